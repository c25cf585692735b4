"""The starting noise as A1111 draws it: variation seeds (spherical interpolation towards another seed's noise) and
seed resize (another size's noise, centred), each image's own generator used as without them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webui.engine.infotext import parse_infotext, request_fields
from webui.engine.request import GenerationRequest
from webui.engine.sampling.noise import Variation, initial_noise, slerp
from webui.engine.xyz import AxisChoice, run_plot
from webui.extensions import plot_axes

SHAPE = (4, 8, 12)


def plain(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def noise_of(seeds, variation=None, shape=SHAPE) -> tuple[torch.Tensor, list[torch.Generator]]:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return initial_noise(shape, generators, seeds, variation), generators


def test_without_a_variation_each_image_is_its_seeds_noise():
    noise, _ = noise_of([5, 6], Variation([9, 10], 0.0))
    assert torch.equal(noise, torch.stack([plain(5), plain(6)]))


def test_full_strength_is_the_variation_seeds_noise_and_the_generators_go_on_as_without_it():
    noise, generators = noise_of([5, 6], Variation([9, 10], 1.0))
    assert torch.allclose(noise, torch.stack([plain(9), plain(10)]), atol=1e-5)
    unvaried = [torch.Generator().manual_seed(s) for s in (5, 6)]
    for g in unvaried:
        torch.randn(SHAPE, generator=g)
    for used, reference in zip(generators, unvaried):  # the ancestral samplers' noise is unchanged
        assert torch.equal(torch.randn(3, generator=used), torch.randn(3, generator=reference))


def test_half_strength_is_the_spherical_interpolation_along_the_height_axis():
    low, high = plain(5), plain(9)
    noise, _ = noise_of([5], Variation([9], 0.5))
    cosine = (low / low.norm(dim=1, keepdim=True) * high / high.norm(dim=1, keepdim=True)).sum(1)
    angle = torch.acos(cosine)
    expected = (torch.sin(0.5 * angle) / torch.sin(angle)).unsqueeze(1) * (low + high)
    assert torch.allclose(noise[0], expected, atol=1e-6)
    assert 0.8 < noise[0].std() < 1.2, "a slerp of two unit Gaussians keeps their scale (a lerp would shrink it)"
    assert torch.allclose(slerp(0.3, low, low), low), "parallel: a straight line"


@pytest.mark.parametrize("resize_from", [(8, 12), (4, 6), (12, 16)])
def test_seed_resize_centres_the_noise_of_the_other_size(resize_from):
    noise, _ = noise_of([5], Variation([9], 0.0, resize_from))
    other = plain(5, (4, *resize_from))
    if resize_from == SHAPE[1:]:
        assert torch.equal(noise[0], plain(5)), "its own size: the image's noise"
    elif resize_from[0] < SHAPE[1]:
        top, left = (SHAPE[1] - 4) // 2, (SHAPE[2] - 6) // 2
        assert torch.equal(noise[0, :, top:top + 4, left:left + 6], other)
        outside = noise[0].clone()
        outside[:, top:top + 4, left:left + 6] = plain(5)[:, top:top + 4, left:left + 6]
        assert torch.equal(outside, plain(5)), "around it, the image's own noise"
    else:
        assert torch.equal(noise[0], other[:, 2:10, 2:14]), "cropped to the middle"


def test_variation_seed_in_the_engine_the_infotext_and_a_plot(engine):
    base = dict(prompt="a red circle", width=64, height=64, steps=4, sampler_name="DPM++ 2M", seed=3,
                save_images=False)
    own = engine.txt2img(GenerationRequest(**{**base, "seed": 8}))
    varied = engine.txt2img(GenerationRequest(**base, subseed=8, subseed_strength=1.0))
    assert np.abs(np.asarray(varied.images[0], int) - np.asarray(own.images[0], int)).max() <= 1, \
        "strength 1: the variation seed's picture"
    half = engine.txt2img(GenerationRequest(**base, subseed=8, subseed_strength=0.5))
    assert half.images[0].tobytes() not in (varied.images[0].tobytes(), own.images[0].tobytes())
    params = parse_infotext(half.infotexts[0])
    assert params["Variation seed"] == "8" and params["Variation seed strength"] == "0.5" and half.subseeds == [8]
    again = engine.txt2img(GenerationRequest(**{**base, **request_fields(half.infotexts[0]), "save_images": False}))
    assert again.images[0].tobytes() == half.images[0].tobytes(), "its infotext makes it again"
    ancestral = engine.txt2img(GenerationRequest(**{**base, "sampler_name": "Euler a", "eta": 0.5}))
    assert request_fields(ancestral.infotexts[0])["eta"] == 0.5, "Eta is read back too"
    resized = engine.txt2img(GenerationRequest(**base, seed_resize_from_w=128, seed_resize_from_h=64))
    assert parse_infotext(resized.infotexts[0])["Seed resize from"] == "128x64"
    assert "Variation seed" not in parse_infotext(own.infotexts[0])
    plot = run_plot(engine, GenerationRequest(**base), [AxisChoice("Var. strength", "0, 1"),
                                                        AxisChoice("Var. seed", "8")], plot_axes(engine))
    assert [c.images[0].tobytes() for c in plot.cells] == [
        engine.txt2img(GenerationRequest(**base)).images[0].tobytes(), varied.images[0].tobytes()]
