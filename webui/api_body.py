"""A1111's request bodies, read by hand and described for /openapi.json.

The routes take their bodies as any JSON and check them here, field by field, so that a refusal names the field
and says what to do (A1111's pydantic models answer a list of validation errors). The schemas below tell clients,
/docs and the API fuzzer which fields there are, of which types and within which fixed bounds; the limits set in
Settings (largest side, most steps...) change at run time, so they are checked here only.
"""
from __future__ import annotations

import base64
import binascii
import io
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from PIL import Image

from webui.engine.infotext import request_fields
from webui.engine.hires import MAX_SCALE as MAX_HIRES_SCALE
from webui.engine.init_image import MAX_DECODED_SIDE_FACTOR
from webui.engine.inpaint import FILLS
from webui.engine.outpaint import METHODS as OUTPAINT_METHODS
from webui.engine.outpaint import Outpaint
from webui.engine.request import (MAX_CFG, MAX_MASK_BLUR, MAX_MASK_PADDING, MAX_SEED, MIN_SIDE, SIDE_MULTIPLE,
                                  GenerationRequest)
from webui.engine.soft_inpaint import SCRIPT_NAME as SOFT_SCRIPT
from webui.engine.soft_inpaint import SoftInpainting, checked_soft_inpainting
from webui.api_controlnet import SCRIPT as CONTROLNET_SCRIPT
from webui.api_controlnet import controlnet_units
from webui.engine.control.units import ControlUnit
from webui.engine.prompt_lines import POSITIONS as LINE_POSITIONS
from webui.engine.prompt_lines import SCRIPT_ARGS as PROMPT_LINES_ARGS
from webui.engine.prompt_lines import TITLE as LINES_TITLE
from webui.engine.prompt_lines import PromptLines
from webui.engine.prompt_matrix import SCRIPT_ARGS as PROMPT_MATRIX_ARGS
from webui.engine.prompt_matrix import TITLE as MATRIX_TITLE
from webui.engine.prompt_matrix import PromptMatrix
from webui.engine.xyz import BUILTIN_AXES, SCRIPT_ARGS, Axis, AxisChoice, PlotOptions, plot_from_args
from webui.errors import UserError
from webui.jobs import Overrides
from webui.settings import LIMIT_OPTIONS, OPTION_DEFAULTS, Options

# The fields of A1111/Forge's txt2img request, by what this app does with them. Clients send most of them, mostly at
# their defaults. A field A1111 ignores is ignored here too and named in the answer's info (``ignored_fields``); a
# field A1111 honours is honoured, or refused with a 422 naming it where this app cannot do what it asks yet.
ENGINE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "distilled_cfg_scale",
                 "sampler_name", "scheduler", "seed", "batch_size", "n_iter", "eta", "subseed", "subseed_strength",
                 "seed_resize_from_w", "seed_resize_from_h")
# Read here (send_images, save_images, the do_not_save_* two, override_settings and its restore flag, sampler_index,
# infotext, styles) or by xyz_script (script_name, script_args); force_task_id names the job for A1111's UI, which has no use
# here.
FLAG_FIELDS = ("send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
               "override_settings_restore_afterwards")
READ_FIELDS = (*FLAG_FIELDS, "override_settings", "sampler_index", "script_name", "script_args", "infotext",
               "force_task_id", "alwayson_scripts", "styles")
# Honoured by A1111 and not done here yet: accepted only at the values that make A1111 do nothing extra.
DEFAULT_ONLY_FIELDS: dict[str, list] = {
    "restore_faces": [False, None], "tiling": [False, None], "s_min_uncond": [None, 0, 0.0], "s_churn": [None, 0, 0.0],
    "s_tmax": [None, 0, 0.0], "s_tmin": [None, 0, 0.0], "s_noise": [None, 1, 1.0],
    "refiner_checkpoint": [None, "", "None"], "disable_extra_networks": [False, None],
}
# Hires. fix's fields: read with enable_hr; A1111 reads them only then, so without it they are ignored and named.
HIRES_FIELDS = ("denoising_strength", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
                "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg")
