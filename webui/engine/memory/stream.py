"""Per-unit weight streaming: a unit's weights live in host memory and visit the device only
for the duration of its forward.

A *unit* is a module whose parameters move together (a transformer block, a resnet, a large
layer). A streamed unit gets a forward pre-hook that puts device copies of its parameters in
place and a forward hook that puts the host tensors back, so the device copies are freed as
soon as the compute that used them is done.

With ``async_copies`` (Forge's "Async" swap method) copies run on a side CUDA stream: while one
unit computes, the next one in execution order is already being copied. The order is recorded
on the first pass and used from then on. Device memory held by streamed units is bounded: the
host waits for an old unit's compute to finish before it lets more copies start.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from webui.engine.memory.pinned import PinnedBlock

IN_FLIGHT = 3  # streamed units whose device copies may exist at once (in use, prefetched, or being freed)


@dataclass(eq=False)
class Unit:
    """Parameters that move together: a module's own parameters, or those of its whole subtree."""

    name: str
    module: nn.Module
    recurse: bool
    nbytes: int = field(init=False)  # sizes never change; the planner asks often
    home: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # host tensors while on the device
    pinned: PinnedBlock | None = field(default=None, init=False, repr=False)  # page-locked memory its host tensors use

    def __post_init__(self) -> None:
        self.nbytes = sum(p.numel() * p.element_size() for p in self.parameters())

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters(recurse=self.recurse))

    def page_locked(self, tensors: list[torch.Tensor]) -> bool:
        """Whether all of ``tensors`` (its host weights) lie in its page-locked block."""
        return self.pinned is not None and all(self.pinned.holds(tensor) for tensor in tensors)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def split_units(root: nn.Module, max_bytes: int) -> list[Unit]:
    """Cut a component into units of at most ``max_bytes`` where the module tree allows, in registration order.

    A module larger than ``max_bytes`` is split into its children; its own parameters, if any,
    become a unit of their own. A leaf larger than ``max_bytes`` stays whole. Units are modules
    whose forward runs (that is where the hooks fire): containers (ModuleList, ModuleDict), the
    root (a VAE is called through ``decode``, not ``forward``) and modules whose class has a
    ``__call__`` of its own (diffusers' attention processors: an IP-Adapter's layers) are always split.
    """
    units: list[Unit] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        size = param_bytes(module)
        if size == 0 or id(module) in seen:  # a module reachable twice (a tied embedding) is one unit
            return
        seen.add(id(module))
        children = [(n, c) for n, c in module.named_children() if param_bytes(c)]
        never_called = (module is root or isinstance(module, (nn.ModuleList, nn.ModuleDict))
                        or type(module).__call__ is not nn.Module.__call__)
        if (size <= max_bytes and not never_called) or not children:
            units.append(Unit(name or "(root)", module, recurse=True))
            return
        if any(True for _ in module.parameters(recurse=False)):
            units.append(Unit(f"{name}(own)", module, recurse=False))
        for child_name, child in children:
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(root, "")
    # A weight tied between two modules (T5's shared embedding and its encoder's embed_tokens) is moved by the
    # unit of the later one, which is the one called; a unit left with no weight of its own is dropped.
    claimed: set[int] = set()
    kept: list[Unit] = []
    for unit in reversed(units):
        weights = {id(p) for p in unit.parameters()}
        if weights <= claimed:
            continue
        claimed |= weights
        kept.append(unit)
    return kept[::-1]


@dataclass
class CopyStats:
    """What the streamer moved: bytes, and the copy time measured on the device (events) or the host."""

    bytes: int = 0
    seconds: float = 0.0
    _events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def collect(self) -> None:
        """Add up the timed copies (synchronises with them)."""
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000
        self._events.clear()


class Streamer:
    """Streams a set of units of one component to ``device`` around their forwards."""

    def __init__(self, units: list[Unit], device: torch.device, async_copies: bool, stats: CopyStats):
        self.units = units
        self.device = device
        self.stats = stats
        cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if cuda and async_copies else None
        self.timed = cuda
        self._next: dict[Unit, Unit] = {}  # execution order, known after the first pass
        self._seen: list[Unit] = []
        self._recording = True
        self._host: dict[Unit, list[torch.Tensor]] = {u: [p.data for p in u.parameters()] for u in units}
        self._ready: dict[Unit, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._released: deque[torch.cuda.Event] = deque()
        self._handles = []
        for unit in units:
            self._handles.append(unit.module.register_forward_pre_hook(self._make_pre(unit)))
            self._handles.append(unit.module.register_forward_hook(self._make_post(unit), always_call=True))

    def detach(self) -> None:
        """Remove the hooks; the parameters are left on the host."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._ready.clear()

    def _make_pre(self, unit: Unit):
        def pre_hook(module, args):
            self._record(unit)
            copies, event = self._ready.pop(unit, None) or self._copy(unit, stream=None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            for param, copy in zip(unit.parameters(), copies):
                if self.side is not None:
                    copy.record_stream(torch.cuda.current_stream(self.device))
                param.data = copy
            self._prefetch_after(unit)
        return pre_hook

    def _make_post(self, unit: Unit):
        def post_hook(module, args, output):
            for param, host in zip(unit.parameters(), self._host[unit]):
                param.data = host
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self._released.append(done)
                while len(self._released) > IN_FLIGHT:
                    self._released.popleft().synchronize()
        return post_hook

    def _record(self, unit: Unit) -> None:
        """Learn the execution order during the first pass; a repeat of the first unit ends it."""
        if not self._recording:
            return
        if self._seen and unit is self._seen[0]:
            order = self._seen
            self._next = {u: order[(i + 1) % len(order)] for i, u in enumerate(order)}
            self._recording = False
        elif unit not in self._seen:
            self._seen.append(unit)

    def _prefetch_after(self, unit: Unit) -> None:
        following = self._next.get(unit)
        if self.side is None or following is None:
            return
        if following not in self._ready:
            self._ready[following] = self._copy(following, stream=self.side)

    def _copy(self, unit: Unit, stream: torch.cuda.Stream | None) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        hosts = self._host[unit]
        self.stats.bytes += sum(t.numel() * t.element_size() for t in hosts)
        if not self.timed:
            start = time.perf_counter()
            copies = [t.to(self.device) for t in hosts]
            self.stats.seconds += time.perf_counter() - start
            return copies, None
        run_on = stream or torch.cuda.current_stream(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(run_on):
            begin.record(run_on)
            copies = [t.to(self.device, non_blocking=True) for t in hosts]
            end.record(run_on)
        self.stats._events.append((begin, end))
        return copies, (end if stream is not None else None)
