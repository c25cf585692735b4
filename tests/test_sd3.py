"""SD3 / SD3.5 transformer single files in Stability AI's layout, safetensors and GGUF: config, conversion, loading."""
from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

from tests.conftest import single_file
from tests.test_flux import assert_same_tensors, infos_of
from webui.engine.families.sd3 import convert_sd3_to_diffusers, load_gguf_sd3_transformer, load_sd3_transformer, sd3_config
from webui.engine.formats.files import read_safetensors_header
from webui.engine.formats.gguf_file import read_gguf
from webui.engine.weights.gguf_load import quantize_where_possible, write_gguf
from webui.engine.weights.quant import PLAIN_TYPES, GGUFConv2d, GGUFLinear, QuantizedLayer, dequantize
from webui.errors import ModelFileError
from webui.synthetic.builders import build_sd3_transformer, sd3_architecture
from webui.synthetic.ldm_export import sd3_to_sai, write_sd3_transformer

PREFIX = "model.diffusion_model."
# The transformer configs of stabilityai/stable-diffusion-3.5-large, -3.5-medium and -3-medium-diffusers
# (the keys they leave out at diffusers' defaults: no dual attention, no q/k norm).
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
    "qk_norm": "rms_norm",
}
SD35_MEDIUM = SD35_LARGE | {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                            "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13))}
SD3_MEDIUM = SD35_LARGE | {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                           "qk_norm": None}
RELEASED = {"sd3.5_large": SD35_LARGE, "sd3.5_medium": SD35_MEDIUM, "sd3_medium": SD3_MEDIUM}
# Relative L2 error of the tiny model's output against the fp32 model, measured 0.97 % (Q8_0) and 7.9 % (Q4_K:
# only the 7 tensors whose rows are multiples of 256 can be Q4_K, the rest stay F16).
ERROR_BOUNDS = {Q.Q8_0: 0.02, Q.Q4_K: 0.12}


@pytest.fixture(scope="module")
def tiny() -> SD3Transformer2DModel:
    return build_sd3_transformer("tiny", seed=3)


@pytest.fixture(scope="module")
def reference(tiny) -> tuple[dict, torch.Tensor]:
    x = inputs(tiny.config)
    with torch.no_grad():
        return x, tiny(**x).sample


@cache
def meta_stability(name: str) -> dict[str, torch.Tensor]:
    """A released model's Stability-layout state dict on the meta device (shapes only)."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(**RELEASED[name])
    return stability_state_dict(model)


def inputs(config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, config.in_channels, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([700.0]),
    }


def stability_state_dict(model: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    return sd3_to_sai(dict(model.state_dict()), model.config)


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_tiny_round_trips_through_a_stability_file(tmp_path, tiny, reference, prefix):
    path = write_sd3_transformer(tmp_path / "sd3.safetensors", tiny, dtype=torch.float32, prefix=prefix)
    header, _ = read_safetensors_header(path)
    assert f"{prefix}joint_blocks.0.x_block.attn2.qkv.weight" in header
    assert f"{prefix}joint_blocks.2.context_block.attn.qkv.weight" in header
    assert f"{prefix}joint_blocks.2.context_block.mlp.fc1.weight" not in header, "the last text stream is pre-only"

    loaded = load_sd3_transformer(path, torch.float32)
    assert_same_tensors(loaded.state_dict(), tiny.state_dict())
    assert {k: loaded.config[k] for k in SD35_LARGE} == sd3_architecture("tiny")
    x, expected = reference
    with torch.no_grad():
        # Bit for bit once the weights sit in fresh memory; safetensors data is only 8-byte aligned, and
        # CPU kernels may round the last bits differently on it.
        assert torch.equal(copy.deepcopy(loaded)(**x).sample, expected)
        torch.testing.assert_close(loaded(**x).sample, expected, rtol=1e-5, atol=1e-5)


def test_load_casts_to_the_requested_dtype(tmp_path, tiny):
    path = write_sd3_transformer(tmp_path / "sd3.safetensors", tiny, dtype=torch.bfloat16, prefix=PREFIX)
    loaded = load_sd3_transformer(path, torch.float32)
    assert loaded.dtype == torch.float32
    assert_same_tensors(loaded.state_dict(), {k: v.to(torch.bfloat16).float() for k, v in tiny.state_dict().items()})


def test_conversion_matches_diffusers_on_the_tiny_model(tiny):
    stability = stability_state_dict(tiny)
    ours = convert_sd3_to_diffusers(dict(stability), sd3_config(infos_of(stability)))
    assert_same_tensors(ours, convert_sd3_transformer_checkpoint_to_diffusers(dict(stability)))
    assert_same_tensors(ours, tiny.state_dict())


@pytest.mark.parametrize("name", list(RELEASED))
def test_conversion_matches_diffusers_at_full_width(name):
    """Both conversions only cut and reorder rows, so every other dim is cut to 1 to keep the tensors small."""
    g = torch.Generator().manual_seed(0)
    shapes = meta_stability(name)
    stability = {k: torch.randn(v.shape[:1] + (1,) * (v.ndim - 1), generator=g) for k, v in shapes.items()}
    ours = convert_sd3_to_diffusers(dict(stability), sd3_config(infos_of(shapes)))
    assert_same_tensors(ours, convert_sd3_transformer_checkpoint_to_diffusers(dict(stability)))
    with torch.device("meta"):
        expected = SD3Transformer2DModel(**RELEASED[name]).state_dict()
    assert {k: v.shape[0] for k, v in ours.items()} == {k: v.shape[0] for k, v in expected.items()}


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("name", list(RELEASED))
def test_full_size_configs_are_the_released_ones(name, prefix):
    infos = {prefix + k: v for k, v in infos_of(meta_stability(name)).items()}
    assert sd3_config(infos) == RELEASED[name]
    assert sd3_architecture("full") == SD35_LARGE


# ---- GGUF ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(ERROR_BOUNDS), ids=lambda q: q.name)
def test_gguf_loads_quantized_and_matches_the_fp32_model(tmp_path, tiny, reference, qtype):
    path = write_gguf(tmp_path / f"sd3-{qtype.name}.gguf", stability_state_dict(tiny), quantize_where_possible(qtype),
                      arch="sd3")
    contents = read_gguf(path)
    assert contents.architecture == "sd3"
    assert contents.tensors["joint_blocks.0.x_block.mlp.fc2.weight"].qtype == qtype

    loaded = load_gguf_sd3_transformer(path, torch.float32)
    x, expected = reference
    with torch.no_grad():
        output = loaded(**x).sample
    error = ((output - expected).norm() / expected.norm()).item()
    assert error < ERROR_BOUNDS[qtype], f"{qtype.name}: relative error {error:.4f}"

    fc2 = loaded.transformer_blocks[0].ff.net[2]
    assert isinstance(fc2, GGUFLinear) and fc2.qtype == qtype and isinstance(loaded.pos_embed.proj, GGUFConv2d)
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLayer)]
    # Every quantized tensor stays packed in its layer, but the positional embedding (a buffer, unpacked once).
    packed = sum(t.nbytes for name, t in contents.tensors.items() if t.qtype not in PLAIN_TYPES and name != "pos_embed")
    assert sum(layer.weight.numel() for layer in layers) == packed


def test_gguf_q_k_v_are_views_of_the_fused_tensor_and_the_swap_stays_quantized(tmp_path, tiny):
    path = write_gguf(tmp_path / "sd3.gguf", stability_state_dict(tiny), quantize_where_possible(Q.Q8_0), arch="sd3")
    loaded = load_gguf_sd3_transformer(path, torch.float32)
    for attn in (loaded.transformer_blocks[0].attn, loaded.transformer_blocks[0].attn2):
        assert all(isinstance(layer, GGUFLinear) for layer in (attn.to_q, attn.to_k, attn.to_v))
        assert len({layer.weight.untyped_storage().data_ptr() for layer in (attn.to_q, attn.to_k, attn.to_v)}) == 1
    for name in ("norm_out.linear", "transformer_blocks.2.norm1_context.linear"):  # halves swapped on packed rows
        layer, expected = loaded.get_submodule(name), tiny.get_submodule(name).weight
        assert isinstance(layer, GGUFLinear) and layer.weight_shape == (256, 128)
        weight = dequantize(layer.weight, layer.qtype, layer.weight_shape)
        assert ((weight - expected).norm() / expected.norm()).item() < 0.01  # Q8_0 rounding; swapped halves: 1.4


def test_gguf_of_another_architecture_is_refused(tmp_path, tiny):
    path = write_gguf(tmp_path / "flux.gguf", stability_state_dict(tiny), quantize_where_possible(Q.Q8_0), arch="flux")
    with pytest.raises(ModelFileError, match="flux.gguf holds a 'flux' model, not an SD3 transformer"):
        load_gguf_sd3_transformer(path)


# ---- files that are not what they should be --------------------------------------------------------------


def rewritten(tmp_path, tiny, change) -> Path:
    """The tiny model's file after ``change`` (a function of its tensors, prefixed names) has edited them."""
    path = write_sd3_transformer(tmp_path / "full.safetensors", tiny, dtype=torch.float16, prefix=PREFIX)
    tensors = load_file(path)
    change(tensors)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    return broken


def test_missing_block_tensor_is_a_clear_error(tmp_path, tiny):
    broken = rewritten(tmp_path, tiny, lambda t: t.pop(PREFIX + "joint_blocks.1.context_block.mlp.fc2.weight"))
    expected = r"broken\.safetensors.*1 tensors missing.*transformer_blocks\.1\.ff_context\.net\.2\.weight"
    with pytest.raises(ModelFileError, match=expected):
        load_sd3_transformer(broken)


def test_missing_embedder_is_a_clear_error(tmp_path, tiny):
    broken = rewritten(tmp_path, tiny, lambda t: t.pop(PREFIX + "pos_embed"))
    with pytest.raises(ModelFileError, match="broken.safetensors: This SD3 transformer has no tensor 'pos_embed'"):
        load_sd3_transformer(broken)


def test_text_stream_of_another_width_is_a_clear_error(tmp_path, tiny):
    def widen(tensors):
        for param in ("weight", "bias"):
            key = f"{PREFIX}context_embedder.{param}"
            tensors[key] = torch.cat([tensors[key], tensors[key][:64]])

    expected = r"broken\.safetensors: .* text stream is 192 channels wide .* but its image stream 128"
    with pytest.raises(ModelFileError, match=expected):
        load_sd3_transformer(rewritten(tmp_path, tiny, widen))


def test_fused_tensor_of_another_width_is_a_clear_error(tmp_path, tiny):
    def narrow(tensors):
        key = PREFIX + "joint_blocks.1.x_block.attn.qkv.weight"
        tensors[key] = tensors[key][:320].clone()

    expected = r"broken\.safetensors: SD3 tensor joint_blocks\.1\.x_block\.attn\.qkv\.weight has 320 rows, not 3 x 128"
    with pytest.raises(ModelFileError, match=expected):
        load_sd3_transformer(rewritten(tmp_path, tiny, narrow))


def test_other_files_are_refused():
    with pytest.raises(ModelFileError, match="not an SD3 transformer in Stability AI's layout"):
        load_sd3_transformer(single_file("sd1"))
