"""The AUTOMATIC1111-compatible HTTP API (/sdapi/v1): thin — validate, queue, shape the reply."""
from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, PngImagePlugin
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.engine.engine import Engine
from webui.engine.files import checkpoint_title, short_hash
from webui.engine.infotext import parse_infotext, read_png_infotext
from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest, GenerationResult
from webui.engine.samplers import api_samplers, api_schedulers, find_sampler
from webui.engine.xyz import BUILTIN_AXES, SCRIPT_ARGS, Axis, AxisChoice, PlotOptions, plot_from_args
from webui.errors import UserError
from webui.extensions import extensions_of, plot_axes
from webui.jobs import JobQueue, Overrides
from webui.settings import Options

log = logging.getLogger(__name__)

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
        if not options.knows(key) and options.get(key, _MISSING) != value:
            raise UserError(f"override_settings: this app has no option {key!r}", field=key)
    try:
        values = options.checked(given)
    except UserError as e:
        raise UserError(f"override_settings: {e.message}", field=e.field) from None
    return Overrides(values, restore=body.get("override_settings_restore_afterwards") is not False)


def _check_eta(eta: Any, sampler_name: str) -> None:
    """eta is honoured where it is the one the sampler samples with, or plays no part in it."""
    if eta is None:
        return
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise UserError(f"must be a number, got {eta!r}", field="eta")
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


SECRET_FLAGS = ("api_auth", "gradio_auth")


def public_flags(args) -> dict:
    """The flags as A1111's /cmd-flags lists them, with the logins' passwords replaced (the user names stay)."""
    flags = dict(vars(args))
    for name in SECRET_FLAGS:
        if flags.get(name):
            flags[name] = [(user, "***") for user, _password in flags[name]]
    return flags


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
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted, "notices": result.notices,
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


def progress_report(progress: Progress, queued: int, with_image: bool = True) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/progress``: fraction of the whole job (an X/Y/Z plot counts all its cells), ETA relative
    to now, A1111's state fields, and the live preview as a base64 PNG (unless ``skip_current_image``)."""
    preview = progress.preview() if progress.active and with_image else None
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


def error_response(error: Exception) -> JSONResponse:
    """A1111's error shape: 422 naming the field at fault for what the user can fix, 500 for anything else."""
    if isinstance(error, UserError):
        return JSONResponse(status_code=422, content={"error": "UserError", "field": error.field,
                                                      "detail": error.message, "errors": str(error)})
    return JSONResponse(status_code=500, content={"error": type(error).__name__, "detail": str(error),
                                                  "errors": str(error)})


def basic_auth(accounts: list[tuple[str, str]]) -> Callable[..., None]:
    """--api-auth: a dependency every API route has; a wrong or missing login is a 401 asking for one."""
    security = HTTPBasic(description="--api-auth USER:PASS")

    def check(given: HTTPBasicCredentials = Depends(security)) -> None:
        user, password = given.username.encode(), given.password.encode()
        # compare every account in full, so that the time taken tells nothing about which part was wrong
        matches = [secrets.compare_digest(user, u.encode()) & secrets.compare_digest(password, p.encode())
                   for u, p in accounts]
        if not any(matches):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return check


