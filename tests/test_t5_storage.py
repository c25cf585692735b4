"""T5-XXL stored in fp8 or bitsandbytes int8 (setting t5_storage_dtype); the feed-forward outputs stay 16-bit."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_flow_pipelines import engine_for, files, flux_request, images, parts  # noqa: F401 (fixtures)
from webui.engine.weights.fp8 import Fp8Linear, to_fp8
from webui.engine.weights.t5_storage import STORAGE, store_t5
from webui.errors import UserError
from webui.settings import OPTION_CHOICES, OPTION_DEFAULTS
from webui.synthetic.builders import build_t5_encoder

CPU = torch.device("cpu")


def encode(model, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_the_setting_offers_every_storage():
    assert OPTION_CHOICES["t5_storage_dtype"] == tuple(STORAGE) and OPTION_DEFAULTS["t5_storage_dtype"] == "Automatic"


@pytest.mark.parametrize("storage", ["float8-e4m3fn", "float8-e5m2"])
def test_fp8_t5_computes_with_its_rounded_weights_and_keeps_wo(storage):
    model = build_t5_encoder(seed=11)
    reference = copy.deepcopy(model)
    fp8 = STORAGE[storage]
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and not n.endswith(".wo"))
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(".wo"):
            module.weight.data = to_fp8(module.weight.data, fp8).float()

    saved = store_t5(model, storage, CPU)
    assert saved == linear_bytes * 3 // 4, "4 bytes became 1 in every Linear but wo"
    layers = dict(model.named_modules())
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for n, m in layers.items() if n.endswith(".wo"))
    assert all(m.weight.dtype == fp8 for m in layers.values() if isinstance(m, Fp8Linear))
    assert torch.equal(encode(model), encode(reference)), "the same as computing with the fp8-rounded weights"


def test_int8_t5_is_refused_on_the_cpu_with_what_to_do(tmp_path, files):  # noqa: F811
    engine = engine_for(tmp_path, files, "flux-aio.safetensors")
    engine.options.update({"t5_storage_dtype": "float8-e4m3fn"})
    fp8 = images(engine.txt2img(flux_request("flux-aio.safetensors")))
    loaded = engine.models.current
    engine.options.update({"t5_storage_dtype": "bnb-int8"})
    with pytest.raises(UserError) as refused:
        engine.txt2img(flux_request("flux-aio.safetensors"))
    assert refused.value.field == "t5_storage_dtype"
    assert "NVIDIA" in str(refused.value) and "float8-e4m3fn" in str(refused.value)
    assert engine.models.current is loaded, "refused before the loaded model was let go"
    engine.options.update({"t5_storage_dtype": "float8-e4m3fn"})
    assert np.array_equal(images(engine.txt2img(flux_request("flux-aio.safetensors"))), fp8)
    assert engine.models.current.t5.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    engine.options.update({"t5_storage_dtype": "Automatic"})
    full = images(engine.txt2img(flux_request("flux-aio.safetensors")))
    assert abs(fp8 - full).mean() < 4, "fp8 T5 weights change the picture little"
