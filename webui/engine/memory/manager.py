"""THE memory manager: where every weight lives, decided in one place.

Inputs
- the device's total and free memory (``DeviceMemory``; simulated in tests),
- the user's GPU Weights = total − ``forge_inference_memory`` (Forge's slider), the launch
  flags, and Forge's swap options (``forge_async_loading``, ``forge_pin_shared_memory``),
- an activation estimate for the request, made before the run (``activation_bytes``), plus the
  largest weight a GGUF or fp8 layer of the phase unpacks to 16 bits for one call.

Policy, per phase of a generation (text encoding → denoising → VAE decode):
- The phase's components must be usable on the device. The weight budget is
  min(GPU Weights, what is ours on the device + free − activation estimate).
- If every component fits, everything stays resident: consecutive generations move 0 bytes.
- Else, for the denoiser (called at every step), other components are evicted (whole) to host
  memory, largest first, and if it still does not fit, it gets a per-unit residency plan: the
  largest units stay resident while the budget allows, the rest are streamed
  (``stream.Streamer``). A phase that calls its components once (text encoding, VAE decode)
  evicts others only as far as it needs to stream beside them, smallest first: bringing the
  denoiser back costs more than streaming a text encoder once (issue 24).
- Device memory held between phases by something other than weights (the denoiser's CUDA graphs, ``Held``) counts
  against the budget; it is released when the component it belongs to moves, and when a phase would otherwise have
  to move weights to make room for it (bringing weights back costs more than capturing a graph again).
- Flags: ``--always-gpu`` everything resident, never evicted; ``--lowvram`` every unit of the
  active component streamed; ``--medvram`` only the active component on the device, whole;
  ``--always-offload-from-vram`` everything back to host memory after each generation.

Everything the manager moves is counted in ``GenerationStats``; one log line per generation.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Protocol

import torch
from torch import nn

from webui.engine.memory import MB, host_pages
from webui.engine.memory.pinned import pinned_copies
from webui.engine.memory.stream import IN_FLIGHT, CopyStats, Streamer, Unit, param_bytes, split_units
from webui.engine.memory.trace import PHASE_OF_COMPONENT, MemoryTrace

log = logging.getLogger(__name__)
VAE_TILE = 512  # px: a tiled VAE pass's tiles at most (diffusers' default, the VAE's sample size, is 1024 for SDXL)
UNITS_PER_COMPONENT = 48  # granularity of partial residency: finer packs the budget, coarser streams faster
MIN_UNIT_BYTES = 4 * MB
PIN_RESERVE = 2048 * MB  # host RAM page-locking leaves to the system
LOW_BIT_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)  # GGUF blocks, fp8: unpacked per call


class MemoryMode(StrEnum):
    """The launch flags' memory modes (above); their values are what the log line and the /memory answer say."""

    AUTO = "auto"
    ALWAYS_GPU = "always_gpu"
    LOWVRAM = "lowvram"
    MEDVRAM = "medvram"


class Held(Protocol):
    """Device memory a component's user keeps between phases (its CUDA graphs' pools)."""

    component: str  # whose: released when it or a companion of it moves
    nbytes: int

    def release(self, why: str) -> None: ...


@dataclass(frozen=True)
class MemoryPolicy:
    mode: MemoryMode = MemoryMode.AUTO  # given as the mode or its value ("lowvram")
    offload_after: bool = False
    inference_mb: int = 1024
    async_copies: bool = False
    pinned: bool = False
    budget_scale: float = 1.0  # < 1 after an out-of-memory error: retry with a smaller resident set
    tiled_vae: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", MemoryMode(self.mode))


