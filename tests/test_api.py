"""POST /sdapi/v1/txt2img: A1111's request and response shape, clear 422s, same path as the UI."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import zlib
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from tests.bombs import png_bomb, png_chunk
import webui.api
from webui.api import register_api
from webui.engine import outputs
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.jobs import JobQueue

ROOT = Path(__file__).resolve().parent.parent
BODY = {"prompt": "a red circle", "negative_prompt": "", "width": 64, "height": 64, "steps": 3, "cfg_scale": 5,
        "sampler_name": "Euler a", "seed": 42, "batch_size": 2, "n_iter": 1}


@pytest.fixture
def client(engine):
    app = FastAPI()
    register_api(app, JobQueue(engine))
    return TestClient(app)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_has_a1111_shape_and_matches_the_engine(client, engine):
    reply = client.post("/sdapi/v1/txt2img", json=BODY)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert set(data) == {"images", "parameters", "info"} and data["parameters"] == BODY
    info = json.loads(data["info"])
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42 and info["sd_model_name"] == "sd1-1"
    images = [decode(b) for b in data["images"]]
    assert [i.size for i in images] == [(64, 64)] * 2
    assert parse_infotext(images[0].text["parameters"])["Seed"] == "42"
    assert info["infotexts"][1] == images[1].text["parameters"]
    direct = engine.txt2img(GenerationRequest.from_dict({**BODY, "save_images": False}))
    assert [i.tobytes() for i in images] == [i.tobytes() for i in direct.images], "API and engine differ"


def test_images_are_not_saved_unless_asked(client, tmp_path):
    client.post("/sdapi/v1/txt2img", json=BODY)
    assert not list((tmp_path / "outputs").rglob("*.png"))
    client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True, "send_images": False})
    assert len(list((tmp_path / "outputs").rglob("*.png"))) == 2


def test_saved_images_are_sent_as_their_files_not_encoded_again(client, engine, monkeypatch):
    """One PNG encoding an image (0.1-0.2 s at 1024²): the route sends the saved files' bytes (issue 24)."""
    encoded = []
    encode = outputs.png_bytes
    monkeypatch.setattr(outputs, "png_bytes", lambda image, text: encoded.append(1) or encode(image, text))
    sent = client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True}).json()["images"]
    files = sorted(engine.config.paths.outdir.rglob("*.png"))
    assert len(encoded) == 2 and [base64.b64decode(b) for b in sent] == [f.read_bytes() for f in files]
    files[1].unlink()  # gone before the answer is made: encoded from the image instead
    result = engine.txt2img(GenerationRequest.from_dict({**BODY, "save_images": False}))
    result.paths = [files[0], files[1]]
    again = webui.api.response_images(result)
    assert len(encoded) == 3 and base64.b64decode(again[0]) == files[0].read_bytes()
    assert decode(again[1]).tobytes() == decode(sent[1]).tobytes()
    assert decode(again[1]).text["parameters"] == decode(sent[1]).text["parameters"]
    not_saved = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"]
    assert len(encoded) == 5 and [decode(b).tobytes() for b in not_saved] == [decode(b).tobytes() for b in sent]


@pytest.mark.parametrize("change,field", [({"width": 7}, "width"), ({"width": 100000}, "width"),
                                          ({"steps": 0}, "steps"), ({"sampler_name": "Bogus"}, "sampler_name"),
                                          ({"enable_hr": "yes"}, "enable_hr"), ({"eta": 1.5}, "eta"),
                                          ({"enable_hr": True, "hr_scale": 9}, "hr_scale"),
                                          ({"override_settings": {"sd_model_checkpoint": "missing"}},
                                           "sd_model_checkpoint"),
                                          ({"eta": 0.5, "sampler_name": 5}, "sampler_name"),
                                          ({"styles": False}, "styles"), ({"styles": [1]}, "styles"),
                                          ({"script_args": False}, "script_args"),
                                          ({"s_min_uncond": False}, "s_min_uncond"), ({"tiling": 0}, "tiling")])
