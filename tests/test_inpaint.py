"""Inpainting on the one generation path: against diffusers' own Inpaint pipelines on the same tiny weights, seed
and sampler (a model that is not for inpainting, an inpainting model's 9-channel UNet, SD3 and Flux); A1111's mask
handling (blur, invert, only masked, masked content); the demo model repainting only what is masked; the API in
A1111's shape, with its own tests' requests and webuiapi's."""
from __future__ import annotations

import dataclasses
import json
import random
import sys

import numpy as np
import pytest
import torch
from diffusers import FluxInpaintPipeline, StableDiffusion3InpaintPipeline, StableDiffusionInpaintPipeline
from diffusers import StableDiffusionXLInpaintPipeline
from gradio_client import handle_file
from PIL import Image

from tests.requests import BOX, inpaint_request, mask_picture
from tests.conftest import diffusers_folder, make_engine, single_file
from tests.test_api import client  # noqa: F401 (the API's fixture)
from tests.test_clients import api, image_of, server  # noqa: F401 (a live server and webuiapi's client of it)
from tests.test_flow_pipelines import engine_for, files, parts  # noqa: F401 (the flow models' fixtures)
from tests.test_img2img import (NEGATIVE, PROMPT, SEEDS, STEPS, WEBUIAPI_BODY, as_array, b64, canvas, flow_reference,
                                init_picture, latent_mean, request, ui)  # noqa: F401 (latent_mean, ui: fixtures)
from tests.test_sampling import NEVER, REGISTRY, SD15, fake_unet, generators, noise
from webui.cli import parse_args
from webui.demo.shapes import COLOURS, POSITIONS, SIZES, all_scenes, draw, read_picture, to_pil
from webui.engine.engine import Engine
from webui.engine.infotext import parse_infotext, request_fields
from webui.engine.inpaint import InpaintOptions, fill, fit_aspect, masked_region, prepare, read_mask
from webui.engine.request import GenerationRequest
from webui.engine.sampling.ksampling import GuidedDenoiser, sample
from webui.engine.sampling.samplers import SamplerRegistry
from webui.engine.sampling.steps import DenoiseSteps, InitLatents
from webui.errors import UserError
from webui.settings import AppConfig



def with_original_kept(images: np.ndarray, mask: Image.Image = None) -> np.ndarray:
    """diffusers' images with the original where the mask keeps it, as the app (and A1111) lays it over them."""
    masked = np.asarray(mask or mask_picture())[None, ..., None] > 127
    return np.where(masked, images, as_array([init_picture()] * len(images)))


def diffusers_inpaint(cls, folder, engine, sampler: str, schedule: str, strength: float) -> np.ndarray:
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.scheduler = SamplerRegistry().make_scheduler(sampler, schedule, engine.models.current.scheduler_config,
                                                      seed=SEEDS)
    pipe.set_progress_bar_config(disable=True)
    run = DenoiseSteps.img2img(STEPS, strength, False).run  # diffusers runs int(strength x steps): A1111's + 1
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init_picture(), mask_image=mask_picture(),
               strength=(run + 0.5) / STEPS, num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64,
               num_images_per_prompt=len(SEEDS), generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS])
    return with_original_kept(as_array(out.images))


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ref - as_array([init_picture()] * len(ref))).mean() > 5, "the reference kept the init image"
    diff = np.abs(ours - ref)  # (rounding: a level or two where a float32 sum comes out another way)
    assert diff.max() <= 2 and diff.mean() < 0.25, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"


@pytest.mark.parametrize("family,sampler,schedule,strength", [
    ("sd1", "Euler a", "Automatic", 0.6), ("sd1", "DPM++ 2M", "Karras", 0.75), ("sd1", "DDIM", "Automatic", 0.5),
    ("sdxl", "DPM++ 2M", "Automatic", 0.6)])
def test_same_image_as_diffusers_inpaint(tmp_path, latent_mean, family, sampler, schedule, strength):
    """A model that is not for inpainting: the kept part put back after each step at its noise level."""
    checkpoint = single_file(family)
    engine = make_engine(tmp_path, checkpoint)
    result = engine.img2img(inpaint_request(checkpoint.name, sampler_name=sampler, scheduler=schedule,
                                           denoising_strength=strength))
    cls = StableDiffusionXLInpaintPipeline if family == "sdxl" else StableDiffusionInpaintPipeline
    assert_same(as_array(result.images), diffusers_inpaint(cls, diffusers_folder(family), engine, sampler, schedule,
                                                           strength))
    params = parse_infotext(result.infotexts[0])
    assert params["Mask blur"] == "0" and params["Denoising strength"] == str(strength)
    assert "Inpaint area" not in params and "Masked content" not in params  # the whole picture, original: defaults


