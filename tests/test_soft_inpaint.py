"""Soft inpainting (A1111's built-in extension): the blend by noise level, its length-keeping interpolation, the
difference filter against a per-pixel reading of its definition, and the whole path (engine, infotext and paste,
A1111's alwayson_scripts body, the img2img form)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.requests import ARGS, SOFT_SIZE as SIZE, soft_request
from tests.conftest import make_engine, single_file
from tests.test_api import client  # noqa: F401 (the API's fixture)
from tests.test_flow_pipelines import engine_for, files, parts  # noqa: F401 (the flow models' fixtures)
from tests.test_img2img import WEBUIAPI_BODY, as_array, b64, init_picture
from tests.test_inpaint import inpaint_request
from webui.engine.infotext import parse_infotext, request_fields
from webui.engine.soft_inpaint import SoftInpainting, gaussian_kernel, weighted_percentile_filter
from webui.ui.png_info import form_updates
from webui.ui.txt2img import request_from_form



def latents(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_the_blend_follows_the_mask_and_the_noise_level():
    original, current = latents(1), latents(2)
    soft, ones = SoftInpainting(), torch.ones(1, 1, 8, 8)
    assert torch.allclose(soft.blend(original, current, ones, 5.0), current, atol=1e-4), "repainted: the generation"
    assert torch.allclose(soft.blend(original, current, 0 * ones, 5.0), original, atol=1e-4), "kept: the original"
    half = 0.5 * ones
    assert torch.allclose(soft.blend(original, current, half, 0.0), current, atol=1e-4), "at the end: the generation"
    early, late = (soft.blend(original, current, half, sigma) for sigma in (8.0, 0.5))
    assert (early - original).norm() < (late - original).norm(), "the original holds more at a high noise level"


def test_the_blend_keeps_the_lengths_of_the_vectors():
    """A linear blend of two vectors is shorter than either; the soft blend has the length of the lengths' blend at
    the power of the transition contrast boost (1: their linear blend), in the linear blend's direction."""
    original, current = latents(3), latents(4)
    t = torch.full((1, 1, 8, 8), 0.5) ** (2.0 * 0.5)  # repaint 0.5 at sigma 2 (bias 1, strength 0.5)
    linear = original * (1 - t) + current * t
    for boost in (1.0, 4.0):
        out = SoftInpainting(transition_contrast_boost=boost).blend(original, current, torch.full((1, 1, 8, 8), 0.5),
                                                                    2.0)
        length = out.norm(dim=1)
        wanted = ((original.norm(dim=1) ** boost) * (1 - t[:, 0]) + (current.norm(dim=1) ** boost) * t[:, 0]) ** (
            1 / boost)
        assert torch.allclose(length, wanted, rtol=1e-4)
        assert torch.allclose(torch.nn.functional.cosine_similarity(out, linear, dim=1), torch.ones(2, 8, 8),
                              atol=1e-5)
    assert (out.norm(dim=1) > linear.norm(dim=1)).float().mean() > 0.9


def per_pixel_filter(image: np.ndarray, kernel: np.ndarray, low: float, high: float) -> np.ndarray:
    """The weighted percentile filter read literally, pixel by pixel: the neighbourhood's values (within the image)
    stacked by value, each as tall as its kernel weight; the mean over the stack between low and high of its height,
    the window widened to a weight of 1 at least and kept within the stack."""
    radius, out = kernel.shape[0] // 2, np.zeros_like(image)
    for y, x in np.ndindex(image.shape):
        items = sorted((image[j, i], kernel[j - y + radius, i - x + radius])
                       for j in range(max(0, y - radius), min(image.shape[0], y + radius + 1))
                       for i in range(max(0, x - radius), min(image.shape[1], x + radius + 1)))
        total = sum(weight for _, weight in items)
        start, end = total * low, total * high
        if end - start < 1:
            centre = (start + end) / 2
            start, end = centre - 0.5, centre + 0.5
            if end > total:
                start, end = total - 1, total
            if start < 0:
                start, end = 0, 1
        value = weight_sum = bottom = 0.0
        for item, weight in items:
            overlap = max(0.0, min(end, bottom + weight) - max(start, bottom))
            value, weight_sum, bottom = value + item * overlap, weight_sum + overlap, bottom + weight
        out[y, x] = value / weight_sum if weight_sum else 0
    return out


@pytest.mark.parametrize("low,high", [(0.9, 1.0), (0.25, 0.75), (0.0, 1.0), (0.5, 0.5)])
def test_the_difference_filter_reads_its_definition(low, high):
    image = np.random.default_rng(5).random((7, 9)) * 3
    kernel = gaussian_kernel(1.5, 2)
    assert kernel[2, 2] == 1 and kernel.min() >= 0 and kernel[0, 0] < kernel[0, 2] < kernel[1, 2]
    assert np.allclose(weighted_percentile_filter(image, kernel, low, high), per_pixel_filter(image, kernel, low, high))