def test_bad_requests_get_422_naming_the_field_and_the_server_goes_on(client, change, field):
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, **change})
    assert reply.status_code == 422 and reply.json()["field"] == field, reply.text
    assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200


def test_a1111_defaults_are_accepted_and_what_changes_nothing_is_named(client):
    body = {**BODY, "styles": [], "subseed": -1, "subseed_strength": 0, "restore_faces": False, "tiling": False,
            "enable_hr": False, "denoising_strength": 0.7, "alwayson_scripts": {}, "override_settings": {},
            "override_settings_restore_afterwards": True, "send_images": True, "save_images": False}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200 and json.loads(reply.json()["info"])["ignored_fields"] == ["denoising_strength"]
    assert json.loads(reply.json()["info"])["all_subseeds"][0] >= 0, "a random variation seed, as A1111 reports it"
    unknown = client.post("/sdapi/v1/txt2img", json={**BODY, "no_such_field": 1, "styles": ["Mine"]})
    assert unknown.status_code == 200, "A1111 ignores fields it does not know, and styles it does not have"
    info = json.loads(unknown.json()["info"])
    assert info["ignored_fields"] == ["no_such_field"] and any("'Mine'" in notice for notice in info["notices"])
    assert unknown.json()["images"] == reply.json()["images"]


def test_memory_route_reports_the_last_generation(client):
    client.post("/sdapi/v1/txt2img", json=BODY)
    data = client.get("/sdapi/v1/memory").json()
    assert data["ram"]["total"] > 0 and set(data["webui"]["components"]) == {"text_encoder", "denoiser", "vae"}
    last = data["webui"]["last_generation"]
    assert {"resident_mb", "streamed_mb", "moved_mb", "move_seconds", "peak_vram_mb"} <= set(last)


def xyz_args(*axes, **options) -> list:
    """A1111's script_args for the X/Y/Z plot: up to three (type, values, dropdown) triples, then the options."""
    args = []
    for axis in (*axes, (0, "", None), (0, "", None))[:3]:
        args += list(axis)
    defaults = {"draw_legend": True, "include_lone_images": False, "include_sub_grids": False, "no_fixed_seeds": False,
                "vary_seeds_x": False, "vary_seeds_y": False, "vary_seeds_z": False, "margin_size": 0,
                "csv_mode": False}
    return args + list((defaults | options).values())


PLOT = {**BODY, "batch_size": 1, "script_name": "X/Y/Z plot"}


def test_xyz_axis_indices_count_in_a1111s_list_or_forges_as_the_option_says(client, engine):
    """Index 9 is Sampler for A1111 (webuiapi's README) and Prompt order for Forge, which adds Distilled CFG Scale
    8th; the answer says how an index was read."""
    sampler_axis = {**PLOT, "script_args": xyz_args((9, "Euler, LMS", None))}
    reply = client.post("/sdapi/v1/txt2img", json=sampler_axis)
    assert reply.status_code == 200, reply.text
    assert "X: Sampler = Euler, LMS" in json.loads(reply.json()["info"])["infotexts"][0]
    assert "x_type 9 read as 'Sampler' (A1111's numbering" in json.loads(reply.json()["info"])["notices"][0]
    hires = client.post("/sdapi/v1/txt2img", json={**PLOT, "script_args": xyz_args((10, "Euler", None))})
    assert "x_type 10 read as 'Hires sampler'" in json.loads(hires.json()["info"])["notices"][0]
    churn = client.post("/sdapi/v1/txt2img", json={**PLOT, "script_args": xyz_args((13, "1", None))})
    assert churn.status_code == 422 and "Sigma Churn" in churn.json()["detail"], "A1111's 13: not this app's axis"
    client.post("/sdapi/v1/options", json={"xyz_axis_numbering": "Forge"})
    forge = client.post("/sdapi/v1/txt2img", json={**PLOT, "script_args": xyz_args((10, "Euler, LMS", None))})
    assert forge.json()["images"][0] == reply.json()["images"][0], "Forge's 10 is A1111's 9"
    assert "Prompt order" in client.post("/sdapi/v1/txt2img", json=sampler_axis).json()["detail"]


