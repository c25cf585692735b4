"""SD1.x / SD2.x / SDXL UNets from GGUF files as ComfyUI-GGUF's converter writes them: LDM names, "sd1"/"sdxl"
metadata, matrices and kernels stored in rows of 256; weights kept quantized until each layer runs."""
from __future__ import annotations

import os

import gguf
import pytest
import torch
from diffusers import UNet2DConditionModel
from gguf import GGMLQuantizationType as Q

from webui.engine.formats.detect import FLUX_MARKER, UNET, Family
from webui.engine.formats.gguf_file import read_gguf
from webui.engine.formats.ldm_keys import unet_to_ldm
from webui.engine.weights.gguf_load import gguf_family, load_gguf_unet, quantize_where_possible, write_gguf
from webui.engine.weights.quant import PLAIN_TYPES, GGUFConv2d, GGUFLinear, QuantizedLayer
from webui.errors import ModelFileError
from webui.synthetic.builders import architecture, build_synthetic_model

# What ComfyUI-GGUF's converter writes in general.architecture: it cannot tell SD2 UNets from SD1's.
DECLARED = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}
FAMILY = {"sd1": Family.SD1, "sd2": Family.SD2, "sdxl": Family.SDXL}
TINY_SDXL_POOLED = 32  # synthetic.py's tiny bigG projection
QTYPES = (Q.Q8_0, Q.Q4_K, Q.F16)
# Relative L2 error of the tiny UNets' output against the fp32 model, measured (sd1, sd2, sdxl): Q8_0 1.06, 1.31,
# 1.09 %; Q4_K 17.7, 20.0, 15.5 % (round-to-nearest Q4_K on every matrix of >= 512 values: 8 % per weight);
# F16 0.065, 0.069, 0.070 %.
ERROR_BOUNDS = {Q.Q8_0: 0.025, Q.Q4_K: 0.25, Q.F16: 0.002}
# Against a plain UNet holding the weights as gguf's numpy code dequantizes them, the output differs by at most
# this much (relative to its largest value); measured 0 (the same float32 weights and ops).
EXACT = 1e-6


@pytest.fixture(scope="module")
def tiny():
    """Per family: the fp32 UNet, its LDM state dict, inputs and its output, built once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            unet = build_synthetic_model(family, "tiny", seed=1).denoiser.float()
            inputs = unet_inputs(unet.config)
            with torch.no_grad():
                cache[family] = unet, unet_to_ldm(unet.state_dict(), unet.config), inputs, unet(**inputs).sample
        return cache[family]
    return get


def unet_inputs(config) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=generator), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator)}
    if config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, TINY_SDXL_POOLED, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return inputs


def write_unet(tmp_path, family: str, ldm: dict, qtype: Q, prefix: str = "", arch: str | None = None):
    tensors = {prefix + name: value for name, value in ldm.items()}
    path = tmp_path / f"{family}-{qtype.name}{'-prefixed' if prefix else ''}.gguf"
    return write_gguf(path, tensors, quantize_where_possible(qtype, shape_fix=True), arch or DECLARED[family])


def load(path, family: str, dtype: torch.dtype = torch.float32):
    return load_gguf_unet(path, dtype, TINY_SDXL_POOLED if family == "sdxl" else None)


def dequantized_reference(unet: UNet2DConditionModel, path) -> UNet2DConditionModel:
    """The original architecture holding the file's weights as gguf's numpy code reads them, by the export's names."""
    contents, state_dict = read_gguf(path), unet.state_dict()
    weights = {}
    for key, ldm_name in zip(state_dict, unet_to_ldm(state_dict, unet.config), strict=True):  # same order
        tensor = contents.tensors[ldm_name]
        weights[key] = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.qtype).reshape(tensor.shape))
    reference = UNet2DConditionModel.from_config(unet.config)
    reference.load_state_dict(weights)
    return reference.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_gguf_unet_computes_with_the_file_weights_and_stays_quantized(tmp_path, tiny, family, qtype):
    unet, ldm, inputs, original = tiny(family)
    path = write_unet(tmp_path, family, ldm, qtype)
    loaded, loaded_family = load(path, family)
    assert loaded_family is FAMILY[family] and gguf_family(path) is FAMILY[family]

    with torch.no_grad():
        output = loaded(**inputs).sample
        expected = dequantized_reference(unet, path)(**inputs).sample
    assert (output - expected).abs().max() <= EXACT * expected.abs().max()
    error = relative_error(output, original)
    assert error < ERROR_BOUNDS[qtype], f"{family} {qtype.name}: relative error {error:.4f}"

    contents = read_gguf(path)
    quantized = [t for t in contents.tensors.values() if t.qtype not in PLAIN_TYPES]
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == len(quantized), "one quantized layer per quantized tensor, none dequantized at load"
    assert (qtype == Q.F16) == (not layers)
    assert {type(m) for m in layers} <= {GGUFLinear, GGUFConv2d}
    assert sum(m.weight.numel() for m in layers) == sum(t.nbytes for t in quantized), "the packed bytes, as stored"
    assert {p.dtype for p in loaded.parameters()} == ({torch.uint8, torch.float32} if layers else {torch.float32})