# What A1111 reads only with a refiner or in img2img, or no longer reads (firstphase_*, A1111 before 1.0), or what
# Forge reads for a hires checkpoint's modules (only the request's own are done here): with those off (refused above
# otherwise) any value changes nothing. Named in ignored_fields like a field A1111 does not know.
UNUSED_FIELDS = ("firstphase_width", "firstphase_height", "hr_additional_modules", "refiner_switch_at",
                 "firstpass_image", "comments")
# A1111 applies the prompt styles a request names and skips names it does not have (here named in info's notices).
STYLE_FIELD = "styles"
# override_settings keys that are request fields too: the request checks them as strictly as its own fields.
OVERRIDE_FIELDS = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
                   "forge_additional_modules": "modules"}

XYZ_TITLE = "X/Y/Z plot"
# Forge's txt2img X/Y/Z axes in their order: clients name an axis by its index in this list or A1111's (those it adds
# after these are the extensions' axes). The ones this app has are found by label; the others are refused by name.
FORGE_AXES = (
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale", "Distilled CFG Scale",
    "Prompt S/R", "Prompt order", "Sampler", "Hires sampler", "Checkpoint name", "Negative Guidance minimum sigma",
    "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type", "Schedule min sigma",
    "Schedule max sigma", "Schedule rho", "Beta schedule alpha", "Beta schedule beta", "Eta", "Clip skip",
    "Denoising", "Initial noise multiplier", "Extra noise", "Hires upscaler", "VAE", "Styles", "UniPC Order",
    "Face restore", "Token merging ratio", "Token merging ratio high-res", "Always discard next-to-last sigma",
    "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at", "RNG source", "FP8 mode", "Size",
)
# A1111 1.10's list: Forge's without Distilled CFG Scale. webuiapi and scripts written for A1111 count in it.
A1111_AXES = tuple(label for label in FORGE_AXES if label != "Distilled CFG Scale")
MAX_MARGIN = 500
_MISSING = object()


@dataclass(frozen=True)
class Txt2ImgCall:
    """An A1111 txt2img body, read: the engine's request and what the API does around it."""

    request: GenerationRequest
    overrides: Overrides
    send_images: bool
    save_grid: bool
    ignored: tuple[str, ...] = ()  # fields that changed nothing, for info's ignored_fields
    notes: tuple[str, ...] = ()  # how lenient readings were taken (a default size, an axis index), for info's notices


