"""The denoiser's attention backend (issue 26's Settings "Attention", ``--attention``): PyTorch's SDPA by default;
SageAttention or FlashAttention through diffusers' attention dispatcher where their package imports, the device is a
CUDA GPU and the denoiser's attention goes through that dispatcher (Flux's does; the SD UNets' and SD3's processors
call SDPA themselves). Otherwise SDPA, with why in one log line.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
SDPA = "SDPA"
# the setting's choices: diffusers' backend name, and the package it needs
BACKENDS = {SDPA: ("native", None), "SageAttention": ("sage", "sageattention"),
            "FlashAttention": ("flash", "flash_attn")}
FLAG_CHOICES = {"sdpa": SDPA, "sage": "SageAttention", "flash": "FlashAttention"}  # --attention's


def use_attention(denoiser: nn.Module, wanted: str, device: torch.device) -> tuple[str, str | None]:
    """Run ``denoiser``'s attention with ``wanted`` where it can: (the backend it runs, why not ``wanted`` or None;
    said once in the log for each choice). What runs is kept on the denoiser, so that it is set only when it
    changes."""
    reason = _why_not(denoiser, wanted, device)
    running = SDPA if reason is not None else wanted
    if getattr(denoiser, "_webui_attention", SDPA) != running:
        try:
            denoiser.set_attention_backend(BACKENDS[running][0])
        except (ImportError, RuntimeError, ValueError) as e:  # diffusers checks the kernel's requirements itself
            reason, running = f"{wanted} could not be set: {e}", SDPA
            denoiser.set_attention_backend(BACKENDS[SDPA][0])
        denoiser._webui_attention = running
    if reason is not None and getattr(denoiser, "_webui_attention_wanted", None) != wanted:
        log.info("Attention: %s; %s runs instead.", reason, SDPA)
    denoiser._webui_attention_wanted = wanted
    return running, reason


def _why_not(denoiser: nn.Module, wanted: str, device: torch.device) -> str | None:
    package = BACKENDS[wanted][1]
    if package is None:
        return None
    if importlib.util.find_spec(package) is None:
        return f"{wanted} needs the {package} package, which is not installed (pip install {package})"
    if device.type != "cuda":
        return f"{wanted} runs on CUDA GPUs only"
    if not dispatches(denoiser):
        return (f"{type(denoiser).__name__}'s attention calls PyTorch's SDPA itself, not diffusers' dispatcher: "
                f"{wanted} is not done for it yet")
    return None


def dispatches(denoiser: nn.Module) -> bool:
    """Whether every attention of ``denoiser`` goes through diffusers' dispatcher (its processors name a backend)."""
    processors = [module.processor for module in denoiser.modules() if hasattr(module, "processor")]
    return bool(processors) and all(hasattr(processor, "_attention_backend") for processor in processors)
