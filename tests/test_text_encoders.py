"""Separate T5 / CLIP text encoder files and 16-channel VAEs: configs from shapes, loading, fp8, bad files."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from tests.test_synthetic_pipelines import assert_same, clip_outputs, t5_output
from webui.engine.formats.detect import Family
from webui.engine.formats.files import TensorInfo
from webui.engine.memory.stream import param_bytes, split_units
from webui.engine.weights.fp8 import to_fp8
from webui.synthetic.builders import build_clip_text, build_t5_encoder, t5_architecture
from webui.synthetic.ldm_export import open_clip_to_ldm, t5_state_dict, text_state_dict, vae_to_ldm
from webui.engine.conditioning.text_encoders import (
    load_clip_file,
    load_t5_encoder,
    load_vae16,
    t5_config,
)
from webui.errors import ModelFileError

COMFY_T5 = "text_encoders.t5xxl.transformer."


@pytest.fixture(scope="module")
def t5() -> T5EncoderModel:
    return build_t5_encoder()


def save(tmp_path, name: str, tensors: dict[str, torch.Tensor]):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def infos_of(state_dict) -> dict[str, TensorInfo]:
    return {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in state_dict.items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    mismatched = [k for k in expected if not torch.equal(actual[k].float(), expected[k].float())]
    assert not mismatched, mismatched[:5]


def test_t5_config_from_shapes(t5):
    config = t5_config(infos_of({COMFY_T5 + k: v for k, v in t5_state_dict(t5).items()}))
    built = t5_architecture("tiny")
    assert config == {key: getattr(built, key) for key in config}


@pytest.mark.parametrize("layout", ["bare", "comfy_embed_tokens"])
def test_t5_file_loads_identically(tmp_path, t5, layout):
    tensors = t5_state_dict(t5)
    if layout == "comfy_embed_tokens":
        tensors = {COMFY_T5 + k.replace("shared.", "encoder.embed_tokens."): v for k, v in tensors.items()}
    loaded = load_t5_encoder(save(tmp_path, "t5xxl.safetensors", tensors), torch.float32)
    assert_same_tensors(loaded.state_dict(), t5.state_dict())
    assert loaded.encoder.embed_tokens is loaded.shared, "one embedding module: the memory manager moves it once"
    units = split_units(loaded, 1024)
    assert sum(u.nbytes for u in units) == param_bytes(loaded), "every weight in exactly one unit"
    assert torch.equal(t5_output(loaded), t5_output(t5))


def test_t5_fp8_file_stays_fp8(tmp_path, t5):
    fp8 = {k: to_fp8(v, torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in t5_state_dict(t5).items()}
    loaded = load_t5_encoder(save(tmp_path, "t5xxl_fp8_e4m3fn.safetensors", fp8), torch.float32)
    reference = T5EncoderModel(t5.config).eval()
    reference.load_state_dict({**{k: v.float() for k, v in fp8.items()},
                               "encoder.embed_tokens.weight": fp8["shared.weight"].float()})
    assert loaded.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    # The feed-forward output layer stays fp8 too, computing in its input's dtype (not in fp8).
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(t5_output(loaded), t5_output(reference))
    in_fp16 = load_t5_encoder(save(tmp_path, "t5xxl_fp8_e4m3fn.safetensors", fp8), torch.float16)
    assert in_fp16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32, "fp16 overflows there"


def test_t5_fp16_keeps_feed_forward_output_in_fp32(t5):
    loaded = load_t5_encoder(t5_state_dict(t5), torch.float16)
    assert loaded.encoder.block[1].layer[0].SelfAttention.q.weight.dtype == torch.float16
    assert loaded.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_t5_missing_block_tensor_is_a_clear_error(tmp_path, t5):
    tensors = t5_state_dict(t5)
    del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
    with pytest.raises(ModelFileError, match=r"T5EncoderModel.*1 tensors missing.*block\.1\.layer\.0\.SelfAttention\.k"):
        load_t5_encoder(save(tmp_path, "broken.safetensors", tensors), torch.float32)


def test_not_a_t5_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="not a T5 encoder"):
        load_t5_encoder(save(tmp_path, "other.safetensors", {"foo.weight": torch.zeros(2)}), torch.float32)


# Separate files in the transformers layout, bare, are written and tested in test_synthetic_pipelines.
@pytest.mark.parametrize("kind,layout", [("clip_l", "comfy"), ("clip_g", "open_clip")])
def test_clip_file_loads_identically(tmp_path, kind, layout):
    reference = build_clip_text(kind)
    tensors = text_state_dict(reference)
    if layout == "comfy":
        tensors = {f"text_encoders.{kind}.transformer.{k}": v for k, v in tensors.items()}
    else:
        tensors = open_clip_to_ldm(tensors)
    loaded = load_clip_file(save(tmp_path, f"{kind}.safetensors", tensors), kind, torch.float32)
    assert type(loaded) is CLIPTextModelWithProjection
    assert loaded.config.hidden_act == reference.config.hidden_act
    assert_same(clip_outputs(loaded), clip_outputs(reference))


def test_clip_file_of_another_kind_is_a_clear_error(tmp_path, t5):
    with pytest.raises(ModelFileError, match="not a CLIP-L text encoder"):
        load_clip_file(save(tmp_path, "t5.safetensors", t5_state_dict(t5)), "clip_l", torch.float32)


def test_four_channel_vae_is_refused_for_flux():
    torch.manual_seed(6)
    sd_vae = AutoencoderKL(latent_channels=4, block_out_channels=(32,), norm_num_groups=32)
    with pytest.raises(ModelFileError, match="4 latent channels"):
        load_vae16(vae_to_ldm(sd_vae.state_dict(), sd_vae.config), torch.float32, Family.FLUX)
