"""Models kept in host memory beside the current one, so that switching back to one is a placement, not a load.

Keyed by a fingerprint: the checkpoint's sha256 and everything else that changes what a load makes
(VAE, separate module files, storage dtypes, T5 on or off). The least recently used model leaves
first. A model that leaves is forgotten completely — nothing in the engine keeps a strong reference
to a model that is not current or cached — and that is checked after each eviction: weak references
to its parts must be dead after a garbage collection, and the host and device memory it gave back
are measured and logged.
"""
from __future__ import annotations

import gc
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import psutil
import torch

from webui.engine.loading.load import LoadedModel
from webui.engine.memory import MB
from webui.engine.memory.host_pages import trim_heap

log = logging.getLogger(__name__)

AUTOMATIC_COUNT = 3  # models kept at most when the limit is automatic
AUTOMATIC_RAM_SHARE = 0.5  # ... and only while their weights take at most this share of the host's RAM


@dataclass(eq=False)
class CachedModel:
    model: LoadedModel
    nbytes: int  # its weights in host memory


def keep_limits(option: int, total_ram: int | None = None) -> tuple[int, int]:
    """(models, bytes) the cache may hold, the current model included, for the "sd_checkpoints_limit" option:
    a positive number is taken as given; 0 means automatic (up to 3, within half of the host's RAM)."""
    if option > 0:
        return option, 1 << 62
    total_ram = psutil.virtual_memory().total if total_ram is None else total_ram
    return AUTOMATIC_COUNT, int(total_ram * AUTOMATIC_RAM_SHARE)


class ModelCache:
    """Fingerprint → model, least recently used first."""

    def __init__(self):
        self._entries: OrderedDict[tuple, CachedModel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def use(self, key: tuple) -> CachedModel | None:
        """The model under ``key``, now the most recently used; None if it is not kept."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def add(self, key: tuple, entry: CachedModel) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)

    def names(self) -> list[str]:
        return [entry.model.info.name for entry in self._entries.values()]

    def evict(self, count: int, nbytes: int, keep: tuple | None = None, room: int = 0) -> None:
        """Let models go, least recently used first, until at most ``count`` are kept and their bytes plus ``room``
        (a model about to load) fit in ``nbytes``; ``keep`` (the current model) never goes."""
        leaving: list[CachedModel] = []
        for key in list(self._entries):
            total = sum(e.nbytes for e in self._entries.values()) + room
            if len(self._entries) <= count and total <= nbytes:
                break
            if key != keep:
                leaving.append(self._entries.pop(key))
        if leaving:
            forget(leaving)

    def clear(self) -> None:
        leaving = list(self._entries.values())
        self._entries.clear()
        forget(leaving)


def forget(entries: list[CachedModel]) -> None:
    """Drop the last references to these models, collect, give the host heap's free pages and the device's cached
    blocks back, and check: a part still alive afterwards is named in a warning (something kept a reference: a
    leak)."""
    names = [e.model.info.name for e in entries]
    parts = [(f"{e.model.info.name}: {name}", weakref.ref(module))
             for e in entries for name, module in e.model.components().items()]
    before = _memory_mb()
    entries.clear()
    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    after = _memory_mb()
    alive = [label for label, ref in parts if ref() is not None]
    if alive:
        log.warning("Unloaded %s, but %s are still referenced somewhere: their memory is not free (a leak).",
                    ", ".join(names), ", ".join(alive))
    log.info("Unloaded %s: host memory %+.0f MB, GPU memory %+.0f MB.", ", ".join(names), after[0] - before[0],
             after[1] - before[1])


def _memory_mb() -> tuple[float, float]:
    vram = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return psutil.Process().memory_info().rss / MB, vram / MB
