"""img2img on the one generation path: against diffusers' own Img2Img pipelines on the same tiny weights, seed and
sampler; A1111's step count, resize modes and infotext; the API route in A1111's shape."""
from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from gradio_client import Client, handle_file
from PIL import Image
from transformers import T5TokenizerFast

from tests.conftest import make_engine
from tests.requests import NEGATIVE, PROMPT, SEEDS, STEPS, init_picture, request
from tests.test_api import client  # noqa: F401 (the API's fixture)
from tests.test_clients import api, image_of, server  # noqa: F401 (a live server and webuiapi's client of it)
from tests.test_flow_pipelines import engine_for, files, parts  # noqa: F401 (the flow models' fixtures)
from tests.test_forecast import planned, record_phases
from tests.test_memory import model_bytes, set_budget, simulated_engine
from tests.test_ui import ui_client
from webui.cli import parse_args
from webui.demo.shapes import COLOURS, all_scenes, draw, read_picture, to_pil
from webui.engine.engine import Engine
from webui.jobs import JobQueue
from webui.settings import AppConfig
from webui.ui import build_ui
from webui.engine.memory.manager import MB
from tests.test_sampling import NEVER, REGISTRY, SD15, fake_unet, generators, noise
from webui.engine.sampling import samplers
from webui.engine.sampling.ksampling import GuidedDenoiser, sample
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.infotext import parse_infotext, request_fields
from webui.engine.init_image import resize
from webui.engine.request import GenerationRequest
from webui.engine.sampling.samplers import SamplerRegistry
from webui.engine.sampling.steps import DenoiseSteps, InitLatents
from webui.errors import UserError



def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(img) for img in images]).astype(int)


