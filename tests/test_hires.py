"""Hires. fix on the one generation path: against diffusers' own txt2img then img2img pipelines on the same tiny
weights, seeds and sampler (a latent mode, and an image upscaler); A1111's hires size, infotext and paste; the API
(A1111's fields, /latent-upscale-modes, webuiapi's call); the demo model keeping its scene at twice the size."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import webuiapi
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from tests.requests import hires_request
from tests.conftest import diffusers_folder, make_engine, single_file
from tests.test_api import client  # noqa: F401 (the API's fixture)
from tests.test_clients import api, image_of, server  # noqa: F401 (a live server and webuiapi's client of it)
from tests.test_img2img import NEGATIVE, PROMPT, SEEDS, STEPS, as_array, latent_mean, ui  # noqa: F401 (fixtures)
from tests.test_forecast import planned, record_phases
from tests.test_memory import simulated_engine
from webui.cli import parse_args
from webui.demo.shapes import all_scenes, read_picture
from webui.engine.engine import Engine
from webui.engine.hires import hires_size
from webui.engine.infotext import parse_infotext, request_fields
from webui.engine.request import GenerationRequest
from webui.engine.sampling.samplers import SamplerRegistry
from webui.engine.sampling.steps import DenoiseSteps
from webui.errors import UserError
from webui.settings import AppConfig


def generators() -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in SEEDS]


def diffusers_hires(folder, engine, sampler: str, schedule: str, upscaler: str, strength: float,
                    second=None) -> np.ndarray:
    """diffusers' txt2img at 64², its latents interpolated (or its images resized with Lanczos) to 128², then its
    img2img there (``second``: another model's folder for it): the seeds drawn again for the second pass, as A1111
    does."""
    config = engine.models.current.scheduler_config
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SamplerRegistry().make_scheduler(sampler, schedule, config, seed=SEEDS)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0,
                  num_images_per_prompt=len(SEEDS))
    if upscaler == "Latent":
        latents = pipe(**common, width=64, height=64, generator=generators(), output_type="latent").images
        image = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear")
    else:
        image = [i.resize((128, 128), Image.Resampling.LANCZOS)
                 for i in pipe(**common, width=64, height=64, generator=generators()).images]
    img2img = (StableDiffusionImg2ImgPipeline(**pipe.components) if second is None else
               StableDiffusionImg2ImgPipeline.from_pretrained(second, torch_dtype=torch.float32, local_files_only=True,
                                                              safety_checker=None))
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = SamplerRegistry().make_scheduler(sampler, schedule, config, seed=SEEDS)
    run = DenoiseSteps.img2img(STEPS, strength, False).run  # diffusers runs int(strength x steps): A1111's + 1
    out = img2img(**common, image=image, strength=(run + 0.5) / STEPS, generator=generators())
    return as_array(out.images)


@pytest.mark.parametrize("sampler,schedule,upscaler", [("Euler a", "Automatic", "Latent"),
                                                       ("DPM++ 2M", "Karras", "Latent"),
                                                       ("Euler", "Automatic", "Lanczos")])
def test_same_image_as_diffusers_txt2img_then_img2img(tmp_path, sd1_file, sd1_folder, latent_mean, sampler,
                                                      schedule, upscaler):
    engine = make_engine(tmp_path, sd1_file)
    result = engine.txt2img(hires_request(sd1_file.name, sampler_name=sampler, scheduler=schedule,
                                          hr_upscaler=upscaler))
    ours = as_array(result.images)
    ref = diffusers_hires(sd1_folder, engine, sampler, schedule, upscaler, 0.6)
    assert ours.shape == ref.shape == (2, 128, 128, 3)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
    params = parse_infotext(result.infotexts[0])
    assert (params["Size"], params["Hires upscale"], params["Hires upscaler"], params["Denoising strength"]) == (
        "64x64", "2", upscaler, "0.6")
    assert {"encode", "denoise", "hires upscale", "hires denoise", "decode"} <= result.timings.keys()


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a_second_checkpoint_for_the_hires_pass(tmp_path, sd1_file, sd1_folder, latent_mean, upscaler):
    """hr_checkpoint_name: the first pass on the request's checkpoint, the second on the other one (A1111's order: an
    image upscaler's input decoded by the first model, encoded by the second), equal to diffusers' txt2img then the
    other model's img2img; the first model is current again after it, and the infotext names the other one."""
    other, other_folder = single_file("sd1", seed=2), diffusers_folder("sd1", seed=2)
    engine = make_engine(tmp_path, sd1_file, other)
    fields = dict(sampler_name="Euler", hr_upscaler=upscaler)
    result = engine.txt2img(hires_request(sd1_file.name, **fields, hr_checkpoint_name=other.name))
    ref = diffusers_hires(sd1_folder, engine, "Euler", "Automatic", upscaler, 0.6, second=other_folder)
    ours = as_array(result.images)
    assert ours.shape == ref.shape == (2, 128, 128, 3)
    assert np.abs(ours - ref).max() <= 1
    assert engine.models.current.info.name == sd1_file.name
    two = as_array(engine.txt2img(hires_request(sd1_file.name, **fields, n_iter=2,
                                                hr_checkpoint_name=other.name)).images)
    later = engine.txt2img(hires_request(sd1_file.name, **fields, seed=SEEDS[0] + len(SEEDS),
                                         hr_checkpoint_name=other.name))
    assert np.array_equal(two[:2], ours) and np.array_equal(two[2:], as_array(later.images)), (
        "each batch: the first pass on the first model, the second on the other")
    same = engine.txt2img(hires_request(sd1_file.name, **fields))
    assert np.abs(as_array(same.images)[:2] - ref).mean() > 1, "the other checkpoint made a difference"
    title = parse_infotext(result.infotexts[0])["Hires checkpoint"]
    assert title == engine.models.title(engine.models.find(other.name)) and title.startswith(other.name + " [")
    assert request_fields(result.infotexts[0])["hr_checkpoint_name"] == title
    assert "Hires checkpoint" not in parse_infotext(same.infotexts[0])


def test_a_hires_checkpoint_of_another_family_needs_an_image_upscaler(tmp_path, sd1_file, sdxl_file):
    """SD1.5's latents are not SDXL's: a latent upscale to an SDXL checkpoint is refused before anything runs; through
    an image upscaler (decoded by SD1.5's VAE, encoded by SDXL's) it runs."""
    engine = make_engine(tmp_path, sd1_file, sdxl_file)
    with pytest.raises(UserError, match="does not read") as refused:
        engine.txt2img(hires_request(sd1_file.name, hr_checkpoint_name=sdxl_file.name))
    assert refused.value.field == "hr_checkpoint_name"
    result = engine.txt2img(hires_request(sd1_file.name, hr_checkpoint_name=sdxl_file.name, hr_upscaler="Lanczos",
                                          batch_size=1))
    assert result.images[0].size == (128, 128) and engine.models.current.info.name == sd1_file.name
    assert parse_infotext(result.infotexts[0])["Hires checkpoint"].startswith(sdxl_file.name)


def test_hires_sizes_as_a1111():
    """By a factor; to a width (the height from the aspect) or a height; to both: the first pass scaled to cover
    them and its middle kept. Sides down to the model's multiple; above the largest side refused, naming it."""
    def size(**fields):
        found = hires_size(GenerationRequest(width=512, height=768, **fields), 8, 4096)
        return found.upscaled, found.target

    assert size(hr_scale=1.5) == ((768, 1152), (768, 1152))
    assert size(hr_scale=1.3) == ((664, 998 // 8 * 8), (664, 992))
    assert size(hr_resize_x=1024) == ((1024, 1536), (1024, 1536))
    assert size(hr_resize_y=1024) == ((680, 1024), (680, 1024))
    assert size(hr_resize_x=1024, hr_resize_y=1024) == ((1024, 1536), (1024, 1024))
    assert hires_size(GenerationRequest(width=512, height=512, hr_scale=1.3), 16, 4096).target == (656, 656)
    with pytest.raises(UserError) as error:
        hires_size(GenerationRequest(width=1024, height=1024, hr_scale=4), 8, 2048)
    assert error.value.field == "hr_scale"


def test_resize_to_both_sides_crops_the_middle(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    result = engine.txt2img(hires_request(sd1_file.name, hr_resize_x=96, hr_resize_y=128, batch_size=1, steps=3))
    assert result.images[0].size == (96, 128)
    params = parse_infotext(result.infotexts[0])
    assert params["Hires resize"] == "96x128" and "Hires upscale" not in params


def test_the_second_pass_has_its_own_steps_sampler_prompt_and_cfg(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    fields = dict(batch_size=1, hr_second_pass_steps=3, hr_sampler_name="DDIM", hr_scheduler="Uniform",
                  hr_prompt="a blue square", hr_negative_prompt="red", hr_cfg=4.0)
    result = engine.txt2img(hires_request(sd1_file.name, **fields))
    params = parse_infotext(result.infotexts[0])
    assert (params["Hires steps"], params["Hires sampler"], params["Hires schedule type"], params["Hires prompt"],
            params["Hires negative prompt"], params["Hires CFG Scale"]) == ("3", "DDIM", "Uniform", "a blue square",
                                                                            "red", "4")
    same = engine.txt2img(hires_request(sd1_file.name, batch_size=1, hr_sampler_name="Use same sampler",
                                        hr_scheduler="Use same scheduler"))
    assert "Hires sampler" not in parse_infotext(same.infotexts[0])
    assert (as_array(engine.txt2img(hires_request(sd1_file.name, **fields)).images) == as_array(result.images)).all()
    assert np.abs(as_array(same.images) - as_array(result.images)).mean() > 1
    pasted = request_fields(result.infotexts[0])
    assert pasted["enable_hr"] and (pasted["hr_scale"], pasted["hr_second_pass_steps"], pasted["hr_sampler_name"],
                                    pasted["hr_prompt"], pasted["hr_cfg"]) == (2.0, 3, "DDIM", "a blue square", 4.0)
    assert "enable_hr" not in request_fields("a cat\nSteps: 3, Seed: 1, Size: 64x64")


@pytest.mark.parametrize("change,field", [
    (dict(hr_upscaler="Nonesuch"), "hr_upscaler"), (dict(hr_scale=20), "hr_scale"), (dict(hr_scale=64), "hr_scale"),
    (dict(hr_sampler_name="Nonesuch"), "hr_sampler_name"), (dict(hr_checkpoint_name="other.safetensors"),
                                                            "hr_checkpoint_name"),
    (dict(hr_second_pass_steps=-1), "hr_second_pass_steps"), (dict(denoising_strength=2), "denoising_strength"),
    (dict(hr_resize_x=100000), "hr_resize_x"), (dict(hr_cfg=-1), "hr_cfg")])
def test_bad_hires_input_names_the_field(tmp_path, sd1_file, change, field):
    engine = make_engine(tmp_path, sd1_file)
    with pytest.raises(UserError) as error:
        engine.txt2img(hires_request(sd1_file.name, **change))
    assert error.value.field == field


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_the_forecast_plans_the_hires_pass(tmp_path, sd1_file, upscaler):
    """The second pass is a phase of its own, planned with its activation estimate as it then runs; an image
    upscaler's decode and encode too, and its time is learnt (per upscaler) and forecast from the next job on."""
    engine = simulated_engine(tmp_path, sd1_file)
    job = hires_request(sd1_file.name, hr_upscaler=upscaler, batch_size=1)
    engine.txt2img(job)
    forecast = engine.forecast(job)
    seen = record_phases(engine)
    result = engine.txt2img(job)
    names = [name for name, _ in forecast.first]
    image_upscaler = upscaler == "Lanczos"
    tail = ["denoising", *(["hires upscale"] * 2 if image_upscaler else []), "hires denoising", "decode"]
    assert names[-len(tail):] == tail
    hires = dict(forecast.first)["hires denoising"]
    assert hires.activation > dict(forecast.first)["denoising"].activation
    assert forecast.shape.hires_steps == DenoiseSteps.img2img(STEPS, 0.6, False).run
    assert planned(forecast) == seen
    assert (forecast.shape.upscaler == upscaler) == image_upscaler and forecast.seconds is not None
    assert (upscaler in forecast.rates.upscale_seconds_per_pixel) == image_upscaler
    again = engine.forecast(job)
    assert again.seconds == pytest.approx(sum(result.timings.values()), rel=0.9), "the same order as measured"
    if image_upscaler:
        other = engine.forecast(hires_request(sd1_file.name, hr_upscaler="Nearest", batch_size=1))
        assert other.seconds is None and "known after" in other.summary(), "not measured for that upscaler yet"


def test_the_api_runs_hires_fix(client):
    """A1111's txt2img body with enable_hr: its fields are read (not ignored); without enable_hr they are ignored
    and named, as A1111 reads them only with it; /latent-upscale-modes lists the latent modes."""
    body = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 64, "seed": 5, "enable_hr": True, "hr_scale": 1.5,
            "hr_upscaler": "Latent (nearest-exact)", "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    assert image_of(reply.json()["images"][0]).size == (96, 96)
    info = json.loads(reply.json()["info"])
    assert "Hires upscaler: Latent (nearest-exact)" in info["infotexts"][0] and not info["ignored_fields"]
    reply = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": False})
    assert image_of(reply.json()["images"][0]).size == (64, 64)
    assert {"hr_scale", "hr_upscaler", "denoising_strength"} <= set(json.loads(reply.json()["info"])["ignored_fields"])
    reply = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "4x-Nonesuch"})
    assert reply.status_code == 422 and reply.json()["field"] == "hr_upscaler"
    names = [mode["name"] for mode in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert names[:2] == ["Latent", "Latent (antialiased)"] and "Latent (nearest-exact)" in names


def test_webuiapi_hires_fix(api):
    """webuiapi's txt2img with enable_hr, as its README calls it (its HiResUpscaler names)."""
    result = api.txt2img(prompt="a large red circle on the left, blue background", width=128, height=128, seed=3,
                         enable_hr=True, hr_scale=1.5, hr_upscaler=webuiapi.HiResUpscaler.Latent,
                         denoising_strength=0.5, hr_second_pass_steps=2)
    assert result.image.size == (192, 192)
    assert parse_infotext(result.image.info["parameters"])["Hires upscale"] == "1.5"
    dusk = api.txt2img(prompt="a large red circle on the left, blue background", width=128, height=128, seed=3,
                       enable_hr=True, hr_scale=1.5, hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.5,
                       hr_second_pass_steps=2, hr_checkpoint_name="demo-shapes-dusk.safetensors")
    assert parse_infotext(dusk.image.info["parameters"])["Hires checkpoint"].startswith("demo-shapes-dusk")
    assert np.abs(np.asarray(dusk.image, dtype=int) - np.asarray(result.image, dtype=int)).mean() > 1


def test_the_txt2img_tab_runs_hires_fix(ui):
    _preview, gallery, status, infotext, *_ = ui.predict(
        prompt="a large red circle on the left, blue background", width=64, height=64, steps=3, seed=3,
        enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5,
        api_name="/txt2img")
    assert "Done" in status and Image.open(gallery[0]["image"]).size == (128, 128)
    assert parse_infotext(infotext)["Hires steps"] == "2"


def test_the_demo_model_keeps_its_scene_at_twice_the_size(tmp_path):
    """Hires. fix on the built-in model, measured: the picture at 256² (its training size is 128²) shows the scene
    the prompt names, as the first pass did (A1111's reason for hires. fix: the model draws at the size it knows)."""
    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path), "--device", "cpu"])))
    scenes = random.Random(5).sample(all_scenes(), 6)
    matched = []
    for i, scene in enumerate(scenes):
        result = engine.txt2img(GenerationRequest(
            prompt=scene.caption(), seed=i, width=128, height=128, steps=12, cfg_scale=7, sampler_name="DPM++ 2M",
            save_images=False, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.55))
        assert result.images[0].size == (256, 256)
        matched.append(read_picture(result.images[0].resize((128, 128), Image.Resampling.BOX)).matches(scene))
    assert sum(matched) >= 5, matched


def test_an_xyz_plot_over_hires_axes(client):
    """A1111's Hires steps (index 5) and Denoising (its label) axes over hires. fix: a cell each, the infotext says
    each cell's value."""
    from tests.test_api import PLOT, xyz_args

    body = {**PLOT, "steps": 2, "enable_hr": True, "hr_scale": 1.5, "include_lone_images": True,
            "script_args": xyz_args((5, "1, 2", None), ("Denoising", "0.3, 0.6", None), include_lone_images=True)}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    texts = json.loads(reply.json()["info"])["infotexts"][1:]
    cells = {(parse_infotext(t)["Hires steps"], parse_infotext(t)["Denoising strength"]) for t in texts}
    assert cells == {("1", "0.3"), ("2", "0.3"), ("1", "0.6"), ("2", "0.6")}
