"""The denoiser's attention kernel (issue 26's Settings "Attention", ``--attention``): PyTorch's SDPA by default;
SageAttention (PyPI's ``sageattention``: Triton kernels, INT8 queries and keys, no build step) or FlashAttention
(``flash_attn``) in its place for a denoising pass, where their package imports and the device is a CUDA GPU.

Every family's attention reaches ``torch.nn.functional.scaled_dot_product_attention`` by name at call time (the
UNets' and SD3's processors directly, Flux's through diffusers' dispatcher), so for the pass that one function is
replaced: calls the kernel can take go to it (CUDA, float16 or bfloat16, a head size it knows, no mask, no dropout,
not causal), the others keep SDPA. SD1.x's head sizes (40, 80, 160) are not Sage's: its attention stays SDPA.
(diffusers' own "sage" backend wants sageattention ≥ 2.1.1, which has no wheel on PyPI.)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
SDPA = "SDPA"
HALF = (torch.float16, torch.bfloat16)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    from flash_attn import flash_attn_func  # (batch, tokens, heads, head size)

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           softmax_scale=scale).transpose(1, 2)


@dataclass(frozen=True)
class Kernel:
    """An attention kernel in SDPA's place: its package, the head sizes it takes, the call on SDPA's
    (batch, heads, tokens, head size) tensors."""

    package: str
    head_sizes: tuple[int, ...]
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]

    def takes(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask, dropout_p: float,
              is_causal: bool, enable_gqa: bool = False) -> bool:
        return (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and query.is_cuda
                and query.dtype in HALF and key.dtype == value.dtype == query.dtype and query.dim() == 4
                and query.shape[-1] in self.head_sizes and key.shape[1] == query.shape[1])


KERNELS = {"SageAttention": Kernel("sageattention", (64, 96, 128), _sage),
           "FlashAttention": Kernel("flash_attn", tuple(range(8, 257, 8)), _flash)}
BACKENDS = (SDPA, *KERNELS)  # the setting's choices
FLAG_CHOICES = {"sdpa": SDPA, "sage": "SageAttention", "flash": "FlashAttention"}  # --attention's


def use_attention(denoiser: nn.Module, wanted: str, device: torch.device) -> tuple[str, str | None]:
    """The backend that runs for ``wanted`` here and why not ``wanted`` (None when it runs); the reason is said
    once in the log for each choice of ``denoiser``'s."""
    reason = _why_not(wanted, device)
    if reason is not None and getattr(denoiser, "_webui_attention_wanted", None) != wanted:
        log.info("Attention: %s; %s runs instead.", reason, SDPA)
    denoiser._webui_attention_wanted = wanted
    return (SDPA if reason is not None else wanted), reason


def _why_not(wanted: str, device: torch.device) -> str | None:
    kernel = KERNELS.get(wanted)
    if kernel is None:
        return None
    if importlib.util.find_spec(kernel.package) is None:
        return f"{wanted} needs the {kernel.package} package, which is not installed (pip install {kernel.package})"
    if device.type != "cuda":
        return f"{wanted} runs on CUDA GPUs only"
    try:
        importlib.import_module(kernel.package)
    except Exception as e:  # a package that imports nothing it needs (Triton, its CUDA build) fails in many ways
        return f"{kernel.package} does not import ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def running(backend: str) -> Iterator[None]:
    """Around a denoising pass: ``backend``'s kernel in SDPA's place for the calls it takes."""
    if backend == SDPA:
        yield
        return
    kernel, sdpa = KERNELS[backend], F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if kernel.takes(query, key, value, attn_mask, dropout_p, is_causal, **kwargs):
            return kernel.call(query, key, value, scale)
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