@pytest.mark.parametrize("sampler,schedule,white", [("Euler a", "Automatic", False), ("DPM++ 2M", "Karras", False),
                                                     ("Euler a", "Automatic", True)])
def test_an_inpainting_model_equals_diffusers(tmp_path, latent_mean, monkeypatch, sampler, schedule, white):
    """A 9-channel UNet (an A1111 single file, known by its first layer's shape) gets the mask and the masked
    picture's latents as extra input, as diffusers' pipeline gives them (a mask of all of it too)."""
    if white:
        monkeypatch.setattr(sys.modules[__name__], "mask_picture", lambda: Image.new("L", (64, 64), 255))
    checkpoint = single_file("sd1", inpainting=True)
    engine = make_engine(tmp_path, checkpoint)
    result = engine.img2img(inpaint_request(checkpoint.name, sampler_name=sampler, scheduler=schedule,
                                            mask=mask_picture()))
    assert engine.models.current.denoiser.config.in_channels == 9
    assert_same(as_array(result.images), diffusers_inpaint(StableDiffusionInpaintPipeline,
                                                           diffusers_folder("sd1", inpainting=True), engine, sampler,
                                                           schedule, 0.6))


def test_an_inpainting_model_draws_in_txt2img_as_a1111_conditions_it(tmp_path, latent_mean):
    """Without a mask a 9-channel UNet is told all of a grey picture is masked (A1111's txt2img conditioning): the
    same images as diffusers' inpainting pipeline with a white mask, from noise. Hires. fix's second pass is
    conditioned the same way at its size: the same as img2img of the first pass resized with a white mask (which
    equals diffusers' pipeline: ``test_an_inpainting_model_equals_diffusers``; at 128² that pipeline's own images move
    by up to 17 levels with the number of CPU threads, so it is not the reference here)."""
    checkpoint = single_file("sd1", inpainting=True)
    engine = make_engine(tmp_path, checkpoint)
    result = engine.txt2img(inpaint_request(checkpoint.name, mask=None, init_images=None, sampler_name="Euler a"))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(diffusers_folder("sd1", inpainting=True),
                                                          torch_dtype=torch.float32, local_files_only=True)
    pipe.scheduler = SamplerRegistry().make_scheduler("Euler a", "Automatic", engine.models.current.scheduler_config,
                                                      seed=SEEDS)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init_picture(), mask_image=Image.new("L", (64, 64), 255),
               strength=1.0, num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64,
               num_images_per_prompt=len(SEEDS), generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS])
    assert np.abs(as_array(result.images) - as_array(out.images)).max() <= 1
    hires = engine.txt2img(inpaint_request(checkpoint.name, mask=None, init_images=None, sampler_name="Euler a",
                                           enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.6))
    white = Image.new("L", (128, 128), 255)
    img2img = [engine.img2img(inpaint_request(checkpoint.name, init_images=[image.resize((128, 128),
                                                                                         Image.Resampling.LANCZOS)],
                                              mask=white, width=128, height=128, seed=seed, batch_size=1,
                                              sampler_name="Euler a", denoising_strength=0.6)).images[0]
               for image, seed in zip(result.images, SEEDS)]
    assert np.abs(as_array(hires.images) - as_array(img2img)).max() <= 1


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_families_equal_diffusers_inpaint(tmp_path, parts, files, latent_mean, monkeypatch, family):
    """diffusers' SD3 inpaint pipeline (0.42) decodes without the VAE's shift factor, which its SD3 txt2img and
    img2img pipelines (and the app) add: the reference's VAE adds it."""
    vae = parts["sd3_vae"]
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, **kw: decode(z + vae.config.shift_factor, **kw))
    name = f"{family}-aio.safetensors"
    engine = engine_for(tmp_path, files, name)
    guidance = dict(cfg_scale=1.0, distilled_cfg_scale=3.5) if family == "flux" else dict(cfg_scale=5.0)
    result = engine.img2img(inpaint_request(name, sampler_name="Euler", denoising_strength=0.6, **guidance))
    run = DenoiseSteps.img2img(STEPS, 0.6, False).run
    masks = [mask_picture()] * len(SEEDS)
    if family == "flux":
        ref = flow_reference(FluxInpaintPipeline, parts, files, family, run, guidance_scale=3.5, mask_image=masks)
    else:
        ref = flow_reference(StableDiffusion3InpaintPipeline, parts, files, family, run, guidance_scale=5.0,
                             negative_prompt=NEGATIVE, mask_image=masks)
    assert_same(as_array(result.images), with_original_kept(ref))


