"""The families the engine knows, found by what ``formats.detect`` reads from a checkpoint."""
from __future__ import annotations

from webui.engine.families.flux import Flux
from webui.engine.families.protocol import FamilyModel
from webui.engine.families.sd import StableDiffusion, StableDiffusion2
from webui.engine.families.sd3 import StableDiffusion3
from webui.engine.families.sdxl import StableDiffusionXL
from webui.engine.formats.detect import Family


class Families:
    """One instance of each family; adding a family is adding its module and its line here. It holds no state:
    the engine keeps one, and code given only a ``Family`` (``lora.keys``) makes its own."""

    def __init__(self) -> None:
        kinds: tuple[FamilyModel, ...] = (StableDiffusion(), StableDiffusion2(), StableDiffusionXL(),
                                          StableDiffusion3(), Flux())
        self._by_family = {kind.family: kind for kind in kinds}

    def __getitem__(self, family: Family) -> FamilyModel:
        return self._by_family[family]
