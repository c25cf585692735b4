"""Command-line flags. Every flag is listed in ``--help``; an unknown flag is an error, except that A1111's and
Forge's common flags are all accepted: those with a meaning here act, the others only earn a warning at start."""
from __future__ import annotations

import argparse
import textwrap
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


def credentials_file(path: Path) -> list[tuple[str, str]]:
    """A1111's --gradio-auth-path: a file of ``user:pass`` pairs, one or several (comma-separated) a line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    pairs = [item for line in text.splitlines() for item in line.split(",") if item.strip()]
    if not pairs:
        raise argparse.ArgumentTypeError(f"{path} holds no USER:PASS")
    return credentials(",".join(pairs))


# A1111/Forge flags that change nothing here, by why. Each keeps A1111's shape so that the flags after it still
# parse: "--flag" takes no value, "--flag X" one, "--flag X..." one or more, "--flag [X]" one or none.
ATTENTION = "attention is PyTorch's scaled-dot-product attention (SDPA) already, on every device; xformers is not used"
WITHOUT_EFFECT: dict[str, tuple[str, ...]] = {
    ATTENTION: (
        "--xformers", "--force-enable-xformers", "--xformers-flash-attention", "--reinstall-xformers",
        "--disable-xformers", "--opt-sdp-attention", "--opt-sdp-no-mem-attention", "--opt-split-attention",
        "--opt-split-attention-v1", "--opt-split-attention-invokeai", "--opt-sub-quad-attention",
        "--disable-opt-split-attention", "--sub-quad-q-chunk-size N", "--sub-quad-kv-chunk-size N",
        "--sub-quad-chunk-threshold N", "--attention-split", "--attention-quad", "--attention-pytorch",
        "--force-upcast-attention", "--disable-attention-upcast"),
    "memory is managed per model and per phase as it goes (--lowvram, --medvram, --always-gpu choose a mode)": (
        "--medvram-sdxl", "--lowram", "--always-batch-cond-uncond", "--always-normal-vram",
        "--disable-model-loading-ram-optimization", "--pin-shared-memory", "--cuda-malloc", "--cuda-stream",
        "--opt-channelslast"),
    "the compute precision is picked per model and device (--no-half, --no-half-vae or --precision full: float32)": (
        "--all-in-fp16", "--unet-in-bf16", "--unet-in-fp16", "--vae-in-fp16", "--vae-in-bf16", "--clip-in-fp16",
        "--clip-in-fp32", "--clip-in-fp8-e4m3fn", "--clip-in-fp8-e5m2", "--upcast-sampling", "--vae-in-cpu"),
    "fp8 weights are the setting Diffusion in Low Bits (forge_unet_storage_dtype)": (
        "--unet-in-fp8-e4m3fn", "--unet-in-fp8-e5m2"),
    "--device picks the device; CUDA_VISIBLE_DEVICES=N picks among several GPUs": (
        "--device-id N", "--gpu-device-id N", "--use-ipex", "--directml [N]", "--disable-ipex-hijack",
        "--skip-torch-cuda-test"),
    "nothing is ever downloaded (with no model of yours, the built-in demo model is used)": (
        "--no-download-sd-model", "--do-not-download-clip"),
    "the launcher checks only what it needs: Python 3.10+ and the packages that are missing": (
        "-f", "--skip-python-version-check", "--skip-version-check", "--reinstall-torch", "--update-check",
        "--update-all-extensions", "--log-startup", "--dump-sysinfo", "--test-server", "--tests DIR", "--no-tests"),
    "this app has no face restoration, BSRGAN/ScuNET/LDSR upscaler, interrogator or hypernetwork models": (
        "--gfpgan-dir DIR", "--gfpgan-model FILE", "--gfpgan-models-path DIR", "--codeformer-models-path DIR",
        "--bsrgan-models-path DIR", "--scunet-models-path DIR", "--ldsr-models-path DIR", "--clip-models-path DIR",
        "--deepdanbooru", "--unload-gfpgan",
        "--textual-inversion-templates-dir DIR", "--hypernetwork-dir DIR"),
    "this UI has no such option": (
        "--no-progressbar-hiding", "--max-batch-count N", "--localizations-dir DIR", "--show-negative-prompt",
        "--ui-config-file FILE", "--gradio-img2img-tool X", "--gradio-inpaint-tool X",
        "--use-textbox-seed", "--no-prompt-history", "--gradio-debug", "--gradio-queue",
        "--no-gradio-queue", "--ui-debug-mode", "--disable-console-progressbars", "--enable-console-prompts",
        "--freeze-settings", "--freeze-settings-in-sections X", "--freeze-specific-settings X",
        "--unix-filenames-sanitization", "--filenames-max-length N", "--gradio-allowed-path DIR", "--administrator",
        "--allow-code"),
    "the server has no such option (put a reverse proxy in front for TLS or a sub-path)": (
        "--subpath PATH", "--add-stop-route", "--tls-keyfile FILE",
        "--tls-certfile FILE", "--disable-tls-verify"),
    "--share makes the public link": ("--ngrok TOKEN", "--ngrok-region REGION", "--ngrok-options JSON"),
    "settings live in <data-dir>/config.json (--data-dir)": ("--ui-settings-file FILE",),
    "extensions load from their folder (--extensions-dir); there is no installer to unlock": (
        "--enable-insecure-extension-access",),
    "a .ckpt is always read weights-only, so a file cannot run code": ("--disable-safe-unpickle",),
    "a file's hash is computed once and cached": ("--no-hashing",),
    "the model loads at the first generation already": ("--skip-load-model-at-start",),
    "the architecture is read from the weights": ("--config FILE",),
    "put the VAE in models/VAE and pick it as SD VAE": ("--vae-path FILE",),
    "point --models-dir or --ckpt-dir at that install's folders": ("--forge-ref-a1111-home DIR",),
    "a float16 VAE that makes NaNs is run again in float32; NaN latents are an error": ("--disable-nan-check",),
    "a seed gives the same image on the CPU already": ("--pytorch-deterministic",),
}

def _shape(metavar: str) -> dict:
    """argparse's nargs for a metavar written as in WITHOUT_EFFECT."""
    if not metavar:
        return {"nargs": 0}
    if metavar.endswith("..."):
        return {"nargs": "+", "metavar": metavar[:-3]}
    if metavar.startswith("["):
        return {"nargs": "?", "metavar": metavar[1:-1]}
    return {"metavar": metavar}


