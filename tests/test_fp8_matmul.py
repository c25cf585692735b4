"""fp8 matrix multiplication (issue 26, ComfyUI's fp8_matrix_mult): an e4m3fn layer's product in fp8 against the
float32 product of its weight, where it switches on, and the setting, flag and fallback."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from tests.conftest import make_engine
from webui.cli import parse_args
from webui.engine.request import GenerationRequest
from webui.engine.weights import fp8
from webui.engine.weights.fp8 import Fp8Linear, cast_weights_fp8, fp8_linear, use_fp8_matmul

CUDA = torch.device("cuda")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def test_an_fp8_product_is_within_3_percent_of_the_float32_one():
    """The input is rounded to e4m3fn per tensor (3 mantissa bits): that is the error, stated here as under 3 % of the
    product's norm, with the file's weight scale and a bias."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 128, generator=generator) * 0.05).to(torch.float8_e4m3fn)
    scale, bias = torch.tensor(0.5), torch.randn(256, generator=generator).to(torch.bfloat16)
    x = torch.randn(2, 7, 128, generator=generator).to(torch.bfloat16)
    exact = x.float() @ (weight.float() * scale).T + bias.float()
    out = fp8_linear(x, weight, scale, bias)
    assert out.shape == (2, 7, 256) and out.dtype == torch.bfloat16
    assert relative_error(out, exact) < 0.03
    assert relative_error(fp8_linear(x * 1000, weight, None, None), x.float() * 1000 @ weight.float().T) < 0.03, (
        "the input's scale follows its range")


def test_it_switches_on_only_where_tensor_cores_take_it(monkeypatch, caplog):
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 264), nn.Linear(256, 256))
    cast_weights_fp8(model[:2], torch.float8_e4m3fn)
    cast_weights_fp8(model[2:], torch.float8_e5m2)
    layers = [layer for layer in model if isinstance(layer, Fp8Linear)]
    assert len(layers) == 3
    with caplog.at_level(logging.INFO, logger="webui.engine.weights.fp8"):
        assert not use_fp8_matmul(model, True, torch.device("cpu"))
        assert not use_fp8_matmul(model, True, torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records].count(
        "fp8 matrix multiplication runs on CUDA GPUs only: the fp8 layers upcast their weights instead.") == 1
    monkeypatch.setattr(fp8.torch.cuda, "get_device_capability", lambda device: (8, 6))
    assert not use_fp8_matmul(model, True, CUDA), "an RTX 30x0 has no fp8 tensor cores"
    monkeypatch.setattr(fp8.torch.cuda, "get_device_capability", lambda device: (8, 9))
    assert use_fp8_matmul(model, True, CUDA)
    assert [layer.fp8_matmul for layer in layers] == [True, False, False], "e4m3fn, both sides multiples of 16"
    assert not use_fp8_matmul(model, False, CUDA) and not any(layer.fp8_matmul for layer in layers)


def test_the_setting_and_the_flag(tmp_path, sd1_file):
    assert parse_args(["--fast", "fp8_matrix_mult"]).fast == ["fp8_matrix_mult"] and parse_args([]).fast is None
    engine = make_engine(tmp_path, sd1_file, extra_args=("--fast", "fp8_matrix_mult"))
    request = dict(prompt="a red circle", width=64, height=64, steps=3, seed=11, save_images=False)
    engine.options.update({"forge_unet_storage_dtype": "float8-e4m3fn"})
    result = engine.txt2img(GenerationRequest(**request))
    assert "FP8 matmul" not in result.infotexts[0], "on the CPU the layers upcast"
    engine.options.update({"fp8_matrix_mult": True})
    again = engine.txt2img(GenerationRequest(**request))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