def test_xyz_script_with_forge_axis_indices_returns_the_grid_then_the_cells(client, engine):
    body = {**PLOT, "script_args": xyz_args((4, "2, 3", None), (6, "3,7", None), include_lone_images=True)}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    grid, *cells = [decode(b) for b in reply.json()["images"]]
    assert len(cells) == 4 and grid.width > 2 * 64 and grid.height > 2 * 64
    assert "X/Y/Z plot: X: Steps = 2, 3; Y: CFG Scale = 3, 7" in grid.text["parameters"] == info["infotexts"][0]
    for cell, (steps, cfg) in zip(cells, [(2, 3), (3, 3), (2, 7), (3, 7)]):  # X fastest
        direct = engine.txt2img(GenerationRequest.from_dict({**BODY, "batch_size": 1, "steps": steps, "cfg_scale": cfg,
                                                             "save_images": False}))
        assert cell.tobytes() == direct.images[0].tobytes(), f"the cell for steps {steps}, CFG {cfg}"
    assert info["all_seeds"] == [42] * 5


def test_xyz_script_by_label_with_picked_values_and_seeds_varying_along_x(client, engine):
    body = {**PLOT, "script_args": xyz_args(("Sampler", "ignored when values are picked", ["Euler", "DPM++ 2M"]),
                                            include_lone_images=True, vary_seeds_x=True, draw_legend=False),
            "override_settings": {"CLIP_stop_at_last_layers": 2}}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    grid, *cells = [decode(b) for b in reply.json()["images"]]
    assert grid.size == (128, 64), "no legend: the two cells side by side"
    assert info["all_seeds"][1:] == [42, 43]
    assert [parse_infotext(c.text["parameters"])["Sampler"] for c in cells] == ["Euler", "DPM++ 2M"]
    assert all(parse_infotext(c.text["parameters"])["Clip skip"] == "2" for c in cells), "override_settings held"
    assert engine.options["CLIP_stop_at_last_layers"] == 1
    grid_only = client.post("/sdapi/v1/txt2img", json={**body, "script_args": body["script_args"][:9]})
    assert len(grid_only.json()["images"]) == 1, "the form's defaults: the grid alone"


@pytest.mark.parametrize("change,field,words", [
    ({"script_name": "Loopback"}, "script_name", "Prompt matrix"),
    ({"script_args": xyz_args((13, "1, 2", None))}, "x_type", "Sigma Churn"),
    ({"script_args": xyz_args((1, "1, 2", None), (99, "1", None))}, "y_type", "99"),
    ({"script_args": xyz_args((4, "two", None))}, "x_values", "two"),
    ({"script_args": xyz_args((4, "1, 2", None), margin_size=-3)}, "script_args", "margin_size"),
    ({"script_args": xyz_args((4, "1, 2", None), draw_legend="maybe")}, "script_args", "draw_legend"),
    ({"script_args": "4, 1-2"}, "script_args", "list"),
])
def test_bad_xyz_scripts_get_422_naming_the_field(client, change, field, words):
    reply = client.post("/sdapi/v1/txt2img", json={**PLOT, **change})
    assert reply.status_code == 422 and reply.json()["field"] == field, reply.text
    assert words in reply.json()["detail"]


