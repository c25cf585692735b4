"""A ControlNet unit as sd-webui-controlnet (and Forge's built-in ControlNet) names its fields: what a request asks
for, checked once, each bad field named with its unit."""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from webui.engine.control.preprocessors import checked_resolution, find_preprocessor
from webui.errors import UserError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # with hires. fix: the passes a unit acts in
# What a unit's image shows, for Union ControlNets: sd-webui-controlnet's control types (xinsir's SDXL Union modes, in
# their order), then those only Flux Union models have; "Unknown": what its preprocessor makes
UNION_TYPES = ("Unknown", "OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile",
               "Inpaint", "Blur", "Gray", "Low Quality")
MAX_WEIGHT = 2.0  # sd-webui-controlnet's slider
SOFT_INJECTION = 0.825  # "My prompt is more important": residual i of n scaled by this ** (n - 1 - i)


@dataclass
class ControlUnit:
    """One unit. ``image`` None: the img2img init image (sd-webui-controlnet's default where a unit has none)."""

    model: str
    image: Image.Image | None = None
    enabled: bool = True
    module: str = "none"  # the preprocessor, by its name or label
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = CONTROL_MODES[0]
    resize_mode: str = RESIZE_MODES[1]
    hr_option: str = HR_OPTIONS[0]
    processor_res: int = -1  # the preprocessor's detect resolution; -1: its default (512)
    threshold_a: float = -1  # its first and second sliders; -1: their defaults
    threshold_b: float = -1
    pixel_perfect: bool = False  # the detect resolution worked out from the image and generation sizes
    union_control_type: str = UNION_TYPES[0]  # for a Union ControlNet: what the image shows

    def acts_in(self, second_pass: bool, hires: bool) -> bool:
        """Whether it acts in this pass: every pass without hires. fix; with it, as its hr_option says."""
        if second_pass:
            return self.hr_option != HR_OPTIONS[1]
        return not hires or self.hr_option != HR_OPTIONS[2]

    def active_at(self, step: int, steps: int) -> bool:
        """Whether it acts at ``step`` of ``steps`` (diffusers' ControlNet pipelines' rule)."""
        return not (step / steps < self.guidance_start or (step + 1) / steps > self.guidance_end)

    def scales(self, residuals: int) -> list[float]:
        """Each of ``residuals`` outputs' scale (the down blocks', then the middle block's) by the control mode."""
        if self.control_mode == CONTROL_MODES[1]:
            return [self.weight * SOFT_INJECTION ** (residuals - 1 - i) for i in range(residuals)]
        if self.control_mode == CONTROL_MODES[2]:  # diffusers' guess mode: 0.1 … 1, and the unconditional half bare
            return [self.weight * 10 ** (i / (residuals - 1) - 1) for i in range(residuals)]
        return [self.weight] * residuals

    @property
    def cond_only(self) -> bool:
        return self.control_mode == CONTROL_MODES[2]

    def infotext(self) -> str:
        """sd-webui-controlnet's ``ControlNet 0`` value: its fields as "Name: value" pairs (``INFOTEXT_FIELDS``),
        quoted as one; the union control type only where one is set."""
        return ", ".join(f"{name}: {getattr(self, field)}" for name, (field, _) in INFOTEXT_FIELDS.items()
                         if field != "union_control_type" or self.union_control_type != UNION_TYPES[0])


# A unit's infotext names, in the order written -> its fields and how each is read back
INFOTEXT_FIELDS = {"Module": ("module", str), "Model": ("model", str), "Weight": ("weight", float),
                   "Resize Mode": ("resize_mode", str), "Processor Res": ("processor_res", int),
                   "Threshold A": ("threshold_a", float), "Threshold B": ("threshold_b", float),
                   "Guidance Start": ("guidance_start", float), "Guidance End": ("guidance_end", float),
                   "Pixel Perfect": ("pixel_perfect", lambda text: text == "True"),
                   "Control Mode": ("control_mode", str), "Union Control Type": ("union_control_type", str)}


def units_from_infotext(params: dict[str, str]) -> list[dict]:
    """The ControlNet units an infotext's ``ControlNet 0``, ``ControlNet 1`` … describe (parsed: ``parse_infotext``),
    as unit fields without their images; a value that does not read as its type is left out (A1111's paste)."""
    units = []
    while (text := params.get(f"ControlNet {len(units)}")) is not None:
        unit = {}
        for pair in text.split(", "):
            key, _, value = pair.partition(": ")
            if key in INFOTEXT_FIELDS:
                field, read = INFOTEXT_FIELDS[key]
                try:
                    unit[field] = int(float(value)) if read is int else read(value)
                except ValueError:
                    continue
        units.append(unit)
    return units


def checked_units(units: list, has_init_image: bool) -> list[ControlUnit]:
    """The enabled units of a request, each field checked (``controlnet[i].weight`` names a bad one)."""
    checked = []
    for index, unit in enumerate(units):
        where = f"controlnet[{index}]"
        if not isinstance(unit, ControlUnit):
            raise UserError(f"must be a ControlNet unit, got {type(unit).__name__}", field=where)
        if not unit.enabled:
            continue
        if not isinstance(unit.model, str) or not unit.model or unit.model == "None":
            raise UserError("names no ControlNet model: pick one from models/ControlNet", field=f"{where}.model")
        if unit.image is None and not has_init_image:
            raise UserError("has no image (txt2img has no init image to take instead)", field=f"{where}.image")
        for name, low, high in (("weight", 0.0, MAX_WEIGHT), ("guidance_start", 0.0, 1.0),
                                ("guidance_end", 0.0, 1.0)):
            value = getattr(unit, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UserError(f"must be a number from {low} to {high}, got {value!r}", field=f"{where}.{name}")
        if unit.guidance_start >= unit.guidance_end:
            raise UserError(f"must be below guidance_end ({unit.guidance_end}), got {unit.guidance_start}",
                            field=f"{where}.guidance_start")
        for name, choices in (("control_mode", CONTROL_MODES), ("resize_mode", RESIZE_MODES),
                              ("hr_option", HR_OPTIONS), ("union_control_type", UNION_TYPES)):
            if getattr(unit, name) not in choices:
                raise UserError(f"must be one of {', '.join(choices)}, got {getattr(unit, name)!r}",
                                field=f"{where}.{name}")
        find_preprocessor(unit.module, f"{where}.module")
        checked_resolution(unit.processor_res, f"{where}.processor_res")
        for name in ("threshold_a", "threshold_b"):
            value = getattr(unit, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"must be a number (-1: the preprocessor's default), got {value!r}",
                                field=f"{where}.{name}")
        if not isinstance(unit.pixel_perfect, bool):
            raise UserError(f"must be true or false, got {unit.pixel_perfect!r}", field=f"{where}.pixel_perfect")
        checked.append(unit)
    return checked


