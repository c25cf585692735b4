"""The denoiser compiled (issue 26's "Compile the denoiser", ``--compile``): regional compilation, as diffusers'
``compile_repeated_blocks`` does it: each repeated block (the UNets' transformer blocks, Flux's and SD3's joint and
single blocks) is compiled once with dynamic shapes (the weights' too), so a new size, batch, prompt, seed or LoRA
compiles nothing more and the first compile takes seconds, not the minutes of a whole model. Inductor's and Triton's caches live in the data
dir, so that a restart finds what was compiled before.

Where the denoiser streams, the blocks whose weights stream run eager (the streamer's hooks swap their weights
between host and device around each call, which compiled code would trace and compile again); the blocks that stay
on the device run compiled. So that most stay there, the memory plan streams compiled blocks whole or not at all
(``MemoryManager.stream_whole``): a full-size Flux or SD3 block is larger than the streamer's unit, and streaming a
part of each would leave every block eager. The log says how many ran eager and why.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
import torch.fx.experimental._config
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # (diffusers imports inductor anyway)

# diffusers lists the repeated blocks of the models it knows (``_repeated_blocks``); the others' are named here
REPEATED_BLOCKS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}
COMPILED_BLOCKS = "_webui_compiled_blocks"  # the denoiser's attribute: its blocks compiled, found once


def use_cache_dir(data_dir: Path) -> None:
    """Keep inductor's and Triton's caches under ``data_dir``, unless the user pointed them elsewhere (inductor
    writes its default into the environment once it has looked: that one is replaced)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(data_dir / "cache" / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(data_dir / "cache" / "triton"))


def repeated_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The blocks compile works on: those compiled already (found once, kept on the denoiser), else found now."""
    found = getattr(denoiser, COMPILED_BLOCKS, None)
    if found is not None:
        return found
    names = getattr(type(denoiser), "_repeated_blocks", None) or REPEATED_BLOCKS.get(type(denoiser).__name__, ())
    return [module for module in denoiser.modules() if type(module).__name__ in names]


def compile_denoiser(denoiser: nn.Module) -> list[nn.Module]:
    """Compile ``denoiser``'s repeated blocks (once: they are kept on it); the blocks."""
    blocks = getattr(denoiser, COMPILED_BLOCKS, None)
    if blocks is None:
        blocks = repeated_blocks(denoiser)
        # The weights' shapes dynamic too, and sizes never taken as equal because they happen to be (duck sizing:
        # a LoRA's rank 4 and a batch of 4): a LoRA of another rank, whose adapters' weights the block uses,
        # compiles nothing again. (For the process: dynamo reads them when a frame compiles, in whichever thread.)
        torch._dynamo.config.force_parameter_static_shapes = False
        torch.fx.experimental._config.use_duck_shape = False
        # Python floats taken as constants: the blocks' are their layers' eps, which dynamo otherwise traces as
        # symbols, finds fixed and traces the whole block again for (a second trace of each kind, cold or warm)
        torch._dynamo.config.specialize_float = True
        for block in blocks:
            compile_block(block)
        setattr(denoiser, COMPILED_BLOCKS, blocks)
    return blocks


def compile_block(block: nn.Module) -> None:
    """``block.compile(dynamic=True)``, its tensor arguments made plain first (see ``plain``): one graph for every
    block of a kind. The first of a kind gets what the layers before it made — in Flux, views of the embedders'
    outputs, and for the first single block a non-contiguous slice — and dynamo guards a view's base and a tensor's
    strides, so each kind was compiled twice (measured: 4 graphs for Flux's 2 kinds, 7 traces on a warm start)."""
    compiled = torch.compile(block._call_impl, dynamic=True)

    def call(*args, **kwargs):
        return compiled(*map(plain, args), **{key: plain(value) for key, value in kwargs.items()})

    block._compiled_call_impl = call  # (the slot nn.Module.compile sets: __call__ runs it)


def plain(value):
    """A tensor that is a view or whose strides are not a new tensor's (a batch of one counts as contiguous with any
    stride along it, which dynamo still guards) copied into one of its own; the others as they are, tuples (Flux's
    rotary embeddings) item by item. The copies happen at the first block of a kind, once a step."""
    if isinstance(value, torch.Tensor) and (value._base is not None or value.stride() != _packed(value.shape)):
        return value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    return value


def _packed(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def running(denoiser: nn.Module, wanted: bool, streamed: Collection[nn.Parameter]) -> Iterator[tuple[int, int]]:
    """Around a denoising pass: yields (blocks that run compiled, blocks in all). With ``wanted`` the blocks are
    compiled at the first pass, and those holding a ``streamed`` weight run eager for this one; without it, blocks
    compiled for an earlier job run eager (the setting turned off since). Each block on its own: other compiled
    code (the GGUF layers' unpacking) is left as it is."""
    blocks = compile_denoiser(denoiser) if wanted else getattr(denoiser, COMPILED_BLOCKS, [])
    moving = {id(p) for p in streamed}
    eager = [b for b in blocks if not wanted or any(id(p) in moving for p in b.parameters())]
    kept = [(block, block._compiled_call_impl) for block in eager]
    for block in eager:
        block._compiled_call_impl = None  # what nn.Module.compile set: None runs the module's own forward
    try:
        yield (len(blocks) - len(eager) if wanted else 0), len(blocks)
    finally:
        for block, call in kept:
            block._compiled_call_impl = call
