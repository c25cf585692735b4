"""The attention setting (issue 26): SDPA by default; SageAttention and FlashAttention in SDPA's place for a
denoising pass where they can run (the calls they take; the others keep SDPA), else SDPA with why in the log; the
flag, the infotext and the setting's choices."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_engine
from webui.cli import parse_args
from webui.engine import attention
from webui.engine.attention import BACKENDS, FLAG_CHOICES, KERNELS, SDPA, Kernel, use_attention
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.settings import OPTION_CHOICES

REQUEST = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=5.0, seed=11, sampler_name="Euler a",
               save_images=False)
CUDA = torch.device("cuda")


def test_the_setting_and_the_flag_name_the_backends():
    assert OPTION_CHOICES["attention_backend"] == BACKENDS
    assert parse_args(["--attention", "sage"]).attention == "sage" and parse_args([]).attention is None
    assert set(FLAG_CHOICES.values()) == set(BACKENDS)
    with pytest.raises(SystemExit):
        parse_args(["--attention", "xformers"])


def test_a_backend_that_cannot_run_here_falls_back_to_sdpa(tmp_path, sd1_file, caplog):
    engine = make_engine(tmp_path, sd1_file)
    plain = engine.txt2img(GenerationRequest(**REQUEST))
    engine.options.update({"attention_backend": "SageAttention"})
    with caplog.at_level(logging.INFO, logger="webui.engine.attention"):
        result = engine.txt2img(GenerationRequest(**REQUEST))
        engine.txt2img(GenerationRequest(**REQUEST))
    said = [r.getMessage() for r in caplog.records if r.name == "webui.engine.attention"]
    assert len(said) == 1 and "SageAttention" in said[0] and "SDPA runs instead" in said[0], "once, with why"
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))
    assert "Attention:" not in result.infotexts[0]
    flagged = make_engine(tmp_path / "flag", sd1_file, extra_args=("--attention", "flash"))
    assert "Attention:" not in flagged.txt2img(GenerationRequest(**REQUEST)).infotexts[0]


def test_why_a_backend_cannot_run(monkeypatch):
    """The package first, then the device, then whether the package imports."""
    assert attention._why_not(SDPA, CUDA) is None
    if attention.importlib.util.find_spec("sageattention") is None:
        assert "pip install sageattention" in attention._why_not("SageAttention", CUDA)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: SimpleNamespace(name=name))
    assert "CUDA" in attention._why_not("SageAttention", torch.device("cpu"))

    def broken(name):
        raise ImportError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(attention.importlib, "import_module", broken)
    assert "does not import (ImportError: libcuda" in attention._why_not("FlashAttention", CUDA)
    monkeypatch.setattr(attention.importlib, "import_module", lambda name: None)
    assert attention._why_not("SageAttention", CUDA) is None


def test_the_kernel_takes_only_the_calls_it_can_compute():
    sage = KERNELS["SageAttention"]
    q = torch.empty(2, 4, 16, 64, dtype=torch.float16)
    assert not sage.takes(q, q, q, None, 0.0, False), "CPU tensors keep SDPA"
    on_gpu = SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=q.shape, dim=lambda: 4)
    assert sage.takes(on_gpu, on_gpu, on_gpu, None, 0.0, False)
    for refused in (dict(attn_mask=torch.ones(1)), dict(dropout_p=0.1), dict(is_causal=True),
                    dict(enable_gqa=True)):
        call = dict(attn_mask=None, dropout_p=0.0, is_causal=False) | refused
        assert not sage.takes(on_gpu, on_gpu, on_gpu, **call), refused
    sd1_heads = SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=(2, 8, 16, 40), dim=lambda: 4)
    full = SimpleNamespace(is_cuda=True, dtype=torch.float32, shape=q.shape, dim=lambda: 4)
    assert not sage.takes(sd1_heads, sd1_heads, sd1_heads, None, 0.0, False), "SD1.5's head size 40 is not Sage's"
    assert not sage.takes(full, full, full, None, 0.0, False), "float32 keeps SDPA"


def test_a_pass_runs_the_kernel_in_sdpas_place_and_puts_sdpa_back(tmp_path, sdxl_file, monkeypatch):
    """SDXL's attention (the UNet's processors call SDPA themselves) through a stand-in kernel that takes CPU
    tensors: every self- and cross-attention of the pass reaches it, the image is SDPA's (the stand-in computes
    it), the infotext names the backend; after the pass SDPA is PyTorch's again."""
    sdpa, calls = F.scaled_dot_product_attention, []

    def stand_in(q, k, v, scale):
        calls.append(q.shape[-1])
        return sdpa(q, k, v, scale=scale)

    kernel = Kernel("sageattention", (8, 16, 32, 64), stand_in)
    monkeypatch.setitem(KERNELS, "SageAttention", kernel)
    monkeypatch.setattr(Kernel, "takes", lambda self, q, k, v, mask, dropout, causal, **kw: mask is None)
    monkeypatch.setattr(attention, "_why_not", lambda wanted, device: None)
    engine = make_engine(tmp_path, sdxl_file)
    plain = engine.txt2img(GenerationRequest(**REQUEST))
    engine.options.update({"attention_backend": "SageAttention"})
    result = engine.txt2img(GenerationRequest(**REQUEST))
    assert calls and F.scaled_dot_product_attention is sdpa
    assert np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(plain.images[0], dtype=int)).max() <= 1
    assert parse_infotext(result.infotexts[0])["Attention"] == "SageAttention" and result.fast == ("SageAttention",)
    assert use_attention(engine.models.current.denoiser, "SageAttention", CUDA) == ("SageAttention", None)
