"""Several engines on Ray Serve (``--workers 2``: two CPU replicas of the demo model) against the single process:
the same images byte for byte, jobs at the same time, routing by checkpoint, a replica killed mid-job, and the
clients (webuiapi, the job API) unchanged."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import webuiapi
import yaml

from tests.live import ROOT, Server, serving
from tests.test_api import xyz_args
from webui.serve.queue import PartMade, parts_made

BODY = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64, "seed": 11,
        "sampler_name": "Euler a", "batch_size": 1}
DUSK = "demo-shapes-dusk"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Iterator[Server]:
    """The single process, with as many torch threads as each of two CPU replicas (float sums in the same order)."""
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    with serving(tmp_path_factory.mktemp("single"), "--nowebui", env={"OMP_NUM_THREADS": threads}) as live:
        yield live


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("cluster"), "--nowebui", "--workers", "2") as live:
        yield live


def made(server: Server) -> list[PartMade]:
    return parts_made(server.log)


def txt2img(server: Server, **fields) -> dict:
    answer = server.api("POST", "txt2img", json={**BODY, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_batch_count_a_plot_and_a_prompt_matrix_are_the_single_process_images_byte_for_byte(single, cluster):
    plot = {"script_name": "X/Y/Z plot", "script_args": xyz_args((1, "1, 2", None), (4, "4, 6", None),
                                                                 include_lone_images=True)}
    matrix = {"script_name": "Prompt matrix", "script_args": [], "prompt": "a red circle|blue background"}
    for body in ({"n_iter": 4}, matrix, plot):
        one, spread = txt2img(single, **body), txt2img(cluster, **body)
        assert len(spread["images"]) == len(one["images"])
        assert spread["images"] == one["images"], body  # (the PNGs: pixels and infotexts)
        assert spread["parameters"]["seed"] == one["parameters"]["seed"]
    replicas = {part.pid for part in made(cluster) if part.job == made(cluster)[-1].job}
    assert len(replicas) == 2, "the plot's cells were spread over both replicas"


def test_the_ingress_saves_the_images_as_one_process_does(cluster):
    made_now = txt2img(cluster, n_iter=2, save_images=True, seed=41)
    saved = sorted(cluster.log_path.parent.glob("outputs/txt2img-images/*/*.png"))
    assert [path.name.split("-")[1] for path in saved[-2:]] == ["41", "42"], "numbered in order, named by seed"
    assert len(made_now["images"]) == 2


def test_two_jobs_run_at_the_same_time_on_two_replicas(cluster):
    answers = []
    threads = [threading.Thread(target=lambda s=seed: answers.append(txt2img(cluster, steps=30, seed=s)))
               for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 2
    a, b = made(cluster)[-2:]
    assert a.pid != b.pid and max(a.start, b.start) < min(a.end, b.end), (a, b)


def test_requests_for_two_checkpoints_go_to_the_replica_holding_each(cluster):
    """Alternating between two checkpoints: after the first of each, every request goes to the replica that made
    that checkpoint last, and no replica switches models again."""
    for _ in range(4):
        for checkpoint in ("demo-shapes", DUSK):
            txt2img(cluster, override_settings={"sd_model_checkpoint": checkpoint})
    routed = made(cluster)[-6:]  # (the first two: one replica may switch to the other checkpoint)
    by_replica: dict[int, set] = {}
    for i, part in enumerate(routed):
        by_replica.setdefault(part.pid, set()).add(i % 2)
    assert len(by_replica) == 2 and all(len(kinds) == 1 for kinds in by_replica.values()), routed
    switches_then = {part.pid: part.switches for part in routed[:2]}
    switches_now = {part.pid: part.switches for part in routed[-2:]}
    assert switches_now == switches_then, routed


def test_a_replica_killed_mid_job_loses_no_image(single, cluster):
    body = {"n_iter": 4, "steps": 40, "seed": 21}
    reference = txt2img(single, **body)
    done: list[dict] = []
    job = threading.Thread(target=lambda: done.append(txt2img(cluster, **body)))
    job.start()
    deadline = time.time() + 60
    while cluster.api("GET", "progress").json()["state"]["sampling_step"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    os.kill(min(replica_pids(cluster)), signal.SIGKILL)
    job.join(timeout=240)
    assert done and done[0]["images"] == reference["images"], "every image, each the single process's"
    assert "made again on another replica" in done[0]["info"]
    assert "A replica stopped while making part" in cluster.log
    assert cluster.api("GET", "progress").status_code == 200, "the ingress serves on"
    deadline = time.time() + 60
    while len(replica_pids(cluster)) < 3 and time.time() < deadline:
        time.sleep(0.5)
    assert len(replica_pids(cluster)) == 3, "Serve started a replica in the killed one's place"


def replica_pids(server: Server) -> set[int]:
    return {int(p) for p in re.findall(r"ServeReplica:webui:engine pid=(\d+)", server.log)}


def test_interrupt_reaches_the_replicas_and_keeps_what_was_made(cluster):
    done: list[dict] = []
    job = threading.Thread(target=lambda: done.append(txt2img(cluster, n_iter=6, steps=60, seed=31)))
    job.start()
    deadline = time.time() + 60
    while cluster.api("GET", "progress").json()["state"]["sampling_step"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert cluster.api("POST", "interrupt").status_code == 200
    job.join(timeout=120)
    assert done and 1 <= len(done[0]["images"]) < 6, "stopped early, the images made by then returned"


def test_webuiapi_and_the_job_api_work_against_the_ingress(cluster):
    port = int(cluster.url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=4)
    result = api.txt2img(prompt="a blue square", width=64, height=64, seed=3, batch_size=2)
    assert len(result.images) == 2 and result.info["all_seeds"] == [3, 4]
    assert api.get_progress()["state"]["job_count"] == 0
    submitted = cluster.api("POST", "jobs", json={**BODY, "n_iter": 2}).json()
    deadline = time.time() + 120
    while (state := cluster.api("GET", f"jobs/{submitted['id']}").json())["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert state["state"] == "done" and len(state["images"]) == 2
    refused = cluster.api("POST", "txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": "nothing"}})
    assert refused.status_code == 422 and "nothing" in refused.text, "a replica's refusal, as the single process's"


def test_the_kuberay_manifest_in_the_docs_names_what_kuberay_requires():
    page = (ROOT / "docs" / "several-gpus.md").read_text()
    manifest = re.search(r"```yaml\n(.*?)```", page, re.DOTALL)[1]
    cluster_spec, service = yaml.safe_load_all(manifest)
    assert cluster_spec["apiVersion"] == "ray.io/v1" and cluster_spec["kind"] == "RayCluster"
    head = cluster_spec["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "--ray-address auto" in " ".join(head["lifecycle"]["postStart"]["exec"]["command"])
    workers = cluster_spec["spec"]["workerGroupSpecs"][0]
    assert {"groupName", "rayStartParams", "template"} <= set(workers)
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert service["kind"] == "Service" and service["spec"]["selector"]["ray.io/node-type"] == "head"


def test_the_flags():
    from webui.cli import parse_args

    assert parse_args(["--workers", "2"]).workers == 2 and parse_args(["--ray-address", "auto"]).ray_address == "auto"
    assert parse_args([]).workers == 0 and parse_args([]).ray_address is None
    with pytest.raises(SystemExit):
        parse_args(["--workers", "-1"])