def test_read_routes_have_a1111_shapes(client, engine):
    models = client.get("/sdapi/v1/sd-models").json()
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert "sd1-1" in [m["model_name"] for m in models]
    client.post("/sdapi/v1/txt2img", json=BODY)  # the first load hashes the file
    used = next(m for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "sd1-1")
    assert len(used["sha256"]) == 64 and used["title"] == f"{used['filename'].split('/')[-1]} [{used['hash']}]"
    assert "Euler a" in [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "karras" in [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]
    scripts = ["x/y/z plot", "prompts from file or textbox", "prompt matrix"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": scripts,
                                                       "img2img": ["poor man's outpainting", "outpainting mk2",
                                                                   *scripts]}
    assert client.get("/sdapi/v1/cmd-flags").json()["device"] == "cpu"
    modules = [m["model_name"] for m in client.get("/sdapi/v1/sd-modules").json()]
    assert modules == ["demo-shapes-clip_l.safetensors", "demo-shapes-vae.safetensors"], "the demo's, built in"
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and {"job", "sampling_step", "queued"} <= set(idle["state"])


def test_options_are_the_one_settings_store(client, engine):
    assert client.get("/sdapi/v1/options").json()["samples_save"] == engine.options["samples_save"]
    assert client.post("/sdapi/v1/options", json={"forge_inference_memory": 2048, "samples_save": False}).status_code \
        == 200
    assert engine.options["forge_inference_memory"] == 2048 and engine.memory_policy().inference_mb == 2048
    bad = client.post("/sdapi/v1/options", json={"forge_inference_memory": 1024, "forge_async_loading": "Sometimes"})
    assert bad.status_code == 422 and bad.json()["field"] == "forge_async_loading", bad.text
    assert engine.options["forge_inference_memory"] == 2048, "nothing stored when one value is bad"
    whole = client.get("/sdapi/v1/options").json() | {"an_a1111_option": 1}
    assert client.post("/sdapi/v1/options", json=whole).status_code == 200, "clients post the whole dict back"
    assert client.get("/sdapi/v1/options").json()["an_a1111_option"] == 1, "options it does not know are kept"


def test_unload_and_refresh_checkpoints(client, engine, tmp_path, sdxl_file):
    client.post("/sdapi/v1/txt2img", json=BODY)
    assert engine.models.current is not None
    assert client.post("/sdapi/v1/unload-checkpoint").status_code == 200
    assert engine.models.current is None and len(engine.models.cache) == 0
    (tmp_path / "models" / "Stable-diffusion" / sdxl_file.name).symlink_to(sdxl_file)
    assert "sdxl-1" not in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    client.post("/sdapi/v1/refresh-checkpoints")
    assert "sdxl-1" in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]


def test_progress_while_generating_has_the_fraction_and_a_preview(client, engine):
    from webui.api import progress_report

    seen = []
    engine.hooks.on("denoising_step", lambda step, **_: seen.append(progress_report(engine.progress, 0)))
    client.post("/sdapi/v1/txt2img", json={**BODY, "batch_size": 1, "steps": 4})
    assert [round(s["progress"], 2) for s in seen] == [0.25, 0.5, 0.75, 1.0]
    assert seen[1]["eta_relative"] >= 0 and seen[1]["state"]["sampling_step"] == 2
    assert decode(seen[1]["current_image"]).size == (8, 8), "the latents' preview"
    assert progress_report(engine.progress, 0, with_image=False)["current_image"] is None


def test_png_info_reads_back_what_txt2img_wrote(client):
    image = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": f"data:image/png;base64,{image}"}).json()
    assert info["info"].startswith("a red circle\n") and info["parameters"]["Seed"] == "42"
    assert info["parameters"]["Sampler"] == "Euler a"
    for bad in ({"image": "not base64!"}, {"image": base64.b64encode(b"not an image").decode()}, {}):
        reply = client.post("/sdapi/v1/png-info", json=bad)
        assert reply.status_code == 422 and reply.json()["field"] == "image", reply.text


