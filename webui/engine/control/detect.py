"""Running ControlNet preprocessors: a unit's control image made from its picture (or the init image), and the
``/controlnet/detect`` job. Detectors with weights are loaded from the preprocessor folder when first used, the last
one kept in host memory; on a GPU its weights are a memory-manager component for the detection (placed whole: the
detectors find their device from their first weight), on a card with no room for them the CPU runs it."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from webui.engine.control.preprocessors import (
    Preprocessor, as_rgb, find_preprocessor, pixel_perfect_resolution, weight_files)
from webui.engine.control.units import RESIZE_MODES, ControlUnit
from webui.engine.memory.manager import MemoryManager
from webui.errors import UserError

COMPONENT = "preprocessor"  # its name among the memory manager's components
ACTIVATION_PER_PIXEL = 4096  # bytes of activations a detected pixel, at most (openpose's and midas' feature maps)


class Detectors:
    def __init__(self, folder: Path):
        self.folder = folder
        self._loaded: tuple[tuple[Path, ...], Any] | None = None  # the last detector, by its files

    def control_image(self, unit: ControlUnit, image: Image.Image, width: int, height: int, memory: MemoryManager,
                      seed: int, field: str) -> tuple[ControlUnit, Image.Image]:
        """The unit's picture through its preprocessor, for a generation of ``width`` x ``height``; the unit with
        the settings used filled in (its module's own name, the resolution and sliders), for the infotext."""
        preprocessor = find_preprocessor(unit.module, f"{field}.module")
        resolution, a, b = preprocessor.chosen(unit.processor_res, unit.threshold_a, unit.threshold_b)
        if unit.pixel_perfect and preprocessor.resolution:
            resolution = pixel_perfect_resolution(image, width, height, unit.resize_mode == RESIZE_MODES[2])
        used = replace(unit, module=preprocessor.name, processor_res=resolution, threshold_a=a, threshold_b=b)
        if preprocessor.name == "none":
            return used, image
        return used, self.detect(preprocessor, image, resolution, a, b, memory, seed, field)

    def detect(self, preprocessor: Preprocessor, image: Image.Image, resolution: int, a: float, b: float,
               memory: MemoryManager, seed: int = 0, field: str = "controlnet_module") -> Image.Image:
        detector = self._detector(preprocessor, field)
        modules = None if detector is None else _modules(detector)
        with placed(modules, memory, resolution * resolution * ACTIVATION_PER_PIXEL), _seeded(preprocessor, seed):
            try:
                found = preprocessor.detect(as_rgb(image), resolution, a, b, detector)
            except UserError:
                raise
            except Exception as e:  # a detector's own failure on this picture: this request only
                raise UserError(f"preprocessor {preprocessor.label} failed on the image ({type(e).__name__}: {e})",
                                field=field) from e
        return Image.fromarray(np.ascontiguousarray(found).astype(np.uint8)).convert("RGB")

    def _detector(self, preprocessor: Preprocessor, field: str) -> Any:
        if preprocessor.load is None:
            return None
        files = weight_files(preprocessor, self.folder, field)
        key = tuple(files.values())
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # the earlier one goes before the next is read
            try:
                detector = preprocessor.load(files)
            except Exception as e:  # a file of another detector, cut short, or a pickle that is not weights only
                raise UserError(f"{', '.join(p.name for p in key)} could not be read for preprocessor "
                                f"{preprocessor.label} ({type(e).__name__}: {e}); the file may be damaged or of "
                                "another model: replace it", field=field) from e
            self._loaded = key, detector
        return self._loaded[1]


def _modules(detector: Any) -> nn.ModuleDict:
    """The detector's networks: its own module attributes, and those of its parts (openpose's body, hand and face
    estimators)."""
    found: dict[str, nn.Module] = {}
    for name, value in vars(detector).items():
        if isinstance(value, nn.Module):
            found[name] = value
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            found.update({f"{name}_{k}": v for k, v in vars(value).items() if isinstance(v, nn.Module)})
    return nn.ModuleDict(found)


@contextmanager
def placed(modules: nn.Module | None, memory: MemoryManager, activation: int,
           name: str = COMPONENT) -> Iterator[torch.device]:
    """The device the block runs ``modules`` on: the memory manager's, with their weights placed there whole (as a
    component ``name`` for the block), or the CPU where there is no room for them whole (the detectors, and
    transformers' models, find their device from their first weight)."""
    if modules is None or not memory.limited:
        yield memory.device
        return
    memory.register(name, modules)
    device = memory.device
    try:
        memory.prepare([name], activation, phase="preprocess")
        if memory.components[name].streaming:
            memory.unregister(name)
            modules.to("cpu")
            device = torch.device("cpu")
        yield device
    finally:
        if name in memory.components:
            memory.unregister(name)
        modules.to("cpu")  # its buffers too


@contextmanager
def _seeded(preprocessor: Preprocessor, seed: int) -> Iterator[None]:
    """NumPy's random numbers seeded by the job for a preprocessor that draws them (shuffle), the state put back."""
    if not preprocessor.seeded:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        np.random.set_state(state)
