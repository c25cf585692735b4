"""What the live server adds to a whole image (issue 24): ``POST /sdapi/v1/txt2img`` on a real HTTP server — uvicorn,
the app's middlewares, the built-in extensions loaded, saving on, the saved PNGs sent back as base64 — beside the
engine's own call with saving on (the PNG encoding of the image is in both), in one process, a new prompt each.

    python3 -m benchmarks.live_route [--size 1024] [--batch 1,2] [--repeat 3] [--steps 1]

The server's share is CPU work (reading the body, the queue's hand-over, reading the saved files back, base64, JSON),
the same whatever the GPU: it is measured per request as the round trip less the engine's time inside it (the
``after_generation`` event's result), on the built-in demo model so that it runs anywhere. The goal is ≤ 5 % of the
engine's whole image on the GPU (BENCHMARKS.md has those times): the table prints the overhead and, for a reference
whole image given with ``--image-ms``, the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchmarks.table import print_table
from tests.live import free_port
from webui.cli import parse_args
from webui.demo.derive import ensure_demo_models
from webui.engine.engine import Engine
from webui.engine.request import GenerationRequest
from webui.extensions import load_extensions
from webui.jobs import JobQueue
from webui.settings import AppConfig

PROMPTS = (f"a red circle number {i}" for i in range(1_000_000))


def serve(engine: Engine) -> str:
    """The API as ``launch.py --nowebui --api`` serves it, on a thread; its base URL once it answers."""
    import uvicorn
    from fastapi import FastAPI

    from webui.api import register_api
    from webui.server import add_middlewares

    app = FastAPI()
    register_api(app, JobQueue(engine))
    add_middlewares(app, engine.config.args)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def body(size: int, batch: int, steps: int) -> dict:
    return {"prompt": next(PROMPTS), "width": size, "height": size, "steps": steps, "batch_size": batch,
            "sampler_name": "Euler", "cfg_scale": 7, "seed": 1, "save_images": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--image-ms", type=float, default=1387.0,
                        help="the engine's whole image on the GPU to compare with (SDXL 1024², H200)")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="live-route-"))
    config = AppConfig.from_args(parse_args(["--data-dir", str(data), "--api"]))
    ensure_demo_models(config.paths.builtin_models_dir, config.paths.builtin_modules_dir)
    engine = Engine(config)
    load_extensions(engine)
    engine_seconds: list[float] = []
    engine.hooks.on("after_generation", lambda request, result: engine_seconds.append(result.seconds))
    url = serve(engine)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        direct, overheads = [], []
        engine.txt2img(GenerationRequest.from_dict(body(args.size, batch, args.steps)))  # warm-up, and the model
        requests.post(f"{url}/sdapi/v1/txt2img", json=body(args.size, batch, args.steps), timeout=600)
        for _ in range(args.repeat):
            start = time.perf_counter()
            engine.txt2img(GenerationRequest.from_dict(body(args.size, batch, args.steps)))
            direct.append(time.perf_counter() - start)
            start = time.perf_counter()
            reply = requests.post(f"{url}/sdapi/v1/txt2img", json=body(args.size, batch, args.steps), timeout=600)
            round_trip = time.perf_counter() - start
            assert reply.status_code == 200 and len(reply.json()["images"]) == batch, reply.text[:300]
            overheads.append(round_trip - engine_seconds[-1])
        overhead = statistics.median(overheads) * 1000
        share = overhead / (args.image_ms * batch)
        rows.append(f"| {args.size}² × {batch} | {statistics.median(direct) * 1000:.0f} ms | {overhead:.0f} ms | "
                    f"{args.image_ms * batch:.0f} ms | {1 + share:.3f}× | ≤ 1.05× | {'yes' if share <= 0.05 else '**no**'} |")
        print(rows[-1], flush=True)
    print_table("The live server's share of a whole image (issue 24)",
                f"`python3 -m benchmarks.live_route --size {args.size} --batch {args.batch} --repeat {args.repeat} "
                f"--steps {args.steps} --image-ms {args.image_ms:g}` — built-in demo model, built-in extensions "
                f"loaded, saving on; medians of {args.repeat}. The overhead is the HTTP round trip less the engine's "
                "time inside it; the ratio puts it on the GPU whole image given (the engine's, per image of the batch).",
                ["images", "engine call here (saving on)", "server overhead", "GPU whole image", "route ÷ engine",
                 "goal", "met"], rows)


if __name__ == "__main__":
    main()
