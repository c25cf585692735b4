"""The denoiser compiled (issue 26's "Compile the denoiser", ``--compile``): regional compilation, as diffusers'
``compile_repeated_blocks`` does it: each repeated block (the UNets' transformer blocks, Flux's and SD3's joint and
single blocks) is compiled once with dynamic shapes, so a new size, batch, prompt or seed compiles nothing more and
the first compile takes seconds, not the minutes of a whole model. Inductor's and Triton's caches live in the data
dir, so that a restart finds what was compiled before.

A job whose denoiser streams runs eager: its blocks' weights move between host and device every step, and each
move would be a new compile (the compiled code is specialised to where its inputs live). It is said once in the log.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

log = logging.getLogger(__name__)
# diffusers lists the repeated blocks of the models it knows (``_repeated_blocks``); the others' are named here
REPEATED_BLOCKS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}


def use_cache_dir(data_dir: Path) -> None:
    """Keep inductor's and Triton's caches under ``data_dir``, unless the user pointed them elsewhere (inductor
    writes its default into the environment once it has looked: that one is replaced)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(data_dir / "cache" / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(data_dir / "cache" / "triton"))


def repeated_blocks(denoiser: nn.Module) -> list[nn.Module]:
    names = getattr(type(denoiser), "_repeated_blocks", None) or REPEATED_BLOCKS.get(type(denoiser).__name__, ())
    return [module for module in denoiser.modules() if type(module).__name__ in names]


def compile_denoiser(denoiser: nn.Module) -> int:
    """Compile ``denoiser``'s repeated blocks (once: a block compiled already is left as it is); how many are."""
    blocks = repeated_blocks(denoiser)
    for block in blocks:
        if not is_compiled(block):
            block.compile(dynamic=True)
    return len(blocks)


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def running(denoiser: nn.Module, streaming: bool) -> Iterator[bool]:
    """Around a denoising pass: yields whether it runs compiled; a streaming one runs eager."""
    compiled = any(is_compiled(block) for block in repeated_blocks(denoiser))
    if not compiled or not streaming:
        yield compiled
        return
    with torch.compiler.set_stance("force_eager"):
        yield False
