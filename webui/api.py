"""The AUTOMATIC1111-compatible HTTP API (/sdapi/v1): thin — validate, queue, shape the reply."""
from __future__ import annotations

import asyncio
import base64
import html
import io
import json
import logging
import os
import secrets
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
from fastapi import Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.api_controlnet import DETECT_BODY_SCHEMA, controlnet_routes, read_detect
from webui.api_jobs import job_routes
from webui.api_merge import MERGE_BODY_SCHEMA, api_field, read_merge
from webui.api_body import (
    MAX_MARGIN,
    PNG_INFO_BODY_SCHEMA,
    XYZ_TITLE,
    PromptScriptCall,
    Txt2ImgCall,
    XyzCall,
    decode_image,
    options_body_schema,
    read_img2img,
    read_txt2img,
    img2img_body_schema,
    txt2img_body_schema,
    prompt_script,
    xyz_script,
)
from webui.engine.engine import Engine, MemoryState
from webui.engine.forecast import Forecast
from webui.engine.inpaint import FILLS
from webui.engine.outpaint import DIRECTIONS
from webui.engine.outpaint import MAX_BLUR as OUTPAINT_MAX_BLUR
from webui.engine.outpaint import MAX_MK2_BLUR as OUTPAINT_MAX_MK2_BLUR
from webui.engine.outpaint import MK2_TITLE as OUTPAINT_MK2
from webui.engine.outpaint import SCRIPT_TITLE as OUTPAINT_SCRIPT
from webui.engine.hires import LATENT_MODES
from webui.engine.infotext import PNG_SIGNATURE, parse_infotext, png_text, read_png_infotext
from webui.engine.outputs import png_bytes, png_files
from webui.engine.progress import Progress
from webui.engine.upscale.extras import ExtrasResult
from webui.engine.upscale.found import UpscalerInfo
from webui.engine.upscale.request import ExtrasCall, extras_body_schema, read_extras
from webui.engine.request import GenerationResult
from webui.engine.xyz import SCRIPT_ARGS, PlotForecast, PlotResult, forecast_plot
from webui.engine.prompt_lines import POSITIONS as LINE_POSITIONS
from webui.engine.prompt_lines import TITLE as LINES_TITLE
from webui.engine.prompt_matrix import DELIMITERS, PROMPT_TYPES
from webui.engine.prompt_matrix import TITLE as MATRIX_TITLE
from webui.errors import Busy, UserError
from webui.job_history import JobHistory
from webui.extensions import extensions_of, plot_axes
from webui.jobs import JobQueue

log = logging.getLogger(__name__)

SECRET_FLAGS = ("api_auth", "gradio_auth")


def public_flags(args) -> dict:
    """The flags as A1111's /cmd-flags lists them, with the logins' passwords replaced (the user names stay)."""
    flags = dict(vars(args))
    for name in SECRET_FLAGS:
        if flags.get(name):
            flags[name] = [(user, "***") for user, _password in flags[name]]
    return flags


def encode_png(image: Image.Image, infotext: str) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def response_images(result: GenerationResult) -> list[str]:
    """The result's images as base64 PNGs with their infotexts."""
    return [base64.b64encode(png).decode("ascii") for png in result_pngs(result)]


def result_pngs(result: GenerationResult) -> list[bytes]:
    """The result's images as PNGs with their infotexts: saved ones as their files' bytes (the same PNG), the others
    encoded now, side by side."""
    pngs = [_read(path) for path in result.saved_files()]
    missing = [i for i, png in enumerate(pngs) if png is None]
    encoded = png_files([result.images[i] for i in missing], [result.infotexts[i] for i in missing])
    for i, png in zip(missing, encoded):
        pngs[i] = png
    return pngs


