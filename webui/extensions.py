"""Extensions: folders with an ``extension.py`` whose ``setup(api)`` registers what the extension adds.

Built-in extensions (``extensions-builtin/``) load first, then the user's (``--extensions-dir``,
default ``<data-dir>/extensions``), each group in folder-name order. Everything an extension
registers carries its name, so an extension that fails (on import, in ``setup``, in a callback, in
its UI tab) is logged with its name and disabled with all it added, and the app goes on. The
engine's ``hooks.disabled`` is the one record of which extensions failed and why.

What an extension adds to the engine (callbacks, prompt networks, samplers and schedule types) it adds through
the ``Engine``; the rest is kept per engine, in the ``Extensions`` that ``extensions_of(engine)`` returns.
docs/extensions.md is the guide.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from webui.cli import ROOT
from webui.engine.engine import Engine
from webui.engine.hooks import Hooks, Network
from webui.engine.request import GenerationRequest
from webui.engine.sampling.ksampling import KSampler
from webui.engine.sampling.samplers import SchedulerFactory
from webui.engine.xyz import BUILTIN_AXES, Axis, extension_axis
from webui.settings import AppConfig

log = logging.getLogger(__name__)

BUILTIN_DIR = ROOT / "extensions-builtin"
ENTRY = "extension.py"


@dataclass(frozen=True)
class Extension:
    """One extension folder; ``error`` says why it is disabled (None: it runs)."""

    name: str
    path: Path
    builtin: bool
    error: str | None = None

    @property
    def enabled(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class UiTab:
    title: str
    build: Callable[[], None]  # called inside ``gr.Tab(title)``
    owner: str


@dataclass(frozen=True)
class XyzAxis:
    label: str
    apply: Callable[[GenerationRequest, Any], None]  # sets one axis value on the request
    choices: Callable[[], list[str]] | None
    owner: str


@dataclass(frozen=True)
class ApiRoute:
    path: str
    endpoint: Callable[..., Any]
    methods: tuple[str, ...]
    owner: str


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    owner: str


@dataclass
class Extensions:
    """What the extensions of one engine added beyond its hooks; the UI, the API and X/Y/Z read it.

    The lists show only what enabled extensions added."""

    hooks: Hooks  # the engine's (disabling an owner there releases its samplers too)
    found: list[Extension] = field(default_factory=list)
    added: list[UiTab | XyzAxis | ApiRoute | Setting] = field(default_factory=list)

    @property
    def extensions(self) -> list[Extension]:
        """Every extension found, with why it is disabled: a callback may have failed since it loaded."""
        return [replace(ext, error=self.hooks.disabled.get(ext.name)) for ext in self.found]

    @property
    def tabs(self) -> list[UiTab]:
        return self._enabled(UiTab)

    @property
    def axes(self) -> list[XyzAxis]:
        return self._enabled(XyzAxis)

    @property
    def routes(self) -> list[ApiRoute]:
        return self._enabled(ApiRoute)

    @property
    def settings(self) -> list[Setting]:
        return self._enabled(Setting)

    def _enabled(self, kind: type) -> list:
        return [item for item in self.added if isinstance(item, kind) and item.owner not in self.hooks.disabled]

    def fail(self, name: str, doing: str) -> None:
        """Call from an ``except`` block: log the error with the extension's name, then disable the extension
        and remove what it registered."""
        error = sys.exc_info()[1]
        log.exception("Extension %s failed %s; it is disabled.", name, doing)
        self.hooks.disable(name, f"{type(error).__name__} {doing}: {error}")

    def status_markdown(self) -> str:
        """A table of the extensions: where each comes from, and whether it runs or why not."""
        rows = ["| Extension | Kind | Status |", "| --- | --- | --- |"]
        for ext in self.extensions:
            status = "enabled" if ext.enabled else "disabled: " + re.sub(r"\s+", " ", ext.error).replace("|", "\\|")
            rows.append(f"| {ext.name} | {'built-in' if ext.builtin else 'user'} | {status} |")
        return "\n".join(rows)


_loaded: weakref.WeakKeyDictionary[Engine, Extensions] = weakref.WeakKeyDictionary()


class ExtensionAPI:
    """What ``setup(api)`` gets: the one way an extension adds to the app. Each method registers under the
    extension's name; a bad argument raises, which fails (and disables) the extension."""

    def __init__(self, name: str, engine: Engine, registry: Extensions):
        self.name = name
        self.engine = engine
        self._registry = registry

    def on(self, event: str, fn: Callable[..., Any]) -> None:
        """Call ``fn(**kwargs)`` at ``event``; the events and their kwargs are in ``webui.engine.hooks``."""
        self.engine.hooks.on(event, fn, owner=self.name)

    def add_network(self, kind: str, network: Network) -> None:
        """Handle the prompt tags ``<kind:name:args>``: before each generation ``network.activate(model, calls)``."""
        self.engine.add_network(kind, network, owner=self.name)

    def add_sampler(self, name: str, factory: SchedulerFactory, aliases: Sequence[str] = (), *,
                    default_schedule: str | None = None, uses_schedule_type: bool = True,
                    flow_factory: SchedulerFactory | None = None, ksampler: KSampler | None = None) -> None:
        """A new sampler for every model of the SD families (and for Flux/SD3 with ``flow_factory``); see
        ``webui.engine.sampling.samplers.SamplerRegistry.register_sampler``. A name that exists already is refused."""
        self.engine.samplers.register_sampler(name, factory, tuple(aliases), default_schedule=default_schedule,
                                              uses_schedule_type=uses_schedule_type, flow_factory=flow_factory,
                                              ksampler=ksampler, owner=self.name)

    def add_schedule_type(self, name: str, label: str, kwargs: dict[str, Any], aliases: Sequence[str] = (), *,
                          default_rho: float = -1) -> None:
        """A new schedule type: ``kwargs`` are the diffusers scheduler config arguments it sets."""
        self.engine.samplers.register_schedule_type(name, label, kwargs, tuple(aliases), default_rho=default_rho,
                                                    owner=self.name)

    def add_setting(self, key: str, default: Any, label: str, choices: Sequence[str] | None = None) -> None:
        """A new option in the settings store (config.json), typed by ``default``; shown in the Extensions tab."""
        self.engine.options.register(key, default, choices)
        self._registry.added.append(Setting(key, label, self.name))

    def add_ui_tab(self, title: str, build: Callable[[], None]) -> None:
        """A tab after txt2img; ``build()`` makes its Gradio components (it runs inside ``gr.Tab(title)``)."""
        self._registry.added.append(UiTab(title, build, self.name))

    def add_xyz_axis(self, label: str, apply: Callable[[GenerationRequest, Any], None],
                     choices: Callable[[], list[str]] | None = None) -> None:
        """An X/Y/Z plot axis: ``apply(request, value)`` sets one value on a request; ``choices()`` lists values."""
        self._registry.added.append(XyzAxis(label, apply, choices, self.name))

    def add_api_route(self, path: str, endpoint: Callable[..., Any], methods: Sequence[str] = ("GET",)) -> None:
        """A FastAPI route at ``path`` (served with --api or --nowebui)."""
        if not path.startswith("/"):
            raise ValueError(f"an API route's path must start with '/', got {path!r}")
        self._registry.added.append(ApiRoute(path, endpoint, tuple(m.upper() for m in methods), self.name))


