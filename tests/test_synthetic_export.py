"""Synthetic models and their export, checked against diffusers' own single-file conversion."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open

from webui.synthetic.ldm_export import (
    LDM_SCHEDULE_KEYS,
    V_PREDICTION_KEY,
    ldm_state_dict,
    text_state_dict,
    write_a1111_checkpoint,
    write_diffusers_folder,
)
from webui.synthetic.builders import FAMILIES, architecture, build_synthetic_model


@functools.cache
def tiny(family: str):
    model = build_synthetic_model(family)
    return model, ldm_state_dict(model)


@pytest.fixture(params=FAMILIES)
def model(request):
    return tiny(request.param)[0]


@pytest.fixture
def ldm(model):
    return tiny(model.family)[1]


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    mismatched = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not mismatched, mismatched[:5]


def test_unet_round_trips_through_diffusers(model, ldm):
    converted = convert_ldm_unet_checkpoint(ldm, model.denoiser.config)
    assert_same_tensors(converted, model.denoiser.state_dict())


def test_vae_round_trips_through_diffusers(model, ldm):
    converted = convert_ldm_vae_checkpoint(ldm, model.vae.config)
    assert_same_tensors(converted, model.vae.state_dict())
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_l_round_trips_through_diffusers(family):
    model, ldm = tiny(family)
    converted = convert_ldm_clip_checkpoint(ldm)
    position_ids = converted.pop("text_model.embeddings.position_ids")  # a buffer diffusers passes along
    assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(77))]
    assert_same_tensors(converted, text_state_dict(model.text_encoders[0]))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_open_clip_round_trips_through_diffusers(family):
    model, ldm = tiny(family)
    prefix = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}[model.family]
    encoder = model.text_encoders[-1]
    converted = convert_open_clip_checkpoint(encoder, ldm, prefix=prefix)
    expected = text_state_dict(encoder)
    if model.family == "sd2":
        # The file's extra last resblock comes back; its text projection is one diffusers drops.
        assert prefix + "text_projection" in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
        expected |= {k: v for k, v in model.text_encoder_extras.items() if k != "text_projection.weight"}
    assert_same_tensors(converted, expected)
    assert ldm[prefix + "logit_scale"].ndim == 0


def test_sd2_file_holds_one_more_resblock_than_diffusers():
    arch = architecture("sd2", "tiny")
    model = build_synthetic_model("sd2")
    layers = arch.text_encoders[0].num_hidden_layers
    ldm = ldm_state_dict(model)
    assert f"cond_stage_model.model.transformer.resblocks.{layers}.mlp.c_proj.bias" in ldm
    assert not any(k.startswith(f"cond_stage_model.model.transformer.resblocks.{layers + 1}.") for k in ldm)
    width = arch.text_encoders[0].hidden_size
    assert ldm["cond_stage_model.model.text_projection"].shape == (width, width)


def test_sdxl_file_is_recognised_by_diffusers():
    ldm = ldm_state_dict(build_synthetic_model("sdxl"))
    assert infer_diffusers_model_type(ldm) == "xl_base"
    projection = ldm["conditioner.embedders.1.model.text_projection"]
    assert projection.shape == (64, 32)  # [width, projection_dim]


def test_a1111_checkpoint_file(tmp_path, model):
    path = write_a1111_checkpoint(tmp_path / "model.safetensors", model, metadata={"title": "synthetic"})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"title": "synthetic"}
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        if model.family == "sdxl":
            assert not keys & set(LDM_SCHEDULE_KEYS)
        else:
            betas = f.get_tensor("betas")
            assert betas.dtype == torch.float32 and betas.shape == (1000,)
            assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
            assert f.get_tensor("alphas_cumprod").dtype == torch.float32
    assert keys == set(ldm_state_dict(model))


def test_v_prediction_is_marked_in_both_formats(tmp_path):
    model = build_synthetic_model("sd2", prediction_type="v_prediction")
    assert V_PREDICTION_KEY in ldm_state_dict(model)
    assert V_PREDICTION_KEY not in ldm_state_dict(build_synthetic_model("sd2"))
    write_diffusers_folder(tmp_path, model)
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["steps_offset"] == 1


def test_every_weight_is_random_and_outputs_are_sane(model):
    modules = (model.denoiser, model.vae, *model.text_encoders)
    assert all(bool(p.ne(0).all()) for m in modules for p in m.parameters())
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, model.denoiser.config.cross_attention_dim, generator=generator)
    extra = {}
    if model.family == "sdxl":
        pooled = torch.randn(1, model.text_encoders[1].config.projection_dim, generator=generator)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        noise = model.denoiser(latents, 500, context, **extra).sample
        image = model.vae.decode(latents).sample
    assert torch.isfinite(noise).all() and 0.05 < noise.std().item() < 5
    assert torch.isfinite(image).all() and image.abs().max().item() < 10


def test_same_seed_same_weights():
    first, again, other = (build_synthetic_model("sd1", seed=s) for s in (0, 0, 1))
    assert_same_tensors(ldm_state_dict(again), ldm_state_dict(first))
    assert not torch.equal(first.denoiser.conv_in.weight, other.denoiser.conv_in.weight)


def shapes(state_dict: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize(
    "family, model_type, unet_millions, text_millions",
    [("sd1", "v1", 859.5, 123.1), ("sd2", "v2", 865.9, 340.4), ("sdxl", "xl_base", 2567.5, 123.1)],
)
def test_full_size_architectures_on_meta_device(family, model_type, unet_millions, text_millions):
    model = build_synthetic_model(family, "full", device="meta")
    assert sum(p.numel() for p in model.denoiser.parameters()) / 1e6 == pytest.approx(unet_millions, abs=0.1)
    assert sum(p.numel() for p in model.text_encoders[0].parameters()) / 1e6 == pytest.approx(text_millions, abs=0.1)
    ldm = ldm_state_dict(model)
    assert infer_diffusers_model_type(ldm) == model_type
    assert shapes(convert_ldm_unet_checkpoint(ldm, model.denoiser.config)) == shapes(model.denoiser.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(ldm, model.vae.config)) == shapes(model.vae.state_dict())
    if family != "sd1":
        # For real SD2 sizes diffusers itself drops the file's last resblock and text projection.
        prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
        converted = convert_open_clip_checkpoint(model.text_encoders[-1], ldm, prefix=prefix)
        assert shapes(converted) == shapes(text_state_dict(model.text_encoders[-1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_offline_and_generates(tmp_path, family):
    model = build_synthetic_model(family)
    write_diffusers_folder(tmp_path, model)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(tmp_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert_same_tensors(pipe.unet.state_dict(), model.denoiser.state_dict())
    generator = torch.Generator().manual_seed(0)
    images = pipe("a photo", height=64, width=64, num_inference_steps=2, generator=generator, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
