"""A1111's request bodies, read by hand and described for /openapi.json.

The routes take their bodies as any JSON and check them here, field by field, so that a refusal names the field
and says what to do (A1111's pydantic models answer a list of validation errors). The schemas below tell clients,
/docs and the API fuzzer which fields there are, of which types and within which fixed bounds; the limits set in
Settings (largest side, most steps...) change at run time, so they are checked here only.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any

from webui.engine.request import MAX_CFG, MAX_SEED, MIN_SIDE, SIDE_MULTIPLE, GenerationRequest
from webui.engine.samplers import find_sampler
from webui.engine.xyz import BUILTIN_AXES, SCRIPT_ARGS, Axis, AxisChoice, PlotOptions, plot_from_args
from webui.errors import UserError
from webui.jobs import Overrides
from webui.settings import LIMIT_OPTIONS, OPTION_DEFAULTS, Options

# Every field of A1111/Forge's txt2img request falls in one of these groups. Clients send them all, mostly at
# their defaults; a value this app cannot honour is a 422 naming the field.
ENGINE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "distilled_cfg_scale",
                 "sampler_name", "scheduler", "seed", "batch_size", "n_iter")
# Read here (send_images, save_images, the do_not_save_* two, override_settings and its restore flag, sampler_index,
# eta) or by xyz_script (script_name, script_args); force_task_id names the job for A1111's UI, which has no use here.
FLAG_FIELDS = ("send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
               "override_settings_restore_afterwards")
READ_FIELDS = (*FLAG_FIELDS, "override_settings", "sampler_index", "eta", "script_name", "script_args",
               "force_task_id")
# Accepted only at the values that make A1111 do nothing extra.
DEFAULT_ONLY_FIELDS: dict[str, list] = {
    "styles": [None, []], "subseed": [-1, None], "subseed_strength": [0, 0.0, None],
    "seed_resize_from_h": [-1, 0, None], "seed_resize_from_w": [-1, 0, None],
    "restore_faces": [False, None], "tiling": [False, None], "s_min_uncond": [None, 0, 0.0], "s_churn": [None, 0, 0.0],
    "s_tmax": [None, 0, 0.0], "s_tmin": [None, 0, 0.0], "s_noise": [None, 1, 1.0], "enable_hr": [False, None],
    "refiner_checkpoint": [None, "", "None"], "disable_extra_networks": [False, None], "firstpass_image": [None, ""],
    "comments": [None, {}], "alwayson_scripts": [None, {}], "infotext": [None, ""],
}
# A1111 reads these only with enable_hr or a refiner_checkpoint, which this app refuses: any value does nothing.
IGNORED_FIELDS = ("denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
                  "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
                  "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules", "hr_cfg",
                  "hr_distilled_cfg", "refiner_switch_at")
# override_settings keys that are request fields too: the request checks them as strictly as its own fields.
OVERRIDE_FIELDS = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
                   "forge_additional_modules": "modules"}

XYZ_SCRIPT = "x/y/z plot"
# Forge's txt2img X/Y/Z axes in their order: clients name an axis by its index in this list (those it adds after
# these are the extensions' axes). The ones this app has are found by label; the others are refused by name.
FORGE_AXES = (
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale", "Distilled CFG Scale",
    "Prompt S/R", "Prompt order", "Sampler", "Hires sampler", "Checkpoint name", "Negative Guidance minimum sigma",
    "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type", "Schedule min sigma",
    "Schedule max sigma", "Schedule rho", "Beta schedule alpha", "Beta schedule beta", "Eta", "Clip skip",
    "Denoising", "Initial noise multiplier", "Extra noise", "Hires upscaler", "VAE", "Styles", "UniPC Order",
    "Face restore", "Token merging ratio", "Token merging ratio high-res", "Always discard next-to-last sigma",
    "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at", "RNG source", "FP8 mode", "Size",
)
MAX_MARGIN = 500
_MISSING = object()


@dataclass(frozen=True)
class Txt2ImgCall:
    """An A1111 txt2img body, read: the engine's request and what the API does around it."""

    request: GenerationRequest
    overrides: Overrides
    send_images: bool
    save_grid: bool


