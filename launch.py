"""Start the web UI, on a fresh machine too: ``python launch.py [flags]`` (``--help`` lists them); or run the
tests in the same environment: ``python launch.py --run-tests [pytest args]``.

Needs only Python 3.10+. Before serving it:

1. re-runs itself inside the project's virtual environment (``.venv``, or ``$WEBUI_VENV``),
   creating it first if needed; ``--skip-venv`` or ``WEBUI_SKIP_VENV=1`` stays in this Python;
2. installs the missing requirements: torch and its torchvision first (CUDA builds when ``nvidia-smi``
   answers, else the CPU builds, which are much smaller), then the project with its dependencies (and, with
   an NVIDIA GPU, bitsandbytes; with --run-tests, the test tools), then k-diffusion without its own;
   ``--skip-install`` skips the check.

Only the standard library may be imported at the top: this runs before anything is installed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REQUIRED_MODULES = ("torch", "torchvision", "diffusers", "transformers", "safetensors", "gguf", "gradio", "fastapi",
                    "uvicorn", "PIL", "psutil", "accelerate", "torchsde", "tqdm", "scipy", "torchdiffeq", "spandrel",
                    "controlnet_aux", "dynamicprompts")
TORCH_MODULES = ("torch", "torchvision")  # installed first, together: torchvision is built for one torch
# Installed apart with pip --no-deps, by module: k-diffusion's own dependencies are its training tools; the sampler
# code the app loads from it needs only the project's (webui/engine/sampling/kdiffusion.py).
NO_DEPS_PACKAGES = {"k_diffusion": "k-diffusion==0.1.1.post1"}
CUDA_MODULES = ("bitsandbytes",)  # pyproject.toml's extra "cuda": 8-bit T5 through bitsandbytes
SERVE_MODULES = ("ray",)  # its extra "serve": --workers and --ray-address (Ray Serve); the tests run it too
TEST_MODULES = ("pytest", "xdist", "requests", "httpx", "playwright", "schemathesis", "webuiapi", *SERVE_MODULES)
MAX_TEST_WORKERS = 8  # pytest-xdist workers: one per core up to this (each holds its own torch and models)
# Without an NVIDIA GPU: PyTorch's CPU builds (a few hundred MB; only PyTorch's CPU index has them), else, where that
# index cannot be reached, a pair PyPI built together (a CUDA build, which runs on the CPU too).
TORCH_CPU = ("torch==2.13.0", "torchvision==0.28.0+cpu")
TORCH_CPU_FALLBACK = ("torch==2.14.1", "torchvision==0.29.1")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REEXEC_MARK = "WEBUI_LAUNCHER_REEXEC"  # set before re-running in the venv, to stop a re-exec loop


def venv_dir() -> Path:
    return Path(os.environ.get("WEBUI_VENV") or ROOT / ".venv").resolve()


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def in_venv(venv: Path) -> bool:
    return Path(sys.prefix).resolve() == venv


def enter_venv(venv: Path, argv: list[str]) -> None:
    """Create the venv if it is missing, then replace this process with this script run by its Python."""
    if os.environ.get(REEXEC_MARK):
        sys.exit(f"Re-ran launch.py with {venv_python(venv)} but it is still not inside {venv}; "
                 "remove that folder to have it made again, or pass --skip-venv.")
    python = venv_python(venv)
    if not python.exists():
        print(f"Creating the virtual environment {venv}", flush=True)
        if subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
            sys.exit(f"Could not create a virtual environment in {venv}. On Debian/Ubuntu install the "
                     "python3-venv package, or pass --skip-venv to run with this Python.")
    print(f"Running in the virtual environment {venv}", flush=True)
    os.environ[REEXEC_MARK] = "1"
    os.execv(python, [str(python), str(Path(__file__).resolve()), *argv])


def missing_modules(cuda: bool = False, tests: bool = False, serve: bool = False) -> list[str]:
    wanted = (REQUIRED_MODULES + tuple(NO_DEPS_PACKAGES) + (CUDA_MODULES if cuda else ()) + (TEST_MODULES if tests else ())
              + (SERVE_MODULES if serve else ()))
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pip_install(*args: str) -> bool:
    command = [sys.executable, "-m", "pip", "install", *args]
    print("Running:", " ".join(command), flush=True)
    return subprocess.run(command).returncode == 0


def install_torch(cuda: bool) -> None:
    """torch and the torchvision built for it, in one pip call (a torchvision of another build does not import, and
    then neither do spandrel, controlnet_aux nor diffusers' Flux pipeline)."""
    if cuda:
        print("Installing torch with CUDA (an NVIDIA GPU answered nvidia-smi).", flush=True)
        ok = pip_install(*TORCH_MODULES)
    else:
        print(f"Installing {' and '.join(TORCH_CPU)}, CPU builds (no NVIDIA GPU found).", flush=True)
        # one try per package at the CPU index: where it cannot be reached, the default index follows in seconds
        ok = (pip_install(*TORCH_CPU, "--extra-index-url", TORCH_CPU_INDEX, "--retries", "1")
              or pip_install(*TORCH_CPU_FALLBACK))
    if not ok:
        sys.exit("Could not install torch and torchvision; pip said why above.")


def install_requirements(tests: bool = False, serve: bool = False) -> None:
    """Install what is missing: torch first, so that pip does not pick a torch build for us; with an NVIDIA GPU
    the CUDA extras too, for ``tests`` the test tools, for ``serve`` (--workers, --ray-address) Ray Serve."""
    cuda = has_nvidia_gpu()
    missing = missing_modules(cuda, tests, serve)
    if not missing:
        return
    print(f"Missing packages: {', '.join(missing)}", flush=True)
    if set(missing) & set(TORCH_MODULES):
        install_torch(cuda)
    if set(missing) - set(NO_DEPS_PACKAGES) - set(TORCH_MODULES):
        print("Installing the web UI and its dependencies.", flush=True)
        extras = ",".join(name for name, wanted in (("cuda", cuda), ("test", tests), ("serve", serve)) if wanted)
        if not pip_install("-e", f"{ROOT}[{extras}]" if extras else str(ROOT)):
            sys.exit("Could not install the requirements; pip said why above.")
    for module, spec in NO_DEPS_PACKAGES.items():
        if module in missing and not pip_install("--no-deps", spec):
            sys.exit(f"Could not install {spec}; pip said why above.")
    importlib.invalidate_caches()


def run_tests(pytest_args: list[str]) -> None:
    """Replace this process with pytest over the project's tests, one worker per core (pytest-xdist) unless the
    arguments say how many; a module's tests stay on one worker, so that its module fixtures (a live server) are
    made once."""
    workers = min(os.cpu_count() or 1, MAX_TEST_WORKERS)
    chosen = any(arg.startswith(("-n", "--numprocesses", "--dist")) or arg == "no:xdist" for arg in pytest_args)
    parallel = [] if chosen else ["-n", str(workers), "--dist", "loadscope"]
    command = [sys.executable, "-m", "pytest", *parallel, *pytest_args]
    print("Running:", " ".join(command), flush=True)
    os.chdir(ROOT)
    os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"Python 3.10 or newer is needed; this is {sys.version.split()[0]}.")
    argv = sys.argv[1:] if argv is None else argv
    from webui.cli import parse_args  # standard library only

    args = parse_args(argv)  # --help and bad flags end here, before any slow step
    venv = venv_dir()
    if not (args.skip_venv or os.environ.get("WEBUI_SKIP_VENV") == "1" or in_venv(venv)):
        enter_venv(venv, argv)
    if not args.skip_install:
        install_requirements(tests=args.run_tests is not None, serve=bool(args.workers or args.ray_address))
    # Every model file is local: Hugging Face libraries must not try the hub (set before they are imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run_tests is not None:
        run_tests(args.run_tests)
    from webui.server import main as serve

    serve(argv)


if __name__ == "__main__":
    main()