@pytest.fixture
def latent_mean(monkeypatch):
    """diffusers' pipelines sample the VAE's latent distribution with the seed's generator; the app takes its mean
    (A1111's sample is from an unseeded generator, its spread tiny): the reference does the same."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("sampler,schedule,strength", [("Euler a", "Automatic", 0.6), ("DPM++ 2M", "Karras", 0.75),
                                                       ("DDIM", "Automatic", 0.5)])
def test_same_image_as_diffusers_img2img(tmp_path, request_fixture_values, latent_mean, family, sampler, schedule,
                                         strength):
    folder, checkpoint = request_fixture_values(f"{family}_folder"), request_fixture_values(f"{family}_file")
    engine = make_engine(tmp_path, checkpoint)
    req = request(checkpoint.name, sampler_name=sampler, scheduler=schedule, denoising_strength=strength)
    result = engine.img2img(req)
    ours = as_array(result.images)
    # A1111 runs int(strength x steps) + 1 steps; diffusers int(strength x steps): the same steps at this strength
    run = DenoiseSteps.img2img(STEPS, strength, False).run
    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.scheduler = SamplerRegistry().make_scheduler(sampler, schedule, engine.models.current.scheduler_config,
                                                      seed=SEEDS)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init_picture(), strength=(run + 0.5) / STEPS,
               num_inference_steps=STEPS, guidance_scale=7.0, num_images_per_prompt=len(SEEDS), output_type="pil",
               generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS])
    ref = as_array(out.images)
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ref - as_array([init_picture()] * 2)).mean() > 5, "the reference kept the init image"
    diff = np.abs(ours - ref)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
    params = parse_infotext(result.infotexts[0])
    assert params["Denoising strength"] == str(strength) and params["Size"] == "64x64" and params["Steps"] == "6"


@pytest.fixture
def request_fixture_values(request):
    return request.getfixturevalue


@pytest.mark.parametrize("name, schedule_type", [("Euler", "Karras"), ("Euler a", "Uniform"), ("Heun", "Karras")])
def test_sigma_space_img2img_matches_the_diffusers_scheduler(name, schedule_type):
    """The sigma-space path (A1111's: init + noise x the first sigma that runs) against diffusers' add_noise and
    steps from the same index of the same schedule."""
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    steps = DenoiseSteps.img2img(6, 0.6, False)
    choice = REGISTRY.choose(name, schedule_type)
    ours = sample(choice.sampler.ksampler, GuidedDenoiser(fake_unet, SD15, 7.0, False),
                  lambda model: choice.sigmas(steps.total, model, False), noise(), [1, 2], generators([1, 2]),
                  choice.eta, NEVER, steps.start, InitLatents(init))
    scheduler = REGISTRY.make_scheduler(name, schedule_type, SD15, seed=[1, 2])
    scheduler.set_timesteps(steps.total)
    start = steps.start * scheduler.order
    scheduler.set_begin_index(start)
    timesteps, gens = scheduler.timesteps[start:], generators([1, 2])
    x = scheduler.add_noise(init, noise(), timesteps[:1].repeat(2))
    for t in timesteps:
        model_output = fake_unet(scheduler.scale_model_input(x, t), t.expand(2).float())
        x = scheduler.step(model_output, t, x, **samplers.step_kwargs(scheduler, gens)).prev_sample
    assert torch.allclose(ours, x, rtol=1e-4, atol=1e-4)


def test_a1111_step_count():
    assert DenoiseSteps.img2img(20, 0.75, False) == DenoiseSteps(20, 16)  # t_enc 15, sigmas[4:]
    assert DenoiseSteps.img2img(20, 1.0, False) == DenoiseSteps(20, 20)
    assert DenoiseSteps.img2img(20, 0.0, False).run == 0
    assert DenoiseSteps.img2img(20, 0.5, True) == DenoiseSteps(40, 20)  # img2img_fix_steps: a longer schedule
    assert DenoiseSteps.img2img(20, 0.5, True).start == 20


def test_seeds_reproduce_and_strength_zero_is_the_round_trip(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    first = as_array(engine.img2img(request(sd1_file.name)).images)
    assert np.array_equal(first, as_array(engine.img2img(request(sd1_file.name)).images))
    other = as_array(engine.img2img(request(sd1_file.name, seed=99)).images)
    assert not np.array_equal(first, other)
    kept = engine.img2img(request(sd1_file.name, denoising_strength=0.0))
    model = engine.models.current
    with torch.inference_mode():
        pixels = torch.from_numpy(np.asarray(init_picture(), dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        round_trip = model.vae.decode(model.vae.encode(pixels).latent_dist.mode()).sample
    expected = ((round_trip / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(as_array(kept.images) - expected[0]).max() <= 1


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_size(tmp_path, sd1_file, mode):
    engine = make_engine(tmp_path, sd1_file)
    result = engine.img2img(request(sd1_file.name, init_images=[init_picture(100, 60)], width=64, height=96,
                                    resize_mode=mode, batch_size=1, steps=2))
    assert [image.size for image in result.images] == [(64, 96)]


def test_resize_modes_follow_a1111():
    wide = init_picture(120, 60)  # 2:1 into a square
    assert resize(wide, 0, 64, 64).size == (64, 64)
    cropped = np.asarray(resize(wide, 1, 64, 64))  # covers the square: the middle of the wide picture
    middle = np.asarray(wide.resize((128, 64), Image.Resampling.LANCZOS))[:, 32:96]
    assert np.abs(cropped.astype(int) - middle).max() <= 1
    filled = np.asarray(resize(wide, 2, 64, 64)).astype(int)  # fits inside: bands above and below, no black
    assert filled[:16].std(axis=0).max() < 1e-6 and filled[0].sum() > 0  # each band column is the edge row stretched
    assert np.abs(filled[16:48] - np.asarray(wide.resize((64, 32), Image.Resampling.LANCZOS))).max() == 0


def test_bad_input_names_the_field(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    cases = {"denoising_strength": dict(denoising_strength=1.5), "resize_mode": dict(resize_mode=4),
             "init_images": dict(init_images=["not an image"])}
    for field, change in cases.items():
        with pytest.raises(UserError) as error:
            engine.img2img(request(sd1_file.name, **change))
        assert error.value.field == field
    with pytest.raises(UserError) as error:
        engine.img2img(request(sd1_file.name, init_images=[init_picture()] * 3))
    assert error.value.field == "init_images"
    with pytest.raises(UserError) as error:
        engine.txt2img(request(sd1_file.name))
    assert error.value.field == "init_images"


def test_one_image_for_each_of_the_batch(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    pictures = [init_picture(), init_picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    result = engine.img2img(request(sd1_file.name, init_images=pictures, batch_size=4, denoising_strength=0.0))
    assert len(result.images) == 2  # the batch is the images, as A1111 makes it
    for picture, image in zip(pictures, result.images):
        alone = engine.img2img(request(sd1_file.name, init_images=[picture], batch_size=1, denoising_strength=0.0))
        assert np.abs(as_array([image]) - as_array(alone.images)).max() <= 1  # batched convolutions round otherwise
    assert not np.array_equal(*as_array(result.images))


def b64(image: Image.Image, prefix: str = "data:image/png;base64,") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return prefix + base64.b64encode(buffer.getvalue()).decode("ascii")


# What webuiapi's img2img sends at its defaults (its payload, with a small size and few steps)
WEBUIAPI_BODY = {
    "resize_mode": 0, "denoising_strength": 0.6, "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": 1, "prompt": PROMPT,
    "styles": [], "seed": SEEDS[0], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0, "batch_size": 2, "n_iter": 1, "steps": STEPS, "cfg_scale": 7.0, "image_cfg_scale": 1.5,
    "width": 64, "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": NEGATIVE, "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "sampler_name": "Euler a",
    "scheduler": "Automatic", "sampler_index": "Euler a", "include_init_images": False, "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_the_api_route_answers_in_a1111s_shape(client, engine):
    reply = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [b64(init_picture())]})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    images = [Image.open(io.BytesIO(base64.b64decode(image))) for image in data["images"]]
    assert [image.size for image in images] == [(64, 64)] * 2
    assert parse_infotext(images[0].info["parameters"])["Denoising strength"] == "0.6"
    assert data["parameters"]["init_images"] is None and data["parameters"]["prompt"] == PROMPT
    info = json.loads(data["info"])
    assert info["denoising_strength"] == 0.6 and info["all_seeds"] == SEEDS
    assert "image_cfg_scale" in info["ignored_fields"]
    direct = engine.img2img(request(None))
    assert np.array_equal(as_array(images), as_array(direct.images)), "the route is the engine's img2img"
    bare = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [b64(init_picture(), prefix="")],
                                                  "include_init_images": True})
    assert bare.status_code == 200 and bare.json()["parameters"]["init_images"]
    assert np.array_equal(as_array([Image.open(io.BytesIO(base64.b64decode(i))) for i in bare.json()["images"]]),
                          as_array(images))


@pytest.mark.parametrize("change, field, words", [
    ({"mask": "AAAA"}, "mask", "base64"),
    ({"init_images": ["not an image"]}, "init_images", "base64"),
    ({"init_images": [base64.b64encode(b"GIF89a but not really").decode()]}, "init_images", "image"),
    ({"init_images": []}, "init_images", "image"),
    ({"denoising_strength": 1.5}, "denoising_strength", "between 0 and 1"),
    ({"denoising_strength": "high"}, "denoising_strength", "number"),
    ({"resize_mode": 7}, "resize_mode", "between 0 and 3"),
    ({"script_name": "loopback"}, "script_name", "img2img script"),
    ({"initial_noise_multiplier": 2.5}, "initial_noise_multiplier", "between 0 and 2.0"),
])
def test_the_api_refuses_bad_input_naming_the_field(client, change, field, words):
    reply = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [b64(init_picture())], **change})
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] == field and words in reply.text


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_the_forecast_plans_the_image_encoding_as_the_job_runs_it(tmp_path, sd1_file, fraction):
    """The init images' VAE encode is a phase of its own, planned by the memory manager as it then runs, once for
    all batches; its time is learnt like the others'."""
    engine = simulated_engine(tmp_path, sd1_file)
    engine.img2img(request(sd1_file.name))
    if fraction is not None:
        set_budget(engine, model_bytes(engine)["denoiser"] * fraction / MB)
    job = request(sd1_file.name, prompt="a blue square", n_iter=2)
    forecast = engine.forecast(job)
    seen = record_phases(engine)
    timings = engine.img2img(job).timings
    assert [name for name, _ in forecast.first] == ["image encoding", "text encoding", "denoising", "decode"]
    assert [name for name, _ in forecast.later] == ["denoising", "decode"]
    assert planned(forecast) == seen
    assert forecast.shape.steps == DenoiseSteps.img2img(STEPS, 0.6, False).run and forecast.shape.init_pixels == 64 * 64
    if fraction is None:  # the same job again: its prompts encoded already, nothing moves
        again = engine.forecast(job)
        assert again.seconds == pytest.approx(timings["encode image"] + timings["denoise"] + timings["decode"])


def flow_reference(cls, parts: dict, files, family: str, run: int, **call) -> np.ndarray:
    """diffusers' Flux / SD3 img2img pipeline over the modules the test files were written from (as
    tests.test_flow_pipelines builds the txt2img ones), at a strength that runs ``run`` of STEPS steps."""
    clip_l = copy.deepcopy(parts["clip_l"])
    tokenizer_t5 = T5TokenizerFast.from_pretrained(files / "text_encoder" / "t5_tokenizer", local_files_only=True)
    if family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = cls(scheduler=scheduler, vae=parts["flux_vae"], tokenizer=clip_tokenizer(),
                   text_encoder=clip_l.text_model if hasattr(clip_l, "text_model") else clip_l,
                   text_encoder_2=parts["t5"], tokenizer_2=tokenizer_t5, transformer=parts["flux"])
    else:
        with torch.no_grad():  # SD3's files carry CLIP-L without a projection: diffusers' identity
            clip_l.text_projection.weight.copy_(torch.eye(clip_l.config.hidden_size))
        pipe = cls(transformer=parts["sd3"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=parts["sd3_vae"],
                   text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=parts["clip_g"],
                   tokenizer_2=clip_tokenizer("!"), text_encoder_3=parts["t5"], tokenizer_3=tokenizer_t5)
    pipe.set_progress_bar_config(disable=True)
    # diffusers' flow img2img runs N - int(N - strength x N) steps; A1111's count is the engine's
    # SD3's pipeline encodes image i for generator i: the init image once for each
    out = pipe(prompt=PROMPT, image=[init_picture()] * len(SEEDS), strength=(run - 0.5) / STEPS, width=64, height=64,
               num_inference_steps=STEPS, num_images_per_prompt=len(SEEDS), max_sequence_length=256,
               sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)), generator=[torch.Generator("cpu").manual_seed(s)
                                                                          for s in SEEDS], **call)
    return as_array(out.images)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_families_equal_diffusers_img2img(tmp_path, parts, files, latent_mean, family):
    name = f"{family}-aio.safetensors"
    engine = engine_for(tmp_path, files, name)
    guidance = dict(cfg_scale=1.0, distilled_cfg_scale=3.5) if family == "flux" else dict(cfg_scale=5.0)
    result = engine.img2img(request(name, sampler_name="Euler", denoising_strength=0.5, **guidance))
    run = DenoiseSteps.img2img(STEPS, 0.5, False).run
    if family == "flux":
        ref = flow_reference(FluxImg2ImgPipeline, parts, files, family, run, guidance_scale=3.5)
    else:
        ref = flow_reference(StableDiffusion3Img2ImgPipeline, parts, files, family, run, guidance_scale=5.0,
                             negative_prompt=NEGATIVE)
    ours = as_array(result.images)
    assert ours.shape == ref.shape == (2, 64, 64, 3) and ref.std() > 5
    diff = np.abs(ours - ref)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
    assert parse_infotext(result.infotexts[0])["Denoising strength"] == "0.5"


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Client:
    """The web UI over the demo model, as tests.test_ui serves it."""
    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path_factory.mktemp("data"))])))
    with ui_client(engine) as client:
        yield client