def read_txt2img(body: Any, options: Options, known_schedule_type: Callable[[str], bool],
                 declared_size: Callable[[str | None], tuple[int, int] | None] = lambda checkpoint: None) -> Txt2ImgCall:
    """Check every field of an A1111 txt2img body (UserError naming the first one this app cannot honour).
    ``known_schedule_type(name)`` says whether the engine has a schedule type (A1111 samples others as Automatic).
    ``declared_size(checkpoint)`` is the resolution a checkpoint says it was trained at: a body without width or
    height gets it (else A1111's 512)."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    ignored = []
    for key, value in body.items():
        if key in DEFAULT_ONLY_FIELDS:
            # typed: false is no number (s_min_uncond) and 0 no flag (tiling), though Python finds them equal
            if not any(value == default and type(value) is type(default) for default in DEFAULT_ONLY_FIELDS[key]):
                raise UserError(f"this app cannot do {key}={value!r} yet; leave it at its default", field=key)
        elif key in HIRES_FIELDS:
            if body.get("enable_hr") is not True:
                ignored.append(key)
        elif key in UNUSED_FIELDS or not (key in ENGINE_FIELDS or key in READ_FIELDS or key == "enable_hr"):
            ignored.append(key)
    for key in ("sampler_index", "force_task_id"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise UserError(f"must be text, got {body[key]!r}", field=key)
    for key in (STYLE_FIELD, "script_args"):  # lists in A1111's request model, which refuses anything else
        if body.get(key) is not None and not isinstance(body[key], list):
            raise UserError(f"must be a list, got {body[key]!r}", field=key)
    if not all(isinstance(name, str) for name in body.get(STYLE_FIELD) or []):
        raise UserError(f"must be a list of style names, got {body[STYLE_FIELD]!r}", field=STYLE_FIELD)
    flags = {key: body.get(key) for key in (*FLAG_FIELDS, "enable_hr")}
    for key, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise UserError(f"must be true or false, got {value!r}", field=key)
    read = (*ENGINE_FIELDS, "enable_hr", *HIRES_FIELDS) if flags["enable_hr"] else ENGINE_FIELDS
    fields = {**_infotext_fields(body.get("infotext")), **{k: body[k] for k in read if body.get(k) is not None}}
    if body.get("sampler_index"):
        if fields.get("sampler_name"):
            if body["sampler_index"] != fields["sampler_name"]:
                ignored.append("sampler_index")  # A1111's older name for it, read only when sampler_name is not given
        else:
            fields["sampler_name"] = body["sampler_index"]
    if isinstance(fields.get("scheduler"), str) and not known_schedule_type(fields["scheduler"]):
        # A1111 samples an unknown schedule type as Automatic (SillyTavern sends "N/A" when it could not list them)
        ignored.append("scheduler")
        del fields["scheduler"]
    if body.get(STYLE_FIELD):
        fields[STYLE_FIELD] = list(body[STYLE_FIELD])
    overrides = overrides_of(body, options)
    fields.update({OVERRIDE_FIELDS[k]: v for k, v in overrides.values.items() if k in OVERRIDE_FIELDS})
    notes = []
    if "width" not in fields or "height" not in fields:
        size = declared_size(fields.get("checkpoint")) or (512, 512)
        fields = {"width": size[0], "height": size[1]} | fields
        notes.append(f"no width or height given: {fields['width']}x{fields['height']}, "
                     f"{'the resolution the checkpoint declares' if size != (512, 512) else 'as A1111'}")
    save = bool(flags["save_images"])  # A1111's API saves nothing unless asked
    fields["save_images"] = save and not flags["do_not_save_samples"]
    request = GenerationRequest.from_dict(fields)
    _, request.controlnet, unit_fields = always_on_scripts(body.get("alwayson_scripts"), options, img2img=False)
    return Txt2ImgCall(request, overrides, flags["send_images"] is not False, save and not flags["do_not_save_grid"],
                       tuple(ignored + unit_fields), tuple(notes))


# img2img's own fields (A1111's StableDiffusionProcessingImg2Img), by what this app does with them.
IMG2IMG_FIELDS = ("init_images", "denoising_strength", "resize_mode", "initial_noise_multiplier")
# How a mask is used: read with a mask; A1111 reads them only with one, so without one they are ignored and named.
MASK_USE_FIELDS = ("mask_blur", "mask_blur_x", "mask_blur_y", "mask_round", "inpainting_fill", "inpaint_full_res",
                   "inpaint_full_res_padding", "inpainting_mask_invert", "latent_mask")
# A1111's img2img has no such field (hires. fix is txt2img's) or reads it only for an instruct-pix2pix model
# (image_cfg_scale): ignored, and named in info. include_init_images only shapes the answer's parameters.
IMG2IMG_IGNORED = ("enable_hr", *(name for name in HIRES_FIELDS if name != "denoising_strength"), "firstphase_width",
                   "firstphase_height", "hr_additional_modules", "firstpass_image", "image_cfg_scale")
IMG2IMG_READ = ("include_init_images", "mask")


def read_img2img(body: Any, options: Options, known_schedule_type: Callable[[str], bool],
                 declared_size: Callable[[str | None], tuple[int, int] | None] = lambda checkpoint: None) -> Txt2ImgCall:
    """Check every field of an A1111 img2img body: its own (init images in base64, with or without a data: prefix;
    denoising strength; resize mode), a mask with how it is used (inpainting), txt2img's (``read_txt2img``), and
    the one img2img script there is, outpainting (``img2img_script``)."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    outpaint = img2img_script(body)
    soft, units, unit_fields = always_on_scripts(body.get("alwayson_scripts"), options, img2img=True)
    given = body.get("init_images")
    if not isinstance(given, list) or not given:
        raise UserError("send one image or more, each in base64 (a data: URL works too)", field="init_images")
    largest = options["max_image_side"] * MAX_DECODED_SIDE_FACTOR
    images = [decode_image(data, "init_images", largest) for data in given]
    mask = None if body.get("mask") in (None, "") else decode_image(body["mask"], "mask", largest)
    if mask is not None and body.get("latent_mask") not in (None, ""):
        body = {**body, "latent_mask": decode_image(body["latent_mask"], "latent_mask", largest)}
    mine = (*IMG2IMG_FIELDS, *MASK_USE_FIELDS, *IMG2IMG_IGNORED, *IMG2IMG_READ, "script_name", "script_args",
            "alwayson_scripts")
    call = read_txt2img({k: v for k, v in body.items() if k not in mine}, options, known_schedule_type, declared_size)
    request = call.request
    request.init_images, request.mask, request.controlnet = images, mask, units
    for key in (*IMG2IMG_FIELDS[1:], *(MASK_USE_FIELDS if mask is not None else ())):
        if body.get(key) is not None:
            setattr(request, key, body[key])
    ignored = [key for key in (*IMG2IMG_IGNORED, *(MASK_USE_FIELDS if mask is None else ())) if key in body]
    ignored += unit_fields
    if soft is not None and mask is None:  # A1111's soft inpainting acts only with a mask
        ignored.append("alwayson_scripts")
    elif soft is not None:
        request.soft_inpainting = soft
    if outpaint is not None:
        for key, value in outpaint.fields().items():  # the script sets the mask and its use, and makes one image
            setattr(request, key, value)
        ignored += [key for key in ("mask", *MASK_USE_FIELDS, "width", "height", "resize_mode")
                    if key in body and key not in ignored]
        if not outpaint.mk2:  # poor man's makes one image; mk2 a batch
            ignored += [key for key in ("batch_size", "n_iter") if body.get(key) not in (None, 1)]
    elif body.get("script_args") and body.get("script_name") in (None, ""):
        ignored.append("script_args")  # A1111 reads them only for a script
    return replace(call, ignored=call.ignored + tuple(ignored))


