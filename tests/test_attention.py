"""The attention setting (issue 26): SDPA by default; SageAttention and FlashAttention only where they can run, else
SDPA with why in the log; the flag, the infotext and the setting's choices."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import make_engine
from webui.cli import parse_args
from webui.engine import attention
from webui.engine.attention import BACKENDS, FLAG_CHOICES, SDPA, dispatches, use_attention
from webui.engine.request import GenerationRequest
from webui.settings import OPTION_CHOICES
from webui.synthetic.builders import build_flux_transformer, build_synthetic_model

REQUEST = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=5.0, seed=11, sampler_name="Euler a",
               save_images=False)
CUDA = torch.device("cuda")


def test_the_setting_and_the_flag_name_the_backends():
    assert OPTION_CHOICES["attention_backend"] == tuple(BACKENDS)
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


def test_why_each_backend_cannot_run(monkeypatch):
    """The package first, then the device, then whether the denoiser's attention goes through diffusers'
    dispatcher (Flux's does; the SD UNets' processors call SDPA themselves)."""
    unet, flux = build_synthetic_model("sd1", "tiny").denoiser, build_flux_transformer("tiny")
    assert not dispatches(unet) and dispatches(flux)
    assert attention._why_not(unet, SDPA, CUDA) is None
    if attention.importlib.util.find_spec("sageattention") is None:
        assert "package" in attention._why_not(flux, "SageAttention", CUDA)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: SimpleNamespace(name=name))
    assert "CUDA" in attention._why_not(flux, "SageAttention", torch.device("cpu"))
    assert "SDPA itself" in attention._why_not(unet, "SageAttention", CUDA)
    assert attention._why_not(flux, "SageAttention", CUDA) is None


def test_a_dispatching_denoiser_gets_the_backend_or_says_why_not(monkeypatch):
    """Flux's processors take diffusers' backend; where diffusers refuses it (its kernel's requirements unmet),
    SDPA runs and the reason is diffusers' own."""
    flux = build_flux_transformer("tiny")
    monkeypatch.setattr(attention, "_why_not", lambda denoiser, wanted, device: None)
    set_to = []
    monkeypatch.setattr(type(flux), "set_attention_backend", lambda self, name: set_to.append(name))
    assert use_attention(flux, "FlashAttention", CUDA) == ("FlashAttention", None) and set_to == ["flash"]
    assert use_attention(flux, "FlashAttention", CUDA)[0] == "FlashAttention" and set_to == ["flash"], "set once"

    def refuse(self, name):
        if name != "native":
            raise RuntimeError(f"{name} needs a newer GPU")
        set_to.append(name)

    monkeypatch.setattr(type(flux), "set_attention_backend", refuse)
    running, why = use_attention(flux, "SageAttention", CUDA)
    assert running == SDPA and "needs a newer GPU" in why and set_to[-1] == "native"