def read_txt2img(body: Any, options: Options) -> Txt2ImgCall:
    """Check every field of an A1111 txt2img body (UserError naming the first one this app cannot honour)."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    for key, value in body.items():
        if key in ENGINE_FIELDS or key in READ_FIELDS or key in IGNORED_FIELDS:
            continue
        if key not in DEFAULT_ONLY_FIELDS:
            raise UserError(f"unknown field {key!r}", field=key)
        if value not in DEFAULT_ONLY_FIELDS[key]:
            raise UserError(f"this app cannot do {key}={value!r} yet; leave it at its default", field=key)
    flags = {key: body.get(key) for key in FLAG_FIELDS}
    for key, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise UserError(f"must be true or false, got {value!r}", field=key)
    fields = {k: body[k] for k in ENGINE_FIELDS if body.get(k) is not None}
    if not fields.get("sampler_name") and body.get("sampler_index"):
        fields["sampler_name"] = body["sampler_index"]  # A1111's older name for it, used when sampler_name is not
    overrides = overrides_of(body, options)
    fields.update({OVERRIDE_FIELDS[k]: v for k, v in overrides.values.items() if k in OVERRIDE_FIELDS})
    save = bool(flags["save_images"])  # A1111's API saves nothing unless asked
    fields["save_images"] = save and not flags["do_not_save_samples"]
    request = GenerationRequest.from_dict(fields)
    _check_eta(body.get("eta"), request.sampler_name)
    return Txt2ImgCall(request, overrides, flags["send_images"] is not False, save and not flags["do_not_save_grid"])


def overrides_of(body: dict[str, Any], options: Options) -> Overrides:
    """``override_settings``, checked like any change of options; a key this app has no option for is refused
    unless it asks for the value the store already keeps for it."""
    given = body.get("override_settings") or {}
    if not isinstance(given, dict):
        raise UserError("must be an object of option names to values", field="override_settings")
    for key, value in given.items():
        if key in LIMIT_OPTIONS:
            raise UserError(f"override_settings: {key} is a limit; change it in Settings (or POST /sdapi/v1/options), "
                            "not per request", field=key)
        if not options.knows(key) and options.get(key, _MISSING) != value:
            raise UserError(f"override_settings: this app has no option {key!r}", field=key)
    try:
        values = options.checked(given)
    except UserError as e:
        raise UserError(f"override_settings: {e.message}", field=e.field) from None
    return Overrides(values, restore=body.get("override_settings_restore_afterwards") is not False)


def _check_eta(eta: Any, sampler_name: Any) -> None:
    """eta is honoured where it is the one the sampler samples with, or plays no part in it."""
    if eta is None:
        return
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise UserError(f"must be a number, got {eta!r}", field="eta")
    if not isinstance(sampler_name, str):
        return  # the request's own check names sampler_name
    sampler, _ = find_sampler(sampler_name)
    if sampler.eta is not None and eta != sampler.eta:
        raise UserError(f"{sampler.name} samples with eta {sampler.eta:g} here; it cannot do {eta!r}", field="eta")


def xyz_script(body: dict[str, Any], axes: list[Axis]) -> tuple[list[AxisChoice], PlotOptions] | None:
    """The X/Y/Z plot (axes, options) a request asks for with ``script_name`` / ``script_args``; None where it names
    no script. Types are checked here; an axis type may be Forge's index of it."""
    name = body.get("script_name")
    if name in (None, ""):
        return None
    if not isinstance(name, str) or name.strip().lower() != XYZ_SCRIPT:
        raise UserError(f"no script {name!r}; the one script is {XYZ_SCRIPT!r}", field="script_name")
    given = body.get("script_args") or []
    if not isinstance(given, list) or len(given) > len(SCRIPT_ARGS):
        raise UserError(f"must be a list of at most {len(SCRIPT_ARGS)} values, in this order: "
                        f"{', '.join(SCRIPT_ARGS)}", field="script_args")
    args = dict(zip(SCRIPT_ARGS, given))
    for key, value in args.items():
        if isinstance(SCRIPT_ARGS[key], bool) and not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}", field="script_args")
    margin = args.get("margin_size", 0)
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= MAX_MARGIN:
        raise UserError(f"margin_size must be a whole number of pixels from 0 to {MAX_MARGIN}, got {margin!r}",
                        field="script_args")
    for axis in "xyz":
        _check_axis_args(args, axis, axes)
    return plot_from_args(args, axes)


