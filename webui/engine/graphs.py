"""The resident denoiser replayed as a CUDA graph (issue 33): same images, a fraction of the host's work.

A denoising step launches thousands of small kernels; on a fast GPU the host cannot launch them as fast as the GPU
runs them (``shared/notes/whole-image-profile.md``: an SD1.5 step is ~13 ms of GPU work behind 35–50 ms of
launching). So where the denoiser's weights are all on the device, one call of it — the CFG batch included — is
captured once per shape key (the inputs' structure, shapes and dtypes, and what else changes the kernels: the
attention backend, compile, fp8 matmul) with static input buffers, and every later call copies its inputs in and
replays the graph. Capturing costs a few eager calls, not a compile.

The graphs belong to the loaded model's denoiser (``graphs_of``) and are held in the memory manager's accounts
(``MemoryManager.hold``): their memory pools count against the budget, and the manager releases them when the
denoiser or a companion of it moves (an unload, a model switch, a budget that streams it, a LoRA's adapters added or
removed) or when a phase would otherwise have to move weights to make room. A small LRU (``GRAPHS_KEPT``) bounds the
shapes kept. Where capture cannot work — weights streamed per step, not CUDA, an IP-Adapter's layers in the
attention for one job, an extension's hook that runs Python inside the denoiser (unless declared
``hooks.graph_safe``), inputs that change shape at every step — the pass runs eager, and the log says why, once.

The compiled path (``compiled``) is captured the same way: compiled blocks inside a replayed graph.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from webui.engine.hooks import is_graph_safe
from webui.engine.memory import MB

log = logging.getLogger(__name__)

GRAPHS_KEPT = 3  # shapes kept per denoiser (a first pass and its hires pass, and one more)
WARMUP_CALLS = 2  # eager calls before a capture, on a side stream: lazy initialisations, cuBLAS's choices
CAPTURES_A_PASS = 2  # new shapes one pass may capture; more means its inputs change every step: eager instead
GRAPHS = "_webui_graphs"  # the denoiser's attribute: its DenoiserGraphs


class Capture(Protocol):
    def __call__(self, run: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], Any, int]:
        """``run`` (which reads static inputs) warmed up and captured: (replay, its static output, the bytes the
        capture's memory pool holds)."""


def cuda_capture(run: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], Any, int]:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # (thread-local: the memory trace's sampler and a preview may call CUDA from their threads meanwhile)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = run()
    return graph.replay, output, pool_bytes(graph.pool(), device)


def pool_bytes(pool: tuple, device: torch.device) -> int:
    """Device memory the segments of a graph's private memory pool reserve."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
               if segment["device"] == index and tuple(segment.get("segment_pool_id", ())) == tuple(pool))


CAPTURES: dict[str, Capture] = {"cuda": cuda_capture}  # by device type (tests add a CPU one that re-runs)


@dataclass(eq=False)
class CapturedCall:
    inputs: list[torch.Tensor]  # the static buffers each call's tensors are copied into, in flattening order
    replay: Callable[[], None]
    output: Any  # the static output (tensors in the graph's pool)
    nbytes: int  # the pool's bytes and the static inputs'
    seconds: float  # warm-up and capture


@dataclass(frozen=True)
class CallKey:
    """What a captured call is valid for: the inputs' structure, each tensor's shape, dtype and device, the other
    arguments' values, and the pass's settings that change the kernels."""

    spec: TreeSpec
    leaves: tuple
    settings: tuple

    @classmethod
    def of(cls, args: tuple, kwargs: dict, settings: tuple) -> tuple[CallKey, list]:
        """The call's key, and its arguments flattened (``spec`` puts them back together)."""
        leaves, spec = tree_flatten((args, kwargs))
        described = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else _value(x)
                          for x in leaves)
        return cls(spec, described, settings), leaves


