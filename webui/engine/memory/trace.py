"""Memory over time during a generation (or a whole X/Y/Z plot), for the UI's memory panel.

A thread samples the device's allocated memory and this process's RAM a few times a second; the memory manager
tells the trace when a phase begins (which components it placed, how much of each stayed resident and how much
is streamed) and when it moved weights between host and device (how many MB, how long). Sampling costs the
generation little: two counters read from another thread, about 30 µs ten times a second (benchmarks/memory_trace.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from webui.engine.memory import MB

SAMPLE_SECONDS = 0.1
MAX_SAMPLES = 400  # a long plot is shown at this many points, each the peak of its stretch
PHASE_OF_COMPONENT = {"denoiser": "denoising", "vae": "VAE decode"}  # any other component encodes text


@dataclass(frozen=True)
class MemorySample:
    seconds: float  # since the trace started
    device_mb: float | None  # what torch has allocated on the GPU; None on a CPU device
    weights_mb: float  # the weights the memory manager keeps on the device
    ram_mb: float  # this process's resident memory


@dataclass(frozen=True)
class Phase:
    name: str  # "loading", "text encoding", "denoising", "VAE decode" (img2img: "VAE encode" first)
    start: float
    end: float


@dataclass(frozen=True)
class Move:
    start: float
    seconds: float
    mb: float


@dataclass
class Placement:
    """Where one component's weights were while it ran: the most that stayed resident and that was streamed."""

    resident_mb: float = 0.0
    streamed_mb: float = 0.0


@dataclass
class MemoryTimeline:
    device: str
    samples: list[MemorySample] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    placements: dict[str, Placement] = field(default_factory=dict)
    stream_seconds: float = 0.0  # copying streamed units to the device, step after step
    stream_mb: float = 0.0

    @property
    def move_seconds(self) -> float:
        return sum(move.seconds for move in self.moves)

    @property
    def moved_mb(self) -> float:
        return sum(move.mb for move in self.moves)

    def phase_seconds(self) -> dict[str, float]:
        """Wall time per phase name, summed over its repeats (batches, plot cells), in order of first appearance."""
        totals: dict[str, float] = {}
        for phase in self.phases:
            totals[phase.name] = totals.get(phase.name, 0.0) + phase.end - phase.start
        return totals


class MemoryTrace:
    """One recording; the memory manager holds the running one (``MemoryManager.tracing``)."""

    def __init__(self, device: torch.device, weights_bytes: int):
        self.device = device
        self._start = time.perf_counter()
        self._lock = threading.Lock()
        self._weights_mb = weights_bytes / MB
        self._process = psutil.Process()
        self._timeline = MemoryTimeline(str(device))
        self._phase: tuple[str, float] | None = None
        self.running = True  # until stop()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def begin_phase(self, name: str) -> None:
        with self._lock:
            self._close_phase()
            self._phase = (name, self.now())
        self.sample()

    def placed(self, component: str, resident_bytes: int, streamed_bytes: int) -> None:
        with self._lock:
            placement = self._timeline.placements.setdefault(component, Placement())
            placement.resident_mb = max(placement.resident_mb, resident_bytes / MB)
            placement.streamed_mb = max(placement.streamed_mb, streamed_bytes / MB)

    def moved(self, start: float, seconds: float, moved_bytes: int, weights_bytes: int) -> None:
        """Weights were moved (``start`` from ``time.perf_counter``); ``weights_bytes`` are on the device now."""
        with self._lock:
            self._timeline.moves.append(Move(start - self._start, seconds, moved_bytes / MB))
            self._weights_mb = weights_bytes / MB
        self.sample()

    def streamed(self, seconds: float, copied_bytes: int) -> None:
        with self._lock:
            self._timeline.stream_seconds += seconds
            self._timeline.stream_mb += copied_bytes / MB

    def sample(self) -> None:
        device_mb = None
        if self.device.type == "cuda":  # the nested form: 8x cheaper than memory_allocated's flattened dict
            stats = torch.cuda.memory_stats_as_nested_dict(self.device)  # empty until CUDA is first used: nothing
            device_mb = stats["allocated_bytes"]["all"]["current"] / MB if stats else 0.0
        ram_mb = self._process.memory_info().rss / MB
        with self._lock:
            self._timeline.samples.append(MemorySample(self.now(), device_mb, self._weights_mb, ram_mb))

    def start(self) -> None:
        self.sample()
        SAMPLER.watch(self)

    def stop(self) -> None:
        self.running = False
        SAMPLER.watch(None)
        self.sample()
        with self._lock:
            self._close_phase()
            self._phase = None

    def timeline(self) -> MemoryTimeline:
        """What was recorded so far (the running phase up to now), at most MAX_SAMPLES samples."""
        with self._lock:
            recorded = self._timeline
            phases = list(recorded.phases)
            if self._phase is not None:
                phases.append(Phase(self._phase[0], self._phase[1], self.now()))
            return MemoryTimeline(recorded.device, thinned(recorded.samples, MAX_SAMPLES), phases,
                                  list(recorded.moves),
                                  {name: Placement(p.resident_mb, p.streamed_mb)
                                   for name, p in recorded.placements.items()},
                                  recorded.stream_seconds, recorded.stream_mb)

    def _close_phase(self) -> None:
        if self._phase is not None:
            name, start = self._phase
            self._timeline.phases.append(Phase(name, start, self.now()))


class Sampler:
    """One thread for the life of the process that samples the running trace every SAMPLE_SECONDS. (A thread per
    generation would pay CUDA's per-thread set-up at each one's first sample.)"""

    def __init__(self):
        self.trace: MemoryTrace | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, trace: MemoryTrace | None) -> None:
        with self._lock:
            self.trace = trace
            if trace is not None and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memory-trace", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(SAMPLE_SECONDS)
            trace = self.trace
            if trace is not None:
                trace.sample()


SAMPLER = Sampler()


def thinned(samples: list[MemorySample], limit: int) -> list[MemorySample]:
    """At most ``limit`` samples: consecutive stretches merged into their peak, so that no spike is lost."""
    if len(samples) <= limit:
        return list(samples)
    size = -(-len(samples) // limit)
    merged = []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        devices = [s.device_mb for s in chunk if s.device_mb is not None]
        merged.append(MemorySample(chunk[-1].seconds, max(devices) if devices else None,
                                   max(s.weights_mb for s in chunk), max(s.ram_mb for s in chunk)))
    return merged
