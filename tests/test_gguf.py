"""GGUF: reading files without trusting them, dequantizing exactly, and models whose weights stay quantized."""
from __future__ import annotations

import math
import os
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from tests.test_flux import inputs
from webui.engine.families.flux import load_gguf_flux_transformer
from webui.engine.formats import gguf_file
from webui.engine.formats.gguf_file import read_gguf
from webui.engine.weights.gguf_load import (
    gguf_state_dict,
    quantize_where_possible,
    stored_shape,
    write_gguf,
)
from webui.engine.memory.manager import MemoryManager, MemoryPolicy, SimulatedMemory
from webui.synthetic.ldm_export import flux_to_bfl
from webui.engine.weights.quant import (
    PLAIN_TYPES,
    SUPPORTED_TYPES,
    GGUFConv2d,
    GGUFLinear,
    QuantizedLayer,
    QuantTensor,
    dequantize,
    replace_with_quantized,
)
from webui.errors import ModelFileError
from webui.synthetic.builders import build_flux_transformer, build_synthetic_model

# Where each block type keeps its fp16 scales (d, and dmin/m where it has one): random bytes anywhere else are valid.
FP16_AT = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
           Q.Q6_K: (208,)}
QUANTIZABLE_BY_GGUF = (Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)  # gguf.quants.quantize has these; K-types it only reads
# Relative L2 error of the tiny Flux's output against the fp32 model, measured 1.08 % (Q8_0), 5.2 % (Q4_K: only
# the 4 matrices whose rows are multiples of 256 can be Q4_K, the rest stay F16) and 11.4 % (the mixed file:
# Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 and Q4_K by turns).
ERROR_BOUNDS = {"Q8_0": 0.02, "Q4_K": 0.08, "mixed": 0.15}


