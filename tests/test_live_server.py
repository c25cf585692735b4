"""The real launcher in its own process, driven over HTTP as scripts drive A1111 and Forge: the UI and the API
together (--api, --api-auth, --api-log, --listen), one queue, one settings store kept across restarts."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import requests
from gradio_client import Client
from PIL import Image

from tests.live import Server, start_server
from webui.engine.infotext import parse_infotext, read_png_infotext

AUTH = ("alice", "pass:word")
BODY = {"prompt": "a red circle", "negative_prompt": "", "width": 64, "height": 64, "steps": 3, "cfg_scale": 5,
        "sampler_name": "Euler a", "seed": 42, "batch_size": 1, "n_iter": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    live = start_server(tmp_path_factory.mktemp("live"), "--api", "--api-auth", ":".join(AUTH), "--api-log",
                        "--listen")
    try:
        yield live
    finally:
        live.stop()


def pixels(b64_or_path: str) -> bytes:
    source = b64_or_path if os.path.exists(b64_or_path) else io.BytesIO(base64.b64decode(b64_or_path))
    return Image.open(source).convert("RGB").tobytes()


def test_openapi_docs_auth_and_the_listen_warning(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/progress", "/sdapi/v1/loras"} <= set(schema["paths"])
    docs = requests.get(f"{server.url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert requests.get(f"{server.url}/sdapi/v1/sd-models", timeout=30).status_code == 401
    assert requests.get(f"{server.url}/sdapi/v1/sd-models", auth=("alice", "nope"), timeout=30).status_code == 401
    assert server.api("GET", "sd-models").json()[0]["model_name"] == "demo-shapes"
    config = next(server.log_path.parent.glob("config.json"), server.log_path.parent / "config.json")
    session = requests.Session()  # logged in: files outside the outputs folder are still not served
    assert session.post(f"{server.url}/login", data=dict(zip(("username", "password"), AUTH)), timeout=30).ok
    for path in ("/etc/passwd", str(config), str(server.log_path), "outputs/../config.json"):
        reply = session.get(f"{server.url}/gradio_api/file={path}", timeout=30)
        assert reply.status_code in (403, 404) and "root:" not in reply.text, f"Gradio served {path}"
    flags = server.api("GET", "cmd-flags").json()
    assert flags["api_auth"] == [["alice", "***"]] and AUTH[1] not in json.dumps(flags), "no password in the flags"
    page = requests.get(server.url, timeout=30)
    assert page.status_code == 200, "the page itself (which shows the login form: its /config needs the login)"
    assert page.headers["x-frame-options"] == "SAMEORIGIN", "no other site may frame the page"
    assert "open to anyone" not in server.log, "--api-auth guards the API and the UI"
    assert re.search(r"API 127\.0\.0\.1 GET /sdapi/v1/sd-models 401 ", server.log), "--api-log"


def test_the_ui_and_the_api_make_the_same_image_with_the_same_budget(server):
    """One settings store and one code path: an option set through the API is what a UI generation runs with,
    and the same request through the Gradio client and /sdapi/v1/txt2img gives byte-identical images."""
    assert server.api("POST", "options", json={"forge_inference_memory": 1536}).status_code == 200
    client = Client(server.url, auth=AUTH, verbose=False)
    form = {k: v for k, v in BODY.items() if k != "sampler_name"}
    _preview, gallery, _status, ui_info, *_memory_plots = client.predict(**form, sampler_name="Euler a", api_name="/txt2img")
    ui_policy = server.api("GET", "memory").json()["webui"]["policy"]
    reply = server.api("POST", "txt2img", json=BODY).json()
    api_policy = server.api("GET", "memory").json()["webui"]["policy"]
    assert ui_policy == api_policy and api_policy["inference_mb"] == 1536
    assert pixels(gallery[0]["image"]) == pixels(reply["images"][0])
    assert ui_info == json.loads(reply["info"])["infotexts"][0]


def test_gradio_auth_alone_guards_the_ui_the_api_and_the_files(tmp_path):
    """--gradio-auth without --api-auth: the same login for every route the server has, generated files included;
    only the login page and the API's description answer without it."""
    login = ("carol", "s3cret")
    live = start_server(tmp_path, "--api", "--gradio-auth", ":".join(login))
    try:
        assert live.api("GET", "options").status_code == 401, "the API asks for the UI's login"
        live.auth = login
        made = live.api("POST", "txt2img", json={**BODY, "save_images": True})
        assert made.status_code == 200
        (image,) = (tmp_path / "outputs").rglob("*.png")
        guarded = [f"/gradio_api/file={image}", "/config", "/gradio_api/info", "/gradio_api/queue/status",
                   "/sdapi/v1/loras", "/sdapi/v1/progress"]
        for route in guarded:
            assert requests.get(f"{live.url}{route}", timeout=30).status_code == 401, f"{route} without a login"
        assert requests.post(f"{live.url}/gradio_api/upload", files={"files": b"x"}, timeout=30).status_code == 401
        session = requests.Session()
        assert session.post(f"{live.url}/login", data=dict(zip(("username", "password"), login)),
                            timeout=30).status_code == 200
        assert session.get(f"{live.url}/gradio_api/file={image}", timeout=30).content == image.read_bytes()
        for route in ("/", "/openapi.json", "/docs"):
            assert requests.get(f"{live.url}{route}", timeout=30).status_code == 200, route
        assert "open to anyone" not in live.log
    finally:
        live.stop()