class DeviceMemory:
    """Total and free memory of the compute device. CPU 'devices' report system RAM and are never limiting."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        import psutil

        return psutil.virtual_memory().total

    def free(self) -> int:
        """What could be allocated now: the driver's free memory, plus what torch keeps cached but unused (blocks
        freed by an eviction stay reserved for reuse, and are ours to fill)."""
        if self.device.type == "cuda":
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return torch.cuda.mem_get_info(self.device)[0] + cached
        return self.host_available()

    def host_available(self) -> int:
        """Host RAM a job may still take (the OS's estimate of what can be had without swapping)."""
        import psutil

        return psutil.virtual_memory().available

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} memory"
        return "system RAM (no CUDA device)"


class SimulatedMemory(DeviceMemory):
    """A device of a given size whose use is exactly what the manager put there: tests' small cards, and a
    forecast's plan (``memory.planning``), where ``capacity`` is what the real device had for our weights then."""

    def __init__(self, device: torch.device, total_mb: float, capacity: int | None = None,
                 host_mb: float | None = None):
        super().__init__(device)
        self.total_bytes = int(total_mb * MB)
        self.capacity = capacity  # None: all of the device, whatever its size is set to later
        self.host_bytes = None if host_mb is None else int(host_mb * MB)  # None: the machine's real RAM
        self.manager: MemoryManager | None = None

    def total(self) -> int:
        return self.total_bytes

    def host_available(self) -> int:
        return super().host_available() if self.host_bytes is None else self.host_bytes

    def free(self) -> int:
        used = self.manager.resident_bytes() if self.manager else 0
        return (self.total_bytes if self.capacity is None else self.capacity) - used