def test_reload_extensions_and_script_info(client, engine):
    assert engine.models.current is None
    assert client.post("/sdapi/v1/reload-checkpoint").status_code == 200
    assert engine.models.current is not None and engine.models.current.info.model_name == "sd1-1"
    from webui.extensions import BUILTIN_DIR, find_extensions, load_extensions

    load_extensions(engine, find_extensions(BUILTIN_DIR, builtin=True))
    listed = {e["name"]: e for e in client.get("/sdapi/v1/extensions").json()}
    assert listed["lora"]["enabled"] and listed["lora"]["builtin"] and listed["lora"]["error"] is None
    info = client.get("/sdapi/v1/script-info").json()
    (script, lines, matrix), (img2img_plot, *_), (outpaint, mk2) = info[:3], info[3:6], info[6:]
    assert [a["label"] for a in lines["args"]] == ["Iterate seed every line", "Use same random seed for all lines",
                                                   "Insert prompts at the", "List of prompt inputs"]
    assert lines["name"] == "prompts from file or textbox" and matrix["name"] == "prompt matrix"
    assert [a["value"] for a in matrix["args"]] == [False, False, "positive", "comma", 0]
    assert mk2["name"] == "outpainting mk2" and len(mk2["args"]) == 6
    assert outpaint["name"] == "poor man's outpainting" and outpaint["is_img2img"]
    assert img2img_plot["is_img2img"] and img2img_plot["args"] == script["args"] and not script["is_img2img"]
    assert script["name"] == "x/y/z plot" and [a["label"] for a in script["args"]][:3] == \
        ["x_type", "x_values", "x_values_dropdown"] and len(script["args"]) == 18


def test_override_settings_hold_for_the_request_or_stay_when_asked(client, engine):
    body = {**BODY, "batch_size": 1, "override_settings": {"forge_inference_memory": 2048, "CLIP_stop_at_last_layers": 2}}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    assert client.get("/sdapi/v1/memory").json()["webui"]["policy"]["inference_mb"] == 2048, "the budget it ran with"
    assert "Clip skip: 2" in json.loads(reply.json()["info"])["infotexts"][0]
    assert engine.options["forge_inference_memory"] == 1024 and engine.options["CLIP_stop_at_last_layers"] == 1
    client.post("/sdapi/v1/txt2img", json={**body, "override_settings_restore_afterwards": False})
    assert engine.options["forge_inference_memory"] == 2048 and engine.options["CLIP_stop_at_last_layers"] == 2
    assert json.loads(engine.config.paths.config_file.read_text())["forge_inference_memory"] == 2048, "and saved"


@pytest.mark.parametrize("overrides,field", [({"forge_async_loading": "Sometimes"}, "forge_async_loading"),
                                             ({"no_such_option": 1}, "no_such_option"),
                                             ({"eta_noise_seed_delta": 31337}, "eta_noise_seed_delta"),
                                             ({"sd_vae": "missing.safetensors"}, "sd_vae"),
                                             ({"max_image_side": 8192}, "max_image_side"),
                                             ({"max_steps": 1000}, "max_steps")])
def test_overrides_this_app_cannot_honour_are_refused_and_nothing_changes(client, engine, overrides, field):
    before = engine.options.as_dict()
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": overrides,
                                                   "override_settings_restore_afterwards": False})
    assert reply.status_code == 422 and reply.json()["field"] == field, reply.text
    assert engine.options.as_dict() == before


def test_fields_a1111_reads_are_honoured(client, engine, tmp_path):
    by_index = client.post("/sdapi/v1/txt2img", json={**BODY, "sampler_name": None, "sampler_index": "Euler"})
    assert "Sampler: Euler," in json.loads(by_index.json()["info"])["infotexts"][0], "sampler_index when no name"
    named = client.post("/sdapi/v1/txt2img", json={**BODY, "sampler_index": "Euler"})
    assert "Sampler: Euler a," in json.loads(named.json()["info"])["infotexts"][0], "sampler_name wins"
    for sampler in ("Euler a", "DDIM"):  # eta scales the sampler's noise (tests/test_samplers.py: how)
        by_eta = [client.post("/sdapi/v1/txt2img", json={**BODY, "sampler_name": sampler, "eta": eta}).json()["images"]
                  for eta in (0, 1)]
        assert by_eta[0] != by_eta[1], f"{sampler}: eta 0 and 1 gave the same images"
    hires_off = {"enable_hr": False, "denoising_strength": 0.45, "hr_upscaler": "Latent", "hr_scale": 1.5,
                 "hr_second_pass_steps": 10, "hr_cfg": 7, "refiner_switch_at": 0.8}
    plain = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"]
    assert client.post("/sdapi/v1/txt2img", json={**BODY, **hires_off}).json()["images"] == plain
    client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True, "do_not_save_samples": True})
    assert not list((tmp_path / "outputs").rglob("*.png"))
    for bad in ({"send_images": "yes"}, {"override_settings_restore_afterwards": 0}):
        assert client.post("/sdapi/v1/txt2img", json={**BODY, **bad}).json()["field"] == next(iter(bad))


