"""Checkpoint merger memory and time: two full-size checkpoints (random weights, fp16, A1111 single files) merged, in
a child process, whose peak resident memory (``ru_maxrss``) is set beside the files' sizes.

    python3 -m benchmarks.merge [--family sdxl] [--workdir /tmp/bench-merge]

Runs on a CPU (no GPU is used). The files are written a tensor at a time with the merger's own writer, from the
architecture's shapes (built on the meta device), so writing them takes no more memory than merging them. Merges:
a weighted sum into fp16, an add difference of three (A, B and A again), and a weighted sum to GGUF Q8_0 (with its
VAE and text encoder files).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.table import print_table
from webui.engine.merge.merger import MergeInputs, MergeRequest, merge_checkpoints
from webui.engine.merge.streamed import write_safetensors
from webui.engine.progress import Progress
from webui.synthetic.builders import build_synthetic_model
from webui.synthetic.ldm_export import ldm_state_dict

MB = 2**20
CASES = {
    "weighted sum, fp16": dict(method="Weighted sum", secondary="b"),
    "add difference, fp16": dict(method="Add difference", secondary="b", tertiary="a"),
    "weighted sum, GGUF Q8_0 (+ VAE, text encoders)": dict(method="Weighted sum", secondary="b", file_format="gguf"),
}


def write_random_checkpoint(path: Path, family: str, seed: int) -> None:
    """A full-size A1111 single file of random fp16 weights, written a tensor at a time."""
    shapes = ldm_state_dict(build_synthetic_model(family, "full", device="meta"))
    planned = {key: (torch.float16 if value.is_floating_point() else value.dtype, tuple(value.shape))
               for key, value in shapes.items()}
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for key, (dtype, shape) in planned.items():
            value = shapes[key]
            if value.is_meta:
                yield key, (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            else:  # the schedule's tensors are real
                yield key, value.to(dtype)

    write_safetensors(path, planned, tensors(), {})


def run_case(root: Path, name: str) -> dict:
    fields = CASES[name]
    files = {"a": root / "a.safetensors", "b": root / "b.safetensors"}
    request = MergeRequest("a", **{k: v for k, v in fields.items() if k not in ("secondary", "tertiary")},
                           secondary=fields.get("secondary"), tertiary=fields.get("tertiary"), multiplier=0.4,
                           custom_name="merged", overwrite=True)
    out = root / "out"
    imported_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, diffusers … before any tensor
    inputs = MergeInputs([files[n] for n in ("a", fields.get("secondary"), fields.get("tertiary")) if n], None, [],
                         out, out / "VAE", out / "text_encoder")
    start = time.monotonic()
    result = merge_checkpoints(request.checked(), inputs, Progress())
    seconds = time.monotonic() - start
    written = sum(path.stat().st_size for path in result.paths)
    return {"seconds": seconds, "written_mb": written / MB, "largest_tensor_mb": result.largest_tensor_mb,
            "imported_mb": imported_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir
    if args.case is not None:
        print(json.dumps(run_case(root, args.case)))
        return
    root.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("a", "b")):
        path = root / f"{name}.safetensors"
        if not path.exists():
            write_random_checkpoint(path, args.family, seed)
    size_mb = (root / "a.safetensors").stat().st_size / MB
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.merge", "--workdir", str(root), "--case", case],
                             capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise RuntimeError(f"{case} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {case} | {size_mb:,.0f} | {r['imported_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | "
                    f"{r['largest_tensor_mb']:.0f} | {r['written_mb']:,.0f} | {r['seconds']:.0f} s |")
    print_table(f"Checkpoint merger, two full-size {args.family.upper()} files",
                f"`python3 -m benchmarks.merge --family {args.family}`: each merge in its own process; peak RSS is "
                "the process's whole resident memory at its highest, beside what it was after the imports (Python, "
                "torch, diffusers) and before the first tensor.",
                ["merge", "each input (MB)", "RSS after imports (MB)", "peak RSS (MB)", "largest tensor, float32 (MB)",
                 "written (MB)", "time"],
                rows)


if __name__ == "__main__":
    main()