def use_expandable_segments() -> None:
    """Let torch's CUDA allocator grow and shrink its segments in place, unless the user configured it.

    Streamed units of many sizes come and go on the device every step; in torch's default fixed
    segments the free space fragments until an allocation fails with memory free (measured: Flux
    Q8_0 on an 8 GB budget ran out asking for 52 MB with 858 MB reserved but unusable). Works
    before or after CUDA is initialised; it applies to segments made from then on.
    """
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (set_settings or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")


def vae_decode_bytes(width: int, height: int, batch: int, dtype: torch.dtype) -> int:
    """Peak memory of a full (untiled) VAE decode: the decoder's last blocks hold several
    128–256-channel tensors at full resolution (2,440 bytes a pixel at 2-byte precision measured on an H100 for
    SD1.5's and SDXL's VAEs, benchmarks/activations.py; 6 % margin)."""
    return int(width * height * batch * 2_600 * torch.finfo(dtype).bits / 16)


def vae_encode_bytes(width: int, height: int, batch: int, dtype: torch.dtype) -> int:
    """Peak memory of a full (untiled) VAE encode (img2img's init image): the encoder's first blocks hold
    128-channel tensors at full resolution. Its live tensors peak at 0.83 of the decoder's at the same size (counted
    op by op for the 4- and 16-channel VAEs at 256² and 512²); 1,537 bytes a pixel measured on an H100
    (benchmarks/activations.py), 10 % under this."""
    return int(width * height * batch * 1_700 * torch.finfo(dtype).bits / 16)


@dataclass(frozen=True)
class VaePass:
    """A VAE pass's activation memory, over the whole image and tiled; the manager decides which runs."""

    whole: int
    tiled: int  # one tile at a time (the batch's rows together, as diffusers runs them), and the output it keeps


def vae_pass(width: int, height: int, batch: int, dtype: torch.dtype, tile: int, encode: bool = False) -> VaePass:
    """A decode's (or an encode's) ``VaePass`` with tiles of ``tile`` px. A tiled decode keeps every decoded tile
    (they overlap by a quarter: 1.8 times the image) and the blended rows before joining them: three images' worth of
    output; a tiled encode's output is latents, small."""
    bytes_per_pixel = vae_encode_bytes if encode else vae_decode_bytes
    output = 0 if encode else width * height * batch * 3 * dtype.itemsize * 3
    return VaePass(bytes_per_pixel(width, height, batch, dtype),
                   bytes_per_pixel(min(tile, width), min(tile, height), batch, dtype) + output)


@dataclass
class GenerationStats:
    """What memory did during one generation; the log line, the UI and /sdapi/v1/memory show it."""

    resident_mb: float = 0.0
    streamed_mb: float = 0.0
    moved_mb: float = 0.0
    move_seconds: float = 0.0
    page_lock_seconds: float = 0.0  # of move_seconds: the system page-locking host memory (once a component)
    peak_vram_mb: float = 0.0
    budget_mb: float = 0.0
    activation_mb: float = 0.0
    tiled_vae: bool = False
    oom_retries: int = 0
    compiled: bool = False  # a denoising pass ran compiled ("Compile the denoiser")
    graphed: bool = False  # a denoising pass replayed CUDA graphs (``engine.graphs``)
    graphs_mb: float = 0.0  # what the denoiser's graphs held at the end
    mode: MemoryMode = MemoryMode.AUTO
    budgeted: bool = True  # False on a CPU 'device': the weights are in RAM and there is no budget to keep

    def line(self) -> str:
        fast = f"{', compiled' if self.compiled else ''}{f', CUDA graphs {self.graphs_mb:.0f} MB' if self.graphed else ''}"
        if not self.budgeted:
            return f"Memory: {self.resident_mb:.0f} MB of weights in RAM (running on the CPU: no GPU budget{fast})"
        return (f"Memory: {self.resident_mb:.0f} MB resident, {self.streamed_mb:.0f} MB streamed, "
                f"{self.moved_mb:.0f} MB moved in {self.move_seconds:.2f} s, peak VRAM {self.peak_vram_mb:.0f} MB "
                f"(budget {self.budget_mb:.0f} MB, activations ~{self.activation_mb:.0f} MB"
                f"{', tiled VAE' if self.tiled_vae else ''}{fast}, {self.mode})")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class Component:
    """A model component (UNet, VAE, a text encoder) cut into units; each unit is on the device or the host."""

    name: str
    module: nn.Module
    units: list[Unit]
    on_device: set[Unit] = field(default_factory=set)
    streamer: Streamer | None = None
    companion_of: str | None = None  # placed in every phase that places this component (a LoRA's adapters)
    streaming: bool = False  # its units off the device are streamed when it runs (a Streamer, or a planned one)
    together: list[list[Unit]] = field(default_factory=list)  # units streamed all or none (a compiled block's)
    together_key: tuple[int, ...] = ()  # the modules ``together`` was found for (MemoryManager.stream_whole)
    nbytes: int = field(init=False)

    upcast_bytes: int = field(init=False)  # the largest weight one of its low-bit layers unpacks for a call

    def __post_init__(self) -> None:
        self.nbytes = sum(u.nbytes for u in self.units)
        self.upcast_bytes = max((_unpacked_bytes(m) for m in self.module.modules()), default=0)

    def device_bytes(self) -> int:
        return sum(u.nbytes for u in self.on_device)

    def streamed_bytes(self) -> int:
        return self.nbytes - self.device_bytes() if self.streaming else 0

    def in_flight_bytes(self) -> int:
        """Device memory its streamed units' copies take at most while it runs."""
        return IN_FLIGHT * max((u.nbytes for u in self.units), default=0) if self.streamed_bytes() else 0


def _streaming_floor(component: Component) -> int:
    """The least device memory ``component`` runs in: every unit streamed, those in flight on the device."""
    return min(component.nbytes, (IN_FLIGHT + 1) * max((u.nbytes for u in component.units), default=0))


Placement = tuple[Component, set[Unit], bool]  # a component, its units to keep on the device, whether to stream the rest


def plan_phase(components: list[Component], needed: list[Component], budget: int, mode: MemoryMode,
               once: bool) -> list[Placement]:
    """Where every unit goes for a phase that runs ``needed`` within ``budget`` bytes of weights: the policy of the
    module docstring, as placements to make in order (evictions first). Pure: it reads where units are, moves none.

    ``once``: the phase calls its components once (text encoding, a decode), so others are evicted only as far as
    these need to stream beside them, smallest first; else (the denoiser) as far as these fit whole, largest first.
    """
    if mode is MemoryMode.ALWAYS_GPU or (mode is MemoryMode.AUTO and sum(c.nbytes for c in components) <= budget):
        return [(c, set(c.units), False) for c in components]
    others = [c for c in components if c not in needed]
    if mode is MemoryMode.AUTO:
        wanted = sum(_streaming_floor(c) if once else c.nbytes for c in needed)
        evicted = _to_evict(others, budget - wanted, smallest_first=once)
    else:  # medvram and lowvram: only the active components on the device
        evicted = others
    placements: list[Placement] = [(c, set(), False) for c in evicted]
    room = budget - sum(c.device_bytes() for c in others if c not in evicted)
    # Companions (a LoRA's adapters) are given room first: they are small, and streaming hundreds of tiny
    # units costs a hook and a copy each, far more per byte than the large units of the component they adapt.
    for c in sorted(needed, key=lambda c: c.companion_of is None):
        if mode is MemoryMode.LOWVRAM:
            keep = set()
        elif mode is MemoryMode.MEDVRAM and c.nbytes <= room:
            keep = set(c.units)
        else:
            keep = plan_residency(c.units, room, c.together)
        room -= sum(u.nbytes for u in keep)
        placements.append((c, keep, True))
    return placements


def _to_evict(candidates: list[Component], room: int, smallest_first: bool) -> list[Component]:
    """Whole components to move to the host until the resident ones fit in ``room``: the largest first, which frees
    the room in fewest moves, or the smallest first, which costs the fewest bytes to bring back."""
    resident, evicted = sum(c.device_bytes() for c in candidates), []
    for c in sorted(candidates, key=lambda c: c.device_bytes() if smallest_first else -c.device_bytes()):
        if resident <= max(room, 0):
            break
        resident -= c.device_bytes()
        evicted.append(c)
    return evicted


def plan_residency(units: list[Unit], budget: int, together: Sequence[list[Unit]] = ()) -> set[Unit]:
    """The units to keep on the device within ``budget``; the others are streamed.

    ``units`` are in execution order. The streamed ones are spread evenly along it, so that
    while one streamed unit is copied the device computes resident ones: the step then costs
    about max(compute, streamed bytes ÷ bandwidth) instead of their sum. Part of the budget
    is kept for the streamed units' device copies in flight (``stream.IN_FLIGHT``). Each list
    of ``together`` is streamed whole or not at all (a compiled block with one streamed weight
    runs eager: streaming a few whole blocks keeps the others compiled).

    Units are streamed in one fixed order (``spread_order``) until enough bytes are: a smaller
    budget streams the same units and a few more. So a small change of room (a LoRA taking some)
    moves a few units, and only those need page-locking, instead of reshuffling the plan.
    Pure and deterministic.
    """
    total = sum(u.nbytes for u in units)
    if total <= budget:
        return set(units)
    window = (IN_FLIGHT + 1) * max(u.nbytes for u in units)
    must_stream = total - max(budget - window, 0)
    pieces = _pieces(units, together)
    resident, streamed = set(units), 0
    for index in spread_order(len(pieces)):
        if streamed >= must_stream:
            break
        resident.difference_update(pieces[index])
        streamed += sum(u.nbytes for u in pieces[index])
    return resident


def _pieces(units: list[Unit], together: Sequence[list[Unit]]) -> list[list[Unit]]:
    """``units`` in order as what streams at once: each list of ``together`` where its first unit is, every other
    unit alone."""
    group_of = {id(u): group for group in together for u in group}
    pieces, seen = [], set()
    for unit in units:
        group = group_of.get(id(unit), [unit])
        if id(group[0]) not in seen:
            seen.add(id(group[0]))
            pieces.append(group)
    return pieces


def spread_order(count: int) -> list[int]:
    """``range(count)`` in bit-reversed order (0, count/2, count/4, 3count/4, ...): every prefix is spread evenly."""
    bits = max(count - 1, 1).bit_length()
    return sorted(range(count), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))