def test_options_refuse_missing_files_and_list_what_is_fixed(client, engine):
    options = client.get("/sdapi/v1/options").json()
    assert options["randn_source"] == "CPU" and options["eta_noise_seed_delta"] == 0
    for change, field in (({"sd_model_checkpoint": "missing"}, "sd_model_checkpoint"), ({"sd_vae": "x.pt"}, "sd_vae"),
                          ({"forge_additional_modules": ["x.safetensors"]}, "forge_additional_modules"),
                          ({"randn_source": "GPU"}, "randn_source")):
        reply = client.post("/sdapi/v1/options", json=change)
        assert reply.status_code == 422 and reply.json()["field"] == field, reply.text
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd1-1"}).status_code == 200
    assert client.post("/sdapi/v1/options", json=options).status_code == 200, "the whole store posted back"
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200


def test_api_auth_guards_every_route_and_api_log_logs_each_call(engine, caplog):
    engine.config.args.api_auth = [("alice", "s3cret:x"), ("bob", "pw")]
    engine.config.args.api_log = True
    from webui.extensions import BUILTIN_DIR, find_extensions, load_extensions

    load_extensions(engine, find_extensions(BUILTIN_DIR, builtin=True))  # their routes too
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    routes = [(r.path, sorted(r.methods)[0]) for r in app.routes if r.path.startswith("/sdapi/")]
    assert len(routes) >= 25 and ("/sdapi/v1/loras", "GET") in routes
    for path, method in routes:
        reply = client.request(method, path)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Basic", (path, reply.text)
    assert client.get("/sdapi/v1/memory", auth=("alice", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/memory", auth=("bob", "s3cret:x")).status_code == 401, "one account's password"
    with caplog.at_level("INFO", logger="webui.api"):
        assert client.get("/sdapi/v1/memory", auth=("alice", "s3cret:x")).status_code == 200
        assert client.post("/sdapi/v1/txt2img", json={**BODY, "width": 7}, auth=("bob", "pw")).status_code == 422
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("API ")]
    assert lines[-2].startswith("API testclient GET /sdapi/v1/memory 200 ")
    assert lines[-1].startswith("API testclient POST /sdapi/v1/txt2img 422 ")


def test_a_failing_job_or_route_is_a_500_with_its_message_and_the_server_goes_on(client, engine, monkeypatch):
    def broken(request):
        raise RuntimeError("the GPU caught fire")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "txt2img", broken)
        reply = client.post("/sdapi/v1/txt2img", json=BODY)
        assert reply.status_code == 500 and reply.json()["error"] == "RuntimeError"
        assert reply.json()["detail"] == "the GPU caught fire"
    assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200
    not_json = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and "detail" in not_json.json()


def test_cmd_flags_hide_the_passwords():
    from webui.api import public_flags
    from webui.cli import parse_args

    args = parse_args(["--api-auth", "alice:pa:ss,bob:x", "--gradio-auth", "carol:y", "--listen"])
    flags = public_flags(args)
    assert flags["api_auth"] == [("alice", "***"), ("bob", "***")] and flags["gradio_auth"] == [("carol", "***")]
    assert flags["listen"] is True and args.api_auth == [("alice", "pa:ss"), ("bob", "x")], "the flags themselves stay"
    assert public_flags(parse_args([]))["api_auth"] is None


@pytest.mark.parametrize("folder", ["/tmp/elsewhere", "../../escaped", "a/../../b"])
def test_output_folders_stay_inside_the_outputs_folder(client, engine, folder):
    for key in ("outdir_txt2img_samples", "outdir_txt2img_grids"):
        reply = client.post("/sdapi/v1/options", json={key: folder})
        assert reply.status_code == 422 and reply.json()["field"] == key
        assert "must be a folder inside" in reply.json()["detail"] and engine.options[key] == ""
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True,
                                                     "override_settings": {"outdir_txt2img_samples": folder}})
    assert reply.status_code == 422 and reply.json()["field"] == "outdir_txt2img_samples"