def _value(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


class DenoiserGraphs:
    """One denoiser's captured calls, least recently used first; ``nbytes`` is what they hold on the device."""

    component = "denoiser"  # the memory manager's component they belong to

    def __init__(self, device: torch.device):
        self.device = device
        self.calls: OrderedDict[CallKey, CapturedCall] = OrderedDict()
        self.failed: dict[CallKey, str] = {}  # keys whose capture failed, and why (eager from then on)
        self.captures = 0  # in all (tests count them)
        self.replays = 0
        self.pass_captures = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.calls.values())

    def release(self, why: str = "") -> None:
        """Let every graph go (their pools return to torch's cache, and to the driver)."""
        if not self.calls:
            return
        count, mb = len(self.calls), self.nbytes / MB
        self.calls.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("CUDA graphs: %d released (%.0f MB)%s.", count, mb, f": {why}" if why else "")

    def call(self, eager: Callable[..., Any], args: tuple, kwargs: dict, settings: tuple) -> Any:
        """``eager(*args, **kwargs)``'s result, replayed from the graph of this call's key (captured now if new)."""
        key, leaves = CallKey.of(args, kwargs, settings)
        captured = self.calls.get(key)
        if captured is None:
            if key in self.failed or self.pass_captures >= CAPTURES_A_PASS:
                return eager(*args, **kwargs)
            captured = self._capture(key, eager, leaves)
            if captured is None:
                return eager(*args, **kwargs)
        self.calls.move_to_end(key)
        for static, x in zip(captured.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(x)
        captured.replay()
        self.replays += 1
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)

    def _capture(self, key: CallKey, eager: Callable[..., Any], leaves: list) -> CapturedCall | None:
        """``eager`` captured on static copies of the call's tensors (None where capture failed: eager then)."""
        while len(self.calls) >= GRAPHS_KEPT:
            self.calls.popitem(last=False)  # (its pool is freed with it)
        self.pass_captures += 1
        inputs = [x.clone() for x in leaves if isinstance(x, torch.Tensor)]
        fed = iter(inputs)
        static_args, static_kwargs = tree_unflatten([next(fed) if isinstance(x, torch.Tensor) else x
                                                     for x in leaves], key.spec)
        start = time.perf_counter()
        try:
            replay, output, pool = CAPTURES[self.device.type](lambda: eager(*static_args, **static_kwargs),
                                                              self.device)
        except Exception as e:  # a kernel that synchronises, an op capture does not allow: this shape runs eager
            self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("CUDA graphs: capture failed (%s); this shape runs eager.", self.failed[key])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # (a failed capture leaves its stream to finish)
                torch.cuda.empty_cache()  # (its pool, and an out-of-memory's leftovers)
            return None
        captured = CapturedCall(inputs, replay, output, pool + sum(x.nbytes for x in inputs),
                                time.perf_counter() - start)
        self.calls[key] = captured
        self.captures += 1
        shape = "x".join(map(str, inputs[0].shape)) if inputs else "no tensors"
        log.info("CUDA graphs: captured a denoiser call (latents %s) in %.2f s, %.0f MB.", shape, captured.seconds,
                 captured.nbytes / MB)
        return captured


def graphs_of(denoiser: nn.Module, device: torch.device) -> DenoiserGraphs:
    graphs = getattr(denoiser, GRAPHS, None)
    if graphs is None:
        graphs = DenoiserGraphs(device)
        setattr(denoiser, GRAPHS, graphs)
    return graphs


def unsafe_hooks(denoiser: nn.Module) -> str | None:
    """The first hook that would run Python inside the denoiser at every call and is not declared graph-safe, named
    (module path and hook), or None."""
    from torch.nn.modules import module as torch_module

    global_hooks = (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks)
    for hooks in global_hooks:
        for hook in hooks.values():
            if not is_graph_safe(hook):
                return f"a global module hook ({_name(hook)})"
    for path, module in denoiser.named_modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                if not is_graph_safe(hook):
                    return f"a hook on {path or 'the denoiser'} ({_name(hook)})"
    return None


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


def why_not(denoiser: nn.Module, device: torch.device, streamed_mb: float, ip_adapter: bool) -> str | None:
    """Why this pass cannot replay graphs, or None."""
    if device.type not in CAPTURES:
        return f"the denoiser runs on {device.type}, not a CUDA GPU"
    if streamed_mb:
        return f"{streamed_mb:.0f} MB of its weights stream at every step (a graph would replay stale copies)"
    if ip_adapter:
        return "an IP-Adapter's layers stand in the denoiser's attention for this job"
    if getattr(denoiser, "_compiled_call_impl", None) is not None:
        return "the denoiser is compiled whole by something else"
    hook = unsafe_hooks(denoiser)
    if hook is not None:
        return (f"{hook} runs Python inside the denoiser at every call; an extension declares a hook that only reads "
                "with webui.engine.hooks.graph_safe")
    return None


@contextlib.contextmanager
def running(denoiser: nn.Module, device: torch.device, reason: str | None,
            settings: tuple) -> Iterator[DenoiserGraphs | None]:
    """Around a denoising pass: the denoiser's calls replayed from its graphs (yielded), or, with a ``reason``,
    eager (None; the reason said in the log once for each reason and denoiser). (What else the denoiser computes
    with — a LoRA's adapters, ControlNets — are its companions in the memory manager, which releases the graphs
    when one comes, goes or moves.)"""
    if reason is not None:
        if getattr(denoiser, "_webui_graphs_reason", None) != reason:
            log.info("CUDA graphs: eager, %s.", reason)
        denoiser._webui_graphs_reason = reason
        yield None
        return
    denoiser._webui_graphs_reason = None
    graphs = graphs_of(denoiser, device)
    graphs.pass_captures = 0
    eager = denoiser._call_impl
    denoiser._compiled_call_impl = lambda *args, **kwargs: graphs.call(eager, args, kwargs, settings)
    try:
        yield graphs
    finally:
        denoiser._compiled_call_impl = None