def test_flux_fill_equals_diffusers_fill_pipeline(tmp_path, parts, files, latent_mean):
    """A Flux Fill transformer (its input 384 wide, known from the file) is given the masked picture's latents and
    the mask's 8x8 patches beside the latents, as diffusers' FluxFillPipeline gives them, and nothing is put back
    during denoising: the same images, from noise (denoising strength 1)."""
    from diffusers import FluxFillPipeline

    from tests.test_flow_pipelines import flux_pipeline
    from webui.synthetic.builders import build_flux_transformer
    from webui.synthetic.ldm_export import write_flux_transformer

    fill = build_flux_transformer("tiny", seed=9, fill=True)
    (tmp_path / "models").mkdir()
    path = write_flux_transformer(tmp_path / "models" / "flux-fill.safetensors", fill, torch.float32)
    engine = make_engine(tmp_path / "app", path, extra_args=("--vae-dir", str(files / "VAE"), "--text-encoder-dir",
                                                             str(files / "text_encoder")))
    engine.options.update({"forge_additional_modules": ["ae.safetensors", "clip_l.safetensors",
                                                        "t5xxl_fp32.safetensors"]})
    result = engine.img2img(inpaint_request(path.name, sampler_name="Euler", denoising_strength=1.0, cfg_scale=1.0,
                                            distilled_cfg_scale=3.5))
    assert engine.models.current.denoiser.config.in_channels == 384
    out = flux_pipeline(FluxFillPipeline, parts, files, fill)(prompt=PROMPT, image=init_picture(), mask_image=mask_picture(), height=64, width=64,
               num_inference_steps=STEPS, guidance_scale=3.5, num_images_per_prompt=len(SEEDS), max_sequence_length=256,
               sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)),
               generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS])
    assert_same(as_array(result.images), with_original_kept(as_array(out.images)))
    # txt2img: A1111's conditioning, all of a grey picture masked: the same as img2img with a white mask, from noise
    txt2img = engine.txt2img(inpaint_request(path.name, mask=None, init_images=None, sampler_name="Euler",
                                             cfg_scale=1.0, distilled_cfg_scale=3.5))
    full = engine.img2img(inpaint_request(path.name, mask=Image.new("L", (64, 64), 255), sampler_name="Euler",
                                          denoising_strength=1.0, cfg_scale=1.0, distilled_cfg_scale=3.5))
    assert np.array_equal(as_array(txt2img.images), as_array(full.images))


@pytest.mark.parametrize("name, schedule_type", [("Euler a", "Uniform"), ("DPM++ 2S a", "Karras")])
def test_the_sigma_space_loop_keeps_what_the_mask_keeps(name, schedule_type):
    """The samplers diffusers has no scheduler for: the kept part of the init latents goes into each prediction
    (A1111's CFG denoiser), so the last latents are the init latents there and new where repainted."""
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    repaint = torch.zeros(1, 1, 8, 8)
    repaint[..., 2:6, 3:7] = 1
    start = InitLatents(init, repaint)
    steps = DenoiseSteps.img2img(6, 0.8, False)
    choice = REGISTRY.choose(name, schedule_type)
    out = sample(choice.sampler.ksampler, GuidedDenoiser(fake_unet, SD15, 7.0, False, start),
                 lambda model: choice.sigmas(steps.total, model, False), noise(), [1, 2], generators([1, 2]),
                 choice.eta, NEVER, steps.start, start)
    kept = repaint.expand_as(init) == 0
    assert torch.allclose(out[kept], init[kept], atol=1e-4)
    assert (out[~kept] - init[~kept]).abs().mean() > 0.1


