"""The AUTOMATIC1111-compatible HTTP API (/sdapi/v1): thin — validate, queue, shape the reply."""
from __future__ import annotations

import base64
import io
import json
import logging
from typing import Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from PIL import Image, PngImagePlugin

from webui.engine.engine import Engine
from webui.engine.files import checkpoint_title, short_hash
from webui.engine.infotext import parse_infotext, read_png_infotext
from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest, GenerationResult
from webui.engine.samplers import api_samplers, api_schedulers
from webui.engine.xyz import BUILTIN_AXES, SCRIPT_ARGS, Axis, AxisChoice, PlotOptions, plot_from_args
from webui.errors import UserError
from webui.extensions import extensions_of, plot_axes
from webui.jobs import JobQueue

log = logging.getLogger(__name__)

# A1111 txt2img fields this version accepts only at their A1111 default: clients send them all.
DEFAULT_ONLY_FIELDS: dict[str, Any] = {
    "styles": [None, []], "subseed": [-1, None], "subseed_strength": [0, 0.0, None],
    "seed_resize_from_h": [-1, 0, None], "seed_resize_from_w": [-1, 0, None],
    "restore_faces": [False, None], "tiling": [False, None], "do_not_save_samples": [False, None],
    "do_not_save_grid": [False, None], "eta": [None, 0, 0.0, 1, 1.0], "denoising_strength": [None, 0, 0.0, 0.7, 0.75],
    "s_min_uncond": [None, 0, 0.0], "s_churn": [None, 0, 0.0], "s_tmax": [None, 0, 0.0], "s_tmin": [None, 0, 0.0],
    "s_noise": [None, 1, 1.0], "enable_hr": [False, None], "firstphase_width": [0, None], "firstphase_height": [0, None],
    "hr_scale": [2, 2.0, None], "hr_upscaler": [None, ""], "hr_second_pass_steps": [0, None],
    "hr_resize_x": [0, None], "hr_resize_y": [0, None], "hr_checkpoint_name": [None, ""],
    "hr_sampler_name": [None, ""], "hr_scheduler": [None, ""], "hr_prompt": ["", None],
    "hr_negative_prompt": ["", None], "hr_additional_modules": [None, []], "refiner_checkpoint": [None, ""],
    "refiner_switch_at": [None, 0, 0.0], "disable_extra_networks": [False, None], "firstpass_image": [None, ""],
    "comments": [None, {}], "sampler_index": [None, "Euler", "Euler a"], "script_name": None,
    "script_args": None, "alwayson_scripts": [None, {}], "infotext": [None, ""], "force_task_id": None,
    "override_settings_restore_afterwards": None, "send_images": None,
    "save_images": None, "override_settings": None,
}
ENGINE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "distilled_cfg_scale",
                 "sampler_name", "scheduler", "seed", "batch_size", "n_iter")
OVERRIDES = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
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


def request_from_a1111(body: dict[str, Any]) -> tuple[GenerationRequest, bool]:
    """A GenerationRequest from an A1111 txt2img body, and whether images are sent back."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    for key, value in body.items():
        if key in ENGINE_FIELDS:
            continue
        if key not in DEFAULT_ONLY_FIELDS:
            raise UserError(f"unknown field {key!r}", field=key)
        allowed = DEFAULT_ONLY_FIELDS[key]
        if allowed is not None and value not in allowed:
            raise UserError(f"this app cannot do {key}={value!r} yet; leave it at its default", field=key)
    fields = {k: body[k] for k in ENGINE_FIELDS if k in body and body[k] is not None}
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise UserError("must be an object of option names to values", field="override_settings")
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise UserError(f"overriding {key!r} per request is not supported", field=f"override_settings.{key}")
        fields[OVERRIDES[key]] = value
    fields["save_images"] = bool(body.get("save_images", False))
    return GenerationRequest.from_dict(fields), bool(body.get("send_images", True))


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


def encode_png(image: Image.Image, infotext: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def info_json(result: GenerationResult) -> str:
    """A1111's ``info`` string: a JSON object describing the whole result."""
    req = result.request
    return json.dumps({
        "prompt": req.prompt, "all_prompts": result.prompts,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": result.negative_prompts,
        "seed": result.seed, "all_seeds": result.seeds, "subseed": -1, "all_subseeds": [-1] * len(result.seeds),
        "subseed_strength": 0, "width": req.width, "height": req.height, "sampler_name": result.sampler_name,
        "scheduler": result.scheduler, "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": result.model_name,
        "sd_model_hash": result.model_hash, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": None, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": result.infotexts, "styles": [], "job_timestamp": "", "clip_skip": result.clip_skip,
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted,
    }, ensure_ascii=False)


