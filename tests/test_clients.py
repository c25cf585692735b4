"""The programs that drive A1111, against the real launcher (--nowebui, the built-in demo model on the CPU):

* A1111's own API tests (its test/ folder: txt2img, options, utils) — the same requests and assertions, written
  here anew (A1111's are AGPL);
* webuiapi, the Python client from PyPI, calling every route it has that this app serves;
* the exact bodies SillyTavern's and Open WebUI's A1111 integrations send (read from their public sources).

Each request that maps to a route or a field this app has must work; a feature this app does not have yet
(hires. fix, face restoration, tiling) is a 422 naming its field.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import webuiapi
from PIL import Image

from tests.live import Server, serving, start_server
from webui.engine.infotext import parse_infotext

# A1111's test/test_txt2img.py request, but 64x64 and 3 steps as there.
A1111_TXT2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0, "firstphase_height": 0,
    "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "", "prompt": "example prompt",
    "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a",
    "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
    "subseed_strength": 0, "tiling": False, "width": 64,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("clients"), "--nowebui") as live:
        yield live


@pytest.fixture(scope="module")
def api(server) -> webuiapi.WebUIApi:
    port = int(server.url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=3)


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# --- A1111's test/test_txt2img.py -------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {}, {"negative_prompt": "example negative prompt"},
    {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
    {"height": 128}, {"sampler_index": "PLMS"}, {"sampler_index": "DDIM"}, {"sampler_index": "UniPC"},
    {"n_iter": 2}, {"batch_size": 2},
], ids=["simple", "negative", "complex-prompt", "not-square", "PLMS", "DDIM", "UniPC", "batches", "batch"])
def test_a1111_txt2img_requests_are_performed(server, change):
    reply = server.api("POST", "txt2img", json={**A1111_TXT2IMG, **change})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    count = change.get("n_iter", 1) * change.get("batch_size", 1)
    assert len(data["images"]) == count
    assert image_of(data["images"][0]).size == (64, change.get("height", 64))


@pytest.mark.parametrize("field", ["tiling", "restore_faces"])
def test_a1111_features_not_here_yet_are_refused_by_name(server, field):
    reply = server.api("POST", "txt2img", json={**A1111_TXT2IMG, field: True})
    assert reply.status_code == 422 and reply.json()["field"] == field, reply.text


# --- A1111's test/test_utils.py ---------------------------------------------------------------------------------

def test_a1111_options_write(server):
    before = server.api("GET", "options").json()["send_seed"]
    assert server.api("POST", "options", json={"send_seed": not before}).status_code == 200
    assert server.api("GET", "options").json()["send_seed"] is (not before)
    assert server.api("POST", "options", json={"send_seed": before}).status_code == 200


@pytest.mark.parametrize("route", ["cmd-flags", "samplers", "upscalers", "sd-models", "hypernetworks",
                                   "face-restorers", "realesrgan-models", "prompt-styles", "embeddings"])
def test_a1111_get_routes(server, route):
    assert server.api("GET", route).status_code == 200


# --- webuiapi ---------------------------------------------------------------------------------------------------

def test_webuiapi_txt2img_with_its_defaults_then_wait_for_ready(api, server):
    """webuiapi sends every field at its own defaults (eta 1.0, scheduler "automatic", hires fields, seed_resize 0
    ...); the answer's info names what changed nothing; util_wait_for_ready returns once the job is done."""
    result = api.txt2img(prompt="a large red circle on the left, blue background", width=128, height=128, seed=7)
    assert result.image.size == (128, 128) and result.info["all_seeds"] == [7]
    assert parse_infotext(result.image.info["parameters"])["Sampler"] == "Euler a"
    assert {"hr_scale", "hr_upscaler", "denoising_strength"} <= set(result.info["ignored_fields"])
    api.util_wait_for_ready(check_interval=0.1)  # waited forever while job_count stayed above 0
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


def test_webuiapi_ddim_with_its_default_eta(api):
    """webuiapi sends eta=1.0 with every sampler: DDIM takes it as its eta (noise), as A1111 does."""
    common = dict(prompt="a small yellow star at the top, purple background", width=128, height=128, seed=3,
                  sampler_name="DDIM", steps=4)
    noisy, plain = api.txt2img(**common), api.txt2img(**common, eta=0)
    assert noisy.image.tobytes() != plain.image.tobytes(), "eta 1 and eta 0 gave the same DDIM image"
    assert api.txt2img(**common).image.tobytes() == noisy.image.tobytes(), "the same request, another image"