def canvas(background, *layers) -> dict:
    """The img2img canvas's value as a client sends it: the image, and the layers painted on it."""
    return {"background": handle_file(str(background)), "layers": [handle_file(str(layer)) for layer in layers],
            "composite": None}


def test_the_img2img_tab_generates_from_its_image(ui, tmp_path):
    path = tmp_path / "init.png"
    init_picture(100, 60).save(path)
    _preview, gallery, status, infotext, *_plots = ui.predict(
        prompt="a large red circle on the left, blue background", init_images=canvas(path), resize_mode=1,
        denoising_strength=0.5, width=64, height=96, steps=4, seed=3, api_name="/img2img")
    assert "Done" in status and len(gallery) == 1
    assert Image.open(gallery[0]["image"]).size == (64, 96)
    assert parse_infotext(infotext)["Denoising strength"] == "0.5" and parse_infotext(infotext)["Steps"] == "4"
    _preview, gallery, status, *_ = ui.predict(prompt="no image", steps=2, width=64, height=64, api_name="/img2img")
    assert "(init_images): img2img needs an init image" in status  # refused, naming the field by its label


def test_png_info_sends_parameters_and_image_to_img2img():
    fields = request_fields("a cat\nSteps: 7, Sampler: Euler, Seed: 5, Size: 64x96, Denoising strength: 0.4")
    assert fields["denoising_strength"] == 0.4 and fields["steps"] == 7