def test_reading_the_mask_as_a1111():
    """White repaints; an RGBA mask with transparency is its opaque part (a drawn layer); invert swaps them; the
    blur spreads across and down by its own amounts."""
    mask = mask_picture()
    assert read_mask(mask, InpaintOptions(blur_x=0, blur_y=0)).getbbox() == BOX
    inverted = np.asarray(read_mask(mask, InpaintOptions(blur_x=0, blur_y=0, invert=True)))
    assert inverted[0, 0] == 255 and inverted[20, 30] == 0
    drawn = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    drawn.paste((255, 255, 255, 255), BOX)
    assert read_mask(drawn, InpaintOptions(blur_x=0, blur_y=0)).getbbox() == BOX
    across = np.asarray(read_mask(mask, InpaintOptions(blur_x=4, blur_y=0)))
    assert across[8, 12] > 0 and across[4, 30] == 0  # spread left of the box, not above it
    assert 0 < across[20, 16] < 255 and across[20, 32] == 255


def test_only_masked_regions_as_a1111():
    """The box around the mask, padded within the picture, then grown to the request's aspect about its centre
    and moved back inside the picture."""
    mask = mask_picture(100, 80, (40, 30, 50, 40))
    assert masked_region(mask, 0) == (40, 30, 50, 40)
    assert masked_region(mask, 45) == (0, 0, 95, 80)
    assert masked_region(Image.new("L", (10, 10)), 4) is None
    assert fit_aspect((40, 30, 50, 40), 64, 32, 100, 80) == (35, 30, 55, 40)  # twice as wide as high
    assert fit_aspect((0, 30, 10, 40), 64, 32, 100, 80) == (0, 30, 20, 40)  # pushed back inside on the left
    assert fit_aspect((90, 0, 100, 80), 64, 64, 100, 80) == (20, 0, 100, 80)  # pushed back inside on the right


def test_fill_paints_the_masked_part_with_the_colours_around_it():
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    picture.paste((30, 30, 200), (32, 0, 64, 64))
    mask = mask_picture(box=(24, 0, 40, 64))
    filled = np.asarray(fill(picture, mask)).astype(int)
    assert (filled[:, :24] == picture.getpixel((0, 0))).all() and (filled[:, 40:] == picture.getpixel((63, 0))).all()
    middle = filled[:, 24:40]
    assert (middle[..., 1] < 60).all() and (middle[..., 0] + middle[..., 2] > 200).all()  # reds and blues, no white
    assert middle[:, 0, 0].mean() > middle[:, -1, 0].mean()  # redder on the red side


def test_prepared_pictures_whole_and_only_masked():
    """The whole picture is resized with the resize mode; only masked cuts the padded region out at the request's
    size and puts each image back at the original's size, the original over it where the mask keeps it."""
    picture = init_picture(96, 64)
    whole = prepare([picture], mask_picture(96, 64), InpaintOptions(blur_x=0, blur_y=0, fill=1, only_masked=False), 0,
                    48, 32)
    assert whole.images[0].size == whole.mask.size == (48, 32) and whole.paste_to is None
    assert whole.finish(Image.new("RGB", (48, 32), "black"), 0).size == (48, 32)
    cut = prepare([picture], mask_picture(96, 64), InpaintOptions(blur_x=0, blur_y=0, fill=1, padding=4), 0, 64, 64)
    x, y, w, h = cut.paste_to
    assert (x, y, w, h) == (12, 4, 40, 40) and cut.images[0].size == (64, 64)
    finished = np.asarray(cut.finish(Image.new("RGB", (64, 64), "black"), 0)).astype(int)
    original = np.asarray(picture).astype(int)
    masked = np.asarray(mask_picture(96, 64)) > 0
    assert finished.shape == (64, 96, 3)
    assert (finished[~masked] == original[~masked]).all() and (finished[masked] == 0).all()


def test_only_masked_through_the_engine(tmp_path, sd1_file):
    """Only masked: the generation runs at the request's size on the region, the image comes back at the
    original's size with everything outside the mask the original's; the infotext says so."""
    engine = make_engine(tmp_path, sd1_file)
    picture, mask = init_picture(96, 80), mask_picture(96, 80, (40, 30, 56, 46))
    result = engine.img2img(request(sd1_file.name, init_images=[picture], mask=mask, mask_blur=0, inpainting_fill=1,
                                    inpaint_full_res=True, inpaint_full_res_padding=8, batch_size=1,
                                    denoising_strength=0.9))
    image = as_array(result.images)[0]
    masked = np.asarray(mask) > 0
    assert image.shape == (80, 96, 3)
    assert (image[~masked] == np.asarray(picture)[~masked]).all()
    assert np.abs(image[masked] - np.asarray(picture)[masked]).mean() > 5
    params = parse_infotext(result.infotexts[0])
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "8"
    assert params["Size"] == "64x64"
    empty = engine.img2img(request(sd1_file.name, init_images=[picture], mask=Image.new("L", (96, 80)),
                                   batch_size=1, steps=2))
    assert empty.images[0].size == (64, 64) and "mask is empty" in empty.notices[0]