def find_extensions(folder: Path, builtin: bool) -> list[Extension]:
    """The extensions in ``folder`` (sub-folders with an extension.py), by name; a missing folder has none."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if (path / ENTRY).is_file():
            found.append(Extension(path.name, path, builtin))
        else:
            log.warning("Extensions: %s has no %s; skipped.", path, ENTRY)
    return found


def discover(config: AppConfig) -> list[Extension]:
    """The extensions to load, in order: built-ins, then the user's, as the flags allow."""
    if config.args.disable_all_extensions:
        return []
    found = find_extensions(BUILTIN_DIR, builtin=True)
    if not config.args.disable_extra_extensions:
        found += find_extensions(config.paths.extensions_dir, builtin=False)
    return found


def load_extensions(engine: Engine, found: list[Extension] | None = None) -> Extensions:
    """Import and set up each extension (default: ``discover``) once, at start. Never raises: a failing
    extension is logged and disabled."""
    registry = Extensions(engine.hooks)
    _loaded[engine] = registry
    modules: set[str] = set()
    for ext in (discover(engine.config) if found is None else found):
        module_name = "webui_ext_" + re.sub(r"\W", "_", ext.name)
        if module_name in modules:
            log.error("Extension %s (%s) skipped: another extension of that name is loaded.", ext.name, ext.path)
            continue
        modules.add(module_name)
        registry.found.append(ext)
        try:
            _import(module_name, ext.path).setup(ExtensionAPI(ext.name, engine, registry))
        except (Exception, SystemExit):
            for name in [m for m in sys.modules if m == module_name or m.startswith(module_name + ".")]:
                del sys.modules[name]
            registry.fail(ext.name, "while loading")
    enabled = [ext.name for ext in registry.extensions if ext.enabled]
    if registry.found:
        log.info("Extensions loaded: %s", ", ".join(enabled) or "none")
    return registry


def _import(module_name: str, folder: Path) -> Any:
    """extension.py as a package (so it can ``from . import helpers`` of its folder)."""
    spec = importlib.util.spec_from_file_location(module_name, folder / ENTRY, submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "setup", None)):
        raise TypeError(f"{ENTRY} defines no setup(api) function")
    return module


def extensions_of(engine: Engine) -> Extensions:
    """What the engine's extensions added; empty where none were loaded."""
    return _loaded.get(engine) or Extensions(engine.hooks)


def plot_axes(engine: Engine) -> list[Axis]:
    """The X/Y/Z plot's axes: the built-in ones, then those enabled extensions added."""
    return [*BUILTIN_AXES, *(extension_axis(a.label, a.apply, a.choices) for a in extensions_of(engine).axes)]
