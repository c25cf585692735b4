"""How T5-XXL's weights are kept: as its file stores them, in fp8, or in 8 bits through bitsandbytes.

T5-XXL is 4.7 B parameters, as large as the denoiser of SDXL twice over; the setting
``t5_storage_dtype`` shrinks it after loading, whatever the file:

- ``float8-e4m3fn`` / ``float8-e5m2``: weights stored in fp8, upcast per layer per call (``fp8``);
- ``bnb-int8``: LLM.int8() as transformers' ``load_in_8bit`` does it: each weight quantized per row
  to int8 with one float32 scale per row, multiplied in bitsandbytes' int8 kernels, input columns
  with outliers (|x| ≥ 6) in fp16. CUDA only.

Either way the feed-forward output layers (``wo``) stay in 16 bits, as transformers keeps them: T5
casts their input to their dtype, and its activations there do not fit fp16 or fp8. The stored
bytes are ordinary parameters, so the memory manager moves and streams exactly them.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

from webui.engine.memory.stream import param_bytes
from webui.engine.weights.fp8 import Fp8Linear, cast_weights_fp8, is_fp8, upcast_weight
from webui.errors import UserError

FIELD = "t5_storage_dtype"
STORAGE = {"Automatic": None, "float8-e4m3fn": torch.float8_e4m3fn, "float8-e5m2": torch.float8_e5m2,
           "bnb-int8": torch.int8}
OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default, as transformers' BitsAndBytesConfig


class Int8Linear(nn.Module):
    """A bias-free or biased Linear whose weight is int8 rows (``weight``) times float32 row scales / 127."""

    def __init__(self, weight: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.row_scale = nn.Parameter(row_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.weight, self.row_scale
        state.has_fp16_weights, state.is_training = False, False
        bias = None if self.bias is None else self.bias.to(torch.float16)
        # bitsandbytes quantizes the input from fp16 (and says so on every call when it is not).
        out = bnb.matmul(x.to(torch.float16), self.weight, bias=bias, state=state, threshold=OUTLIER_THRESHOLD)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"int8, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def to_int8(layer: nn.Linear, device: torch.device) -> Int8Linear:
    """``layer`` (16-bit or fp8) as int8 rows, quantized on ``device`` by bitsandbytes, kept on the CPU."""
    import bitsandbytes.functional as bnb_functional

    half = torch.empty(0, device=device, dtype=torch.float16)
    weight = upcast_weight(layer, half) if is_fp8(layer.weight) else layer.weight.to(device, torch.float16)
    rows, scales, _ = bnb_functional.int8_vectorwise_quant(weight)
    return Int8Linear(rows.cpu(), scales.cpu(), layer.bias)


def _quantizable(model: T5EncoderModel) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every Linear (plain or fp8) but the feed-forward outputs."""
    kept = {id(m.wo) for m in model.modules() if isinstance(m, T5DenseGatedActDense)}
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) in (nn.Linear, Fp8Linear) and id(child) not in kept]


def check_t5_storage(storage: str, device: torch.device) -> None:
    """Refuse, before anything loads, a storage this machine cannot run."""
    if STORAGE[storage] is not torch.int8:
        return
    if device.type != "cuda":
        raise UserError(f"T5 in 8 bits (bnb-int8) runs on NVIDIA GPUs only (bitsandbytes' int8 kernels), and this "
                        f"app computes on the {device.type.upper()}. Set 'T5 storage' to Automatic or float8-e4m3fn.",
                        FIELD)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError("T5 in 8 bits (bnb-int8) needs the bitsandbytes package, which is not installed: run "
                        "`pip install bitsandbytes` in the app's environment (venv), or set 'T5 storage' to "
                        "float8-e4m3fn.", FIELD) from e


@torch.no_grad()
def store_t5(model: T5EncoderModel, storage: str, device: torch.device) -> int:
    """Store ``model``'s weights as ``storage`` says (before the memory manager registers it); the bytes saved.

    int8 rows are quantized on ``device`` (a CUDA device: bitsandbytes' quantizer), one layer at a time.
    """
    target = STORAGE[storage]
    layers = _quantizable(model) if target is not None else []
    before = sum(param_bytes(layer) for _, _, layer in layers)
    if target is torch.int8:
        for parent, name, layer in layers:
            setattr(parent, name, to_int8(layer, device))
    elif target is not None:
        for _, _, layer in layers:
            cast_weights_fp8(layer, target, min_numel=0)
    return before - sum(param_bytes(getattr(parent, name)) for parent, name, _ in layers)