def test_weights_stored_in_rows_of_256_are_used_with_their_real_shape(tmp_path, tiny):
    _, ldm, _, _ = tiny("sd1")
    path = write_unet(tmp_path, "sd1", ldm, Q.Q4_K)
    tensors = read_gguf(path).tensors
    conv_name = "input_blocks.1.0.in_layers.2.weight"
    linear_name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert tensors[conv_name].stored_shape == (36, 256) and tensors[conv_name].shape == (32, 32, 3, 3)
    assert tensors[linear_name].stored_shape == (4, 256) and tensors[linear_name].shape == (32, 32)
    loaded, _ = load(path, "sd1")
    conv = loaded.down_blocks[0].resnets[0].conv1
    linear = loaded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    for layer, name in ((conv, conv_name), (linear, linear_name)):
        tensor = tensors[name]
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.qtype).reshape(tensor.shape))
        assert layer.weight_shape == tensor.shape and tuple(layer.weight.shape) == (tensor.stored_shape[0], 144)
        assert torch.equal(layer.weight_and_bias(torch.zeros(1))[0], expected)
    assert isinstance(conv, GGUFConv2d) and isinstance(linear, GGUFLinear)


def test_prefixed_names_and_a_16_bit_dtype(tmp_path, tiny):
    _, ldm, inputs, _ = tiny("sdxl")
    bare, _ = load(write_unet(tmp_path, "sdxl", ldm, Q.Q8_0), "sdxl")
    prefixed, family = load(write_unet(tmp_path, "sdxl", ldm, Q.Q8_0, prefix=UNET), "sdxl")
    assert family is Family.SDXL
    with torch.no_grad():
        assert torch.equal(prefixed(**inputs).sample, bare(**inputs).sample)
    half, _ = load(write_unet(tmp_path, "sdxl", ldm, Q.Q8_0, prefix=UNET), "sdxl", torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.uint8, torch.float16}


def test_sdxl_pooled_width_defaults_to_256_channels_per_size_number(tmp_path, tiny):
    """SDXL base takes 1280 pooled + 6 x 256 values; tiny test UNets (32 + 6 x 8) need their pooled width."""
    config = architecture("sdxl", "tiny").unet | {"addition_time_embed_dim": 256,
                                                  "projection_class_embeddings_input_dim": 32 + 6 * 256}
    unet = UNet2DConditionModel(**config)
    path = write_gguf(tmp_path / "sdxl.gguf", unet_to_ldm(unet.state_dict(), unet.config), lambda *_: Q.F16, "sdxl")
    loaded, _ = load_gguf_unet(path)
    assert loaded.config.addition_time_embed_dim == 256 and loaded.add_embedding.linear_1.in_features == 1568
    _, ldm, _, _ = tiny("sdxl")
    tiny_path = write_unet(tmp_path, "sdxl", ldm, Q.F16)
    with pytest.raises(ModelFileError, match=r"sdxl-F16.gguf: this SDXL UNet's label_emb takes 80 values, which are "
                                             r"not a pooled text embedding plus 6 equal size/crop embeddings"):
        load_gguf_unet(tiny_path)
    with pytest.raises(ModelFileError, match="not a pooled text embedding 77 wide"):
        load_gguf_unet(tiny_path, pooled_dim=77)


# ---- files that are not what they say ----------------------------------------------------------------------


@pytest.mark.parametrize("family, arch, message", [
    ("sdxl", "sd1", r"sdxl-F16.gguf says it holds a 'sd1' model, but its tensors are those of a SDXL-family model"),
    ("sd1", "sdxl", r"sd1-F16.gguf says it holds a 'sdxl' model, but its tensors are those of a SD1.x-family model"),
    ("sd1", "flux", r"says it holds a 'flux' model, but its tensors are those of a SD1.x-family model"),
    ("sd1", "wan", r"sd1-F16.gguf holds a 'wan' model, which this app cannot load from GGUF \(the GGUF architectures it knows are flux"),
])
def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path, tiny, family, arch, message):
    path = write_unet(tmp_path, family, tiny(family)[1], Q.F16, arch=arch)
    for read in (gguf_family, load_gguf_unet):
        with pytest.raises(ModelFileError, match=message):
            read(path)


def test_other_models_are_refused(tmp_path):
    flux = write_gguf(tmp_path / "flux.gguf", {FLUX_MARKER: torch.randn(96, 32)}, lambda *_: Q.F16)
    assert gguf_family(flux) is Family.FLUX
    with pytest.raises(ModelFileError, match="flux.gguf holds a Flux transformer, not an SD1.x/SD2.x/SDXL UNet"):
        load_gguf_unet(flux)
    other = write_gguf(tmp_path / "other.gguf", {"blocks.0.weight": torch.randn(4, 32)}, lambda *_: Q.F16, "sd1")
    with pytest.raises(ModelFileError, match=r"other.gguf holds no model this app loads from GGUF: .* \(1 tensors, "
                                             r"e.g. blocks.0.weight\)"):
        load_gguf_unet(other)


@pytest.mark.parametrize("dropped, message", [
    ("out.2.weight", r"sd1-F16.gguf: the SD1.x UNet has no tensor 'out.2.weight'. The file is incomplete"),
    ("middle_block.1.proj_out.weight", r"sd1-F16.gguf: the UNet2DConditionModel in this file does not match its "
                                       r"inferred architecture \(1 tensors missing, e.g. \['mid_block.attentions.0."
                                       r"proj_out.weight'\]"),
])
def test_incomplete_unet_is_refused(tmp_path, tiny, dropped, message):
    ldm = {k: v for k, v in tiny("sd1")[1].items() if k != dropped}
    with pytest.raises(ModelFileError, match=message):
        load_gguf_unet(write_unet(tmp_path, "sd1", ldm, Q.F16))


def test_truncated_file_is_refused(tmp_path, tiny):
    path = write_unet(tmp_path, "sd1", tiny("sd1")[1], Q.Q8_0)
    os.truncate(path, path.stat().st_size - 100)
    for read in (gguf_family, load_gguf_unet):
        with pytest.raises(ModelFileError, match=r"sd1-Q8_0.gguf is truncated: tensor '.*' needs bytes \d+ to \d+ "
                                                 r"but the file ends at \d+. Download or copy it again."):
            read(path)
