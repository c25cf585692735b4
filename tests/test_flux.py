"""Flux transformer single files in BFL's layout: config from shapes, conversion, loading."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from tests.conftest import single_file
from webui.engine.families.flux import convert_flux_to_diffusers, flux_config, load_flux_transformer, rope_axes
from webui.engine.formats.files import TensorInfo, read_safetensors_header
from webui.errors import ModelFileError
from webui.synthetic.builders import build_flux_transformer, flux_architecture
from webui.synthetic.ldm_export import flux_to_bfl, write_flux_transformer

PREFIX = "model.diffusion_model."
# black-forest-labs/FLUX.1-dev's transformer config (out_channels: null there, i.e. in_channels).
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


@pytest.fixture(scope="module")
def tiny() -> FluxTransformer2DModel:
    return build_flux_transformer("tiny", seed=3)


def infos_of(state_dict) -> dict[str, TensorInfo]:
    return {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in state_dict.items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    mismatched = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not mismatched, mismatched[:5]


def meta_bfl(**overrides) -> dict[str, torch.Tensor]:
    """The BFL-layout state dict of a full-size Flux on the meta device."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(**(flux_architecture("full") | overrides))
    return flux_to_bfl(model.state_dict(), model.config)


def inputs(config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image, text = 16, 8
    return {
        "hidden_states": torch.randn(1, image, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                              indexing="ij"), dim=-1).reshape(image, 3),
        "txt_ids": torch.zeros(text, 3),
    }


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_tiny_round_trips_through_a_bfl_file(tmp_path, tiny, prefix):
    path = write_flux_transformer(tmp_path / "flux.safetensors", tiny, dtype=torch.float32, prefix=prefix)
    header, _ = read_safetensors_header(path)
    assert f"{prefix}double_blocks.0.img_attn.qkv.weight" in header
    assert f"{prefix}single_blocks.1.linear1.weight" in header
    assert f"{prefix}guidance_in.in_layer.weight" in header

    loaded = load_flux_transformer(path, torch.float32)
    assert_same_tensors(loaded.state_dict(), tiny.state_dict())
    assert {k: loaded.config[k] for k in FLUX_DEV} == flux_architecture("tiny")
    # Same weights, but safetensors data is only 8-byte aligned: CPU kernels may round the last bits differently.
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs(tiny.config)).sample, tiny(**inputs(tiny.config)).sample,
                                   rtol=1e-5, atol=1e-5)


def test_load_casts_to_the_requested_dtype(tmp_path, tiny):
    path = write_flux_transformer(tmp_path / "flux.safetensors", tiny, dtype=torch.bfloat16)
    loaded = load_flux_transformer(path, torch.float32)
    assert loaded.dtype == torch.float32
    expected = {k: v.to(torch.bfloat16).float() for k, v in tiny.state_dict().items()}
    assert_same_tensors(loaded.state_dict(), expected)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_conversion_matches_diffusers_at_full_width(guidance):
    """diffusers' converter only knows width 3072; only dim 0 matters to both, so dim 1 is cut to 1."""
    shapes = meta_bfl(guidance_embeds=guidance)
    g = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(v.shape[:1] + (1,) * (v.ndim - 1), generator=g) for k, v in shapes.items()}
    config = flux_config(infos_of(shapes))
    ours = convert_flux_to_diffusers(dict(bfl), config)
    assert_same_tensors(ours, convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)))
    with torch.device("meta"):
        expected = FluxTransformer2DModel(**config).state_dict()
    assert {k: v.shape[0] for k, v in ours.items()} == {k: v.shape[0] for k, v in expected.items()}


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_full_size_config_is_flux_dev(prefix):
    infos = {prefix + k: v for k, v in infos_of(meta_bfl()).items()}
    assert flux_config(infos) == FLUX_DEV
    assert FLUX_DEV == flux_architecture("full")


@pytest.mark.parametrize("head_dim,axes", [(128, (16, 56, 56)), (64, (8, 28, 28)), (32, (4, 14, 14)), (16, (4, 6, 6))])
def test_rope_axes_fill_the_head_in_even_sizes(head_dim, axes):
    assert rope_axes(head_dim) == axes


def _write_without(tmp_path, tiny, key: str):
    path = write_flux_transformer(tmp_path / "full.safetensors", tiny, dtype=torch.float16, prefix=PREFIX)
    tensors = load_file(path)
    del tensors[PREFIX + key]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    return broken


def test_missing_block_tensor_is_a_clear_error(tmp_path, tiny):
    broken = _write_without(tmp_path, tiny, "single_blocks.1.linear2.weight")
    expected = r"broken\.safetensors.*1 tensors missing.*single_transformer_blocks\.1\.proj_out"
    with pytest.raises(ModelFileError, match=expected):
        load_flux_transformer(broken)


def test_missing_embedder_is_a_clear_error(tmp_path, tiny):
    broken = _write_without(tmp_path, tiny, "txt_in.weight")
    with pytest.raises(ModelFileError, match="no tensor 'txt_in.weight'"):
        load_flux_transformer(broken)


def test_other_files_are_refused():
    with pytest.raises(ModelFileError, match="not a Flux transformer"):
        load_flux_transformer(single_file("sd1"))