def test_the_demo_model_recolours_the_background_and_keeps_the_shape(tmp_path):
    """img2img on the built-in model, measured: drawn pictures, the prompt naming another background colour. At
    strength 0.85 the background takes the prompt's colour and the shape keeps its colour and place (15 of 16 each,
    measured); at 0.5 the picture keeps its own background."""
    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path), "--device", "cpu"])))
    scenes = random.Random(11).sample(all_scenes(), 16)
    palette = list(COLOURS)
    recoloured, kept, unchanged = [], [], []
    for i, (scene, init) in enumerate(zip(scenes, to_pil(draw(scenes, 128, seed=5)))):
        other = next(c for c in palette[palette.index(scene.background) + 3:] + palette
                     if c not in (scene.background, scene.colour))
        fields = dict(prompt=dataclasses.replace(scene, background=other).caption(), seed=i, width=128, height=128,
                      steps=20, cfg_scale=7, sampler_name="DPM++ 2M", save_images=False, init_images=[init])
        reading = read_picture(engine.img2img(GenerationRequest(**fields, denoising_strength=0.85)).images[0])
        recoloured.append(reading.background == other)
        kept.append((reading.colour, reading.position) == (scene.colour, scene.position))
        if i < 4:
            light = read_picture(engine.img2img(GenerationRequest(**fields, denoising_strength=0.5)).images[0])
            unchanged.append(light.matches(scene))
    assert sum(recoloured) >= 13 and sum(kept) >= 13, (sum(recoloured), sum(kept))
    assert all(unchanged)