def test_webuiapi_xyz_plot_as_in_its_readme(api):
    """webuiapi's README: axis indices (A1111's numbering: 4 Steps, 9 Sampler), values as text, options as the
    strings "True"/"False", an empty dropdown as ""."""
    result = api.txt2img(prompt="a large red circle on the left, blue background", width=64, height=64, seed=1003,
                         script_name="X/Y/Z Plot",
                         script_args=[4, "2,3", "", 9, "Euler a, LMS", "", 0, "", "", "True", "False", "False",
                                      "False", 0])
    assert len(result.images) == 1 and result.image.width > 2 * 64 and result.image.height > 2 * 64
    grid_text = result.image.info["parameters"]
    assert "X/Y/Z plot: X: Steps = 2, 3; Y: Sampler = Euler a, LMS" in grid_text
    assert any("read as 'Sampler'" in note for note in result.info["notices"])


def test_webuiapi_prompt_scripts(api):
    """A1111's two prompt scripts by title with their script_args in A1111's order, as webuiapi sends them."""
    lines = api.txt2img(prompt="blue background", width=64, height=64, seed=7, script_name="Prompts from file or textbox",
                        script_args=[False, True, "start", "a red circle\n--prompt a green square --steps 2"])
    assert len(lines.images) == 2 and lines.info["all_prompts"] == ["a red circle blue background",
                                                                     "a green square blue background"]
    assert lines.info["all_seeds"] == [7, 7]
    matrix = api.txt2img(prompt="a red circle|blue background|small", width=64, height=64, seed=7,
                         script_name="Prompt matrix", script_args=[False, False, "positive", "comma", 0])
    assert len(matrix.images) == 5 and matrix.info["index_of_first_image"] == 1
    assert matrix.info["all_prompts"][1:] == ["a red circle", "a red circle, blue background", "a red circle, small",
                                              "a red circle, blue background, small"]


def test_webuiapi_lists_and_settings(api, server):
    assert api.util_get_sampler_names() and "Euler a" in api.util_get_sampler_names()
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    titles = api.util_get_model_names()
    assert any(title.startswith("demo-shapes") for title in titles)
    current = api.util_get_current_model()
    assert current in titles, "sd_model_checkpoint names the checkpoint the next image uses"
    for listed in (api.get_sd_vae(), api.get_upscalers(), api.get_latent_upscale_modes(), api.get_loras(),
                   api.get_hypernetworks(), api.get_face_restorers(), api.get_realesrgan_models(),
                   api.get_prompt_styles(), api.get_embeddings(), api.get_scripts(), api.get_memory(),
                   api.get_cmd_flags(), api.get_schedulers(), api.get_samplers()):
        assert isinstance(listed, (list, dict))
    other = next(title for title in titles if title != current)
    api.util_set_model(other)
    assert api.util_get_current_model() == other
    api.util_set_model(current)
    api.refresh_checkpoints()
    assert api.get_options()["samples_format"] == "png"
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})
    api.interrupt()
    api.skip()


def test_webuiapi_png_info_reads_what_txt2img_wrote(api):
    result = api.txt2img(prompt="a large white triangle in the centre, green background", width=64, height=64,
                         seed=11)
    info = api.png_info(result.image)  # webuiapi keeps the infotext as info, the parsed fields as parameters
    assert info.parameters["Seed"] == "11" and "white triangle" in info.info


# --- what A1111 ignores is ignored, and said -------------------------------------------------------------------

def test_unknown_fields_are_ignored_and_named_and_a_missing_size_is_the_checkpoints(server):
    reply = server.api("POST", "txt2img", json={"prompt": "a large red circle on the left, blue background",
                                                  "steps": 3, "seed": 5, "url": "http://x", "auth": "", "clip_skip": 2})
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert {"url", "auth", "clip_skip"} <= set(info["ignored_fields"])
    assert image_of(reply.json()["images"][0]).size == (128, 128), "the demo model declares 128x128"
    assert any("no width or height given: 128x128" in note for note in info["notices"])


def test_every_answer_carries_the_security_headers(server):
    reply = server.api("GET", "sd-models")
    assert reply.headers["x-frame-options"] == "SAMEORIGIN" and reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["referrer-policy"] == "same-origin" and "frame-ancestors 'self'" in \
        reply.headers["content-security-policy"]