def checkpoint_list(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/sd-models``: hashes where known (hashing a file is work done on first load)."""
    models = engine.models
    entries = []
    for info in models.checkpoints():
        sha = models.hashes.cached(info.path)
        entries.append({"title": checkpoint_title(info, sha), "model_name": info.model_name,
                        "hash": short_hash(sha) if sha else None, "sha256": sha, "filename": str(info.path),
                        "config": None})
    return entries


def module_list(engine: Engine) -> list[dict[str, Any]]:
    return [{"model_name": engine.models.module_name(path), "filename": str(path)}
            for path in engine.models.module_files()]


def progress_report(progress: Progress, queued: int) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/progress``: fraction of the whole job (an X/Y/Z plot counts all its cells), ETA relative
    to now, A1111's state fields, and the live preview as a base64 PNG."""
    preview = progress.preview() if progress.active else None
    return {
        "progress": progress.fraction,
        "eta_relative": progress.eta_seconds,
        "state": {"skipped": progress.skipped, "interrupted": progress.interrupted, "job": progress.job,
                  "job_count": progress.job_count, "job_timestamp": "", "job_no": progress.job_no,
                  "sampling_step": progress.sampling_step, "sampling_steps": progress.sampling_steps,
                  "queued": queued},
        "current_image": encode_png(preview, "") if preview is not None else None,
        "textinfo": progress.textinfo or None,
    }


def png_info_of(body: Any) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/png-info``: the image's infotext, its other text chunks, and the infotext parsed."""
    data = body.get("image") if isinstance(body, dict) else None
    if not isinstance(data, str) or not data:
        raise UserError("send the image as base64 text (a data: URL works too)", field="image")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1], validate=True)))
        image.load()
    except (ValueError, OSError) as e:
        raise UserError(f"is not a base64-encoded image ({e})", field="image") from e
    infotext = read_png_infotext(image) or ""
    items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
    return {"info": infotext, "items": items, "parameters": parse_infotext(infotext) if infotext else {}}


