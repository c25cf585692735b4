"""sd-webui-controlnet's API units, as Forge kept them: ``alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}``
on txt2img and img2img, each unit a dict (webuiapi's ``ControlNetUnit.to_dict()``, or the extension's own field
names and their older aliases)."""
from __future__ import annotations

import math
from typing import Any, Callable

from PIL import Image

from webui.engine.control.preprocessors import PREPROCESSORS, checked_resolution, find_preprocessor
from webui.engine.control.units import CONTROL_MODES, HR_OPTIONS, RESIZE_MODES, UNION_TYPES, ControlUnit
from webui.errors import UserError

SCRIPT = "controlnet"  # its name in alwayson_scripts (any case)
# What a unit may say that changes nothing here: its low-VRAM switch (the memory manager places every model), an
# inpainting mask or effective region mask, the extension's UI state
IGNORED = ("low_vram", "lowvram", "mask", "effective_region_mask", "save_detected_map", "is_ui", "input_mode",
           "batch_images", "advanced_weighting")
DETECT_IGNORED = ("controlnet_masks", "low_vram")  # /controlnet/detect's: no preprocessor here takes a mask
DETECT_BODY_SCHEMA = {"type": "object", "required": ["controlnet_input_images"], "properties": {
    "controlnet_module": {"type": "string", "description": "a preprocessor's name or label (/controlnet/module_list)"},
    "controlnet_input_images": {"type": "array", "items": {"type": "string"}, "description": "base64 images"},
    "controlnet_processor_res": {"type": "integer", "description": "detect resolution; -1: the default (512)"},
    "controlnet_threshold_a": {"type": "number", "description": "first slider; -1: its default"},
    "controlnet_threshold_b": {"type": "number", "description": "second slider; -1: its default"},
    "controlnet_masks": {"type": "array", "items": {"type": "string"}, "description": "ignored here"},
    "low_vram": {"type": "boolean", "description": "ignored: the memory manager places the detector"}}}
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
        unit = _unit(given, where, decode)
        unused = IGNORED + _unused_settings(unit.module)
        ignored += [f"{where}.{key}" for key in unused if given.get(key) not in (None, False, "", -1)]
        units.append(unit)
    return units, ignored


def _unused_settings(module: Any) -> tuple[str, ...]:
    """The unit fields its preprocessor has no use for (an unknown one is refused when the unit is checked)."""
    try:
        preprocessor = find_preprocessor(module, "module")
    except UserError:
        return ()
    sliders = ("threshold_a", "threshold_b")[len(preprocessor.sliders):]
    return sliders + (() if preprocessor.resolution else ("processor_res", "pixel_perfect"))


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
        processor_res=given.get("processor_res", -1),
        threshold_a=given.get("threshold_a", -1),
        threshold_b=given.get("threshold_b", -1),
        pixel_perfect=given.get("pixel_perfect", False),
        union_control_type=_choice(given.get("union_control_type", UNION_TYPES[0]), UNION_TYPES,
                                   f"{where}.union_control_type"),
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


def module_list(alias_names: bool = False) -> dict:
    """sd-webui-controlnet's list: the preprocessors' names (their UI labels with ``alias_names``), and each one's
    sliders (``model_free``: whether it runs without a ControlNet model, which none here does)."""
    names = [p.label if alias_names else p.name for p in PREPROCESSORS]
    return {"module_list": names,
            "module_detail": {name: {"model_free": False, "sliders": p.settings()}
                              for name, p in zip(names, PREPROCESSORS)}}


def read_detect(body: Any, decode: Callable[[Any, str], Image.Image]) -> tuple[dict, list[str]]:
    """``/controlnet/detect``'s body as ``Engine.detect``'s arguments, and the fields that change nothing here."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    given = body.get("controlnet_input_images", body.get("controlnet_images"))  # the older name: webuiapi's
    if not isinstance(given, list) or not given:
        raise UserError("send one or more base64 images to preprocess", field="controlnet_input_images")
    ignored = [key for key in DETECT_IGNORED if body.get(key) not in (None, False, [])]
    numbers = {}
    for key in ("controlnet_threshold_a", "controlnet_threshold_b"):
        value = body.get(key, -1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"must be a number (-1: the preprocessor's default), got {value!r}", field=key)
        numbers[key] = value
    return {"module": body.get("controlnet_module", "none"),
            "images": [decode(data, f"controlnet_input_images[{i}]") for i, data in enumerate(given)],
            "resolution": checked_resolution(body.get("controlnet_processor_res", -1), "controlnet_processor_res"),
            "a": numbers["controlnet_threshold_a"], "b": numbers["controlnet_threshold_b"]}, ignored


def controlnet_routes(engine, detect: Callable) -> list[tuple[str, Callable, str, str]]:
    """sd-webui-controlnet's routes (at the server's root, as the extension serves them): path, endpoint, method,
    summary. ``detect`` is the POST endpoint, which runs in the job queue."""
    def model_list(update: bool = True) -> dict:
        return {"model_list": engine.controlnets.names()}

    return [
        ("/controlnet/version", lambda: {"version": VERSION}, "GET", "sd-webui-controlnet's API version"),
        ("/controlnet/model_list", model_list, "GET",
         "ControlNet models of models/ControlNet (files and diffusers folders)"),
        ("/controlnet/module_list", module_list, "GET", "Preprocessors, by name (or UI label), with their sliders"),
        ("/controlnet/settings", lambda: {"control_net_unit_count": engine.options["control_net_unit_count"]}, "GET",
         "How many ControlNet units the UI shows"),
        ("/controlnet/detect", detect, "POST", "Preprocess images: each one's detected map as a base64 PNG"),
    ]