def test_a1111s_own_img2img_test_request_works(client):
    """The body of A1111's tests/test_img2img.py (its simple request): inpainting's fields without a mask, which
    A1111 does not read then, are ignored and named."""
    body = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
            "include_init_images": False, "init_images": [b64(init_picture(), prefix="")], "inpaint_full_res": False,
            "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
            "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
            "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
            "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
            "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}
    for change in ({}, {"resize_mode": 1}, {"resize_mode": 2}, {"resize_mode": 3}, {"include_init_images": True}):
        reply = client.post("/sdapi/v1/img2img", json={**body, **change})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["images"]) == 1
    ignored = json.loads(reply.json()["info"])["ignored_fields"]
    assert {"inpaint_full_res", "inpainting_mask_invert", "mask_blur"} <= set(ignored)


def test_webuiapi_img2img_with_its_defaults(api):
    """webuiapi's img2img (its payload at its defaults: data: URLs, inpainting's fields, image_cfg_scale 1.5) against
    a live server."""
    result = api.img2img(images=[init_picture(128, 128)], prompt="a large red circle on the left, green background",
                         width=128, height=128, seed=7, denoising_strength=0.5)
    assert result.image.size == (128, 128) and result.info["all_seeds"] == [7]
    assert result.info["denoising_strength"] == 0.5
    assert parse_infotext(result.image.info["parameters"])["Denoising strength"] == "0.5"
    assert {"image_cfg_scale", "inpainting_fill"} <= set(result.info["ignored_fields"])