def always_on_scripts(scripts: Any, options: Options, img2img: bool
                      ) -> tuple[SoftInpainting | None, list[ControlUnit] | None, list[str]]:
    """The always-on scripts a body turns on (their names in any case): ControlNet's units (sd-webui-controlnet's, on
    both routes) and img2img's Soft Inpainting; with the unit fields that change nothing here. Another script is
    refused by name, as A1111 refuses one it does not have."""
    if scripts in (None, {}):
        return None, None, []
    has = "'ControlNet' and 'Soft Inpainting'" if img2img else "'ControlNet'"
    if not isinstance(scripts, dict):
        raise UserError(f'must be an object: {{"ControlNet": {{"args": [...]}}}}; this route has {has}',
                        field="alwayson_scripts")
    largest = options["max_image_side"] * MAX_DECODED_SIDE_FACTOR
    soft, units, ignored = None, None, []
    for name, entry in scripts.items():
        key = name.strip().lower() if isinstance(name, str) else name
        if key == CONTROLNET_SCRIPT:
            units, ignored = controlnet_units(entry, lambda data, field: decode_image(data, field, largest))
        elif key == SOFT_SCRIPT and img2img:
            soft = _soft_inpainting(name, entry)
        else:
            raise UserError(f"no always-on script {name!r}; this route has {has}", field="alwayson_scripts")
    return soft, units, ignored


def _soft_inpainting(name: str, entry: Any) -> SoftInpainting:
    """Soft Inpainting's args: on or off, then the six settings, those left out at their defaults."""
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise UserError(f'{name!r} must be {{"args": [...]}}', field="alwayson_scripts")
    defaults = SoftInpainting().values()
    try:  # the settings left out at their defaults
        return checked_soft_inpainting([bool(args and args[0]), *args[1:len(defaults) + 1],
                                        *defaults[max(len(args) - 1, 0):]])
    except UserError as e:
        raise UserError(f"{name!r}: {e.message}", field="alwayson_scripts") from None


def img2img_script(body: dict[str, Any]) -> Outpaint | None:
    """The outpainting an img2img request's script asks for (A1111's titles, any case); None for another script (read
    by ``xyz_script`` or ``prompt_script``) or none."""
    name = _script_name(body, img2img=True)
    return Outpaint.from_args(body.get("script_args") or [], name) if name in OUTPAINT_METHODS else None