def _check_axis_args(args: dict[str, Any], name: str, axes: list[Axis]) -> None:
    """One axis' arguments: its type a label or Forge's index (replaced by the label), its values text, its picked
    values a list."""
    field = f"{name}_type"
    wanted = args.get(field, SCRIPT_ARGS[field])
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        if 0 <= wanted < len(FORGE_AXES):
            args[field] = FORGE_AXES[wanted]
        elif 0 <= wanted - len(FORGE_AXES) < len(axes) - len(BUILTIN_AXES):  # plot_axes: extensions' axes last
            args[field] = axes[len(BUILTIN_AXES) + wanted - len(FORGE_AXES)].label
        else:
            raise UserError(f"no X/Y/Z axis at index {wanted}", field=field)
    elif not isinstance(wanted, str):
        raise UserError(f"an axis is a label or Forge's index of it, got {wanted!r}", field=field)
    if not isinstance(args.get(f"{name}_values", ""), str):
        raise UserError(f"must be text, got {args[f'{name}_values']!r}", field=f"{name}_values")
    picked = args.get(f"{name}_values_dropdown")
    if picked is not None and not (isinstance(picked, list) and all(isinstance(v, (str, int, float)) for v in picked)):
        raise UserError(f"must be a list of values, got {picked!r}", field=f"{name}_values_dropdown")


JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}
# What a request field may be whatever the settings say; the limits (largest side, most steps...) are settings.
FIELD_BOUNDS = {"width": {"minimum": MIN_SIDE, "multipleOf": SIDE_MULTIPLE},
                "height": {"minimum": MIN_SIDE, "multipleOf": SIDE_MULTIPLE},
                "steps": {"minimum": 1}, "batch_size": {"minimum": 1}, "n_iter": {"minimum": 1},
                "cfg_scale": {"minimum": 0, "maximum": MAX_CFG}, "distilled_cfg_scale": {"minimum": 0, "maximum": MAX_CFG},
                "seed": {"minimum": -1, "maximum": MAX_SEED}}


def _typed(python_type: Any) -> dict[str, Any]:
    """A JSON schema for a value of ``python_type``, or null (A1111 clients send null for 'the default')."""
    return {"type": [JSON_TYPES[python_type], "null"]}


def txt2img_body_schema() -> dict[str, Any]:
    """The fields read_txt2img takes, with their types; the default-only ones with the values they may have."""
    hints = typing.get_type_hints(GenerationRequest)
    defaults = {f.name: f.default for f in fields(GenerationRequest)}
    properties: dict[str, Any] = {name: {**_typed(hints[name]), **FIELD_BOUNDS.get(name, {}), "default": defaults[name]}
                                  for name in ENGINE_FIELDS}
    properties |= {name: _typed(bool) for name in FLAG_FIELDS}
    properties |= {"override_settings": _typed(dict), "sampler_index": _typed(str), "eta": _typed(float),
                   "script_name": _typed(str), "script_args": _typed(list), "force_task_id": _typed(str)}
    properties |= {name: {"enum": values} for name, values in DEFAULT_ONLY_FIELDS.items()}
    properties |= {name: {"description": "read by A1111 only for hires. fix or a refiner: ignored"}
                   for name in IGNORED_FIELDS}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def options_body_schema() -> dict[str, Any]:
    """The options this app has, with their types (POST /options checks their values and choices)."""
    properties = {name: {"type": JSON_TYPES[type(value)]} for name, value in OPTION_DEFAULTS.items()}
    return {"type": "object", "properties": properties, "description": "Option names to new values; others A1111 "
            "has are accepted at the value the store keeps"}


PNG_INFO_BODY_SCHEMA = {"type": "object", "required": ["image"],
                        "properties": {"image": {"type": "string", "description": "a PNG, JPEG or WebP in base64"}}}