def test_the_memory_trace_names_the_image_encoding(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    timeline = engine.img2img(request(sd1_file.name)).memory_timeline
    assert [p.name for p in timeline.phases] == ["loading", "VAE encode", "text encoding", "denoising", "VAE decode"]


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning", "ignore:Should have:UserWarning")  # as test_sampling
def test_every_sampler_runs_img2img(tmp_path, sd1_file):
    """Each sampler from the init latents, diffusers' or sigma-space (DPM fast and adaptive within the part of the
    schedule that runs, as A1111): it runs its steps and changes the picture, less at a lower strength."""
    engine = make_engine(tmp_path, sd1_file)
    kept = as_array(engine.img2img(request(sd1_file.name, denoising_strength=0.0, batch_size=1)).images)
    for name in engine.sampler_names():
        light, strong = (as_array(engine.img2img(request(sd1_file.name, sampler_name=name, denoising_strength=s,
                                                         batch_size=1, steps=3)).images) for s in (0.4, 0.9))
        assert 0 < np.abs(light - kept).mean() < np.abs(strong - kept).mean(), name
    with pytest.raises(UserError) as error:  # one step at the lowest noise level: no interval to choose steps in
        engine.img2img(request(sd1_file.name, sampler_name="DPM fast", denoising_strength=0.1, steps=3))
    assert error.value.field == "denoising_strength"


def test_send_to_img2img_takes_the_picked_image_and_its_parameters(tmp_path):
    """A gallery's Send to img2img (txt2img's and img2img's own): the picked image becomes the init image, its
    infotext fills the form (denoising strength too), and the img2img tab shows."""
    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path)])))
    demo = build_ui(engine, JobQueue(engine))
    sends = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "send"]
    assert len(sends) == 2
    picked = tmp_path / "picked.png"
    init_picture().save(picked)
    texts = ["a cat\nSteps: 7, Seed: 5", "a dog\nSteps: 9, Sampler: Euler, Seed: 6, Size: 64x96, Denoising strength: 0.4"]
    *updates, tab = sends[0]([(str(tmp_path / "other.png"), None), (str(picked), None)], texts, 1)
    values = [update.get("value") for update in updates]
    assert str(picked) in values and "a dog" in values and 0.4 in values and 96 in values and "Euler" in values
    assert tab.selected == "img2img"
    assert all("value" not in update for update in sends[1](None, [], 0)[:-1]), "no image yet: nothing changes"


