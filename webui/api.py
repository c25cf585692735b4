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

from webui.engine.request import GenerationRequest, GenerationResult
from webui.errors import UserError
from webui.extensions import extensions_of
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
    "comments": [None, {}], "sampler_index": [None, "Euler", "Euler a"], "script_name": [None, ""],
    "script_args": [None, []], "alwayson_scripts": [None, {}], "infotext": [None, ""], "force_task_id": None,
    "override_settings_restore_afterwards": None, "send_images": None,
    "save_images": None, "override_settings": None,
}
ENGINE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "distilled_cfg_scale",
                 "sampler_name", "scheduler", "seed", "batch_size", "n_iter")
OVERRIDES = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
             "forge_additional_modules": "modules"}


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
            result = jobs.run(request)
        except UserError as e:
            return user_error_response(e)
        images = [encode_png(img, text) for img, text in zip(result.images, result.infotexts)] if send_images else []
        return {"images": images, "parameters": body, "info": info_json(result)}

    def memory() -> dict[str, Any]:
        return jobs.engine.memory.report()

    app.add_api_route("/sdapi/v1/txt2img", txt2img, methods=["POST"], tags=["sdapi"],
                      summary="Text to image (A1111 request and response shape)")
    app.add_api_route("/sdapi/v1/memory", memory, methods=["GET"], tags=["sdapi"],
                      summary="RAM and VRAM use, where the weights are, and what the last generation moved")
    for route in extensions_of(jobs.engine).routes:
        app.add_api_route(route.path, route.endpoint, methods=list(route.methods), tags=[f"extension {route.owner}"])