def _script_name(body: dict[str, Any], img2img: bool) -> str | None:
    """The script a body names (A1111's titles, any case), as this app spells it; None for none, refused where the
    route has no such script."""
    name = body.get("script_name")
    if name in (None, ""):
        return None
    titles = (XYZ_TITLE, LINES_TITLE, MATRIX_TITLE, *(OUTPAINT_METHODS if img2img else ()))
    found = next((t for t in titles if isinstance(name, str) and name.strip().lower() == t.lower()), None)
    if found is None:
        raise UserError(f"no {'img2img' if img2img else 'txt2img'} script {name!r}; the scripts are "
                        f"{', '.join(map(repr, titles))}", field="script_name")
    return found


def _script_args(body: dict[str, Any], names: dict[str, Any]) -> dict[str, Any]:
    """A script's ``script_args``, by A1111's names for them in its order (those left out are not in the dict)."""
    given = body.get("script_args") or []
    if not isinstance(given, list) or len(given) > len(names):
        raise UserError(f"must be a list of at most {len(names)} values, in this order: {', '.join(names)}",
                        field="script_args")
    return dict(zip(names, given))


@dataclass(frozen=True)
class PromptScriptCall:
    """A prompt script a request asks for, and how its lenient arguments were read (for info's notices)."""

    script: PromptLines | PromptMatrix
    notes: tuple[str, ...] = ()


def prompt_script(body: dict[str, Any], img2img: bool = False, save_grid: bool | None = None
                  ) -> PromptScriptCall | None:
    """"Prompts from file or textbox" or "Prompt matrix" as ``script_name`` / ``script_args`` ask for them; None for
    another script or none. A1111's script arguments in its order; flags may be true/false, 1/0 or their text."""
    name = _script_name(body, img2img)
    if name == LINES_TITLE:
        return _prompt_lines(body)
    if name == MATRIX_TITLE:
        args = PROMPT_MATRIX_ARGS | _script_args(body, PROMPT_MATRIX_ARGS)
        for key in ("prompt_type", "variations_delimiter"):
            if not isinstance(args[key], str):
                raise UserError(f"{key} must be text, got {args[key]!r}", field="script_args")
        return PromptScriptCall(PromptMatrix(_flag("put_at_start", args["put_at_start"]),
                                             _flag("different_seeds", args["different_seeds"]),
                                             args["prompt_type"].strip().lower(),
                                             args["variations_delimiter"].strip().lower(),
                                             _margin(args["margin_size"]), save_grid))
    return None


def _prompt_lines(body: dict[str, Any]) -> PromptScriptCall:
    """Prompts from file or textbox's arguments; three (A1111 before 1.6: no prompt_position) are read as the two
    seed boxes and the text."""
    given, notes = body.get("script_args") or [], []
    if isinstance(given, list) and len(given) == 3 and not (isinstance(given[2], str)
                                                            and given[2].strip().lower() in LINE_POSITIONS):
        body = {**body, "script_args": [*given[:2], "start", given[2]]}
        notes.append("script_args read in A1111's order before 1.6 (iterate seed, same seed, prompts): the prompts "
                     "go at the start")
    args = PROMPT_LINES_ARGS | _script_args(body, PROMPT_LINES_ARGS)
    for key in ("prompt_position", "prompt_txt"):
        if not isinstance(args[key], str):
            raise UserError(f"{key} must be text, got {args[key]!r}", field="script_args")
    return PromptScriptCall(PromptLines(args["prompt_txt"], _flag("checkbox_iterate", args["checkbox_iterate"]),
                                        _flag("checkbox_iterate_batch", args["checkbox_iterate_batch"]),
                                        args["prompt_position"].strip().lower()), tuple(notes))


def decode_image(data: Any, field: str, largest: int) -> Image.Image:
    """An image sent as base64 (a data: URL too), decoded whole; refused naming ``field`` where it is no image or
    a side is above ``largest`` pixels (checked from its header, before any pixel is decoded)."""
    if not isinstance(data, str) or not data:
        raise UserError("each image must be base64 text (a data: URL works too)", field=field)
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1], validate=True)))
        if max(image.size) > largest:
            raise UserError(f"an image of {image.width}x{image.height} pixels is larger than this app decodes "
                            f"({largest} pixels a side)", field=field)
        image.load()
    except (binascii.Error, ValueError, OSError, SyntaxError, struct.error, Image.DecompressionBombError) as e:
        raise UserError(f"is not a base64-encoded image ({e})", field=field) from e
    return image