def test_a_rebound_host_name_and_another_sites_page_are_refused(server):
    """DNS rebinding: a page on rebind.example whose name now points at 127.0.0.1 read /cmd-flags and changed options.
    The server answers only to its own names; a change sent from another site's page is refused; programs (no
    Origin) and the server's own page are not concerned."""
    port = server.url.rsplit(":", 1)[1]
    rebound = requests.get(f"{server.url}/sdapi/v1/cmd-flags", headers={"Host": f"rebind.example:{port}"}, timeout=30)
    assert rebound.status_code == 403 and "rebind.example" in rebound.json()["detail"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert requests.get(f"{server.url}/sdapi/v1/sd-models", headers={"Host": host}, timeout=30).ok
    change = {"send_seed": False}
    foreign = requests.post(f"{server.url}/sdapi/v1/options", json=change, timeout=30,
                            headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "--cors-allow-origins" in foreign.json()["detail"]
    assert server.api("GET", "options").json()["send_seed"] is True, "nothing changed"
    own = requests.post(f"{server.url}/sdapi/v1/options", json=change, timeout=30, headers={"Origin": server.url})
    assert own.ok and server.api("GET", "options").json()["send_seed"] is False
    assert server.api("POST", "options", json={"send_seed": True}).ok


def test_server_commands_need_api_server_stop(server):
    for name in ("kill", "restart", "stop"):
        reply = server.api("POST", f"server-{name}")
        assert reply.status_code == 403 and "--api-server-stop" in reply.json()["detail"]
    assert server.api("GET", "sd-models").status_code == 200, "the server goes on"


# --- SillyTavern (src/endpoints/stable-diffusion.js, public/scripts/extensions/stable-diffusion/index.js) --------

# Its txt2img body at a fresh install's settings (sampler DDIM, schedule "normal"), with the size and steps a user of
# the demo model sets; its server forwards the browser's body as it is, its own url and auth included.
SILLYTAVERN_TXT2IMG = {
    "url": "http://localhost:7860", "auth": "", "prompt": "a large red circle on the left, blue background",
    "negative_prompt": "lowres, bad anatomy, text, error, worst quality, low quality, blurry",
    "sampler_name": "DDIM", "scheduler": "normal", "steps": 8, "cfg_scale": 7, "width": 128, "height": 128,
    "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 1, "hr_additional_modules": [],
    "denoising_strength": 0.7, "hr_second_pass_steps": 0, "override_settings": {"CLIP_stop_at_last_layers": 1},
    "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
    "do_not_save_grid": False, "do_not_save_samples": False,
}
EMPTY_LOGIN = {"Authorization": "Basic "}  # both programs send it when no login is set


def test_sillytavern_connects_lists_switches_model_and_generates(server):
    def call(method: str, route: str, **kwargs) -> requests.Response:
        reply = requests.request(method, f"{server.url}/sdapi/v1/{route}", headers=EMPTY_LOGIN, timeout=300, **kwargs)
        assert reply.ok, f"{method} {route}: {reply.status_code} {reply.text[:300]}"
        return reply

    call("GET", "options")  # its ping
    samplers = [s["name"] for s in call("GET", "samplers").json()]
    schedulers = [s["name"] for s in call("GET", "schedulers").json()]
    assert "DDIM" in samplers and "normal" in schedulers
    current = call("GET", "options").json()["sd_model_checkpoint"]
    titles = [m["title"] for m in call("GET", "sd-models").json()]
    assert current in titles, "its model list preselects the title equal to sd_model_checkpoint"
    upscalers = call("GET", "upscalers").json()
    assert upscalers[0]["name"] == "None", "its list starts with A1111's first upscaler"
    assert all("name" in u for u in upscalers + call("GET", "latent-upscale-modes").json())
    vaes = [v["model_name"] for v in call("GET", "sd-vae").json()]
    assert isinstance(vaes, list)
    for title in (titles[-1], current):  # set-model: options, then progress until idle
        call("POST", "options", json={"sd_model_checkpoint": title})
        idle = call("GET", "progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
        assert call("GET", "options").json()["sd_model_checkpoint"] == title
    call("GET", "options")  # its Forge probe before each image
    reply = call("POST", "txt2img", json={**SILLYTAVERN_TXT2IMG, "seed": 4})
    image = image_of(reply.json()["images"][0])
    assert image.format == "PNG" and image.size == (128, 128)
    assert {"url", "auth", "clip_skip", "hr_additional_modules"} <= set(json.loads(reply.json()["info"])["ignored_fields"])
    assert "Sampler: DDIM" in image.info["parameters"]
    lenient = call("POST", "txt2img", json={**SILLYTAVERN_TXT2IMG, "sampler_name": None, "scheduler": "N/A"})
    assert "scheduler" in json.loads(lenient.json()["info"])["ignored_fields"], "A1111 samples N/A as Automatic"
    call("POST", "interrupt")  # what it sends when its own client goes away


# --- Open WebUI (backend/open_webui/routers/images.py, engine "automatic1111") ---------------------------------

def test_open_webui_verifies_lists_sets_the_model_and_generates(server):
    base = f"{server.url}/"  # its docs suggest a base URL ending in "/": every path starts with "//sdapi"

    def call(method: str, route: str, **kwargs) -> requests.Response:
        reply = requests.request(method, f"{base}/sdapi/v1/{route}", headers={"authorization": "Basic "}, timeout=300,
                                 **kwargs)
        assert reply.ok, f"{method} {route}: {reply.status_code} {reply.text[:300]}"
        return reply

    call("GET", "options")  # verify
    models = [{"id": m["title"], "name": m["model_name"]} for m in call("GET", "sd-models").json()]
    options = call("GET", "options").json()
    wanted = models[-1]["id"] if models[-1]["id"] != options["sd_model_checkpoint"] else models[0]["id"]
    call("POST", "options", json={**options, "sd_model_checkpoint": wanted})  # the whole document posted back
    assert call("GET", "options").json()["sd_model_checkpoint"] == wanted
    call("POST", "options", json={**options, "sd_model_checkpoint": ""})  # saving its settings with no model chosen
    assert call("GET", "options").json()["sd_model_checkpoint"] in [m["id"] for m in models]
    reply = call("POST", "txt2img", json={"prompt": "a small yellow star at the top, purple background",
                                          "batch_size": 1, "width": 128, "height": 128, "steps": 50})
    data = reply.json()
    assert len(data["images"]) == 1 and "," not in data["images"][0], "plain base64, read as PNG"
    assert image_of(data["images"][0]).size == (128, 128)
    assert json.loads(data["info"])["steps"] == 50  # info is always read


def test_server_restart_and_stop_with_api_server_stop(tmp_path):
    """--api-server-stop: server-restart runs the same command line again (the same process id, the port served
    again), server-stop ends the process cleanly."""
    live = start_server(tmp_path, "--nowebui", "--api-server-stop")
    try:
        assert live.api("POST", "server-restart").status_code == 200
        deadline = time.time() + 120
        while live.log.count("API only: http") < 2:
            assert live.process.poll() is None and time.time() < deadline, live.log
            time.sleep(0.5)
        assert live.api("GET", "sd-models").status_code == 200, "served again after the restart"
        assert live.api("POST", "server-stop").status_code == 200
        assert live.process.wait(timeout=60) == 0, live.log
    finally:
        if live.process.poll() is None:
            live.stop()


def test_a_client_that_goes_away_is_not_worked_for(server):
    """A request whose client gave up while it waited is taken out of the queue; one whose client goes away while it
    runs is interrupted (A1111 generated all three images of three clients that had given up)."""
    long_job = {"prompt": "a large red circle on the left, blue background", "width": 512, "height": 512,
                "steps": 150, "seed": 1}
    before = server.log.count("INFO webui.engine.engine: txt2img:")
    first = threading.Thread(target=server.api, args=("POST", "txt2img"), kwargs={"json": long_job})
    first.start()
    deadline = time.time() + 60
    while server.api("GET", "progress").json()["progress"] == 0:
        assert time.time() < deadline, "the first job never started"
        time.sleep(0.1)
    with pytest.raises(requests.Timeout):  # waits behind the first, then gives up
        requests.post(f"{server.url}/sdapi/v1/txt2img", json={**long_job, "seed": 2}, timeout=1.5)
    while "its job was dropped from the queue" not in server.log:
        assert time.time() < deadline, server.log[-2000:]
        time.sleep(0.2)
    assert server.api("GET", "progress").json()["state"]["queued"] == 0
    server.api("POST", "interrupt")
    first.join(timeout=120)
    with pytest.raises(requests.Timeout):  # runs at once, then its client gives up
        requests.post(f"{server.url}/sdapi/v1/txt2img", json={**long_job, "seed": 3}, timeout=3)
    while "its job was interrupted" not in server.log:
        assert time.time() < deadline + 60, server.log[-2000:]
        time.sleep(0.2)
    while server.api("GET", "progress").json()["state"]["job_count"]:
        assert time.time() < deadline + 120, "the job the client left ran on"
        time.sleep(0.2)
    made = server.log.split("INFO webui.engine.engine: txt2img:")[before + 1:]
    assert len(made) == 2 and all("(interrupted)" in line.splitlines()[0] for line in made), \
        "the first job (interrupted by hand) and the third (its client went away); the second never ran"