@pytest.mark.parametrize("sampler,schedule", [("Euler a", "Automatic"), ("DPM++ 2S a", "Karras")])
def test_soft_inpainting_repaints_the_mask_and_keeps_what_it_did_not_change(tmp_path, sampler, schedule):
    """Through diffusers' scheduler loop and the sigma-space loop: reproducible; inside the mask other than the hard
    inpainting's; far outside it the original (laid back where the latents did not move); its settings in the
    infotext, and pasting them back gives the same image."""
    checkpoint = single_file("sd1")
    engine = make_engine(tmp_path, checkpoint)
    kwargs = dict(sampler_name=sampler, scheduler=schedule)
    soft = engine.img2img(soft_request(checkpoint.name, soft_inpainting=ARGS, **kwargs))
    again = engine.img2img(soft_request(checkpoint.name, soft_inpainting=SoftInpainting(), **kwargs))
    hard = engine.img2img(soft_request(checkpoint.name, **kwargs))
    ours, original = as_array(soft.images), np.asarray(init_picture(SIZE, SIZE), dtype=int)
    assert np.array_equal(ours, as_array(again.images))
    inside = (slice(None), slice(112, 144), slice(112, 144))
    assert np.abs(ours - original)[inside].mean() > 10 and np.abs(ours - as_array(hard.images))[inside].mean() > 1
    assert np.abs(ours - original)[:, :32, :32].max() <= 2, "far from the mask: the original"
    params = parse_infotext(soft.infotexts[0])
    assert params["Soft inpainting enabled"] == "True" and params["Soft inpainting transition contrast boost"] == "4"
    assert "Soft inpainting enabled" not in parse_infotext(hard.infotexts[0])
    pasted = request_fields(soft.infotexts[0])["soft_inpainting"]
    assert pasted == [True, *SoftInpainting().values()]
    assert np.array_equal(as_array(engine.img2img(soft_request(checkpoint.name, soft_inpainting=pasted,
                                                               **kwargs)).images), ours)


def test_the_api_reads_a1111s_alwayson_soft_inpainting(client):
    """A1111's body: alwayson_scripts {"Soft Inpainting": {"args": [on, six settings]}} (any case, the settings left
    out at their defaults); off or without a mask it changes nothing (and is named as ignored without one); another
    always-on script or a setting out of range is a 422 naming alwayson_scripts."""
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    body = {**WEBUIAPI_BODY, "init_images": [b64(init_picture())], "mask": b64(mask), "mask_blur": 8,
            "batch_size": 1, "denoising_strength": 0.8}
    reply = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"soft inpainting": {"args": [True]}}})
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    params = parse_infotext(info["infotexts"][0])
    assert params["Soft inpainting enabled"] == "True" and params["Soft inpainting difference threshold"] == "0.5"
    off = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"Soft Inpainting": {"args": [False]}}})
    assert "Soft inpainting enabled" not in json.loads(off.json()["info"])["infotexts"][0]
    unmasked = client.post("/sdapi/v1/img2img", json={**body, "mask": None,
                                                       "alwayson_scripts": {"Soft Inpainting": {"args": ARGS}}})
    assert unmasked.status_code == 200 and "alwayson_scripts" in json.loads(unmasked.json()["info"])["ignored_fields"]
    for scripts in ({"ADetailer": {"args": []}}, {"Soft Inpainting": {"args": [True, 1, 0.5, 99]}},
                    {"Soft Inpainting": "on"}):
        refused = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": scripts})
        assert refused.status_code == 422 and refused.json()["field"] == "alwayson_scripts", scripts


def test_the_img2img_form_gives_and_takes_the_settings():
    """The switch and the six sliders ("soft_inpainting__0" to "__6") make the request's list, and an infotext's
    settings go back to them."""
    names = ["prompt", *(f"soft_inpainting__{i}" for i in range(7))]
    request = request_from_form(dict.fromkeys(names), ("a cat", *ARGS))
    assert request.soft_inpainting == ARGS
    form = {name: SimpleNamespace(value=None) for name in names}
    infotext = "a cat\nSteps: 3, Soft inpainting enabled: True, Soft inpainting schedule bias: 2.5"
    updates = form_updates(form, infotext, lambda sampler, schedule: (sampler, schedule))
    values = [update.get("value") for update in updates[1:]]
    assert values == [True, 2.5, *SoftInpainting().values()[1:]]


def test_soft_inpainting_of_a_flow_model(tmp_path, parts, files):
    """Flux's loop blends in the latents' own layout (the packed one mixes 2x2 pixels into a token)."""
    engine = engine_for(tmp_path, files, "flux-aio.safetensors")
    fields = dict(sampler_name="Euler", cfg_scale=1.0, distilled_cfg_scale=3.5, mask_blur=4, denoising_strength=0.8)
    soft = engine.img2img(inpaint_request("flux-aio.safetensors", soft_inpainting=ARGS, **fields))
    hard = engine.img2img(inpaint_request("flux-aio.safetensors", **fields))
    again = engine.img2img(inpaint_request("flux-aio.safetensors", soft_inpainting=ARGS, **fields))
    assert np.array_equal(as_array(soft.images), as_array(again.images))
    assert np.abs(as_array(soft.images) - as_array(hard.images)).mean() > 0.5
    assert "Soft inpainting enabled: True" in soft.infotexts[0]