class WithoutEffect(argparse.Action):
    """Takes an A1111/Forge flag's values and notes it in ``no_effect``: one warning line each at start."""

    def __init__(self, option_strings: list[str], dest: str, reason: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        line = f"{option_string} has no effect here: {self.reason}"
        if line not in namespace.no_effect:
            namespace.no_effect = [*namespace.no_effect, line]


def add_without_effect(p: argparse.ArgumentParser) -> None:
    """Listed in --help by reason, not one line each (and not in the usage line, which they would swamp)."""
    paragraphs = []
    for reason, specs in WITHOUT_EFFECT.items():
        paragraphs.append(textwrap.fill(f"{', '.join(specs)}: {reason}.", width=100, initial_indent="  ",
                                        subsequent_indent="    ", break_on_hyphens=False))
        for spec in specs:
            flag, _, metavar = spec.partition(" ")
            p.add_argument(flag, action=WithoutEffect, reason=reason, **_shape(metavar))
    p.add_argument_group("A1111/Forge flags accepted without effect",
                         "So that an A1111/Forge command line starts; each one given is named at start, with why.\n"
                         + "\n".join(paragraphs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Stable Diffusion web UI: memory never gets in the way.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(no_effect=[])
    net = p.add_argument_group("server")
    net.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    net.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 so other machines can connect")
    net.add_argument("--server-name", default=None, metavar="ADDRESS",
                     help="the address (or host name) to serve on, instead of 127.0.0.1 or --listen's 0.0.0.0")
    net.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                     help="more host names the server answers to (it answers only to its own addresses when it serves "
                          "this machine alone: a web page cannot rebind a name to it)")
    net.add_argument("--share", action="store_true", help="make a public Gradio link (needs internet)")
    net.add_argument("--api", action="store_true", help="serve the HTTP API (/sdapi/v1) beside the UI")
    net.add_argument("--nowebui", action="store_true", help="serve only the HTTP API, no UI")
    net.add_argument("--api-auth", type=credentials, default=None, metavar="USER:PASS[,USER:PASS...]",
                     help="HTTP basic authentication on every API route (and, without --gradio-auth, the same "
                          "logins for the UI)")
    net.add_argument("--api-log", action="store_true", help="log every API call: client, route, status, seconds")
    net.add_argument("--api-server-stop", action="store_true",
                     help="allow POST /sdapi/v1/server-kill, -restart and -stop (else they answer 403)")
    net.add_argument("--gradio-auth", type=credentials, default=None, metavar="USER:PASS[,USER:PASS...]",
                     help="a login page in front of the UI (and, without --api-auth, the same logins for the API)")
    net.add_argument("--gradio-auth-path", type=Path, default=None, metavar="FILE",
                     help="--gradio-auth's logins read from a file (USER:PASS pairs, one or more a line)")
    net.add_argument("--timeout-keep-alive", type=float, default=30, metavar="SECONDS",
                     help="how long a client may take to send a request's headers, or pause while sending its body, "
                          "and how long an idle connection is kept (default 30)")
    net.add_argument("--cors-allow-origins", default=None, metavar="ORIGIN[,ORIGIN...]",
                     help="web pages of these origins may call the API (Open WebUI, browser apps)")
    net.add_argument("--cors-allow-origins-regex", default=None, metavar="REGEX",
                     help="web pages of the origins this regular expression matches may call the API")
    net.add_argument("--autolaunch", action="store_true", help="open the UI in the default web browser once served")
    net.add_argument("--theme", choices=("light", "dark"), default=None,
                     help="open the UI in this theme (default: the browser's)")
    net.add_argument("--loglevel", type=str.upper, default="INFO",
                     choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"), help="log level (default INFO)")
    paths = p.add_argument_group("folders")
    paths.add_argument("--data-dir", type=Path, default=ROOT, help="where config.json and cache.json live")
    paths.add_argument("--models-dir", type=Path, default=None, help="models folder (default: <data-dir>/models)")
    paths.add_argument("--ckpt-dir", type=Path, default=None, help="extra folder with checkpoints")
    paths.add_argument("--ckpt", type=Path, default=None, metavar="FILE",
                       help="use this checkpoint (a file or diffusers folder, anywhere) in this run; it is listed too")
    paths.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder (default: <models>/Lora)")
    paths.add_argument("--controlnet-dir", type=Path, default=None,
                       help="ControlNet folder (default: <models>/ControlNet)")
    paths.add_argument("--controlnet-preprocessor-models-dir", type=Path, default=None, metavar="DIR",
                       help="ControlNet preprocessors' weights (default: <models>/ControlNetPreprocessor)")
    paths.add_argument("--vae-dir", type=Path, default=None, help="VAE folder (default: <models>/VAE)")
    paths.add_argument("--text-encoder-dir", type=Path, default=None,
                       help="text encoder folder (default: <models>/text_encoder)")
    for folder in ("ESRGAN", "RealESRGAN", "SwinIR", "DAT"):
        paths.add_argument(f"--{folder.lower()}-models-path", type=Path, default=None, metavar="DIR",
                           help=f"{folder} upscaler models (default: <models>/{folder})")
    paths.add_argument("--outdir", type=Path, default=None, help="output folder (default: <data-dir>/outputs)")
    paths.add_argument("--styles-file", type=Path, default=None,
                       help="A1111's prompt styles file (default: <data-dir>/styles.csv)")
    paths.add_argument("--embeddings-dir", type=Path, default=None,
                       help="textual-inversion embeddings (default: <data-dir>/embeddings)")
    paths.add_argument("--wildcards-dir", type=Path, default=None,
                       help="dynamic prompts' __wildcard__ files (default: <data-dir>/wildcards)")
    paths.add_argument("--hide-ui-dir-config", action="store_true",
                       help="refuse folders typed in the UI (img2img's batch from a folder reads and writes the "
                            "server's): for a UI others reach")
    paths.add_argument("--extensions-dir", type=Path, default=None,
                       help="folder of your extensions (default: <data-dir>/extensions)")
    dev = p.add_argument_group("device and precision")
    dev.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto",
                     help="compute device (default: auto = CUDA if present, else MPS, else CPU)")
    dev.add_argument("--always-cpu", action="store_const", dest="device", const="cpu", help="--device cpu (Forge)")
    dev.add_argument("--use-cpu", nargs="+", default=[], type=str.lower, metavar="MODULE",
                     help="A1111's: 'all' or 'sd' is --device cpu; other modules do not exist here")
    dev.add_argument("--no-half", action="store_true", help="compute in float32 instead of float16")
    dev.add_argument("--no-half-vae", "--vae-in-fp32", action="store_true", help="run the VAE in float32")
    dev.add_argument("--all-in-fp32", action="store_true", help="--no-half and --no-half-vae (Forge)")
    dev.add_argument("--precision", choices=("full", "half", "autocast"), default="autocast",
                     help="A1111's: full is --no-half; half and autocast are the default")
    mem = p.add_argument_group("memory")
    mode = mem.add_mutually_exclusive_group()
    mode.add_argument("--lowvram", "--always-low-vram", "--always-no-vram", action="store_true",
                      help="stream every layer from host memory")
    mode.add_argument("--medvram", action="store_true", help="swap whole components between phases")
    mode.add_argument("--always-gpu", "--always-high-vram", action="store_true",
                      help="keep everything on the GPU, never offload")
    dev.add_argument("--attention", choices=("sdpa", "sage", "flash"), default=None,
                     help="the denoiser's attention for this session (the setting Attention): SDPA, SageAttention, "
                          "FlashAttention")
    dev.add_argument("--fast", nargs="+", choices=("fp8_matrix_mult",), default=None, metavar="FEATURE",
                     help="ComfyUI's: fp8_matrix_mult (the setting fp8 matrix multiplication, for this session)")
    dev.add_argument("--disable-cuda-graphs", action="store_true",
                     help="run every denoising step eager (the setting Replay the denoiser as a CUDA graph, off for "
                          "this session)")
    dev.add_argument("--compile", action="store_true",
                     help="compile the denoiser's repeated blocks (the setting Compile the denoiser, for this session)")
    mem.add_argument("--always-offload-from-vram", action="store_true",
                     help="unload models from the GPU after every generation")
    ray = p.add_argument_group("several GPUs and hosts (Ray Serve; docs/several-gpus.md)")
    ray.add_argument("--workers", type=int, default=0, metavar="N",
                     help="start a local Ray cluster with N engine replicas, one per GPU (N CPU replicas on a machine "
                          "without GPUs); this process serves the UI and the API and spreads jobs over them")
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="join an existing Ray cluster instead (several hosts: the model folders at the same path on "
                          "every node); --workers N replicas there (default: one per GPU in the cluster)")
    ext = p.add_argument_group("extensions")
    ext.add_argument("--disable-all-extensions", action="store_true",
                     help="load no extensions, not even the built-in ones (extensions-builtin/)")
    ext.add_argument("--disable-extra-extensions", action="store_true",
                     help="load only the built-in extensions, not those in --extensions-dir")
    launcher = p.add_argument_group("launcher")
    launcher.add_argument("--skip-venv", action="store_true",
                          help="run with the current Python instead of the project's venv "
                               "(also: WEBUI_SKIP_VENV=1; the venv is $WEBUI_VENV or .venv)")
    launcher.add_argument("--skip-install", "--skip-prepare-environment", action="store_true",
                          help="do not check or install the required packages")
    launcher.add_argument("--run-tests", nargs=argparse.REMAINDER, default=None, metavar="PYTEST_ARGS",
                          help="run the tests instead of the app, in the same venv with the test tools installed; "
                               "what follows goes to pytest (last flag)")
    add_without_effect(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gradio_auth_path:  # read here, so that the flags keep the path, not the passwords
        try:
            args.gradio_auth = (args.gradio_auth or []) + credentials_file(args.gradio_auth_path)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --gradio-auth-path: {e}")
    if args.workers < 0:
        parser.error("argument --workers: a number of replicas, 0 (this process alone) or more")
    args.no_half = args.no_half or args.all_in_fp32 or args.precision == "full"
    args.no_half_vae = args.no_half_vae or args.all_in_fp32
    if {"all", "sd"} & set(args.use_cpu):
        args.device = "cpu"
    elif args.use_cpu:
        args.no_effect = [*args.no_effect, f"--use-cpu {' '.join(args.use_cpu)} has no effect here: only 'all' "
                                           "and 'sd' mean something (--device cpu)"]
    # One rule: when any login is configured, every route that does work needs one. The API takes the UI's logins
    # unless it is given its own; the UI (its Gradio routes generate too) takes the API's unless it has its own.
    if args.gradio_auth and not args.api_auth:
        args.api_auth = args.gradio_auth
    elif args.api_auth and not args.gradio_auth:
        args.gradio_auth = args.api_auth
    return args