def test_resize_by_sets_the_size_from_the_image():
    """A1111's Resize by: the init image's size times the scale, whole multiples of 8 within the limits."""
    from webui.ui.img2img import resized_by

    width, height = resized_by([init_picture(300, 200)], 1.5, 4096)
    assert (width["value"], height["value"]) == (448, 296)
    assert [u["value"] for u in resized_by([init_picture(300, 200)], 0.05, 4096)] == [64, 64]
    assert [u["value"] for u in resized_by([init_picture(3000, 2000)], 4, 4096)] == [4096, 4096]
    assert all("value" not in u for u in resized_by(None, 2, 4096))


def test_the_initial_noise_multiplier_scales_only_the_starting_noise():
    """A1111's initial_noise_multiplier: img2img starts from init + noise x multiplier x the first sigma; the noise of
    later steps is the sampler's own. The same as handing the sampler noise already scaled."""
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    steps = DenoiseSteps.img2img(6, 0.6, False)
    choice = REGISTRY.choose("Euler a", "Automatic")

    def run(start_noise, multiplier):
        return sample(choice.sampler.ksampler, GuidedDenoiser(fake_unet, SD15, 7.0, False),
                      lambda model: choice.sigmas(steps.total, model, False), start_noise, [1, 2], generators([1, 2]),
                      choice.eta, NEVER, steps.start, InitLatents(init, noise_multiplier=multiplier))

    scaled = run(noise(), 0.6)
    assert torch.equal(scaled, run(noise() * 0.6, 1.0))
    assert not torch.allclose(scaled, run(noise(), 1.0))


def test_the_noise_multiplier_through_the_engine_and_the_api(tmp_path, sd1_file, client):
    """A request's multiplier (else the option's) changes the image, is written in the infotext as A1111 writes it
    ("Noise multiplier") and read back by a paste; txt2img has none."""
    engine = make_engine(tmp_path / "app", sd1_file)
    plain = engine.img2img(request(None))
    half = engine.img2img(request(None, initial_noise_multiplier=0.5))
    assert np.abs(as_array(half.images) - as_array(plain.images)).mean() > 1
    assert "Noise multiplier" not in plain.infotexts[0]
    assert parse_infotext(half.infotexts[0])["Noise multiplier"] == "0.5"
    assert request_fields(half.infotexts[0])["initial_noise_multiplier"] == 0.5
    engine.options.update({"initial_noise_multiplier": 0.5})
    assert np.array_equal(as_array(engine.img2img(request(None)).images), as_array(half.images)), "the option's"
    assert "Noise multiplier" not in engine.txt2img(request(None, init_images=None)).infotexts[0]
    reply = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [b64(init_picture())],
                                                   "initial_noise_multiplier": 0.8})
    assert reply.status_code == 200 and "Noise multiplier: 0.8" in json.loads(reply.json()["info"])["infotexts"][0]


def test_an_xyz_plot_over_img2img(client, engine):
    """The X/Y/Z plot of an img2img body (A1111's img2img script): each cell is an img2img of the init image, the
    grid saved with img2img's grids; /scripts and /script-info list it for img2img."""
    from tests.test_api import xyz_args

    body = {**WEBUIAPI_BODY, "init_images": [b64(init_picture())], "batch_size": 1, "script_name": "X/Y/Z plot",
            "save_images": True,
            "script_args": xyz_args(("Denoising", "0.2, 0.9", None), include_lone_images=True)}
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    grid, low, high = (np.asarray(image_of(data)).astype(int) for data in reply.json()["images"])
    assert grid.shape[1] > low.shape[1] and low.shape == high.shape == (64, 64, 3)
    original = np.asarray(init_picture()).astype(int)
    assert np.abs(low - original).mean() < np.abs(high - original).mean(), "more denoising, further from the image"
    infotexts = json.loads(reply.json()["info"])["infotexts"]
    assert "Denoising strength: 0.2" in infotexts[1] and "Denoising strength: 0.9" in infotexts[2]
    assert any("img2img-grids" in p.parts for p in engine.config.paths.outdir.rglob("*.png")), "with img2img's grids"
    assert "x/y/z plot" in client.get("/sdapi/v1/scripts").json()["img2img"]
