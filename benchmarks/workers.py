"""Several engine replicas on Ray Serve (issues 29 and 30), measured through the real launcher and its HTTP API as
clients use it: ``launch.py --nowebui --workers N`` beside the single process, a new prompt each image.

    python3 -m benchmarks.workers --family demo --workers 1,2            # anywhere (CPU replicas, the demo model)
    python3 -m benchmarks.workers --family sdxl --workers 1,2,4          # a machine with several GPUs
    python3 -m benchmarks.workers --family flux-q8 --workers 1,2,4 --gpu-weights 8192

Rows: single-image latency (single process, then ``--workers 1``: the Ray path's overhead, goal ≤ 1.05×);
throughput with N replicas from ``--clients`` concurrent clients (goal ≥ 0.9 × N × one replica's rate); routing —
requests alternating between three checkpoints, the model switches counted from the ingress's log; an X/Y/Z plot of
three checkpoints × 8 seeds (goal ≥ 1.8× faster on 2 replicas than on 1, and its grid byte-identical); the same plot
with one replica killed (SIGKILL) a quarter of the way in (every cell made; the time it cost). Full-size models with
random weights are written as real files under ``--root`` first (SDXL: three checkpoints for the routing rows).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.table import print_table
from tests.live import Server, start_server
from tests.test_api import xyz_args
from webui.serve.queue import parts_made


@dataclass(frozen=True)
class Family:
    width: int
    height: int
    steps: int
    checkpoints: tuple[str, ...]  # for the routing and plot rows (three; the demo has two single files)


FAMILIES = {
    "demo": Family(128, 128, 20, ("demo-shapes", "demo-shapes-dusk")),
    "sdxl": Family(1024, 1024, 20, ("sdxl-a", "sdxl-b", "sdxl-c")),
    "flux-q8": Family(1344, 768, 20, ("flux1-dev-Q8_0",)),
}
PROMPTS = (f"a red circle number {i}" for i in range(1_000_000))


def write_files(family: str, root: Path) -> tuple[str, ...]:
    """The model files (once); the flags that point the app at them."""
    if family == "demo":
        return ()
    if family == "sdxl":
        from benchmarks.memory import write_checkpoint

        for name in FAMILIES["sdxl"].checkpoints:
            write_checkpoint("sdxl", root / "Stable-diffusion" / f"{name}.safetensors")
        return ("--models-dir", str(root))
    from benchmarks.pipelines import write_flux_q8, write_modules

    write_modules(root)
    write_flux_q8(root)
    return ("--models-dir", str(root))


def start(data: Path, flags: tuple[str, ...], workers: int, args: argparse.Namespace) -> Server:
    """``launch.py --nowebui`` on this machine's GPUs (or its CPU), with ``--workers`` unless 0."""
    device = "cpu" if args.family == "demo" and args.cpu else "auto"
    data.mkdir(parents=True, exist_ok=True)
    server = start_server(data, "--nowebui", "--device", device, *flags,
                          *(("--workers", str(workers)) if workers else ()))
    options = {"samples_save": False, "grid_save": False}
    if args.gpu_weights:
        options["forge_inference_memory"] = max(1024, args.total_mb - args.gpu_weights)
    if args.family == "flux-q8":
        options["forge_additional_modules"] = ["ae.safetensors", "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]
    assert server.api("POST", "options", json=options).status_code == 200
    return server


def body(family: Family, checkpoint: str | None = None, **fields) -> dict:
    return {"prompt": next(PROMPTS), "width": family.width, "height": family.height, "steps": family.steps,
            "seed": 1, "batch_size": 1, "cfg_scale": 1.0 if "flux" in (checkpoint or family.checkpoints[0]) else 7.0,
            **({"override_settings": {"sd_model_checkpoint": checkpoint}} if checkpoint else {}), **fields}


def post(server: Server, request: dict) -> dict:
    answer = server.api("POST", "txt2img", json=request)
    assert answer.status_code == 200, answer.text
    return answer.json()


def latency(server: Server, family: Family, repeat: int) -> tuple[float, float]:
    """The median round trip of one image, and of its part on the replica (0 for the single process)."""
    post(server, body(family))  # (loads the model)
    times, outside = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        post(server, body(family))
        times.append(time.perf_counter() - start)
        made = parts_made(server.log)
        if made:
            outside.append(times[-1] - (made[-1].end - made[-1].start))
    return statistics.median(times), statistics.median(outside) if outside else 0.0


def throughput(server: Server, family: Family, images: int, clients: int) -> float:
    """Images per minute: ``images`` single-image requests from ``clients`` threads at once."""
    left = iter(range(images))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            post(server, body(family))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return images / (time.perf_counter() - start) * 60


def routing(server: Server, family: Family, rounds: int) -> tuple[int, int]:
    """Requests alternating between the checkpoints: (requests, model switches after the first of each)."""
    for checkpoint in family.checkpoints:
        post(server, body(family, checkpoint))
    settled = sum_of_switches(server)
    for _ in range(rounds):
        for checkpoint in family.checkpoints:
            post(server, body(family, checkpoint))
    return rounds * len(family.checkpoints), sum_of_switches(server) - settled


def sum_of_switches(server: Server) -> int:
    latest: dict[int, int] = {}
    for part in parts_made(server.log):
        latest[part.pid] = part.switches
    return sum(latest.values())


def plot(server: Server, family: Family, kill_after: float | None = None) -> tuple[float, list[str]]:
    """An X/Y/Z plot: the checkpoints × 8 seeds; (seconds, its images). ``kill_after``: SIGKILL a replica once this
    share of the cells is made."""
    names = ", ".join(family.checkpoints)
    axes = xyz_args((11, names, None), (1, "1-8", None))  # Checkpoint name, Seed (A1111's numbering)
    request = body(family, script_name="X/Y/Z plot", script_args=axes)
    request["prompt"] = "a red circle"
    done: list[dict] = []
    start = time.perf_counter()
    job = threading.Thread(target=lambda: done.append(post(server, request)))
    job.start()
    if kill_after is not None:
        cells = 8 * len(family.checkpoints)
        first = len(parts_made(server.log))
        while len(parts_made(server.log)) - first < cells * kill_after and job.is_alive():
            time.sleep(0.05)
        running = {part.pid for part in parts_made(server.log)}
        os.kill(sorted(running)[0], signal.SIGKILL)
    job.join()
    return time.perf_counter() - start, done[0]["images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="demo")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gpu-weights", type=int, default=0, help="MB of GPU Weights per replica (0: the default)")
    parser.add_argument("--total-mb", type=int, default=81559, help="each GPU's memory, for --gpu-weights")
    parser.add_argument("--cpu", action="store_true", help="the demo family on the CPU even where GPUs are")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "webui-bench-workers")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    flags = write_files(args.family, args.root)
    counts = [int(n) for n in args.workers.split(",")]
    rows = []

    single = start(args.root / "data-single", flags, 0, args)
    try:
        alone, _ = latency(single, family, args.repeat)
    finally:
        single.stop()
    rows.append(f"| single process | one image | {alone * 1000:.0f} ms | — | — | — |")
    rates, plots = {}, {}
    for workers in counts:
        server = start(args.root / f"data-{workers}", flags, workers, args)
        try:
            if workers == 1:
                seconds, outside = latency(server, family, args.repeat)
                ratio = seconds / alone
                rows.append(f"| --workers 1 | one image | {seconds * 1000:.0f} ms ({outside * 1000:.0f} ms of it "
                            f"outside the replica's part) | {ratio:.3f}× the single process | ≤ 1.05× | "
                            f"{'yes' if ratio <= 1.05 else '**no**'} |")
            for _ in range(workers):
                post(server, body(family))  # (every replica loads the model)
            rates[workers] = throughput(server, family, args.images, args.clients)
            goal = 0.9 * workers * rates[counts[0]] / counts[0]
            rows.append(f"| --workers {workers} | {args.images} images, {args.clients} clients | "
                        f"{rates[workers]:.1f} images/min | {rates[workers] / rates[counts[0]]:.2f}× --workers "
                        f"{counts[0]} | ≥ {goal:.1f} | {'yes' if rates[workers] >= goal - 1e-9 else '**no**'} |")
            if len(family.checkpoints) >= 2:
                asked, switches = routing(server, family, rounds=3)
                rows.append(f"| --workers {workers} | {asked} requests over {len(family.checkpoints)} checkpoints | "
                            f"{switches} model switches after the first of each | — | as few as the replicas allow "
                            "| — |")
                seconds, images = plot(server, family)
                plots[workers] = (seconds, images)
                speedup = plots[counts[0]][0] / seconds
                same = images == plots[counts[0]][1]  # (on GPUs; CPU replicas of another count: other threads)
                rows.append(f"| --workers {workers} | X/Y/Z {len(family.checkpoints)} checkpoints × 8 seeds | "
                            f"{seconds:.1f} s, {speedup:.2f}× faster than --workers {counts[0]}, grid "
                            f"{'byte-identical' if same else '**differs**'} | — | ≥ 1.8× on 2 | "
                            f"{'yes' if workers != 2 or speedup >= 1.8 else '**no**'} |")
                if workers >= 2:  # (against this run's own plot: CPU replicas of another count run other threads)
                    killed, images = plot(server, family, kill_after=0.25)
                    same = images == plots[workers][1]
                    rows.append(f"| --workers {workers} | the plot, a replica killed at 25 % | {killed:.1f} s "
                                f"({killed - seconds:+.1f} s), {len(images)} image(s), "
                                f"{'byte-identical' if same else '**differs**'} | — | every cell | "
                                f"{'yes' if same else '**no**'} |")
        finally:
            server.stop()
    print_table(f"Several replicas on Ray Serve, {args.family}", "`python3 -m benchmarks.workers "
                f"--family {args.family} --workers {args.workers} --images {args.images} --clients {args.clients}`",
                ["run", "what", "measured", "against", "goal", "met"], rows)


if __name__ == "__main__":
    main()