@pytest.mark.parametrize("fill_mode", [0, 2, 3])
def test_masked_content_changes_the_start_and_is_reproducible(tmp_path, sd1_file, fill_mode):
    """fill, latent noise and latent nothing start the masked part from something else than the original (seen at
    strength 0, where the start is decoded as it is), the same again for the same seed; latent noise is the seed's."""
    engine = make_engine(tmp_path, sd1_file)
    fields = dict(inpainting_fill=fill_mode, denoising_strength=0.0)
    original = as_array(engine.img2img(inpaint_request(sd1_file.name, denoising_strength=0.0)).images)
    first, again = (engine.img2img(inpaint_request(sd1_file.name, **fields)) for _ in range(2))
    other_seed = as_array(engine.img2img(inpaint_request(sd1_file.name, **fields, seed=99)).images)
    masked = np.asarray(mask_picture()) > 0
    assert (as_array(first.images) == as_array(again.images)).all()
    assert np.abs(as_array(first.images)[:, masked] - original[:, masked]).mean() > 10
    assert (as_array(first.images)[:, ~masked] == original[:, ~masked]).all()
    assert (np.abs(other_seed - as_array(first.images)).mean() > 1) == (fill_mode == 2)
    names = {0: "fill", 2: "latent noise", 3: "latent nothing"}
    assert parse_infotext(first.infotexts[0])["Masked content"] == names[fill_mode]


def test_inverted_mask_repaints_the_rest(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    result = engine.img2img(inpaint_request(sd1_file.name, inpainting_mask_invert=1, denoising_strength=0.9))
    image, picture = as_array(result.images), as_array([init_picture()] * 2)
    masked = np.asarray(mask_picture()) > 0
    assert (image[:, masked] == picture[:, masked]).all() and np.abs(image[:, ~masked] - picture[:, ~masked]).mean() > 5
    assert parse_infotext(result.infotexts[0])["Mask mode"] == "Inpaint not masked"


def test_infotext_gives_the_inpainting_fields_back():
    text = ("a cat\nSteps: 7, Seed: 5, Size: 64x64, Denoising strength: 0.4, Mask blur: 6, Mask mode: Inpaint not "
            "masked, Masked content: latent noise, Inpaint area: Only masked, Masked area padding: 40")
    fields = request_fields(text)
    assert (fields["mask_blur"], fields["inpainting_mask_invert"], fields["inpainting_fill"],
            fields["inpaint_full_res"], fields["inpaint_full_res_padding"]) == (6, 1, 2, 1, 40)
    assert "inpainting_fill" not in request_fields("a cat\nMasked content: sideways")


@pytest.mark.parametrize("change,field", [
    (dict(mask=mask_picture(32, 32)), "mask"), (dict(inpainting_fill=4), "inpainting_fill"),
    (dict(mask_blur=-1), "mask_blur"), (dict(mask_blur=None, mask_blur_x=500), "mask_blur_x"), (dict(resize_mode=3), "resize_mode"),
    (dict(inpaint_full_res_padding=5000), "inpaint_full_res_padding"), (dict(inpainting_mask_invert=2),
                                                                         "inpainting_mask_invert"),
    (dict(mask="a mask"), "mask"), (dict(mask_round="yes"), "mask_round")])
def test_bad_inpainting_input_names_the_field(tmp_path, sd1_file, change, field):
    engine = make_engine(tmp_path, sd1_file)
    with pytest.raises(UserError) as error:
        engine.img2img(inpaint_request(sd1_file.name, **change))
    assert error.value.field == field
    with pytest.raises(UserError) as error:
        engine.txt2img(GenerationRequest(mask=mask_picture(), steps=2, width=64, height=64))
    assert error.value.field in ("mask", "init_images")


def test_the_demo_model_repaints_only_the_masked_shape(tmp_path):
    """Inpainting on the built-in model, measured: the shape masked (a box around it) and the prompt naming another
    colour for it. The shape takes the new colour in its place, the background keeps its own, and nothing outside
    the blurred mask changes."""
    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path), "--device", "cpu"])))
    scenes = [s for s in random.Random(3).sample(all_scenes(), 200) if s.position in ("left", "right")][:12]
    palette = list(COLOURS)
    recoloured, background_kept, outside_same = [], [], []
    for i, (scene, picture) in enumerate(zip(scenes, to_pil(draw(scenes, 128, seed=7)))):
        other = next(c for c in palette[palette.index(scene.colour) + 2:] + palette
                     if c not in (scene.background, scene.colour))
        cx, cy = (round(v * 128) for v in POSITIONS[scene.position])
        reach = round((SIZES[scene.size] + 0.06) * 128)
        box = (cx - reach, cy - reach, cx + reach, cy + reach)
        result = engine.img2img(GenerationRequest(
            prompt=dataclasses.replace(scene, colour=other).caption(), seed=i, width=128, height=128, steps=20,
            cfg_scale=7, sampler_name="DPM++ 2M", save_images=False, init_images=[picture],
            mask=mask_picture(128, 128, box), mask_blur=4, inpainting_fill=1, inpaint_full_res=False,
            denoising_strength=0.9))
        reading = read_picture(result.images[0])
        recoloured.append((reading.colour, reading.position) == (other, scene.position))
        background_kept.append(reading.background == scene.background)
        outside = np.ones((128, 128), bool)
        outside[max(box[1] - 12, 0):box[3] + 12, max(box[0] - 12, 0):box[2] + 12] = False  # the box, its blur
        outside_same.append((np.asarray(result.images[0])[outside] == np.asarray(picture)[outside]).all())
    assert all(outside_same) and sum(background_kept) >= 11, sum(background_kept)  # 12 of 12 measured
    assert sum(recoloured) >= 10, sum(recoloured)  # 12 of 12 measured