def _infotext_fields(infotext: Any) -> dict[str, Any]:
    """A1111's ``infotext`` field: the fields a pasted infotext gives, used where the body gives none."""
    if infotext in (None, ""):
        return {}
    if not isinstance(infotext, str):
        raise UserError(f"must be the text of an image's parameters, got {infotext!r}", field="infotext")
    return request_fields(infotext)


def overrides_of(body: dict[str, Any], options: Options) -> Overrides:
    """``override_settings``, checked like any change of options; a key this app has no option for is refused
    unless it asks for the value the store already keeps for it."""
    given = body.get("override_settings")
    given = {} if given is None else given
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


@dataclass(frozen=True)
class XyzCall:
    """The X/Y/Z plot a request asks for, and how its lenient arguments were read (for info's notices)."""

    choices: list[AxisChoice]
    options: PlotOptions
    notes: tuple[str, ...] = ()


def xyz_script(body: dict[str, Any], axes: list[Axis], numbering: str = "A1111", img2img: bool = False
               ) -> XyzCall | None:
    """The X/Y/Z plot a request asks for with ``script_name`` / ``script_args``; None where it names no script.
    Types are checked here. An axis type is a label or an index into A1111's or Forge's list of axes (``numbering``:
    the option ``xyz_axis_numbering``); options may be true/false, "True"/"False" or 1/0 (webuiapi's README sends
    strings), a dropdown may be "" for none."""
    if _script_name(body, img2img) != XYZ_TITLE:
        return None
    args = _script_args(body, SCRIPT_ARGS)
    for key, value in args.items():
        if isinstance(SCRIPT_ARGS[key], bool):
            args[key] = _flag(key, value)
    args["margin_size"] = _margin(args.get("margin_size", 0))
    notes = [note for axis in "xyz" if (note := _check_axis_args(args, axis, axes, numbering))]
    return XyzCall(*plot_from_args(args, axes), tuple(notes))


def _margin(margin: Any) -> int:
    """A grid's margin_size in pixels, a whole number or its text."""
    if isinstance(margin, str) and margin.strip().isdigit():
        margin = int(margin)
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= MAX_MARGIN:
        raise UserError(f"margin_size must be a whole number of pixels from 0 to {MAX_MARGIN}, got {margin!r}",
                        field="script_args")
    return margin


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no", "")


