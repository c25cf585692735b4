"""Start (``--workers N``) or join (``--ray-address``) a Ray cluster and deploy the engine replicas on it: one per
GPU (``num_gpus: 1``: Ray gives each its own card), or N CPU replicas sharing this machine's cores."""
from __future__ import annotations

import argparse
import atexit
import logging
import os
from pathlib import Path

import ray
from ray import serve

from webui.engine.engine import Engine
from webui.serve.board import JobBoard
from webui.serve.queue import ServeQueue
from webui.serve.replica import EngineReplica

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
APP = "webui"


def ingress_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags of this process's own engine: the CPU (the GPUs are the replicas'); it lists models, keeps the
    settings and runs the work that is not a generation."""
    return argparse.Namespace(**{**vars(args), "device": "cpu"})


def start_replicas(args: argparse.Namespace, engine: Engine) -> ServeQueue:
    """The cluster up, the replicas deployed and ready; the queue that spreads jobs over them."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    runtime = {"env_vars": {"PYTHONPATH": python_path}}
    gpus = 0 if args.device == "cpu" else _local_gpus()
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env=runtime, logging_level=logging.WARNING)
        gpus = 0 if args.device == "cpu" else int(ray.cluster_resources().get("GPU", 0))
    else:
        cores = os.cpu_count() or 1
        # address="local": a Ray instance of its own, even where `ray start` runs one here (--ray-address joins that)
        ray.init(address="local", num_cpus=max(cores, args.workers or 1), num_gpus=gpus, include_dashboard=False,
                 runtime_env=runtime, logging_level=logging.WARNING)
    atexit.register(stop)
    replicas = args.workers or gpus or 1
    on_gpu = gpus > 0
    if on_gpu and replicas > gpus:
        log.warning("--workers %d: the cluster has %d GPU(s); the replicas beyond them wait for one.", replicas, gpus)
    # CPU replicas share this machine's cores (more threads than cores stall torch's thread pools); the images are the
    # single process's byte for byte where that one runs as many threads (OMP_NUM_THREADS), as the tests run it
    threads = 0 if on_gpu else max(1, (os.cpu_count() or 1) // replicas)
    board = ray.remote(num_cpus=0)(JobBoard).remote()
    deployment = serve.deployment(
        EngineReplica, name="engine", num_replicas=replicas, max_ongoing_requests=1,
        ray_actor_options={"num_gpus": 1} if on_gpu else {"num_cpus": 1},
        health_check_period_s=2, health_check_timeout_s=60, graceful_shutdown_timeout_s=5)
    replica_args = argparse.Namespace(**{**vars(args), "workers": 0, "ray_address": None})
    log.info("Starting %d engine replica(s) on %s…", replicas, "GPUs" if on_gpu else "the CPU")
    serve.start(http_options={"location": "NoServer"})  # (the app serves HTTP itself; Serve's proxy is not used)
    handle = serve.run(deployment.bind(replica_args, board, threads), name=APP, route_prefix=None)
    log.info("Ray Serve: %d engine replica(s) ready.", replicas)
    return ServeQueue(engine, handle, board, replicas)


def stop() -> None:
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