def extension_list(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/extensions`` (no git here: remote, branch and commit are empty)."""
    return [{"name": ext.name, "remote": "", "branch": "", "commit_hash": "", "commit_date": 0, "version": "",
             "enabled": ext.enabled, "builtin": ext.builtin, "error": ext.error}
            for ext in extensions_of(engine).extensions]


def script_info() -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/script-info`` for the one script: its ``script_args`` in order, with their defaults."""
    args = [{"label": name, "value": value, "minimum": 0 if name == "margin_size" else None,
             "maximum": MAX_MARGIN if name == "margin_size" else None, "step": None, "choices": None}
            for name, value in SCRIPT_ARGS.items()]
    return [{"name": XYZ_SCRIPT, "is_alwayson": False, "is_img2img": False, "args": args}]


def user_error_response(error: UserError) -> JSONResponse:
    """422 naming the field at fault. Routes answer it themselves: handlers added to a running
    Gradio app would never be installed."""
    return JSONResponse(status_code=422, content={"error": "UserError", "field": error.field,
                                                  "detail": error.message, "errors": str(error)})


def register_api(app: FastAPI, jobs: JobQueue) -> None:
    """Add the /sdapi/v1 routes, and those extensions added, to an app (Gradio's, or a bare FastAPI app with
    --nowebui)."""

    def txt2img(body: Any = Body(...)) -> Any:
        try:
            request, send_images = request_from_a1111(body)
            script = xyz_script(body, plot_axes(jobs.engine))
            if script is None:
                result = jobs.run(request)
            else:
                result = jobs.run_plot(request, *script, save_grid=request.save_images).as_result()
        except UserError as e:
            return user_error_response(e)
        images = [encode_png(img, text) for img, text in zip(result.images, result.infotexts)] if send_images else []
        return {"images": images, "parameters": body, "info": info_json(result)}

    engine = jobs.engine

    def memory() -> dict[str, Any]:
        return engine.memory.report()

    def get_options() -> dict[str, Any]:
        return engine.options.as_dict()

    def set_options(body: Any = Body(...)) -> Any:
        """Checked all together before any is stored (the UI reads the same store): a bad one is a 422 naming it."""
        if not isinstance(body, dict):
            return user_error_response(UserError("the request body must be a JSON object", field="body"))
        try:
            engine.options.update(body)
        except UserError as e:
            return user_error_response(e)
        return None

    def refresh_checkpoints() -> None:
        engine.models.refresh()

    def unload_checkpoint() -> None:
        engine.models.unload()

    def png_info(body: Any = Body(...)) -> Any:
        try:
            return png_info_of(body)
        except UserError as e:
            return user_error_response(e)

    def reload_checkpoint() -> None:
        """Load the selected checkpoint now, in the generation queue (it waits for the running job)."""
        jobs.run_call("reload-checkpoint", engine.load_selected)

    routes = [
        ("/txt2img", txt2img, "POST", "Text to image (A1111 request and response shape)"),
        ("/png-info", png_info, "POST", "The generation parameters stored in an image (base64), read and parsed"),
        ("/reload-checkpoint", reload_checkpoint, "POST", "Load the checkpoint the options select"),
        ("/extensions", lambda: extension_list(engine), "GET", "Extensions found, and whether each runs"),
        ("/script-info", script_info, "GET", "The scripts' arguments, in order, with defaults"),
        ("/memory", memory, "GET", "RAM and VRAM use, where the weights are, and what the last generation moved"),
        ("/options", get_options, "GET", "The settings store (config.json), as the UI sees it"),
        ("/options", set_options, "POST", "Change settings: checked together, stored, used from the next job"),
        ("/cmd-flags", lambda: vars(engine.config.args), "GET", "The command-line flags the app runs with"),
        ("/sd-models", lambda: checkpoint_list(engine), "GET", "Checkpoints found (A1111 shape)"),
        ("/sd-modules", lambda: module_list(engine), "GET", "VAE and text-encoder files (Forge's VAE / Text Encoder)"),
        ("/samplers", api_samplers, "GET", "Sampling methods, with their aliases"),
        ("/schedulers", api_schedulers, "GET", "Schedule types"),
        ("/refresh-checkpoints", refresh_checkpoints, "POST", "Scan the checkpoint folders again"),
        ("/unload-checkpoint", unload_checkpoint, "POST", "Let every model go (current and kept), freeing RAM and VRAM"),
        ("/progress", lambda: progress_report(engine.progress, jobs.pending), "GET",
         "The running job: fraction done, ETA, step, and a preview of its latents"),
        ("/interrupt", jobs.interrupt, "POST", "Stop the running job after its current step"),
        ("/skip", jobs.skip, "POST", "Skip the running job's current image"),
        ("/scripts", lambda: {"txt2img": [XYZ_SCRIPT], "img2img": []}, "GET", "Scripts a request can name"),
    ]
    for path, endpoint, method, summary in routes:
        app.add_api_route(f"/sdapi/v1{path}", endpoint, methods=[method], tags=["sdapi"], summary=summary)
    for route in extensions_of(jobs.engine).routes:
        app.add_api_route(route.path, route.endpoint, methods=list(route.methods), tags=[f"extension {route.owner}"])