def route_class(log_calls: bool) -> type[APIRoute]:
    """Every API route's: an error a route raises is answered (error_response) and the server goes on; exception
    handlers cannot do it, as those added to a running Gradio app are never installed. With --api-log, one line
    per call: client, method, path, status and seconds, as A1111 logs them."""

    def logged(request: Request, status: int, start: float) -> None:
        if log_calls:
            client = request.client.host if request.client else "-"
            log.info("API %s %s %s %d %.3fs", client, request.method, request.url.path, status,
                     time.perf_counter() - start)

    class ApiRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def answer(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    response = await handler(request)
                except (StarletteHTTPException, RequestValidationError) as e:  # the app's own handlers answer these
                    logged(request, getattr(e, "status_code", 422), start)
                    raise
                except Exception as e:
                    if not isinstance(e, UserError):
                        log.exception("API %s %s failed", request.method, request.url.path)
                    response = error_response(e)
                logged(request, response.status_code, start)
                return response

            return answer

    return ApiRoute


def register_api(app: FastAPI, jobs: JobQueue) -> None:
    """Add the /sdapi/v1 routes, and those extensions added, to an app (Gradio's, or a bare FastAPI app with
    --nowebui), behind --api-auth and logged with --api-log."""

    engine = jobs.engine

    def txt2img(body: Any = Body(...)) -> dict[str, Any]:
        call = read_txt2img(body, engine.options)
        script = xyz_script(body, plot_axes(engine))
        if script is None:
            result = jobs.run(call.request, call.overrides)
        else:
            result = jobs.run_plot(call.request, *script, save_grid=call.save_grid,
                                   overrides=call.overrides).as_result()
        images = [encode_png(img, text) for img, text in zip(result.images, result.infotexts)] \
            if call.send_images else []
        return {"images": images, "parameters": body, "info": info_json(result)}

    def memory() -> dict[str, Any]:
        return engine.memory.report()

    def get_options() -> dict[str, Any]:
        return engine.options.as_dict()

    def set_options(body: Any = Body(...)) -> None:
        """Checked all together before any is stored (the UI reads the same store): a bad one is a 422 naming it."""
        if not isinstance(body, dict):
            raise UserError("the request body must be a JSON object", field="body")
        engine.set_options(body)

    def refresh_checkpoints() -> None:
        engine.models.refresh()

    def unload_checkpoint() -> None:
        engine.models.unload()

    def png_info(body: Any = Body(...)) -> dict[str, Any]:
        return png_info_of(body)

    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return progress_report(engine.progress, jobs.pending, with_image=not skip_current_image)

    def refresh_vae() -> None:
        """The VAE and text encoder lists are read from their folders at every call: nothing to do."""

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
        ("/cmd-flags", lambda: public_flags(engine.config.args), "GET",
         "The command-line flags the app runs with (passwords hidden)"),
        ("/sd-models", lambda: checkpoint_list(engine), "GET", "Checkpoints found (A1111 shape)"),
        ("/sd-modules", lambda: module_list(engine), "GET", "VAE and text-encoder files (Forge's VAE / Text Encoder)"),
        ("/samplers", api_samplers, "GET", "Sampling methods, with their aliases"),
        ("/schedulers", api_schedulers, "GET", "Schedule types"),
        ("/refresh-checkpoints", refresh_checkpoints, "POST", "Scan the checkpoint folders again"),
        ("/unload-checkpoint", unload_checkpoint, "POST", "Let every model go (current and kept), freeing RAM and VRAM"),
        ("/progress", progress, "GET",
         "The running job: fraction done, ETA, step, and a preview of its latents"),
        ("/interrupt", jobs.interrupt, "POST", "Stop the running job after its current step"),
        ("/skip", jobs.skip, "POST", "Skip the running job's current image"),
        ("/scripts", lambda: {"txt2img": [XYZ_SCRIPT], "img2img": []}, "GET", "Scripts a request can name"),
        ("/refresh-vae", refresh_vae, "POST", "Scan the VAE folder again (it is read at every call)"),
        ("/embeddings", lambda: {"loaded": {}, "skipped": {}}, "GET", "Textual inversions (none: not supported yet)"),
        ("/prompt-styles", lambda: [], "GET", "Saved prompt styles (none: not supported yet)"),
        ("/upscalers", lambda: [], "GET", "Upscalers (none: hires. fix is not supported yet)"),
    ]
    args = engine.config.args
    extra = {"dependencies": [Depends(basic_auth(args.api_auth))] if args.api_auth else None,
             "route_class_override": route_class(args.api_log)}
    for path, endpoint, method, summary in routes:
        app.router.add_api_route(f"/sdapi/v1{path}", endpoint, methods=[method], tags=["sdapi"], summary=summary, **extra)
    for route in extensions_of(engine).routes:
        app.router.add_api_route(route.path, route.endpoint, methods=list(route.methods), tags=[f"extension {route.owner}"],
                          **extra)
    app.openapi_schema = None  # made again with these routes at the next /openapi.json