def test_api_auth_alone_guards_the_uis_routes_too(server):
    """One rule: with --api-auth alone, Gradio's routes on the same port (which generate) need the same login; it
    generated images for anyone through /gradio_api/call/txt2img."""
    call = requests.post(f"{server.url}/gradio_api/call/txt2img", json={"data": []}, timeout=30)
    assert call.status_code == 401, call.text
    for route in ("/config", "/gradio_api/info", "/gradio_api/queue/status"):
        assert requests.get(f"{server.url}{route}", timeout=30).status_code == 401, route
    session = requests.Session()
    assert session.post(f"{server.url}/login", data=dict(zip(("username", "password"), AUTH)), timeout=30).ok
    assert session.get(f"{server.url}/config", timeout=30).status_code == 200


def test_uploads_are_capped(server):
    """Gradio's upload route took files of any size; above 100 MB it is a 413 (the file streamed, never held)."""
    session = requests.Session()
    assert session.post(f"{server.url}/login", data=dict(zip(("username", "password"), AUTH)), timeout=30).ok
    boundary = "b0undary"

    def multipart(megabytes: int) -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'.encode()
        chunk = bytes(1 << 20)
        for _ in range(megabytes):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    small = session.post(f"{server.url}/gradio_api/upload", data=multipart(1), headers=headers, timeout=60)
    assert small.status_code == 200, small.text
    big = session.post(f"{server.url}/gradio_api/upload", data=multipart(101), headers=headers, timeout=60)
    assert big.status_code == 413, big.text[:200]


def test_wrong_logins_are_slowed_down_per_client(tmp_path):
    """Five wrong logins within a minute, and the client's next attempts are a 429 with Retry-After (the right login
    too, until the minute is over); a request carrying no login is not counted, and other routes answer."""
    login = ("dave", "pa55")
    live = start_server(tmp_path, "--api", "--api-auth", ":".join(login))
    try:
        for _ in range(3):
            assert requests.get(f"{live.url}/sdapi/v1/options", timeout=30).status_code == 401  # no login: not counted
        wrong = [requests.get(f"{live.url}/sdapi/v1/options", auth=(login[0], f"guess{i}"), timeout=30).status_code
                 for i in range(5)]
        assert wrong == [401] * 5
        throttled = requests.get(f"{live.url}/sdapi/v1/options", auth=login, timeout=30)
        assert throttled.status_code == 429 and 0 < int(throttled.headers["retry-after"]) <= 61, throttled.text
        assert "too many wrong logins" in throttled.json()["detail"]
        form = requests.post(f"{live.url}/login", data={"username": login[0], "password": "guess"}, timeout=30)
        assert form.status_code == 429, "Gradio's login form is the same client"
        assert requests.get(f"{live.url}/openapi.json", timeout=30).status_code == 200
    finally:
        live.stop()