def test_an_output_folder_inside_the_outputs_folder_is_used(client, engine):
    assert client.post("/sdapi/v1/options", json={"outdir_txt2img_samples": "mine/cats"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True}).status_code == 200
    assert len(list((engine.config.paths.outdir / "mine" / "cats").rglob("*.png"))) == BODY["batch_size"]


@pytest.mark.parametrize("field,value", [
    ("prompt", "a cat <lora:../../etc/passwd:1>"), ("prompt", "a cat <lora:/etc/passwd:1>"),
    ("sd_vae", "../../../etc/passwd"), ("sd_vae", "/etc/passwd"),
    ("sd_model_checkpoint", "../../config.json"), ("sd_model_checkpoint", "/etc/passwd")])
def test_paths_in_names_are_refused(client, engine, field, value):
    from webui.extensions import load_extensions

    load_extensions(engine)  # the LoRA network is the built-in extension's
    body = {**BODY, "prompt": value} if field == "prompt" else {**BODY, "override_settings": {field: value}}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] in (field, "prompt")


@pytest.mark.parametrize("prompt", ["", "猫が月の上で踊る 🐈‍⬛🌕 " * 120, "e\u0301" * 3000])
def test_empty_and_long_unicode_prompts_make_an_image(client, prompt):
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "prompt": prompt})
    assert reply.status_code == 200 and len(reply.json()["images"]) == BODY["batch_size"]
    assert json.loads(reply.json()["info"])["prompt"] == prompt


def test_prompt_length_and_plot_size_have_limits_in_the_settings(client, engine):
    engine.set_options({"max_prompt_length": 100, "max_plot_cells": 4})
    for field in ("prompt", "negative_prompt"):
        reply = client.post("/sdapi/v1/txt2img", json={**BODY, field: "a" * 101})
        assert reply.status_code == 422 and reply.json()["field"] == field
        assert "101 characters" in reply.json()["detail"] and "max_prompt_length" in reply.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={**BODY, "prompt": "a" * 100}).status_code == 200
    plot = {**PLOT, "script_args": xyz_args((4, "1-3", None), (6, "3, 7", None))}
    reply = client.post("/sdapi/v1/txt2img", json=plot)
    assert reply.status_code == 422 and "3 x 2 x 1 = 6 cells" in reply.json()["detail"]
    assert engine.progress.job == "" and not engine.progress.cell_count, "refused before any cell ran"


def test_requests_waiting_in_the_queue_hold_no_thread_and_a_full_queue_answers_503(engine):
    """With fewer worker threads than waiting requests, /progress still answers at once (a waiting txt2img holds
    no thread); one request more than max_queued_jobs is a 503 saying so; the waiting ones then all run."""
    jobs = JobQueue(engine)
    app = FastAPI()
    register_api(app, jobs)
    engine.set_options({"max_queued_jobs": 6})
    release = threading.Event()
    jobs.submit_call("block the worker", release.wait)

    async def clients() -> list[httpx.Response]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            waiting = [asyncio.ensure_future(http.post("/sdapi/v1/txt2img", json={**BODY, "batch_size": 1, "seed": i}))
                       for i in range(6)]
            try:
                # a waiting request that held a thread would starve the others: they would never all be queued.
                # The deadline only bounds that wait; on a loaded 2-core CI machine 30 s was once not enough.
                with anyio.fail_after(120):
                    while jobs.pending < 6:
                        await asyncio.sleep(0.01)
                    progress = await http.get("/sdapi/v1/progress")
                assert progress.json()["state"]["queued"] == 6
                full = await http.post("/sdapi/v1/txt2img", json=BODY)
                assert full.status_code == 503 and full.headers["retry-after"], full.text
                assert "6 jobs are waiting" in full.json()["detail"] and "max_queued_jobs" in full.json()["detail"]
            finally:
                release.set()
            return await asyncio.gather(*waiting)

    replies = anyio.run(clients)
    assert [json.loads(reply.json()["info"])["seed"] for reply in replies] == list(range(6))


