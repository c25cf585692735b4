"""sd-webui-controlnet's API units, as Forge kept them: ``alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}``
on txt2img and img2img, each unit a dict (webuiapi's ``ControlNetUnit.to_dict()``, or the extension's own field
names and their older aliases)."""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image

from webui.engine.control.units import CONTROL_MODES, HR_OPTIONS, RESIZE_MODES, ControlUnit
from webui.errors import UserError

SCRIPT = "controlnet"  # its name in alwayson_scripts (any case)
# What a unit may say that changes nothing here: the preprocessor's settings (no preprocessor runs: module "none"),
# its low-VRAM switch (the memory manager places every model), an effective region mask
IGNORED = ("processor_res", "threshold_a", "threshold_b", "pixel_perfect", "low_vram", "lowvram", "mask",
           "effective_region_mask", "save_detected_map", "is_ui", "input_mode", "batch_images", "advanced_weighting")
RESIZE_ALIASES = {"inner": RESIZE_MODES[1], "outer": RESIZE_MODES[2], "envelope": RESIZE_MODES[2]}


def controlnet_units(entry: Any, decode: Callable[[Any, str], Image.Image]) -> tuple[list[ControlUnit], list[str]]:
    """The units of a ``{"args": [...]}`` entry (``decode`` reads a base64 image for a field) and the unit fields
    that change nothing here, named as ``ControlNet[i].field``."""
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise UserError('must be {"ControlNet": {"args": [unit, ...]}}', field="alwayson_scripts")
    units, ignored = [], []
    for index, given in enumerate(args):
        where = f"ControlNet[{index}]"
        if not isinstance(given, dict):
            raise UserError(f"each unit must be an object (sd-webui-controlnet's fields), got {given!r}", field=where)
        ignored += [f"{where}.{key}" for key in IGNORED if given.get(key) not in (None, False, "", -1)]
        units.append(_unit(given, where, decode))
    return units, ignored


def _unit(given: dict, where: str, decode: Callable[[Any, str], Image.Image]) -> ControlUnit:
    image = given.get("image", given.get("input_image"))
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
        image = image.get("image")
    control_mode = given.get("control_mode", 2 if given.get("guess_mode") or given.get("guessmode") else 0)
    return ControlUnit(
        model=str(given.get("model", "None")),
        image=decode(image, f"{where}.image") if image not in (None, "") else None,
        enabled=given.get("enabled", True) is not False,
        module=given.get("module") or "none",
        weight=given.get("weight", 1.0),
        guidance_start=given.get("guidance_start", 0.0),
        guidance_end=given.get("guidance_end", 1.0),
        control_mode=_choice(control_mode, CONTROL_MODES, f"{where}.control_mode"),
        resize_mode=_resize_mode(given.get("resize_mode", RESIZE_MODES[1]), f"{where}.resize_mode"),
        hr_option=_choice(given.get("hr_option", HR_OPTIONS[0]), HR_OPTIONS, f"{where}.hr_option"),
    )


def _choice(value: Any, choices: tuple[str, ...], field: str) -> str:
    """A choice by its name or its index (the extension's enums take both)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        found = next((c for c in choices if c.lower() == value.strip().lower()), None)
        if found:
            return found
    raise UserError(f"must be one of {', '.join(choices)} (or 0 to {len(choices) - 1}), got {value!r}", field=field)


def _resize_mode(value: Any, field: str) -> str:
    """The extension's resize modes, their older names too ("Inner Fit (Scale to Fit)", "Envelope (Outer Fit)")."""
    if isinstance(value, str):
        alias = next((mode for word, mode in RESIZE_ALIASES.items() if word in value.lower()), None)
        if alias:
            return alias
    return _choice(value, RESIZE_MODES, field)


VERSION = 2  # sd-webui-controlnet's API version that clients check


def controlnet_routes(engine) -> list[tuple[str, Callable, str]]:
    """sd-webui-controlnet's GET routes (at the server's root, as the extension serves them): path, endpoint,
    summary."""
    def model_list(update: bool = True) -> dict:
        return {"model_list": engine.controlnets.names()}

    def module_list(alias_names: bool = False) -> dict:
        return {"module_list": ["none"], "module_detail": {"none": {"model_free": True, "sliders": []}}}

    return [
        ("/controlnet/version", lambda: {"version": VERSION}, "sd-webui-controlnet's API version"),
        ("/controlnet/model_list", model_list, "ControlNet models of models/ControlNet (files and diffusers folders)"),
        ("/controlnet/module_list", module_list, "Preprocessors: 'none' so far (send control images preprocessed)"),
        ("/controlnet/settings", lambda: {"control_net_unit_count": engine.options["control_net_unit_count"]},
         "How many ControlNet units the UI shows"),
    ]