def _flag(key: str, value: Any) -> bool:
    """A true/false script argument as clients send it: a boolean, 1/0, or its text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise UserError(f"{key} must be true or false, got {value!r}", field="script_args")


def axis_table(numbering: str) -> tuple[str, ...]:
    """The txt2img X/Y/Z axes in A1111 1.10's order, or Forge's (which adds Distilled CFG Scale as the 8th)."""
    return FORGE_AXES if numbering == "Forge" else A1111_AXES


def _check_axis_args(args: dict[str, Any], name: str, axes: list[Axis], numbering: str) -> str | None:
    """One axis' arguments: its type a label or an index in ``numbering``'s list (replaced by the label; the note
    returned says which), its values text, its picked values a list."""
    field = f"{name}_type"
    wanted = args.get(field, SCRIPT_ARGS[field])
    if isinstance(wanted, str) and wanted.strip().isdigit():
        wanted = int(wanted)
    note = None
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        table = axis_table(numbering)
        if 0 <= wanted < len(table):
            args[field] = table[wanted]
        elif 0 <= wanted - len(table) < len(axes) - len(BUILTIN_AXES):  # plot_axes: extensions' axes last
            args[field] = axes[len(BUILTIN_AXES) + wanted - len(table)].label
        else:
            raise UserError(f"no X/Y/Z axis at index {wanted} in {numbering}'s list (option xyz_axis_numbering)",
                            field=field)
        if wanted:
            note = f"{field} {wanted} read as {args[field]!r} ({numbering}'s numbering: option xyz_axis_numbering)"
    elif not isinstance(wanted, str):
        raise UserError(f"an axis is a label or its index, got {wanted!r}", field=field)
    if args.get(f"{name}_values") is None:
        args[f"{name}_values"] = ""
    if not isinstance(args[f"{name}_values"], str):
        raise UserError(f"must be text, got {args[f'{name}_values']!r}", field=f"{name}_values")
    picked = args.get(f"{name}_values_dropdown")
    if picked == "":
        args[f"{name}_values_dropdown"] = picked = None  # webuiapi's README sends "" for none
    if picked is not None and not (isinstance(picked, list) and all(isinstance(v, (str, int, float)) for v in picked)):
        raise UserError(f"must be a list of values, got {picked!r}", field=f"{name}_values_dropdown")
    return note


JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}
# What a request field may be whatever the settings say; the limits (largest side, most steps...) are settings.
FIELD_BOUNDS = {"width": {"minimum": MIN_SIDE, "multipleOf": SIDE_MULTIPLE},
                "height": {"minimum": MIN_SIDE, "multipleOf": SIDE_MULTIPLE},
                "steps": {"minimum": 1}, "batch_size": {"minimum": 1}, "n_iter": {"minimum": 1},
                "cfg_scale": {"minimum": 0, "maximum": MAX_CFG}, "distilled_cfg_scale": {"minimum": 0, "maximum": MAX_CFG},
                "seed": {"minimum": -1, "maximum": MAX_SEED}, "subseed": {"minimum": -1, "maximum": MAX_SEED},
                "eta": {"minimum": 0, "maximum": 1}, "subseed_strength": {"minimum": 0, "maximum": 1},
                "denoising_strength": {"minimum": 0, "maximum": 1}, "hr_scale": {"minimum": 1, "maximum": MAX_HIRES_SCALE},
                "hr_second_pass_steps": {"minimum": 0}, "hr_resize_x": {"minimum": 0}, "hr_resize_y": {"minimum": 0},
                "hr_cfg": {"minimum": 0, "maximum": MAX_CFG}, "hr_distilled_cfg": {"minimum": 0, "maximum": MAX_CFG}}


def _described(python_type: Any, name: str) -> str:
    """A field's type and bounds in words, for a field whose schema cannot hold them (it is checked only with
    another's value)."""
    kind = JSON_TYPES[next((t for t in typing.get_args(python_type) if t is not type(None)), python_type)]
    bounds = FIELD_BOUNDS.get(name, {})
    limits = [f"{word} {bounds[key]}" for key, word in (("minimum", "at least"), ("maximum", "at most"))
              if key in bounds]
    return f"{kind} {' and '.join(limits)}".strip()


def _typed(python_type: Any) -> dict[str, Any]:
    """A JSON schema for a value of ``python_type`` (or ``type | None``), or null (A1111 clients send null for 'the
    default')."""
    python_type = next((t for t in typing.get_args(python_type) if t is not type(None)), python_type)
    return {"type": [JSON_TYPES[python_type], "null"]}


def txt2img_body_schema() -> dict[str, Any]:
    """The fields read_txt2img takes, with their types; the default-only ones with the values they may have. Others
    are allowed: A1111 ignores fields it does not know, and so does this app (naming them in info)."""
    hints = typing.get_type_hints(GenerationRequest)
    defaults = {f.name: f.default for f in fields(GenerationRequest)}
    properties: dict[str, Any] = {name: {**_typed(hints[name]), **FIELD_BOUNDS.get(name, {}), "default": defaults[name]}
                                  for name in ENGINE_FIELDS}
    for side in ("width", "height"):
        properties[side]["description"] = ("left out: the resolution the checkpoint declares (ModelSpec), else "
                                            "A1111's 512")
    properties |= {name: _typed(bool) for name in FLAG_FIELDS}
    properties |= {"alwayson_scripts": {**_typed(dict), "description": 'always-on scripts: {"ControlNet": {"args": '
                                        '[unit, ...]}} (sd-webui-controlnet\'s units)'},
                   "override_settings": _typed(dict), "sampler_index": _typed(str), "script_name": _typed(str),
                   "script_args": _typed(list), "infotext": _typed(str), "force_task_id": _typed(str),
                   STYLE_FIELD: {**_typed(list), "description": "prompt styles of styles.csv by name, applied in "
                                 "order; a name there is no style of is skipped (as A1111) and named in info's notices"}}
    properties |= {name: {"enum": values} for name, values in DEFAULT_ONLY_FIELDS.items()}
    properties |= {name: {"description": "read by A1111 only for a refiner or img2img, or no longer: ignored"}
                   for name in UNUSED_FIELDS}
    properties["enable_hr"] = {**_typed(bool), "default": False, "description": "hires. fix: the hr_* fields and "
                               "denoising_strength are read with it (A1111 ignores them without, and so does this app: "
                               "their types and bounds are checked only then)"}
    properties |= {name: {"description": f"read with enable_hr: {_described(hints[name], name)}, default "
                                         f"{defaults[name]!r}"} for name in HIRES_FIELDS}
    return {"type": "object", "properties": properties, "additionalProperties": True}