def test_whole_numbers_sent_as_floats_make_the_same_image(client):
    as_ints = client.post("/sdapi/v1/txt2img", json=BODY).json()
    as_floats = client.post("/sdapi/v1/txt2img", json={**BODY, "width": 64.0, "height": 64.0, "steps": 3.0,
                                                       "seed": 42.0, "batch_size": 2.0, "n_iter": 1.0}).json()
    assert as_floats["images"] == as_ints["images"]


def test_options_keep_unknown_keys_within_bounds_and_a_null_removes_one(client):
    nested: list = []
    for _ in range(400):
        nested = [nested]
    reply = client.post("/sdapi/v1/options", json={"poison": nested})
    assert reply.status_code == 422 and reply.json()["field"] == "poison", reply.text
    assert client.get("/sdapi/v1/options").status_code == 200
    assert client.post("/sdapi/v1/options", json={"my_flag": 3}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["my_flag"] == 3
    assert client.post("/sdapi/v1/options", json={"my_flag": None}).status_code == 200
    assert "my_flag" not in client.get("/sdapi/v1/options").json()


def test_png_info_reads_the_text_of_a_decompression_bomb_without_decoding_it(client, monkeypatch):
    """A 12000x12000 PNG of ~0.4 MB (432 MB of pixels) with its parameters after the pixels: the text is read, the
    pixels never are (decoding them took 485 MB per request)."""
    parameters = png_chunk(b"tEXt", b"parameters\0a bomb\nSteps: 3, Sampler: Euler, Seed: 9")
    bomb = png_bomb(parameters + png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"packed")))
    assert len(bomb) < 1_000_000
    def no_decoding(image):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    reply = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(bomb).decode()})
    assert reply.status_code == 200, reply.text
    assert reply.json()["parameters"]["Seed"] == "9" and reply.json()["items"] == {"Comment": "packed"}
    inflating = bomb.replace(png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"packed")),
                             png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"x" * (2 << 20))))
    refused = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(inflating).decode()})
    assert refused.status_code == 422 and refused.json()["field"] == "image" and "inflates" in refused.json()["detail"]


def test_a_disk_that_refuses_the_images_still_returns_them_with_a_notice(client, engine, monkeypatch):
    """Disk full: the batch was a raw OSError 500 and its images were lost. Now they are returned, and the notice
    names the folder and the reason."""
    def disk_full(image, folder, *args, **kwargs):
        raise OSError(28, "No space left on device", str(folder / "00001.png"))

    monkeypatch.setattr("webui.engine.engine.save_image", disk_full)
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["images"]) == 2
    notices = json.loads(reply.json()["info"])["notices"]
    assert len(notices) == 1 and "No space left on device" in notices[0] and "txt2img-images" in notices[0]
    long_name = client.post("/sdapi/v1/options", json={"outdir_txt2img_samples": "x" * 300})
    assert long_name.status_code == 422 and long_name.json()["field"] == "outdir_txt2img_samples"


def test_a_job_longer_than_max_job_seconds_is_stopped_and_keeps_what_it_made(client, engine):
    assert client.post("/sdapi/v1/options", json={"max_job_seconds": 1}).status_code == 200
    start = time.perf_counter()
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "width": 512, "height": 512, "steps": 150, "n_iter": 3,
                                                     "batch_size": 1})
    assert reply.status_code == 200 and time.perf_counter() - start < 60
    info = json.loads(reply.json()["info"])
    assert info["interrupted"] and any("max_job_seconds" in notice for notice in info["notices"])
    assert 1 <= len(reply.json()["images"]) < 3, "the batch it was on is kept, the later ones never ran"
    assert client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"max_job_seconds": 0}}).json()[
        "field"] == "max_job_seconds", "a limit: not per request"