class MemoryManager:
    """Owns the placement of every registered component's weights."""

    def __init__(self, device: torch.device, memory: DeviceMemory | None = None, min_unit_bytes: int = MIN_UNIT_BYTES):
        self.device = device
        self.min_unit_bytes = min_unit_bytes
        self.memory = memory or DeviceMemory(device)
        if isinstance(self.memory, SimulatedMemory):
            self.memory.manager = self
        # On a real CPU the weights are already where the compute is: there is nothing to plan.
        self.limited = device.type != "cpu" or isinstance(self.memory, SimulatedMemory)
        self.components: dict[str, Component] = {}
        self.policy = MemoryPolicy()
        self.stats = GenerationStats()
        self.last = GenerationStats()
        self._copies = CopyStats()
        self.phase = "nothing yet"  # the components the last prepare() placed, for messages
        self._pinning_refused = False  # the system refused to page-lock host memory: pageable from then on
        self.trace: MemoryTrace | None = None
        self.held: list[Held] = []

    # ---- registration -----------------------------------------------------------------

    def register(self, name: str, module: nn.Module, companion_of: str | None = None) -> Component:
        """Take charge of a module whose weights are in host memory (buffers go to the device: they are small).
        A companion is placed whenever the component it accompanies is."""
        _move_buffers(module, self.device)
        self._release_held(companion_of or name, f"{name} registered")
        unit_bytes = max(self.min_unit_bytes, param_bytes(module) // UNITS_PER_COMPONENT)
        component = Component(name, module, split_units(module, unit_bytes), companion_of=companion_of)
        self.components[name] = component
        return component

    def stream_whole(self, name: str, modules: list[nn.Module]) -> None:
        """From now on stream each of ``modules`` (parts of component ``name``) whole or not at all: compiled
        blocks, which run eager where one weight streams. An empty list lets the plan cut them again."""
        component = self.components[name]
        key = tuple(id(module) for module in modules)
        if component.together_key == key:  # (asked each denoising pass: the groups are found once)
            return
        inside = [{id(m) for m in module.modules()} for module in modules]
        together = [[u for u in component.units if id(u.module) in ids] for ids in inside]
        component.together = [group for group in together if len(group) > 1]
        component.together_key = key

    def unregister(self, name: str) -> None:
        """Let a component go: its weights back to host memory, its streaming hooks removed."""
        component = self.components[name]
        self._release_held(component.companion_of or name, f"{name} let go")
        self._place(self.components.pop(name), set(), stream=False, pin_host=False)

    def convert(self, name: str, dtype: torch.dtype) -> None:
        """Keep a component in another dtype from now on (the VAE's float32 retry after float16 overflowed). The
        conversion happens in host memory, so the device never holds both copies."""
        component = self.components[name]
        self.unregister(name)
        # nn.Module's to(), not diffusers' ModelMixin.to(), which warns about any cast made by hand
        self.register(name, nn.Module.to(component.module, dtype), component.companion_of)

    def release_all(self) -> None:
        """Forget every component (the model is being unloaded): weights back to the host, unpinned since
        nobody will stream them again, and the device's cached blocks returned to the driver."""
        self._release_held(None, "the model is unloaded")
        for component in self.components.values():
            self._place(component, set(), stream=False, pin_host=False)
        self.components.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one generation ---------------------------------------------------------------

    @contextmanager
    def tracing(self) -> Iterator[MemoryTrace]:
        """Record memory over time for the block (the UI's memory panel). A block inside another (a plot's
        cells) adds to the outer recording."""
        if self.trace is not None:
            yield self.trace
            return
        self.trace = MemoryTrace(self.device, self.resident_bytes())
        self.trace.start()
        try:
            yield self.trace
        finally:
            self.trace.stop()
            self.trace = None

    def begin(self, policy: MemoryPolicy, activation: int) -> None:
        self.policy = policy
        self.activation = activation
        self.stats = GenerationStats(mode=policy.mode, activation_mb=activation / MB, budgeted=self.limited)
        self._copies = CopyStats()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def prepare(self, names: list[str], activation: int | None = None, once: bool = False,
                phase: str | None = None) -> None:
        """Make the named components usable on the device for the next phase. ``once``: the phase calls them once
        (text encoding, a decode), so the others keep their place where these can stream beside them. ``phase``:
        its name in the memory trace, where the first component's usual phase is not it (img2img's VAE encode)."""
        activation = self.activation if activation is None else activation
        self.phase = ", ".join(names)
        needed = [self.components[n] for n in names]
        needed += [c for c in self.components.values() if c.companion_of in names]
        if self.trace is not None:
            self.trace.begin_phase(phase or (PHASE_OF_COMPONENT.get(names[0], "text encoding") if names else "other"))
        self._arrange(needed, activation, once)
        if self.trace is not None:
            for c in needed:
                self.trace.placed(c.name, c.device_bytes(), c.streamed_bytes())
        self.stats.resident_mb = max(self.stats.resident_mb, self.resident_bytes() / MB)
        self.stats.streamed_mb = max(self.stats.streamed_mb, sum(c.streamed_bytes() for c in needed) / MB)

    def _arrange(self, needed: list[Component], activation: int, once: bool) -> None:
        activation = phase_activation(needed, activation)
        mode = self.policy.mode if self.limited else MemoryMode.ALWAYS_GPU

        def plan(held: int) -> list[Placement]:
            budget = 0
            if mode is not MemoryMode.ALWAYS_GPU:
                budget = int(self.weight_budget(activation, held) * self.policy.budget_scale)
                self.stats.budget_mb = budget / MB
            return plan_phase(list(self.components.values()), needed, budget, mode, once)

        placements = plan(self.held_bytes())
        if self.held and placements != (without := plan(0)):
            self._release_held(None, f"room for {self.phase}")
            placements = without
        for component, keep, stream in placements:
            self._place(component, keep, stream)

    def hold(self, held: Held) -> None:
        """Count ``held`` against the budget from now on, until it is released (below)."""
        if held not in self.held:
            self.held.append(held)

    def held_bytes(self) -> int:
        return sum(h.nbytes for h in self.held)

    def _release_held(self, component: str | None, why: str) -> None:
        """Release what is held for ``component`` (None: everything)."""
        for held in [h for h in self.held if component is None or h.component == component]:
            self.held.remove(held)
            held.release(why)

    def streamed_parameters(self, name: str) -> list[nn.Parameter]:
        """The weights of ``name`` and its companions (a LoRA's adapters) that stream when it runs."""
        return [p for c in self.components.values() if c.streaming and name in (c.name, c.companion_of)
                for unit in c.units if unit not in c.on_device for p in unit.parameters()]

    def prepare_vae(self, name: str, activation: VaePass, phase: str | None = None) -> bool:
        """Place the VAE for decoding (or, ``phase`` "VAE encode", encoding) with the room its pass needs. True
        when it must be tiled: a whole pass would not fit beside the VAE alone."""
        vae = self.components[name]
        # (what is held does not make it tile: it is released where the pass needs its room)
        tiled = self.policy.tiled_vae or (self.limited and self.weight_budget(activation.whole, 0) < vae.nbytes)
        self.prepare([name], activation=activation.tiled if tiled else activation.whole, once=True, phase=phase)
        self.stats.tiled_vae = self.stats.tiled_vae or tiled
        return tiled

    def recover_from_oom(self) -> None:
        """After an out-of-memory error: free what can be freed and halve the weights' budget for the retry."""
        self._release_held(None, "out of memory")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.policy = replace(self.policy, budget_scale=self.policy.budget_scale / 2, tiled_vae=True)
        self.stats.oom_retries += 1

    def explain_oom(self, width: int, height: int, batch: int) -> str:
        total, free = self.memory.total() / MB, self.memory.free() / MB
        return (f"Out of GPU memory at {width}x{height}, batch {batch}: it needs about {self.activation / MB:.0f} MB "
                f"for activations beside {self.resident_bytes() / MB:.0f} MB of weights on the device, and only "
                f"{free:.0f} MB of {total:.0f} MB were free after a retry with half the weights and a tiled VAE. "
                "Lower the resolution or the batch size, lower GPU Weights, or start with --lowvram.")

    def weight_budget(self, activation: int, held: int | None = None) -> int:
        """Bytes the weights may use on the device now: the user's GPU Weights, capped by what is free beside what
        is ``held`` (by default: what is)."""
        gpu_weights = self.memory.total() - self.policy.inference_mb * MB
        held = self.held_bytes() if held is None else held
        return max(0, min(gpu_weights - held, self.capacity() - held - activation))

    def capacity(self) -> int:
        """Device memory ours to use: what our weights hold now, and what is free (what is held included: torch
        counts its pools as cached, free to fill)."""
        return self.resident_bytes() + self.memory.free()

    def finish(self) -> GenerationStats:
        """Close the generation's accounting (and offload everything if the flag says so)."""
        if self.policy.offload_after:
            for c in self.components.values():
                self._place(c, set(), stream=False)
        self._copies.collect()
        self.stats.moved_mb += self._copies.bytes / MB
        self.stats.move_seconds += self._copies.seconds
        if self.trace is not None:
            self.trace.streamed(self._copies.seconds, self._copies.bytes)
        if self.device.type == "cuda":
            self.stats.peak_vram_mb = torch.cuda.max_memory_allocated(self.device) / MB
        self.last = self.stats
        log.info(self.stats.line())
        return self.stats

    def resident_bytes(self) -> int:
        return sum(c.device_bytes() for c in self.components.values())

    # ---- moving -----------------------------------------------------------------------

    def _place(self, component: Component, keep: set[Unit], stream: bool, pin_host: bool = True) -> None:
        """Put exactly ``keep`` on the device; stream the rest if asked, else leave it on the host.

        Freed device memory stays in torch's cache for the next phase: returning it to the driver on
        every eviction would cost a cudaMalloc per generation."""
        rest = [u for u in component.units if u not in keep]
        unchanged = keep == component.on_device and (
            set(rest) == set(component.streamer.units) if component.streamer else not (stream and rest))
        if unchanged:
            return
        self._release_held(component.companion_of or component.name, f"{component.name} moved")
        if component.streamer is not None:
            component.streamer.detach()
            component.streamer = None
        start, moved, spans = time.perf_counter(), 0, None
        pin = stream and self._pinning()
        for unit in component.units:
            replaced: list[torch.Tensor] = []
            if unit in keep and unit not in component.on_device:
                moved += self._move(unit, self.device, replaced)
                component.on_device.add(unit)
            elif unit not in keep and unit in component.on_device:
                moved += self._move(unit, torch.device("cpu"), replaced, pin_host)
                component.on_device.discard(unit)
            if pin and unit not in keep:
                self._pin(unit, replaced)
            if replaced:  # their bytes now live on the device or in pinned memory: one host copy, unit by unit
                spans = host_pages.model_file_mappings() if spans is None else spans
                host_pages.release(replaced, spans)
        if moved:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            self.stats.moved_mb += moved / MB
            self.stats.move_seconds += seconds
            if self.trace is not None:
                self.trace.moved(start, seconds, moved, self.resident_bytes())
        if stream and rest:
            component.streamer = Streamer(rest, self.device, self.policy.async_copies, self._copies)
        component.streaming = component.streamer is not None

    def _move(self, unit: Unit, target: torch.device, replaced: list[torch.Tensor], pin_host: bool = True) -> int:
        """Move a unit's parameters to ``target``; the host tensors they leave go to ``replaced``.

        A unit that goes to the device keeps its host tensors as its home, so that evicting it copies
        nothing: its parameters point at them again (host memory holds every weight once, in the
        mapped file or in pinned memory). Nothing writes to a weight on the device behind the manager.
        With Swap Location "Shared", a home in the mapped file (whose pages were given back once copied) is
        replaced by a page-locked copy at its first eviction: a component evicted every image (text encoders
        beside a denoiser that needs the room) then comes back at full bus speed instead of faulting the file in.
        """
        params = unit.parameters()
        if target.type == "cpu" and unit.home is not None:
            locked = unit.page_locked(unit.home)
            copies = None if locked or not pin_host or not self._pinning() else self._page_locked(
                unit, [param.data for param in params])
            for param, host in zip(params, copies or unit.home):
                param.data = host
            unit.home = None
            return sum(copy.nbytes for copy in copies or ())
        if target.type != "cpu" and all(param.device.type == "cpu" for param in params):
            unit.home = [param.data for param in params]
        copies = None
        if pin_host and target.type == "cpu" and self._pinning():
            # straight into page-locked memory: one DMA, no pageable copy to fault in and copy again
            copies = self._page_locked(unit, [param.data for param in params])
        if copies is None:
            copies = [param.data.to(target, non_blocking=True) for param in params]
        for param, data in zip(params, copies):
            if data.data_ptr() != param.data.data_ptr():
                replaced.append(param.data)
            param.data = data
        return sum(data.numel() * data.element_size() for data in copies)

    def _pinning(self) -> bool:
        """Whether host copies go to page-locked memory: Swap Location "Shared", on CUDA, until the system refuses."""
        return self.policy.pinned and self.device.type == "cuda" and not self._pinning_refused

    def _pin(self, unit: Unit, replaced: list[torch.Tensor]) -> None:
        """Put a unit's host weights in one page-locked block of their exact size (unless they all are pinned)."""
        params = unit.parameters()
        if not self._pinning() or unit.page_locked([param.data for param in params]):
            return
        copies = self._page_locked(unit, [param.data for param in params])
        for param, data in zip(params, copies or ()):
            replaced.append(param.data)
            param.data = data

    def _page_locked(self, unit: Unit, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Copies of a unit's weights in a new page-locked block, or None: where that would leave the system less
        than ``PIN_RESERVE`` of RAM (locked pages cannot be swapped or reclaimed), or where the system will not lock
        more (pageable memory from then on, said once in the log): streaming goes on, with slower copies."""
        if self.memory.host_available() < unit.nbytes + PIN_RESERVE:
            return None
        start = time.perf_counter()
        try:
            unit.pinned, copies = pinned_copies(tensors)
        except MemoryError as e:
            self._pinning_refused = True
            log.warning("%s Streaming goes on from pageable memory (slower copies).", e)
            return None
        finally:
            self.stats.page_lock_seconds += time.perf_counter() - start
        return copies


def phase_activation(needed: list[Component], activation: int) -> int:
    """A phase's activation estimate, and the largest weight one of its low-bit layers unpacks for a call."""
    return activation + max((c.upcast_bytes for c in needed), default=0)


def _unpacked_bytes(layer: nn.Module) -> int:
    """Device bytes of ``layer``'s weight unpacked to 16 bits for one call, if it is stored in fewer (GGUF blocks
    keep their real shape in ``weight_shape``; fp8 weights are upcast); 0 for other layers."""
    weight = layer._parameters.get("weight")
    if weight is None or weight.dtype not in LOW_BIT_DTYPES:
        return 0
    return math.prod(getattr(layer, "weight_shape", weight.shape)) * 2


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = buf.to(device)