def test_a_client_that_sends_slowly_is_cut_off(tmp_path):
    """Slowloris: headers dripped a line at a time, or a body that stops coming, held their connection for ever;
    --timeout-keep-alive (here 2 s) is how long a client has for its headers and may pause in its body."""
    live = start_server(tmp_path, "--api", "--timeout-keep-alive", "2")
    try:
        host, port = live.url.removeprefix("http://").rsplit(":", 1)

        def seconds_until_closed(first: bytes, drip: bytes) -> float:
            start = time.monotonic()
            with socket.create_connection((host, int(port)), timeout=30) as conn:
                conn.sendall(first)
                while time.monotonic() - start < 20:
                    try:
                        conn.sendall(drip)
                    except OSError:  # closed by the server
                        break
                    conn.settimeout(0.5)
                    try:
                        if conn.recv(1024) == b"":
                            break
                    except TimeoutError:
                        continue
            return time.monotonic() - start

        head = f"GET /sdapi/v1/options HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        assert seconds_until_closed(head, b"X-Slow: 1\r\n") < 6, "headers dripped"
        body = f"POST /sdapi/v1/png-info HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n" \
               f"Content-Length: 1000\r\n\r\n{{".encode()
        assert seconds_until_closed(body, b"") < 6, "a body that stalls"
        assert live.api("GET", "options").status_code == 200, "a client that sends its request at once is served"
    finally:
        live.stop()