def _read(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path else None
    except OSError:  # moved or deleted since it was saved
        return None


def info_json(result: GenerationResult, ignored: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """A1111's ``info`` string: a JSON object describing the whole result; ``ignored_fields`` names the request's
    fields that changed nothing, ``notices`` says what the user should know (how lenient readings were taken too)."""
    req = result.request
    return json.dumps({
        "prompt": req.prompt, "all_prompts": result.prompts,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": result.negative_prompts,
        "seed": result.seed, "all_seeds": result.seeds, "subseed": result.subseeds[0] if result.subseeds else -1,
        "all_subseeds": result.subseeds, "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height, "sampler_name": result.sampler_name,
        "scheduler": result.scheduler, "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": result.model_name,
        "sd_model_hash": result.model_hash, "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": req.denoising_strength if req.init_images is not None or req.enable_hr else None,
        "extra_generation_params": {}, "index_of_first_image": result.grids,
        "infotexts": result.infotexts, "styles": [], "job_timestamp": "", "clip_skip": result.clip_skip,
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted,
        "notices": [*notes, *result.notices], "ignored_fields": list(ignored),
    }, ensure_ascii=False)


def checkpoint_list(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/sd-models``: hashes where known (hashing a file is work done on first load)."""
    entries = []
    for info in engine.models.checkpoints():
        named = engine.checkpoint_id(info)
        entries.append({"title": named.title, "model_name": info.model_name, "hash": named.short_hash,
                        "sha256": named.sha256, "filename": str(info.path), "config": None})
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


def memory_report(engine: Engine) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/memory`` answer ("ram", "cuda"), plus where our weights are and the last generation."""
    ram = psutil.virtual_memory()
    state = engine.memory_state()
    answer = {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}}
    if state.cuda is not None:
        answer["cuda"] = cuda_report(state)
    answer["webui"] = {"device": state.device, "policy": state.policy, "components": state.components,
                       "last_generation": state.last_generation}
    return answer


def cuda_report(state: MemoryState) -> dict[str, Any]:
    """A1111's "cuda" part: the device's free and total memory, torch's allocator counters."""
    free, total, stats = state.cuda
    return {
        "system": {"free": free, "used": total - free, "total": total},
        **{key: {"current": stats.get(f"{key}_bytes.all.current", 0), "peak": stats.get(f"{key}_bytes.all.peak", 0)}
           for key in ("active", "allocated", "reserved", "inactive_split")},
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def vae_list(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/sd-vae``: the files of the VAE folder."""
    return [{"model_name": engine.models.vae_name(path), "filename": str(path)} for path in engine.models.vaes()]


def upscaler_entry(info: UpscalerInfo) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/upscalers`` entry ("None" comes first: SillyTavern builds its list around it): a model
    file's folder kind, path and the scale its name says; nothing is ever downloaded, so no URL."""
    return {"name": info.name, "model_name": info.folder, "model_path": str(info.path) if info.path else None,
            "model_url": None, "scale": info.scale}


def extras_reply(call: ExtrasCall, result: ExtrasResult, batch: bool) -> dict[str, Any]:
    """A1111's Extras answer: the images as base64 PNGs (the source's parameters kept, the "Postprocess" line
    added), ``html_info`` the line as its UI shows it; ``info`` (this app's) names the fields ignored."""
    images = [base64.b64encode(png).decode("ascii") for png in result.pngs]
    line = result.infotexts[-1] if result.infotexts else ""
    reply = {"html_info": f"<p>{'<br>'.join(html.escape(part) for part in line.splitlines())}</p>",
             "info": json.dumps({"ignored_fields": call.ignored, "infotexts": result.infotexts})}
    return reply | ({"images": images} if batch else {"image": images[0]})
# The scripts either generation route runs, by A1111's titles (/scripts lists them in lower case, as A1111's)
SCRIPT_TITLES = (XYZ_TITLE, LINES_TITLE, MATRIX_TITLE)
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the log does
DISCONNECT_POLL_SECONDS = 0.5
SERVER_COMMANDS = {"kill": "End the server process at once (--api-server-stop)",
                   "restart": "Start the server again with the same flags (--api-server-stop)",
                   "stop": "Stop the server once the running job is interrupted (--api-server-stop)"}


def server_command(jobs: JobQueue, name: str) -> Callable[[], dict[str, str]]:
    """A1111's server-kill/-restart/-stop, allowed only with --api-server-stop (as A1111 adds them only then; here they
    answer 403 saying so). The answer goes out first; the process acts a moment later."""

    def run() -> dict[str, str]:
        if not jobs.engine.config.args.api_server_stop:
            raise HTTPException(status_code=403, detail=f"server-{name} is allowed only when the server is started "
                                                        "with --api-server-stop")
        if name != "kill":
            jobs.interrupt()
        log.warning("server-%s asked through the API", name)
        threading.Timer(0.5, SERVER_ACTIONS[name]).start()
        return {"detail": f"server-{name}: done in a moment"}

    return run


SERVER_ACTIONS: dict[str, Callable[[], None]] = {
    "kill": lambda: os._exit(0),
    # the same command line in this process (sockets are not inherited, so the port is free for it)
    "restart": lambda: os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]]),
    "stop": lambda: os.kill(os.getpid(), signal.SIGINT),  # as Ctrl+C: uvicorn and Gradio shut down cleanly
}


def png_info_of(body: Any) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/png-info``: the image's infotext, its other text chunks, and the infotext parsed. No pixel
    is decoded (a small PNG can hold a decompression bomb): a PNG's text chunks are walked, other formats' headers
    read."""
    data = body.get("image") if isinstance(body, dict) else None
    if not isinstance(data, str) or not data:
        raise UserError("send the image as base64 text (a data: URL works too)", field="image")
    try:
        raw = io.BytesIO(base64.b64decode(data.split(",", 1)[-1], validate=True))
        if raw.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
            items = png_text(raw)
        else:
            raw.seek(0)
            with Image.open(raw) as image:
                items = {k: v for k, v in image.info.items() if isinstance(v, str)}
                items["parameters"] = read_png_infotext(image) or ""
    except (ValueError, OSError, struct.error) as e:
        raise UserError(f"is not a base64-encoded image ({e})", field="image") from e
    infotext = items.pop("parameters", "") or ""
    return {"info": infotext, "items": items, "parameters": parse_infotext(infotext) if infotext else {}}


def extension_list(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/extensions`` (no git here: remote, branch and commit are empty)."""
    return [{"name": ext.name, "remote": "", "branch": "", "commit_hash": "", "commit_date": 0, "version": "",
             "enabled": ext.enabled, "builtin": ext.builtin, "error": ext.error}
            for ext in extensions_of(engine).extensions]


def script_info() -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/script-info``: each script's ``script_args`` in order, with their defaults."""
    args = [_arg(name, value, **({"minimum": 0, "maximum": MAX_MARGIN} if name == "margin_size" else {}))
            for name, value in SCRIPT_ARGS.items()]
    outpaint = [_arg("Pixels to expand", 128, 8, 256, 8), _arg("Mask blur", 4, 0, OUTPAINT_MAX_BLUR, 1),
                _arg("Masked content", FILLS[0], choices=list(FILLS)),
                _arg("Outpainting direction", list(DIRECTIONS), choices=list(DIRECTIONS))]
    mk2 = [_arg("", None), outpaint[0], _arg("Mask blur", 8, 0, OUTPAINT_MAX_MK2_BLUR, 1), outpaint[3],
           _arg("Fall-off exponent (lower=higher detail)", 1.0, 0.0, 4.0, 0.01),
           _arg("Color variation", 0.05, 0.0, 1.0, 0.01)]
    lines = [_arg("Iterate seed every line", False), _arg("Use same random seed for all lines", False),
             _arg("Insert prompts at the", "start", choices=list(LINE_POSITIONS)), _arg("List of prompt inputs", "")]
    matrix = [_arg("Put variable parts at start of prompt", False), _arg("Use different seed for each picture", False),
              _arg("Select prompt", "positive", choices=list(PROMPT_TYPES)),
              _arg("Select joining char", "comma", choices=list(DELIMITERS)),
              _arg("Grid margins (px)", 0, minimum=0, maximum=MAX_MARGIN, step=2)]
    either = [(name.lower(), script_args) for name, script_args in zip(SCRIPT_TITLES, (args, lines, matrix))]
    return [*({"name": name, "is_alwayson": False, "is_img2img": img2img, "args": script_args}
              for img2img in (False, True) for name, script_args in either),
            {"name": OUTPAINT_SCRIPT.lower(), "is_alwayson": False, "is_img2img": True, "args": outpaint},
            {"name": OUTPAINT_MK2.lower(), "is_alwayson": False, "is_img2img": True, "args": mk2}]


def _arg(label: str, value: Any, minimum: float | None = None, maximum: float | None = None,
         step: float | None = None, choices: list[str] | None = None) -> dict[str, Any]:
    """One script argument as A1111's /script-info describes it."""
    return {"label": label, "value": value, "minimum": minimum, "maximum": maximum, "step": step, "choices": choices}


class ApiError(BaseModel):
    """A refused or failed call, in A1111's shape: what is wrong, and the request field at fault where one is."""

    error: str
    field: str | None = None
    detail: str
    errors: str


class RequestNotRead(BaseModel):
    """FastAPI's own 422: a body that is not JSON, a query parameter of the wrong type."""

    detail: list[dict[str, Any]]


class Message(BaseModel):
    """What the server answers by itself (a body that is not JSON, a login missing)."""

    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ApiError | RequestNotRead, "description": "A field this app cannot honour, named"},
    500: {"model": ApiError, "description": "The call failed; the server goes on"},
}
QUEUED_RESPONSES = {503: {"model": ApiError, "description": "The generation queue is full (max_queued_jobs)"}}
LOGIN_RESPONSES = {401: {"model": Message, "description": "No login, or a wrong one (--api-auth)"}}
BODY_RESPONSES = {400: {"model": Message, "description": "The body is not JSON"}}
COMMAND_RESPONSES = {403: {"model": Message, "description": "The server was not started with --api-server-stop"}}
JOB_RESPONSES = {404: {"model": Message, "description": "No job of that id"}}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """openapi_extra for a route that reads its body by hand: the body it takes, for /docs and clients."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def error_response(error: Exception) -> JSONResponse:
    """A1111's error shape: 422 naming the field at fault for what the user can fix, 503 when the queue is full,
    500 for anything else."""
    if isinstance(error, Busy):
        return JSONResponse(status_code=503, content={"error": "Busy", "detail": error.message, "errors": str(error)},
                            headers={"Retry-After": "10"})
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

    async def txt2img(request: Request, body: Any = Body(...)) -> Any:
        """Async: a request waiting in the queue holds no worker thread, so however many wait, /progress,
        /interrupt and /skip are answered at once. A client that goes away is not worked for (see ``waited``)."""
        call = read_txt2img(body, engine.options, engine.known_schedule_type, engine.declared_size)
        return await generated(request, body, call, img2img=False)

    async def img2img(request: Request, body: Any = Body(...)) -> Any:
        """txt2img's route from init images (A1111's img2img body, ``read_img2img``); the images are decoded off the
        event loop. The answer's parameters leave the init images out unless include_init_images, as A1111's."""
        call = await run_in_threadpool(read_img2img, body, engine.options, engine.known_schedule_type,
                                       engine.declared_size)
        return await generated(request, body, call, img2img=True)

    async def generated(request: Request, body: dict[str, Any], call: Txt2ImgCall, img2img: bool) -> Any:
        """The answer to a generation route: the job the body asks for (one generation, or the script it names)
        queued, waited for while its client is there, its images and info."""
        future, script = enqueue(body, call, img2img)
        if not await waited(future, request):
            return Response(status_code=CLIENT_GONE)
        result = future.result()
        result = result.as_result() if isinstance(result, PlotResult) else result
        images = await run_in_threadpool(response_images, result) if call.send_images else []
        parameters = body if not img2img or body.get("include_init_images") else {**body, "init_images": None,
                                                                                    "mask": None}
        notes = call.notes + (script.notes if script else ())
        return {"images": images, "parameters": parameters, "info": info_json(result, call.ignored, notes)}

    def enqueue(body: dict[str, Any], call: Txt2ImgCall, img2img: bool
                ) -> tuple[Future, XyzCall | PromptScriptCall | None]:
        """The job a read body asks for, in the queue: one generation, or the script it names."""
        script = scripted(body, call, img2img)
        if isinstance(script, XyzCall):
            future = jobs.submit_plot(call.request, script.choices, script.options, save_grid=call.save_grid,
                                      overrides=call.overrides)
        elif isinstance(script, PromptScriptCall):
            future = jobs.submit_script(call.request, script.script, call.overrides)
        else:
            future = (jobs.submit_img2img if img2img else jobs.submit)(call.request, call.overrides)
        return future, script

    async def submitted(body: Any) -> tuple[Future, str, Callable[[Any], tuple[list[bytes], str]]]:
        """A job API body read (an img2img one where it has init_images) and queued; how its result becomes PNGs and
        A1111's info."""
        img2img = isinstance(body, dict) and body.get("init_images") is not None
        call = await run_in_threadpool(read_img2img if img2img else read_txt2img, body, engine.options,
                                       engine.known_schedule_type, engine.declared_size)
        call.request.validate(engine.options.as_dict())  # refused now, not once the job runs
        future, script = enqueue(body, call, img2img)
        notes = call.notes + (script.notes if script else ())

        def as_pngs(result: Any) -> tuple[list[bytes], str]:
            result = result.as_result() if isinstance(result, PlotResult) else result
            return result_pngs(result), info_json(result, call.ignored, notes)

        return future, "img2img" if img2img else "txt2img", as_pngs

    def scripted(body: dict[str, Any], call: Txt2ImgCall, img2img: bool) -> XyzCall | PromptScriptCall | None:
        """The script a body names, read (outpainting is read with the request: None then)."""
        if call.request.outpaint_directions:
            return None
        return (xyz_script(body, plot_axes(engine), engine.options["xyz_axis_numbering"], img2img)
                or prompt_script(body, img2img, call.save_grid))

    async def estimate(body: Any = Body(...)) -> dict[str, Any]:
        """Will it fit? A txt2img body's forecast (a script's: each generation's), or an img2img body's (one with
        init_images), made in the queue after the jobs before it, with the model it names loaded as the generation
        would load it; nothing is generated."""
        img2img = isinstance(body, dict) and body.get("init_images") is not None
        read = read_img2img if img2img else read_txt2img
        call = read(body, engine.options, engine.known_schedule_type, engine.declared_size)
        script = scripted(body, call, img2img)

        def work() -> Forecast | PlotForecast:
            forecast = engine.forecast(call.request, load=True)  # the body's model loaded; a script's generations
            if isinstance(script, XyzCall):                     # of other checkpoints are named, not loaded
                return forecast_plot(engine, call.request, script.choices, plot_axes(engine), script.options)
            return script.script.forecast(engine, call.request) if script else forecast

        forecast = await asyncio.wrap_future(jobs.submit_call("estimate", work, call.overrides))
        return forecast.as_dict() | {"ignored_fields": list(call.ignored)}

    async def waited(future: Future, request: Request) -> bool:
        """Wait for a queued job while its client is there. A client that goes away before the job starts takes it
        out of the queue; one that goes away while it runs interrupts it (A1111 works on for nobody). False then."""
        done = asyncio.wrap_future(future)
        while not future.done():
            await asyncio.wait([done], timeout=DISCONNECT_POLL_SECONDS)
            if not future.done() and await request.is_disconnected():
                jobs.abandon(future)
                return False
        await done
        return True

    def get_options() -> dict[str, Any]:
        """The store, with A1111's options this app keeps as given; sd_model_checkpoint names the checkpoint the next
        generation uses (clients show it as the current model), as A1111's does once a model is loaded."""
        options = engine.options.as_dict()
        selected = engine.selected_checkpoint()
        if selected is not None:
            options |= dict(zip(("sd_model_checkpoint", "sd_checkpoint_hash"), selected))
        return options

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
        return progress_report(jobs.progress, jobs.pending, with_image=not skip_current_image)

    def refresh_vae() -> None:
        """The VAE and text encoder lists (and the embeddings) are read from their folders at every call: nothing to
        do."""

    async def extras(request: Request, body: Any, batch: bool) -> Any:
        """Read the body (its images decoded off the event loop), upscale in the queue, answer in A1111's shape."""
        call = await run_in_threadpool(read_extras, body, batch, engine.options["max_image_side"],
                                       engine.options["max_batch_count"])
        future = jobs.submit_call("extras", lambda: engine.extras(call.request, call.parameters))
        if not await waited(future, request):
            return Response(status_code=CLIENT_GONE)
        return await run_in_threadpool(extras_reply, call, future.result(), batch)

    async def extra_single_image(request: Request, body: Any = Body(...)) -> Any:
        return await extras(request, body, batch=False)

    async def extra_batch_images(request: Request, body: Any = Body(...)) -> Any:
        return await extras(request, body, batch=True)

    async def detect(body: Any = Body(...)) -> dict[str, Any]:
        """sd-webui-controlnet's preprocessing: the images decoded off the event loop, preprocessed in the queue."""
        largest = engine.options["max_image_side"]
        arguments, ignored = await run_in_threadpool(read_detect, body,
                                                     lambda data, field: decode_image(data, field, largest))
        images = await asyncio.wrap_future(jobs.submit_call("detect", lambda: engine.detect(**arguments)))
        encoded = await run_in_threadpool(png_files, images, [""] * len(images))
        return {"images": [base64.b64encode(png).decode("ascii") for png in encoded], "info": "Success",
                "ignored_fields": ignored}

    async def merge(body: Any = Body(...)) -> dict[str, Any]:
        """The checkpoint merger, in the queue (one job at a time with the generations); the results are listed at
        once (/sd-models)."""
        request, ignored = read_merge(body)
        try:
            result = await asyncio.wrap_future(jobs.submit_call("merge", lambda: engine.merge_checkpoints(request)))
        except UserError as e:
            raise UserError(e.message, field=api_field(e.field)) from None
        return {"paths": [str(path) for path in result.paths], "family": result.family.value,
                "tensors": result.tensors, "seconds": round(result.seconds, 2),
                "largest_tensor_mb": round(result.largest_tensor_mb, 1), "notices": result.notices,
                "ignored_fields": ignored}

    async def reload_checkpoint() -> None:
        """Load the selected checkpoint now, in the generation queue (it waits for the running job)."""
        await asyncio.wrap_future(jobs.submit_call("reload-checkpoint", engine.load_selected))

    routes = [
        ("/txt2img", txt2img, "POST", "Text to image (A1111 request and response shape)"),
        ("/img2img", img2img, "POST", "Image to image, inpainting, and outpainting as A1111's script (A1111 request "
         "and response shape)"),
        ("/estimate", estimate, "POST", "Will it fit? A txt2img or img2img body's peak VRAM, RAM and time on this "
         "machine, forecast without generating (this app's; loads the model it names)"),
        ("/png-info", png_info, "POST", "The generation parameters stored in an image (base64), read and parsed"),
        ("/reload-checkpoint", reload_checkpoint, "POST", "Load the checkpoint the options select"),
        ("/merge-checkpoints", merge, "POST", "The checkpoint merger: weighted sum, add difference or none of 2-3 "
         "checkpoints, a VAE and LoRAs baked in, saved as safetensors or GGUF (A1111's merger fields; this app's)"),
        ("/extra-single-image", extra_single_image, "POST",
         "Extras: upscale one image (A1111 request and response shape; face restoration is not supported)"),
        ("/extra-batch-images", extra_batch_images, "POST",
         "Extras: upscale several images (A1111 request and response shape; face restoration is not supported)"),
        ("/extensions", lambda: extension_list(engine), "GET", "Extensions found, and whether each runs"),
        ("/script-info", script_info, "GET", "The scripts' arguments, in order, with defaults"),
        ("/memory", lambda: memory_report(engine), "GET",
         "RAM and VRAM use, where the weights are, and what the last generation moved"),
        ("/options", get_options, "GET", "The settings store (config.json), as the UI sees it"),
        ("/options", set_options, "POST", "Change settings: checked together, stored, used from the next job"),
        ("/cmd-flags", lambda: public_flags(engine.config.args), "GET",
         "The command-line flags the app runs with (passwords hidden)"),
        ("/sd-models", lambda: checkpoint_list(engine), "GET", "Checkpoints found (A1111 shape)"),
        ("/sd-modules", lambda: module_list(engine), "GET", "VAE and text-encoder files (Forge's VAE / Text Encoder)"),
        ("/samplers", engine.api_samplers, "GET", "Sampling methods, with their aliases"),
        ("/schedulers", engine.api_schedulers, "GET", "Schedule types"),
        ("/refresh-checkpoints", refresh_checkpoints, "POST", "Scan the checkpoint folders again"),
        ("/unload-checkpoint", unload_checkpoint, "POST", "Let every model go (current and kept), freeing RAM and VRAM"),
        ("/progress", progress, "GET",
         "The running job: fraction done, ETA, step, and a preview of its latents"),
        ("/interrupt", jobs.interrupt, "POST", "Stop the running job after its current step"),
        ("/skip", jobs.skip, "POST", "Skip the running job's current image"),
        ("/scripts", lambda: {"txt2img": [title.lower() for title in SCRIPT_TITLES],
                              "img2img": [OUTPAINT_SCRIPT.lower(), OUTPAINT_MK2.lower(),
                                          *(title.lower() for title in SCRIPT_TITLES)]}, "GET",
         "Scripts a request can name"),
        ("/refresh-vae", refresh_vae, "POST", "Scan the VAE folder again (it is read at every call)"),
        ("/sd-vae", lambda: vae_list(engine), "GET", "VAE files of models/VAE (A1111 shape)"),
        ("/embeddings", engine.embeddings_info, "GET",
         "Textual-inversion embeddings of the embeddings folder: those the loaded model takes, the others with the "
         "reason"),
        ("/refresh-embeddings", refresh_vae, "POST",
         "Scan the embeddings folder again (it is read at every use: files added since are found)"),
        ("/prompt-styles", lambda: [asdict(style) for style in engine.styles.all().values()], "GET",
         "The prompt styles of styles.csv (--styles-file): name, prompt, negative_prompt"),
        ("/upscalers", lambda: [upscaler_entry(info) for info in engine.upscalers()], "GET",
         "Upscalers: A1111's built-in None, Lanczos and Nearest, then the model files of models/ESRGAN, RealESRGAN, "
         "SwinIR, DAT, HAT and upscale_models"),
        ("/latent-upscale-modes", lambda: [{"name": name} for name in LATENT_MODES], "GET",
         "Hires. fix's latent upscale modes (its hr_upscaler may also name any of /upscalers)"),
        ("/hypernetworks", lambda: [], "GET", "Hypernetworks (none: not supported)"),
        ("/face-restorers", lambda: [], "GET", "Face restoration models (none: not supported yet)"),
        ("/realesrgan-models", lambda: [], "GET", "A1111's Real-ESRGAN download list (empty: nothing is downloaded "
         "here; Real-ESRGAN files in models/RealESRGAN are in /upscalers)"),
        *((f"/server-{name}", server_command(jobs, name), "POST", summary) for name, summary in SERVER_COMMANDS.items()),
    ]
    args = engine.config.args
    extra = {"dependencies": [Depends(basic_auth(args.api_auth))] if args.api_auth else None,
             "route_class_override": route_class(args.api_log)}
    responses = ERROR_RESPONSES | (LOGIN_RESPONSES if args.api_auth else {})
    bodies = {"/txt2img": txt2img_body_schema(), "/img2img": img2img_body_schema(), "/estimate": txt2img_body_schema(),
              "/options": options_body_schema(), "/png-info": PNG_INFO_BODY_SCHEMA, "/merge-checkpoints": MERGE_BODY_SCHEMA,
              "/extra-single-image": extras_body_schema(batch=False), "/extra-batch-images": extras_body_schema(batch=True)}
    queued = ("/extra-single-image", "/extra-batch-images", "/txt2img", "/img2img", "/reload-checkpoint", "/estimate",
              "/merge-checkpoints")
    commands = {f"/server-{name}" for name in SERVER_COMMANDS}
    for path, endpoint, method, summary in routes:
        body = bodies.get(path) if method == "POST" else None
        app.router.add_api_route(
            f"/sdapi/v1{path}", endpoint, methods=[method], tags=["sdapi"], summary=summary,
            responses=responses | (QUEUED_RESPONSES if path in queued else {}) | (BODY_RESPONSES if body else {})
            | (COMMAND_RESPONSES if path in commands else {}),
            openapi_extra=json_body(body) if body else None, **extra)
    history = JobHistory(engine.config.paths.data_dir / "jobs")
    for path, endpoint, method, summary in job_routes(jobs, history, submitted, progress_report):
        app.router.add_api_route(f"/sdapi/v1{path}", endpoint, methods=[method], tags=["jobs"], summary=summary,
                                 responses=responses | (BODY_RESPONSES | QUEUED_RESPONSES if method == "POST" else {})
                                 | (JOB_RESPONSES if "{job_id}" in path else {}),
                                 openapi_extra=json_body(txt2img_body_schema()) if method == "POST" else None, **extra)
    for path, endpoint, method, summary in controlnet_routes(engine, detect):
        app.router.add_api_route(path, endpoint, methods=[method], tags=["controlnet"], summary=summary,
                                 responses=responses | (QUEUED_RESPONSES | BODY_RESPONSES if method == "POST" else {}),
                                 openapi_extra=json_body(DETECT_BODY_SCHEMA) if method == "POST" else None, **extra)
    for route in extensions_of(engine).routes:
        app.router.add_api_route(route.path, route.endpoint, methods=list(route.methods), tags=[f"extension {route.owner}"],
                                 responses=responses, **extra)
    app.openapi_schema = None  # made again with these routes at the next /openapi.json