def img2img_body_schema() -> dict[str, Any]:
    """read_img2img's fields: txt2img's (hires. fix's ignored), img2img's own, inpainting's."""
    schema = txt2img_body_schema()
    properties = {k: v for k, v in schema["properties"].items() if k not in IMG2IMG_IGNORED}
    properties |= {
        "init_images": {"type": "array", "minItems": 1, "items": {"type": "string"},
                        "description": "images in base64 (PNG, JPEG, WebP...), a data: URL too: one for the whole "
                                       "batch, or one for each image of it"},
        "denoising_strength": {"type": ["number", "null"], "minimum": 0, "maximum": 1, "default": 0.75},
        "resize_mode": {"type": ["integer", "null"], "minimum": 0, "maximum": 3, "default": 0,
                        "description": "0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent "
                                       "upscale)"},
        "include_init_images": _typed(bool),
    }
    # read only with a mask (A1111 ignores them without, and so does this app): their types and bounds in words
    properties |= {
        "mask": {"type": ["string", "null"], "description": "inpainting: a mask in base64 the init images' size, "
                                                            "white where repainted; the fields below are read with it"},
        "mask_blur": {"description": f"with a mask: sets mask_blur_x and mask_blur_y, 0 to {MAX_MASK_BLUR}"},
        "mask_blur_x": {"description": f"with a mask: 0 to {MAX_MASK_BLUR}, default 4"},
        "mask_blur_y": {"description": f"with a mask: 0 to {MAX_MASK_BLUR}, default 4"},
        "inpainting_fill": {"description": "with a mask: masked content, " + ", ".join(
            f"{i} {n}" for i, n in enumerate(FILLS)) + ", default 0"},
        "inpaint_full_res": {"description": "with a mask: inpaint area, only masked (true or 1, the default), or the "
                                            "whole picture"},
        "inpaint_full_res_padding": {"description": f"with a mask: 0 to {MAX_MASK_PADDING} pixels, default 0"},
        "inpainting_mask_invert": {"description": "with a mask: 1 (or true) inpaints what is not masked, default 0"},
        "mask_round": {"description": "with a mask: the latent mask rounded (true, the default) or blended"},
        "latent_mask": {"type": ["string", "null"], "description": "with a mask: another mask in base64 for the "
                                                                   "latents only, taken as it is (A1111's)"},
    }
    properties |= {name: {"description": "not read by A1111's img2img (only for instruct-pix2pix, or only in "
                                         "txt2img): ignored"}
                   for name in IMG2IMG_IGNORED}
    return {**schema, "properties": properties, "required": ["init_images"]}


def options_body_schema() -> dict[str, Any]:
    """The options this app has, with their types (POST /options checks their values and choices)."""
    properties = {name: {"type": JSON_TYPES[type(value)]} for name, value in OPTION_DEFAULTS.items()}
    return {"type": "object", "properties": properties, "description": "Option names to new values; others A1111 "
            "has are accepted at the value the store keeps"}


PNG_INFO_BODY_SCHEMA = {"type": "object", "required": ["image"],
                        "properties": {"image": {"type": "string", "description": "a PNG, JPEG or WebP in base64"}}}
