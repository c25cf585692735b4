"""What extensions hook into the engine: callbacks at named moments, and prompt network tags.

The engine fires an event at each of ``EVENTS``; every callback registered for it is called with
the event's keyword arguments. A callback that raises is logged with its owner's name and the
owner (an extension) is disabled: its callbacks and networks are removed, and what it added to the
engine's other registries (``releases``: samplers) too, and the generation goes on. Network tags in prompts (``<lora:name:1.0>``) are handed to the ``Network`` registered for
their kind before each generation, with an empty list when the prompt has none, so that what
was applied for the previous generation can be removed.

Events and their arguments:
    app_started          engine, app (the FastAPI app, or None without a web server)
    model_loaded         model (engine.models.LoadedModel)
    before_generation    request (the GenerationRequest; callbacks may change its fields)
    denoising_step       step, total, latents (the current latents; for SD1.x/SDXL changing them in place
                         changes the image, Flux/SD3 pass an unpacked copy)
    after_generation     request, result (the GenerationResult)
    image_saved          path, image, infotext

Module hooks an extension puts on the denoiser's layers (torch's ``register_forward_hook``) run Python at every call,
which a replayed CUDA graph would skip: the denoiser then runs eager (``engine.graphs``). A hook that only changes
tensors the same way at every call (no Python state read per step, no host sync) can be declared ``graph_safe``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from webui.errors import UserError

log = logging.getLogger(__name__)

EVENTS = ("app_started", "model_loaded", "before_generation", "denoising_step", "after_generation", "image_saved")
NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax


GRAPH_SAFE = "_webui_graph_safe"


def graph_safe(hook: Callable) -> Callable:
    """Declare a module hook safe inside a CUDA graph: what it does to tensors is captured once and replayed (it is
    not called again). Use as a decorator on the hook before registering it."""
    setattr(hook, GRAPH_SAFE, True)
    return hook


def is_graph_safe(hook: Callable) -> bool:
    return getattr(hook, GRAPH_SAFE, False)


@dataclass(frozen=True)
class NetworkCall:
    """One ``<kind:name:arg:...>`` tag of a prompt."""

    kind: str
    name: str
    args: tuple[str, ...] = ()


class Network(Protocol):
    def activate(self, model: Any, calls: list[NetworkCall]) -> dict[str, str]:
        """Make ``model`` compute with exactly these networks (none: as it was loaded); infotext fields to add.
        Raise ``UserError`` for a tag that cannot be honoured (unknown name, wrong family)."""


def extract_networks(prompt: str) -> tuple[str, list[NetworkCall]]:
    """The prompt without its network tags, and the tags in order."""
    calls = []
    for match in NETWORK_TAG.finditer(prompt):
        name, *args = match.group(2).split(":")
        calls.append(NetworkCall(match.group(1).lower(), name.strip(), tuple(a.strip() for a in args)))
    return NETWORK_TAG.sub("", prompt), calls


@dataclass
class _Callback:
    owner: str
    fn: Callable[..., Any]


@dataclass
class Hooks:
    """The registry the engine fires; extensions add to it through ``webui.extensions.ExtensionAPI``."""

    callbacks: dict[str, list[_Callback]] = field(default_factory=lambda: {event: [] for event in EVENTS})
    networks: dict[str, tuple[str, Network]] = field(default_factory=dict)  # kind -> (owner, network)
    disabled: dict[str, str] = field(default_factory=dict)  # owner -> why
    # told the owner disabled here: what it added elsewhere (samplers, schedule types) goes too
    releases: list[Callable[[str], None]] = field(default_factory=list)

    def on(self, event: str, fn: Callable[..., Any], owner: str = "builtin") -> None:
        if event not in self.callbacks:
            raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        self.callbacks[event].append(_Callback(owner, fn))

    def add_network(self, kind: str, network: Network, owner: str = "builtin") -> None:
        """Hand the prompt tags ``<kind:...>`` to ``network``; a kind belongs to the owner that added it first."""
        taken = self.networks.get(kind.lower())
        if taken is not None and taken[0] != owner:
            raise ValueError(f"the network kind {kind!r} belongs to {taken[0]}")
        self.networks[kind.lower()] = (owner, network)

    def fire(self, event: str, **kwargs: Any) -> None:
        for callback in list(self.callbacks[event]):
            try:
                callback.fn(**kwargs)
            except Exception as e:  # an extension's bug must not stop the generation
                log.exception("Extension %s failed in %s; it is disabled.", callback.owner, event)
                self.disable(callback.owner, f"{type(e).__name__} in {event}: {e}")

    def disable(self, owner: str, why: str) -> None:
        self.disabled[owner] = why
        for event, callbacks in self.callbacks.items():
            self.callbacks[event] = [c for c in callbacks if c.owner != owner]
        self.networks = {kind: entry for kind, entry in self.networks.items() if entry[0] != owner}
        for release in self.releases:
            release(owner)

    def activate_networks(self, model: Any, calls: list[NetworkCall]) -> dict[str, str]:
        """Hand each registered network its tags (maybe none); tags of unknown kinds are logged and ignored,
        as A1111 does. The infotext fields the networks return."""
        unknown = sorted({c.kind for c in calls} - self.networks.keys())
        if unknown:
            log.warning("Ignoring prompt tags of unknown kinds: %s", ", ".join(f"<{k}:...>" for k in unknown))
        params: dict[str, str] = {}
        for kind, (owner, network) in list(self.networks.items()):
            try:
                params.update(network.activate(model, [c for c in calls if c.kind == kind]))
            except UserError:
                raise
            except Exception as e:
                log.exception("Extension %s failed applying <%s:...> tags; it is disabled.", owner, kind)
                self.disable(owner, f"{type(e).__name__} applying <{kind}:...> tags: {e}")
        return params
