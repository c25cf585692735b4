"""A diffusers folder whose VAE is not 8x: latents are the image size over the VAE's own factor."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from tests.conftest import make_engine
from tests.test_reference import NEGATIVE, PROMPT, reference_images
from webui.engine.request import GenerationRequest
from webui.errors import UserError
from webui.synthetic.builders import build_synthetic_model
from webui.synthetic.ldm_export import write_diffusers_folder


def folder_with_vae_levels(path: Path, levels: int) -> Path:
    """The tiny SD1 model with a VAE of ``levels`` levels: a 2**(levels-1)x VAE."""
    model = build_synthetic_model("sd1", seed=3)
    torch.manual_seed(4)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                        block_out_channels=(32,) * levels, layers_per_block=1, latent_channels=4, sample_size=64)
    return write_diffusers_folder(path, dataclasses.replace(model, vae=vae.eval()), dtype=torch.float16)


def request(width: int, height: int, folder: Path) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=4,
                             cfg_scale=7.0, sampler_name="Euler a", seed=77, checkpoint=folder.name, save_images=False)


def test_a_4x_vae_makes_the_requested_size_and_the_diffusers_image(tmp_path):
    folder = folder_with_vae_levels(tmp_path / "vae4x", 3)
    engine = make_engine(tmp_path / "data", folder)
    result = engine.txt2img(request(64, 64, folder))
    assert engine.models.current.vae_scale_factor == 4
    ours = np.asarray(result.images[0])
    assert ours.shape == (64, 64, 3)
    assert "Size: 64x64" in result.infotexts[0]
    ref = reference_images(folder, False, "Euler a", "Automatic", [77], 4, engine.models.current.scheduler_config)[0]
    assert ref.std() > 5, "the reference image is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"


def test_a_size_the_vae_cannot_make_is_refused_naming_the_side(tmp_path):
    folder = folder_with_vae_levels(tmp_path / "vae16x", 5)
    engine = make_engine(tmp_path / "data", folder)
    with pytest.raises(UserError, match="multiple of 16") as e:
        engine.txt2img(request(72, 64, folder))
    assert e.value.field == "width"
    assert engine.txt2img(request(64, 64, folder)).images[0].size == (64, 64)