def test_one_queue_in_order_progress_while_running_and_interrupt_stops_only_the_running_job(server):
    """A long job runs; twenty more are queued one after another from their own threads; progress answers
    meanwhile; interrupt stops the long one only; the twenty run after it, in the order they came."""
    results: dict[int, requests.Response] = {}

    def post(key: int, body: dict) -> None:
        results[key] = server.api("POST", "txt2img", json=body)

    def queued() -> int:
        return server.api("GET", "progress").json()["state"]["queued"]

    long_job = threading.Thread(target=post, args=(-1, {**BODY, "width": 512, "height": 512, "steps": 150}))
    long_job.start()
    deadline = time.time() + 60
    while server.api("GET", "progress").json()["eta_relative"] == 0:  # an ETA from the second step's rate on
        assert time.time() < deadline, "the long job never started"
        time.sleep(0.1)
    threads = []
    for i in range(20):
        threads.append(threading.Thread(target=post, args=(i, {**BODY, "seed": 1000 + i % 10})))
        threads[-1].start()
        while queued() < i + 1:  # this one is in the queue before the next is sent
            assert time.time() < deadline, "a request never reached the queue"
            time.sleep(0.02)
    progress = server.api("GET", "progress").json()
    assert 0 < progress["progress"] < 1 and progress["state"]["queued"] == 20 and progress["eta_relative"] > 0
    assert progress["current_image"] is not None and progress["state"]["sampling_steps"] == 150
    assert server.api("GET", "progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    assert server.api("POST", "interrupt").status_code == 200
    for thread in [long_job, *threads]:
        thread.join(timeout=300)
    assert all(results[k].status_code == 200 for k in results) and len(results) == 21
    long_info = json.loads(results[-1].json()["info"])
    assert long_info["interrupted"] and long_info["width"] == 512
    infos = [json.loads(results[i].json()["info"]) for i in range(20)]
    assert not any(info["interrupted"] for info in infos), "interrupt stopped only the running job"
    assert [info["seed"] for info in infos] == [1000 + i % 10 for i in range(20)]
    for i in range(10):  # the same seed, ten requests apart: the same image
        assert pixels(results[i].json()["images"][0]) == pixels(results[i + 10].json()["images"][0])
    logged = [int(s) for s in re.findall(r"txt2img: 1 image\(s\) 64x64, 3 steps, Euler a, seed (\d+)", server.log)]
    assert logged[-20:] == [1000 + i % 10 for i in range(20)], "run in the order they came"


def test_settings_survive_a_restart_and_bad_requests_leave_the_server_running(tmp_path):
    first = start_server(tmp_path, "--nowebui")
    try:
        assert first.api("POST", "options", json={"samples_save": False, "forge_inference_memory": 900,
                                                  "an_a1111_option": "kept"}).status_code == 200
        bad = first.api("POST", "txt2img", json={**BODY, "width": 7})
        assert bad.status_code == 422 and bad.json()["field"] == "width"
        assert first.api("POST", "txt2img", json=BODY).status_code == 200
        assert "width: must be a multiple of 8" in first.log
    finally:
        first.stop()
    second = start_server(tmp_path, "--nowebui")
    try:
        options = second.api("GET", "options").json()
        assert (options["samples_save"], options["forge_inference_memory"], options["an_a1111_option"]) == \
            (False, 900, "kept")
    finally:
        second.stop()


def test_twenty_simultaneous_requests_with_interrupts_and_skips_each_get_their_own_images(server):
    """Twenty clients at once, each with its own prompt and seeds, while interrupts and skips hit whatever runs:
    every request is answered, every image (returned or saved) carries its own request's prompt and seed, the
    saved file is the returned image, and the server's memory stays bounded."""
    process = psutil.Process(server.process.pid)
    assert server.api("POST", "txt2img", json=BODY).status_code == 200  # warm: the model is loaded
    rss_before = process.memory_info().rss
    bodies = {i: {**BODY, "prompt": f"request {i}, a red circle", "seed": 7000 + 10 * i, "steps": 8,
                  "batch_size": 1 + i % 2, "n_iter": 1 + i % 3, "save_images": True} for i in range(20)}
    results: dict[int, requests.Response] = {}

    def post(i: int) -> None:
        results[i] = server.api("POST", "txt2img", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in bodies]
    for thread in threads:
        thread.start()
    rss_peak, hits = rss_before, 0
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.7)
        interrupt = hits % 3 == 0 and hits < 12  # four interrupts, each stops the job running then; skips go on
        assert server.api("POST", "interrupt" if interrupt else "skip").status_code == 200
        hits += 1
        rss_peak = max(rss_peak, process.memory_info().rss)
    assert sorted(results) == list(bodies) and all(r.status_code == 200 for r in results.values())
    saved = {}
    for path in (server.log_path.parent / "outputs").rglob("*.png"):
        params = parse_infotext(read_png_infotext(path))
        saved[params["Prompt"], params["Seed"]] = pixels(str(path))
    interrupted = 0
    for i, reply in results.items():
        info = json.loads(reply.json()["info"])
        interrupted += info["interrupted"]
        body = bodies[i]
        seeds = {str(body["seed"] + k) for k in range(body["batch_size"] * body["n_iter"])}
        assert len(reply.json()["images"]) == len(info["infotexts"]) <= len(seeds)
        for image, infotext in zip(reply.json()["images"], info["infotexts"]):
            params = parse_infotext(infotext)
            assert params["Prompt"] == body["prompt"] and params["Seed"] in seeds, f"request {i} got {infotext}"
            assert Image.open(io.BytesIO(base64.b64decode(image))).info["parameters"] == infotext
            key = params["Prompt"], params["Seed"]
            assert key in saved or info["interrupted"], f"request {i}: {infotext} not saved"
            assert saved.get(key, pixels(image)) == pixels(image), f"request {i}: another image saved as {key}"
        if not info["interrupted"]:
            assert len(info["infotexts"]) == len(seeds), f"request {i} was not interrupted but lost images"
    assert 0 < interrupted <= 4, "an interrupt stops the job running then, and only that one"
    assert (rss_peak - rss_before) / 2**20 < 200, f"RSS grew {(rss_peak - rss_before) / 2**20:.0f} MB"
    assert server.api("GET", "progress").json()["state"]["queued"] == 0