def test_the_api_inpaints_with_a_mask(client):
    """A1111's img2img body with a mask (base64): inpainting's fields are read, not ignored; a mask of another size
    is a 422 naming it."""
    body = {**WEBUIAPI_BODY, "init_images": [b64(init_picture())], "mask": b64(mask_picture()), "mask_blur": 0,
            "inpainting_fill": 1, "inpaint_full_res": False, "batch_size": 1, "denoising_strength": 0.9}
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert not {"mask_blur", "inpainting_fill", "inpaint_full_res"} & set(info["ignored_fields"])
    assert "Mask blur: 0" in info["infotexts"][0] and reply.json()["parameters"]["mask"] is None
    image, picture = np.asarray(image_of(reply.json()["images"][0])).astype(int), np.asarray(init_picture()).astype(int)
    masked = np.asarray(mask_picture()) > 0
    assert (image[~masked] == picture[~masked]).all() and np.abs(image[masked] - picture[masked]).mean() > 5
    reply = client.post("/sdapi/v1/img2img", json={**body, "mask": b64(mask_picture(32, 32))})
    assert reply.status_code == 422 and reply.json()["field"] == "mask"
    reply = client.post("/sdapi/v1/img2img", json={**body, "mask": "not an image"})
    assert reply.status_code == 422 and reply.json()["field"] == "mask"


def test_a1111s_own_inpainting_test_requests_work(client):
    """The bodies of A1111's tests/test_img2img.py inpainting tests: a mask (and the same inverted) with its
    defaults (fill, only masked, padding 0, blur 4)."""
    body = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
            "include_init_images": False, "init_images": [b64(init_picture(), prefix="")], "inpaint_full_res": False,
            "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False,
            "mask": b64(mask_picture(), prefix=""), "mask_blur": 4, "n_iter": 1, "negative_prompt": "",
            "override_settings": {}, "prompt": "example prompt", "resize_mode": 0, "restore_faces": False,
            "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a", "seed": -1,
            "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
            "subseed_strength": 0, "tiling": False, "width": 64}
    for change in ({}, {"inpainting_mask_invert": True}, {"inpaint_full_res": True}):
        reply = client.post("/sdapi/v1/img2img", json={**body, **change})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["images"]) == 1


def test_webuiapi_inpaints(api):
    """webuiapi's img2img with a mask_image, as its README's inpainting example calls it."""
    result = api.img2img(images=[init_picture(128, 128)], mask_image=mask_picture(128, 128, (32, 32, 96, 96)),
                         inpainting_fill=1, prompt="a large red circle on the left, green background", width=128,
                         height=128, seed=7, denoising_strength=0.9, mask_blur=2)
    params = parse_infotext(result.image.info["parameters"])
    assert result.image.size == (128, 128) and params["Mask blur"] == "2" and params["Inpaint area"] == "Only masked"
    assert not {"inpainting_fill", "mask_blur"} & set(result.info["ignored_fields"])


