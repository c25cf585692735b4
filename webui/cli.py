"""Command-line flags. Every flag is listed in ``--help``; an unknown flag is an error."""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def credentials(text: str) -> list[tuple[str, str]]:
    """``user:pass[,user2:pass2...]`` (A1111's format; a password may contain ':') as (user, password) pairs."""
    pairs = []
    for item in text.split(","):
        user, colon, password = item.strip().partition(":")
        if not (user and colon and password):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not USER:PASS (both needed)")
        pairs.append((user, password))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Stable Diffusion web UI: memory never gets in the way.",
        allow_abbrev=False,
    )
    net = p.add_argument_group("server")
    net.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    net.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 so other machines can connect")
    net.add_argument("--share", action="store_true", help="make a public Gradio link (needs internet)")
    net.add_argument("--api", action="store_true", help="serve the HTTP API (/sdapi/v1) beside the UI")
    net.add_argument("--nowebui", action="store_true", help="serve only the HTTP API, no UI")
    net.add_argument("--api-auth", type=credentials, default=None, metavar="USER:PASS[,USER:PASS...]",
                     help="HTTP basic authentication on every API route")
    net.add_argument("--api-log", action="store_true", help="log every API call: client, route, status, seconds")
    net.add_argument("--gradio-auth", type=credentials, default=None, metavar="USER:PASS[,USER:PASS...]",
                     help="a login page in front of the UI (and, without --api-auth, the same logins for the API)")
    paths = p.add_argument_group("folders")
    paths.add_argument("--data-dir", type=Path, default=ROOT, help="where config.json and cache.json live")
    paths.add_argument("--models-dir", type=Path, default=None, help="models folder (default: <data-dir>/models)")
    paths.add_argument("--ckpt-dir", type=Path, default=None, help="extra folder with checkpoints")
    paths.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder (default: <models>/Lora)")
    paths.add_argument("--vae-dir", type=Path, default=None, help="VAE folder (default: <models>/VAE)")
    paths.add_argument("--text-encoder-dir", type=Path, default=None,
                       help="text encoder folder (default: <models>/text_encoder)")
    paths.add_argument("--outdir", type=Path, default=None, help="output folder (default: <data-dir>/outputs)")
    paths.add_argument("--extensions-dir", type=Path, default=None,
                       help="folder of your extensions (default: <data-dir>/extensions)")
    dev = p.add_argument_group("device and precision")
    dev.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto",
                     help="compute device (default: auto = CUDA if present, else MPS, else CPU)")
    dev.add_argument("--no-half", action="store_true", help="compute in float32 instead of float16")
    dev.add_argument("--no-half-vae", action="store_true", help="run the VAE in float32")
    mem = p.add_argument_group("memory")
    mode = mem.add_mutually_exclusive_group()
    mode.add_argument("--lowvram", action="store_true", help="stream every layer from host memory")
    mode.add_argument("--medvram", action="store_true", help="swap whole components between phases")
    mode.add_argument("--always-gpu", action="store_true", help="keep everything on the GPU, never offload")
    mem.add_argument("--always-offload-from-vram", action="store_true",
                     help="unload models from the GPU after every generation")
    ext = p.add_argument_group("extensions")
    ext.add_argument("--disable-all-extensions", action="store_true",
                     help="load no extensions, not even the built-in ones (extensions-builtin/)")
    ext.add_argument("--disable-extra-extensions", action="store_true",
                     help="load only the built-in extensions, not those in --extensions-dir")
    launcher = p.add_argument_group("launcher")
    launcher.add_argument("--skip-venv", action="store_true",
                          help="run with the current Python instead of the project's venv "
                               "(also: WEBUI_SKIP_VENV=1; the venv is $WEBUI_VENV or .venv)")
    launcher.add_argument("--skip-install", action="store_true",
                          help="do not check or install the required packages")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.gradio_auth and not args.api_auth:
        args.api_auth = args.gradio_auth  # one login for everything served, unless the API is given its own
    return args
