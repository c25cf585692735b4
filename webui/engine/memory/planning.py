"""The memory manager's plan for a job, made before it runs: where each phase's units would go, what it would move
and stream, and its peak device memory ("will it fit?", ``webui.engine.forecast``).

A ``PlanningManager`` is a copy of the real manager whose placements only update where units are said to be: the
job's phases call the very same ``prepare`` and ``prepare_vae`` on it as on the real one, so the plan is the
policy's, not a second model of it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from webui.engine.memory.manager import Component, MemoryManager, MemoryPolicy, SimulatedMemory, phase_activation
from webui.engine.memory.stream import Unit
from webui.engine.memory import MB


@dataclass(frozen=True)
class PhasePlan:
    """One phase as planned: its components, and the device bytes it would use."""

    components: tuple[str, ...]
    resident: int  # weights on the device while it runs (every component's, not only its own)
    streamed: int  # bytes of its components streamed at every call
    in_flight: int  # device copies of streamed units that may exist at once
    activation: int  # the phase's activation estimate (with a low-bit layer's unpacked weight)
    moved: int  # bytes moved to place it (to the device and back)
    held: int = 0  # held beside the weights (the denoiser's CUDA graphs) while it runs

    @property
    def peak(self) -> int:
        if "denoiser" in self.components:  # a replayed graph's activations are in its own pool
            return self.resident + self.in_flight + max(self.activation, self.held)
        return self.resident + self.in_flight + self.activation + self.held


@dataclass
class PlannedHold:
    """What the real manager holds, as a plan sees it: its bytes, until the plan releases it."""

    component: str
    nbytes: int

    def release(self, why: str) -> None:
        pass


class PlanningManager(MemoryManager):
    """Plans as ``real`` would from where its units are now, moving nothing; ``phases`` records each ``prepare``."""

    def __init__(self, real: MemoryManager, policy: MemoryPolicy, activation: int):
        memory = SimulatedMemory(real.device, real.memory.total() / MB, capacity=real.capacity())
        super().__init__(real.device, memory, real.min_unit_bytes)
        self.limited = real.limited
        self.components = {name: _planned(c) for name, c in real.components.items()}
        self.policy, self.activation = policy, activation  # not begin(): the real device's counters stay as they are
        self._pinning_refused = real._pinning_refused
        self.held = [PlannedHold(h.component, h.nbytes) for h in real.held]  # released here as the real ones would be
        self._page_locked_here: set[Unit] = set()  # units whose first eviction in this plan page-locks them
        self.phases: list[PhasePlan] = []
        self._moved = 0

    def _arrange(self, needed: list[Component], activation: int, once: bool) -> None:
        self._moved = 0
        super()._arrange(needed, activation, once)
        self.phases.append(PhasePlan(
            components=tuple(c.name for c in needed),
            resident=self.resident_bytes(),
            streamed=sum(c.streamed_bytes() for c in needed),
            in_flight=sum(c.in_flight_bytes() for c in needed),
            activation=phase_activation(needed, activation),
            moved=self._moved,
            held=self.held_bytes(),
        ))

    def _place(self, component: Component, keep: set[Unit], stream: bool, pin_host: bool = True) -> None:
        if keep != component.on_device:
            self._release_held(component.companion_of or component.name, f"{component.name} moved")
        self._moved += sum(u.nbytes for u in keep - component.on_device) + sum(
            u.nbytes for u in component.on_device - keep if self._eviction_copies(u, pin_host))
        component.on_device = set(keep)
        component.streaming = stream and len(keep) < len(component.units)

    def _eviction_copies(self, unit: Unit, pin_host: bool) -> bool:
        """Whether evicting ``unit`` copies its bytes, as ``MemoryManager._move`` does it: not where its parameters
        point back at the host tensors they came from (``Unit.home``, which a device of "cpu" does not keep), unless
        those are to be page-locked first (Swap Location "Shared": once, at a component's first eviction)."""
        came_from_host = unit.home is not None or all(p.device.type == "cpu" for p in unit.parameters())
        if self.device.type == "cpu" or not came_from_host:
            return True
        home = unit.home or [p.data for p in unit.parameters()]
        locked = unit in self._page_locked_here or unit.page_locked(home)
        if locked or not pin_host or not self._pinning():
            return False
        self._page_locked_here.add(unit)
        return True


def _planned(component: Component) -> Component:
    """A copy of ``component`` whose placement can change without touching the real one (units are shared)."""
    twin = copy.copy(component)
    twin.on_device = set(component.on_device)
    twin.streamer = None
    return twin
