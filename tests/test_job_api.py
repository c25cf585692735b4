"""The job API (issue 29, single process): submit answers at once, polling follows the job to its images, which are
the blocking route's bytes; a queued job is cancelled without running; the history survives a restart, and a job the
server stopped is marked lost; bad bodies are refused at submit."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from webui.api import register_api
from webui.job_history import JobHistory
from webui.jobs import JobQueue

BODY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler", "seed": 4,
        "batch_size": 2}


@pytest.fixture
def client(engine):
    app = FastAPI()
    register_api(app, JobQueue(engine))
    return TestClient(app)


def wait_done(client, job_id: str, seconds: float = 60) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        answer = client.get(f"/sdapi/v1/jobs/{job_id}").json()
        if answer["state"] not in ("queued", "running"):
            return answer
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


def test_a_job_ends_with_the_blocking_routes_images(client):
    submitted = client.post("/sdapi/v1/jobs", json=BODY)
    assert submitted.status_code == 200 and submitted.json()["state"] in ("queued", "running")
    done = wait_done(client, submitted.json()["id"])
    assert done["state"] == "done" and done["kind"] == "txt2img" and done["finished"] >= done["started"]
    blocking = client.post("/sdapi/v1/txt2img", json=BODY).json()
    assert done["images"] == blocking["images"], "the same PNGs, infotexts and all"
    assert json.loads(done["info"])["all_seeds"] == [4, 5]
    listed = client.get("/sdapi/v1/jobs").json()
    assert listed[0]["id"] == submitted.json()["id"] and listed[0]["images"] == 2


def test_a_queued_job_is_cancelled_without_running_and_a_running_one_keeps_what_it_made(client, engine):
    gate = threading.Event()
    original = engine.txt2img
    engine.txt2img = lambda request: (gate.wait(30), original(request))[1]  # the first job holds the queue
    first = client.post("/sdapi/v1/jobs", json=BODY).json()["id"]
    second = client.post("/sdapi/v1/jobs", json=BODY).json()["id"]
    assert client.get(f"/sdapi/v1/jobs/{second}").json()["state"] == "queued"
    assert client.delete(f"/sdapi/v1/jobs/{second}").json()["state"] == "cancelled"
    gate.set()
    assert wait_done(client, first)["state"] == "done"
    cancelled = client.get(f"/sdapi/v1/jobs/{second}").json()
    assert cancelled["state"] == "cancelled" and cancelled["started"] is None and cancelled["images"] == 0
    assert client.get("/sdapi/v1/jobs/nope").status_code == 404


def test_the_history_survives_a_restart_and_a_stopped_job_is_lost(client, engine):
    done = client.post("/sdapi/v1/jobs", json=BODY).json()["id"]
    wait_done(client, done)
    folder = engine.config.paths.data_dir / "jobs"
    stopped = JobHistory(folder)
    stopped.add("was-running", "txt2img")
    stopped.started("was-running")
    stopped.close()
    app = FastAPI()
    register_api(app, JobQueue(engine))  # the server started again
    again = TestClient(app)
    kept = again.get(f"/sdapi/v1/jobs/{done}").json()
    assert kept["state"] == "done" and len(kept["images"]) == 2
    assert base64.b64decode(kept["images"][0]).startswith(b"\x89PNG")
    lost = again.get("/sdapi/v1/jobs/was-running").json()
    assert lost["state"] == "lost" and "stopped" in lost["error"]


def test_a_bad_body_is_refused_at_submit_and_a_failed_job_says_why(client):
    bad = client.post("/sdapi/v1/jobs", json={**BODY, "width": 65})
    assert bad.status_code == 422 and bad.json()["field"] == "width"
    failing = client.post("/sdapi/v1/jobs", json={**BODY, "override_settings": {"sd_model_checkpoint": "nothing-here"}})
    ended = wait_done(client, failing.json()["id"])
    assert ended["state"] == "failed" and ended["field"] == "sd_model_checkpoint" and "nothing-here" in ended["error"]
    assert client.get("/sdapi/v1/jobs", params={"limit": 0}).status_code == 422