def random_blocks(qtype: Q, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` valid blocks of ``qtype`` as (count, type size) bytes: random bits, finite scales of weight size."""
    if qtype in PLAIN_TYPES:
        values = rng.normal(size=(count, 1)).astype(np.float32)
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(count, -1)
    blocks = rng.integers(0, 256, size=(count, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for at in FP16_AT[qtype]:
        blocks[:, at:at + 2] = rng.normal(0, 0.01, size=(count, 1)).astype(np.float16).view(np.uint8)
    return blocks


def as_shape(blocks: np.ndarray, qtype: Q, rows: int) -> tuple[int, ...]:
    return rows, blocks.size // rows // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0]


def quant_tensor(qtype: Q, rows: int, blocks_per_row: int, seed: int = 0) -> QuantTensor:
    blocks = random_blocks(qtype, rows * blocks_per_row, np.random.default_rng(seed)).reshape(rows, -1)
    return QuantTensor(torch.from_numpy(blocks), qtype, as_shape(blocks, qtype, rows))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf_numpy_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    packed = [random_blocks(qtype, 96, rng).reshape(6, -1)]
    if qtype in QUANTIZABLE_BY_GGUF:
        packed.append(gguf.quants.quantize(rng.normal(size=(6, 512)).astype(np.float32), qtype))
    for raw in packed:
        raw = raw.view(np.uint8)
        shape = as_shape(raw, qtype, 6)
        expected = gguf.quants.dequantize(raw, qtype).reshape(shape)
        actual = dequantize(torch.from_numpy(raw), qtype, shape).numpy()
        assert actual.dtype == np.float32 and np.array_equal(actual.view(np.uint32), expected.view(np.uint32))
        for dtype in (torch.float16, torch.bfloat16):  # scales rounded first: within a few ulp of the exact value
            low = dequantize(torch.from_numpy(raw), qtype, shape, dtype)
            assert low.dtype == dtype
            assert np.abs(low.float().numpy() - expected).max() <= 2 ** -6 * np.abs(expected).max()


def test_dequantize_refuses_what_it_cannot_unpack():
    with pytest.raises(ValueError, match="IQ4_NL is not a supported GGUF type"):
        dequantize(torch.zeros(18, dtype=torch.uint8), Q.IQ4_NL, (32,))
    with pytest.raises(ValueError, match="cannot hold a Q8_0 tensor"):
        dequantize(torch.zeros(33, dtype=torch.uint8), Q.Q8_0, (32,))


@pytest.mark.parametrize("qtype", [q for q in SUPPORTED_TYPES if q not in PLAIN_TYPES], ids=lambda q: q.name)
def test_quantized_linear_is_linear_with_the_dequantized_weight(qtype):
    weight = quant_tensor(qtype, rows=8, blocks_per_row=2)
    bias = torch.randn(8)
    layer = GGUFLinear(weight, bias)
    x = torch.randn(3, weight.shape[1])
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert torch.equal(layer(x), F.linear(x, weight.dequantize(), bias))
    assert layer(x.double()).dtype == torch.float64, "the compute dtype is the input's"


def test_compiled_code_takes_a_gguf_layers_packed_bytes_at_fixed_sizes():
    """Compiled with every size dynamic, parameters' too (as the denoiser's blocks are), a GGUF layer's packed bytes
    keep their sizes: symbolic, its unpacking's reshapes cost dynamo ~0.7 s of proofs a layer (a tiny Flux Q8_0's
    first compile on this CPU: 48 s with them, 23 s without)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    layer, recorder = GGUFLinear(quant_tensor(Q.Q8_0, rows=64, blocks_per_row=2), torch.randn(64)), EagerAndRecordGraphs()
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(force_parameter_static_shapes=False):
        compiled = torch.compile(layer, backend=recorder, dynamic=True, fullgraph=True)(x)
    torch._dynamo.reset()
    values = [node.meta["example_value"] for graph in recorder.graphs for node in graph.graph.nodes
              if node.op == "placeholder" and isinstance(node.meta["example_value"], torch.Tensor)]
    assert any(isinstance(size, torch.SymInt) for value in values for size in value.shape), "the input is dynamic"
    packed = [value for value in values if value.dtype == torch.uint8]
    assert packed and all(type(size) is int for value in packed for size in value.shape)
    assert torch.equal(compiled, layer(x))


def test_quantized_conv_is_conv_with_the_dequantized_weight():
    conv = torch.nn.Conv2d(16, 8, 4, stride=2, padding=1)
    weight = quant_tensor(Q.Q4_K, rows=1, blocks_per_row=8)
    weight = QuantTensor(weight.raw, Q.Q4_K, conv.weight.shape)  # 8*16*4*4 = 2048 values, stored as one row
    layer = GGUFConv2d(weight, conv)
    x = torch.randn(2, 16, 10, 10)
    assert torch.equal(layer(x), F.conv2d(x, weight.dequantize(), conv.bias, 2, 1))


def test_rows_of_a_quantized_tensor_split_and_join_exactly_without_copies():
    tensor = quant_tensor(Q.Q5_K, rows=12, blocks_per_row=2)
    full = tensor.dequantize()
    parts = torch.split(tensor, [4, 4, 4])
    assert all(torch.equal(p.dequantize(), f) for p, f in zip(parts, full.split([4, 4, 4])))
    assert all(p.raw.untyped_storage().data_ptr() == tensor.raw.untyped_storage().data_ptr() for p in parts)
    first, second = tensor.chunk(2)
    assert torch.equal(torch.cat([second, first]).dequantize(), torch.cat([full[6:], full[:6]]))
    reshaped = QuantTensor(tensor.raw, tensor.qtype, (6, 2, 512))
    with pytest.raises(ValueError, match="cannot be cut or joined by rows"):
        reshaped.split([3, 3])


# ---- whole models ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    model = build_flux_transformer("tiny", seed=3)
    x = inputs(model.config)
    with torch.no_grad():
        reference = model(**x).sample
    return model, x, reference


def bfl_state_dict(model) -> dict[str, torch.Tensor]:
    return flux_to_bfl(dict(model.state_dict()), model.config)


def mixed_types(name: str, tensor: torch.Tensor) -> Q:
    """Every type gguf can write, in turn over the matrices: Q4_K where rows allow, F16 where nothing fits."""
    if tensor.dim() < 2:
        return Q.F16
    if stored_shape(Q.Q4_K, tuple(tensor.shape)):
        return Q.Q4_K
    fitting = [q for q in QUANTIZABLE_BY_GGUF + (Q.BF16,) if stored_shape(q, tuple(tensor.shape))]
    return fitting[sum(map(ord, name)) % len(fitting)] if fitting else Q.F16


QTYPE_FOR = {"Q8_0": quantize_where_possible(Q.Q8_0), "Q4_K": quantize_where_possible(Q.Q4_K), "mixed": mixed_types}


@pytest.mark.parametrize("kind", list(QTYPE_FOR))
def test_flux_gguf_loads_quantized_and_matches_the_fp32_model(tmp_path, tiny_flux, kind):
    model, x, reference = tiny_flux
    path = write_gguf(tmp_path / f"flux-{kind}.gguf", bfl_state_dict(model), QTYPE_FOR[kind])
    contents = read_gguf(path)
    assert contents.architecture == "flux"
    assert contents.tensors["double_blocks.0.img_attn.qkv.weight"].shape == (384, 128)

    loaded = load_gguf_flux_transformer(path, torch.float32)
    with torch.no_grad():
        output = loaded(**x).sample
    error = ((output - reference).norm() / reference.norm()).item()
    assert error < ERROR_BOUNDS[kind], f"{kind}: relative error {error:.4f}"

    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLayer)]
    assert layers and all(layer.weight.dtype == torch.uint8 for layer in layers)
    packed_params = {id(layer.weight) for layer in layers}
    assert {p.dtype for p in loaded.parameters() if id(p) not in packed_params} == {torch.float32}
    packed = sum(t.nbytes for t in contents.tensors.values() if t.qtype not in PLAIN_TYPES)
    plain_fp32 = sum(4 * math.prod(t.shape) for t in contents.tensors.values() if t.qtype in PLAIN_TYPES)
    assert sum(layer.weight.numel() for layer in layers) == packed, "every quantized byte, and only those"
    assert sum(p.numel() * p.element_size() for p in loaded.parameters()) == packed + plain_fp32


def test_fused_tensors_are_split_in_place_in_the_file_mapping(tmp_path, tiny_flux):
    model, _, _ = tiny_flux
    path = write_gguf(tmp_path / "flux.gguf", bfl_state_dict(model), quantize_where_possible(Q.Q8_0))
    attn = load_gguf_flux_transformer(path, torch.float32).transformer_blocks[0].attn
    storages = {layer.weight.untyped_storage().data_ptr() for layer in (attn.to_q, attn.to_k, attn.to_v)}
    assert len(storages) == 1 and isinstance(attn.to_q, GGUFLinear) and attn.to_q.weight_shape == (128, 128)


def test_streamed_quantized_model_computes_exactly_what_the_resident_one_does(tmp_path, tiny_flux):
    model, x, _ = tiny_flux
    path = write_gguf(tmp_path / "flux.gguf", bfl_state_dict(model), quantize_where_possible(Q.Q8_0))
    loaded = load_gguf_flux_transformer(path, torch.float32)
    with torch.no_grad():
        resident = loaded(**x).sample
    device = torch.device("cpu")
    manager = MemoryManager(device, SimulatedMemory(device, 1), min_unit_bytes=16 * 1024)
    component = manager.register("transformer", loaded)
    for mode, fraction in (("auto", 0.5), ("lowvram", 1.0)):
        manager.memory.total_bytes = int(component.nbytes * fraction)
        manager.begin(MemoryPolicy(mode=mode, inference_mb=0), activation=0)
        manager.prepare(["transformer"])
        with torch.no_grad():
            streamed = loaded(**x).sample
        stats = manager.finish()
        assert torch.equal(streamed, resident), mode
        assert 0 < stats.streamed_mb and stats.resident_mb <= stats.budget_mb
    assert component.nbytes == sum(p.numel() * p.element_size() for p in loaded.parameters())


def test_unet_convolutions_stored_reshaped_load_quantized(tmp_path):
    """SD UNet files store 3x3 convolutions as rows of 256 with their shape in metadata (ComfyUI-GGUF's converter)."""
    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser.float()
    path = write_gguf(tmp_path / "unet.gguf", unet.state_dict(), quantize_where_possible(Q.Q8_0), arch="sd1")
    conv = read_gguf(path).tensors["down_blocks.0.resnets.0.conv1.weight"]
    assert conv.shape == (32, 32, 3, 3) and conv.stored_shape == (36, 256)
    with init_empty_weights():
        loaded = UNet2DConditionModel(**unet.config)
    replace_with_quantized(loaded, gguf_state_dict(read_gguf(path)), torch.float32, path.name)
    assert isinstance(loaded.down_blocks[0].resnets[0].conv1, GGUFConv2d)
    sample = torch.randn(1, 4, 16, 16)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample
        actual = loaded(sample, torch.tensor([500]), encoder_hidden_states=context).sample
    assert ((actual - expected).norm() / expected.norm()).item() < 0.02  # measured 1.08 %


# ---- files that lie ----------------------------------------------------------------------------------------


@pytest.fixture
def small_gguf(tmp_path):
    tensors = {"a.weight": torch.randn(4, 64), "b.weight": torch.randn(2, 32), "c.bias": torch.randn(8)}
    return write_gguf(tmp_path / "small.gguf", tensors, quantize_where_possible(Q.Q8_0))


def patch_tensor_info(path, index: int, part: int, value: int) -> None:
    """Overwrite one field of a tensor's info record: part 1 name, 3 dims, 4 type, 5 offset (gguf's field layout)."""
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[index].field.parts[part][0] = value
    reader.data.flush()


@pytest.mark.parametrize("part, value, message", [
    (4, 99, r"tensor 'a.weight' has unknown GGUF type id 99.*supported types are F32, F16, BF16, Q8_0"),
    (4, int(Q.IQ4_NL), r"tensor 'a.weight' is quantized as IQ4_NL, which this version cannot read. Supported types"),
    (3, 48, r"tensor 'a.weight': rows of 48 values are not whole Q8_0 blocks of 32"),
    (5, 1 << 40, r"tensor 'a.weight' starts at byte \d+, past the end of the \d+-byte file"),
    (5, 8, r"tensor 'a.weight' starts at offset 8, not a multiple of the file's alignment 32"),
])
def test_lying_tensor_infos_are_refused_with_a_clear_message(small_gguf, part, value, message):
    patch_tensor_info(small_gguf, 0, part, value)
    with pytest.raises(ModelFileError, match=message):
        read_gguf(small_gguf)


def test_two_tensors_of_one_name_are_refused(small_gguf):
    patch_tensor_info(small_gguf, 1, 1, ord("a"))  # "b.weight" -> "a.weight"
    with pytest.raises(ModelFileError, match="small.gguf has two tensors named 'a.weight'"):
        read_gguf(small_gguf)


def test_overlapping_tensors_are_refused(small_gguf):
    patch_tensor_info(small_gguf, 1, 5, 0)
    with pytest.raises(ModelFileError, match="small.gguf: tensor 'a.weight' .* runs into tensor 'b.weight'"):
        read_gguf(small_gguf)


def test_truncated_file_is_refused(small_gguf):
    os.truncate(small_gguf, small_gguf.stat().st_size - 16)
    with pytest.raises(ModelFileError, match=r"small.gguf is truncated: tensor 'c.bias' needs bytes \d+ to \d+ but "
                                             r"the file ends at \d+. Download or copy it again."):
        read_gguf(small_gguf)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all", b"GGUF\x03\x00\x00\x00" + b"\xff" * 3])
def test_garbage_is_not_a_readable_gguf_file(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.gguf is not a readable GGUF file"):
        read_gguf(path)


def test_flux_loader_refuses_other_architectures(tmp_path, small_gguf):
    path = write_gguf(tmp_path / "sd3.gguf", {"x.weight": torch.randn(2, 32)}, quantize_where_possible(Q.Q8_0), "sd3")
    with pytest.raises(ModelFileError, match="holds a 'sd3' model, not a Flux transformer"):
        load_gguf_flux_transformer(path)
    with pytest.raises(ModelFileError, match="not a Flux transformer in Black Forest Labs' layout"):
        load_gguf_flux_transformer(small_gguf)


# ---- counts that lie (issue 22) ------------------------------------------------------------------------------


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def gguf_array(key: bytes, item_type: gguf.GGUFValueType, count: int, payload: bytes) -> bytes:
    """A metadata entry holding an array: the key, the array type, its item type and count, then ``payload``."""
    return gguf_string(key) + struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, item_type, count) + payload


def raw_gguf(path, tensor_count: int, kv_count: int, entries: bytes) -> os.PathLike:
    """A GGUF v3 file from its counts and metadata bytes as given, true or not."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count) + entries)
    return path


U8, STRING, ARRAY = gguf.GGUFValueType.UINT8, gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize("tensor_count, kv_count, entries, message", [
    (0, 1, gguf_array(b"big", U8, 20_000_000, bytes(64)),
     r"metadata 'big' claims 20000000 values, more than the 64 bytes left in the file can hold"),
    (0, 1, gguf_array(b"tokenizer.ggml.tokens", STRING, 20_000_000, bytes(64)),
     r"metadata 'tokenizer.ggml.tokens' claims 20000000 values, more than the 64 bytes left"),
    (0, 1, gguf_array(b"big", U8, 1_000_001, bytes(1_000_001)),
     r"metadata 'big' claims 1000001 array values \(with the arrays before it\), more than this app reads "
     r"\(1,000,000\)"),
    (0, 10**12, b"", r"the header claims 1000000000000 metadata entries, more than the 0 bytes left"),
    (0, 10_000, bytes(13 * 10_000), r"the header claims 10000 metadata entries, more than this app reads"),
    (10**9, 0, bytes(64), r"the header claims 1000000000 tensors, more than the 64 bytes left"),
    (0, 1, struct.pack("<Q", 2**40) + bytes(16),
     r"a metadata key claims 1099511627776 bytes of text, more than the 16 bytes left"),
    (0, 1, gguf_array(b"nested", ARRAY, 1, struct.pack("<IQ", U8, 20_000_000)),
     r"metadata 'nested' is an array of arrays"),
], ids=["array", "strings", "all arrays", "entries", "too many entries", "tensors", "string", "nested"])
def test_counts_that_lie_are_refused_before_they_are_read(tmp_path, tensor_count, kv_count, entries, message):
    """A 20 MB file claiming an array of 20 million values held the queue 6 minutes and took 14 GB: GGUFReader makes
    numpy objects per value, as many as the file says."""
    path = raw_gguf(tmp_path / "hostile.gguf", tensor_count, kv_count, entries)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="hostile.gguf: " + message):
            read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_long_arrays_are_checked_and_left_out(tmp_path, monkeypatch):
    """A tokenizer's vocabulary (256k strings in real files) is read past, not parsed: nothing here uses it; an
    array short enough is kept."""
    monkeypatch.setattr(gguf_file, "MAX_PARSED_VALUES", 4)
    path = tmp_path / "vocabulary.gguf"
    writer = gguf.GGUFWriter(path, "flux")
    writer.add_array("tokenizer.ggml.tokens", [f"token{i}" for i in range(10)])
    writer.add_array("small", [1, 2, 3])
    writer.add_tensor("a.weight", np.ones((2, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    contents = read_gguf(path)
    assert contents.metadata["small"] == [1, 2, 3] and "tokenizer.ggml.tokens" not in contents.metadata
    assert contents.architecture == "flux" and list(contents.tensors) == ["a.weight"]

    strings = gguf_string(b"a") * 4 + struct.pack("<Q", 2**40)  # the fifth runs past the end
    cut = raw_gguf(tmp_path / "cut.gguf", 0, 1, gguf_array(b"tokens", STRING, 5, strings))
    with pytest.raises(ModelFileError, match="cut.gguf: the strings of metadata 'tokens' run past the end"):
        read_gguf(cut)