def test_the_img2img_tab_inpaints_what_is_painted(ui, tmp_path):
    """Strokes painted on the image are the mask (their layer's opaque part); the Inpainting accordion's fields are
    used; an uploaded mask takes the strokes' place; a mask of another size is refused naming its box."""
    picture, layer = tmp_path / "init.png", tmp_path / "strokes.png"
    init_picture(64, 64).save(picture)
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), BOX)
    strokes.save(layer)
    fields = dict(prompt="a large red circle on the left, blue background", denoising_strength=0.9, width=64,
                  height=64, steps=4, seed=3, mask_blur=0, inpaint_full_res=0, api_name="/img2img")
    _preview, gallery, status, infotext, *_ = ui.predict(init_images=canvas(picture, layer), **fields)
    assert "Done" in status, status
    image, original = np.asarray(Image.open(gallery[0]["image"]).convert("RGB")).astype(int), np.asarray(
        init_picture()).astype(int)
    masked = np.asarray(mask_picture()) > 0
    assert (image[~masked] == original[~masked]).all() and np.abs(image[masked] - original[masked]).mean() > 5
    assert parse_infotext(infotext)["Mask blur"] == "0"
    unpainted = ui.predict(init_images=canvas(picture), **fields)[3]
    assert "Mask blur" not in parse_infotext(unpainted)  # nothing painted: img2img
    upload = tmp_path / "mask.png"
    mask_picture(64, 64, (0, 0, 32, 64)).save(upload)
    _preview, gallery, status, infotext, *_ = ui.predict(init_images=canvas(picture, layer), mask=handle_file(
        str(upload)), **fields)
    image = np.asarray(Image.open(gallery[0]["image"]).convert("RGB")).astype(int)
    assert (image[:, 32:] == original[:, 32:]).all() and np.abs(image[:, :32] - original[:, :32]).mean() > 5
    mask_picture(32, 32).save(upload)
    status = ui.predict(init_images=canvas(picture), mask=handle_file(str(upload)), **fields)[2]
    assert "Mask (white is repainted; instead of painting) (mask): is 32x32" in status, status


def test_a_latent_mask_replaces_the_mask_for_the_latents_only(tmp_path, sd1_file, client):
    """A1111's latent_mask: the latents are kept or repainted by it, taken as it is, while the picture still goes
    back through the mask. Black everywhere keeps every latent: inside the mask the picture is the init image through
    the VAE alone (strength 0). The API reads it with a mask, names it ignored without one, refuses a non-image."""
    engine = make_engine(tmp_path / "app", sd1_file)
    fields = dict(mask=mask_picture(), mask_blur=0, inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9,
                  batch_size=1)
    plain = as_array(engine.img2img(request(None, **fields)).images)
    same = as_array(engine.img2img(request(None, **fields, latent_mask=mask_picture(16, 16, (4, 2, 12, 10)))).images)
    assert np.abs(same - plain).max() <= 1, "the same mask at another size: the same latents"
    kept = as_array(engine.img2img(request(None, **fields, latent_mask=Image.new("L", (8, 8)))).images)
    through_vae = as_array(engine.img2img(request(None, denoising_strength=0.0, batch_size=1)).images)
    masked = np.asarray(mask_picture()) > 0
    assert np.abs(kept[0][masked] - through_vae[0][masked]).max() <= 1
    assert np.abs(plain[0][masked] - through_vae[0][masked]).mean() > 5
    body = {**WEBUIAPI_BODY, "init_images": [b64(init_picture())], "mask": b64(mask_picture()),
            "latent_mask": b64(Image.new("L", (8, 8))), "batch_size": 1}
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200 and "latent_mask" not in json.loads(reply.json()["info"])["ignored_fields"]
    reply = client.post("/sdapi/v1/img2img", json={**body, "mask": None})
    assert reply.status_code == 200 and "latent_mask" in json.loads(reply.json()["info"])["ignored_fields"]
    reply = client.post("/sdapi/v1/img2img", json={**body, "latent_mask": "AAAA"})
    assert reply.status_code == 422 and reply.json()["field"] == "latent_mask"
