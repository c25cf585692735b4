"""Separate T5 / CLIP text encoder files and 16-channel VAEs: configs from shapes, loading, fp8, bad files."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from webui.engine.detect import Family
from webui.engine.files import TensorInfo
from webui.engine.fp8 import to_fp8
from webui.engine.ldm_export import open_clip_to_ldm, text_state_dict, vae_to_ldm
from webui.engine.text_encoders import (
    load_clip_file,
    load_t5_encoder,
    load_vae16,
    t5_config,
)
from webui.errors import ModelFileError

COMFY_T5 = "text_encoders.t5xxl.transformer."
T5_SMALL = {"vocab_size": 1000, "d_model": 128, "d_ff": 256, "num_layers": 2, "num_heads": 2, "d_kv": 64,
            "relative_attention_num_buckets": 32}


@pytest.fixture(scope="module")
def t5() -> T5EncoderModel:
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(**T5_SMALL, feed_forward_proj="gated-gelu")).eval()


def t5_file_tensors(model: T5EncoderModel) -> dict[str, torch.Tensor]:
    """The layout of t5xxl_fp16.safetensors: ``shared.weight`` only, no tied duplicate."""
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


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


def t5_output(model: T5EncoderModel) -> torch.Tensor:
    ids = torch.randint(0, T5_SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_t5_config_from_shapes(t5):
    config = t5_config(infos_of({COMFY_T5 + k: v for k, v in t5_file_tensors(t5).items()}))
    assert config == {**T5_SMALL, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False}


@pytest.mark.parametrize("layout", ["bare", "comfy_embed_tokens"])
def test_t5_file_loads_identically(tmp_path, t5, layout):
    tensors = t5_file_tensors(t5)
    if layout == "comfy_embed_tokens":
        tensors = {COMFY_T5 + k.replace("shared.", "encoder.embed_tokens."): v for k, v in tensors.items()}
    loaded = load_t5_encoder(save(tmp_path, "t5xxl.safetensors", tensors), torch.float32)
    assert_same_tensors(loaded.state_dict(), t5.state_dict())
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    assert torch.equal(t5_output(loaded), t5_output(t5))


def test_t5_fp8_file_stays_fp8(tmp_path, t5):
    fp8 = {k: to_fp8(v, torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in t5_file_tensors(t5).items()}
    loaded = load_t5_encoder(save(tmp_path, "t5xxl_fp8_e4m3fn.safetensors", fp8), torch.float32)
    reference = T5EncoderModel(t5.config).eval()
    reference.load_state_dict({**{k: v.float() for k, v in fp8.items()},
                               "encoder.embed_tokens.weight": fp8["shared.weight"].float()})
    assert loaded.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    # The feed-forward output layer casts its input to its own dtype, so it is upcast.
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert torch.equal(t5_output(loaded), t5_output(reference))


def test_t5_fp16_keeps_feed_forward_output_in_fp32(t5):
    loaded = load_t5_encoder(t5_file_tensors(t5), torch.float16)
    assert loaded.encoder.block[1].layer[0].SelfAttention.q.weight.dtype == torch.float16
    assert loaded.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_t5_missing_block_tensor_is_a_clear_error(tmp_path, t5):
    tensors = t5_file_tensors(t5)
    del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
    with pytest.raises(ModelFileError, match=r"T5EncoderModel.*1 tensors missing.*block\.1\.layer\.0\.SelfAttention\.k"):
        load_t5_encoder(save(tmp_path, "broken.safetensors", tensors), torch.float32)


def test_not_a_t5_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="not a T5 encoder"):
        load_t5_encoder(save(tmp_path, "other.safetensors", {"foo.weight": torch.zeros(2)}), torch.float32)


def tiny_clip(hidden_act: str, projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act=hidden_act,
                            projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def clip_outputs(model) -> list[torch.Tensor]:
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids)
    return [out.last_hidden_state, out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output]


@pytest.mark.parametrize("kind,projection,layout", [
    ("clip_l", False, "transformers"),
    ("clip_l", True, "comfy"),
    ("clip_g", True, "transformers"),
    ("clip_g", True, "open_clip"),
])
def test_clip_file_loads_identically(tmp_path, kind, projection, layout):
    reference = tiny_clip("quick_gelu" if kind == "clip_l" else "gelu", projection)
    tensors = text_state_dict(reference)
    if layout == "comfy":
        tensors = {f"text_encoders.{kind}.transformer.{k}": v for k, v in tensors.items()}
    elif layout == "open_clip":
        tensors = open_clip_to_ldm(tensors)
    loaded = load_clip_file(save(tmp_path, f"{kind}.safetensors", tensors), kind, torch.float32)
    assert type(loaded) is type(reference)
    assert loaded.config.hidden_act == reference.config.hidden_act
    for actual, expected in zip(clip_outputs(loaded), clip_outputs(reference), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_clip_file_of_another_kind_is_a_clear_error(tmp_path, t5):
    with pytest.raises(ModelFileError, match="not a CLIP-L text encoder"):
        load_clip_file(save(tmp_path, "t5.safetensors", t5_file_tensors(t5)), "clip_l", torch.float32)


@pytest.fixture(scope="module")
def vae16() -> AutoencoderKL:
    torch.manual_seed(4)
    return AutoencoderKL(latent_channels=16, block_out_channels=(32,) * 4, layers_per_block=1, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


@pytest.mark.parametrize("prefix,family", [("", Family.FLUX), ("vae.", Family.SD3), ("first_stage_model.", Family.FLUX)])
def test_vae16_loads_identically(tmp_path, vae16, prefix, family):
    ldm = {prefix + k: v for k, v in vae_to_ldm(vae16.state_dict(), vae16.config).items()}
    loaded = load_vae16(save(tmp_path, "ae.safetensors", ldm), torch.float32, family)
    assert loaded.config.latent_channels == 16
    assert not loaded.config.use_quant_conv and not loaded.config.use_post_quant_conv
    expected_scale = {Family.FLUX: (0.3611, 0.1159), Family.SD3: (1.5305, 0.0609)}[family]
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == expected_scale
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded.decode(latent).sample, vae16.decode(latent).sample)


def test_four_channel_vae_is_refused_for_flux():
    torch.manual_seed(6)
    sd_vae = AutoencoderKL(latent_channels=4, block_out_channels=(32,), norm_num_groups=32)
    with pytest.raises(ModelFileError, match="4 latent channels"):
        load_vae16(vae_to_ldm(sd_vae.state_dict(), sd_vae.config), torch.float32, Family.FLUX)
