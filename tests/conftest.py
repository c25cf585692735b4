"""Shared fixtures: tiny models written by the project's own code in the real file formats.

They are cached in .cache/test-models (keyed by FIXTURE_VERSION) so later runs skip writing them; pytest-xdist's
workers share that cache (one writes a model while the others wait for it) and split the cores between them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from gguf import GGMLQuantizationType as Q

from webui.cli import parse_args
from webui.demo.derive import ensure_demo_models
from webui.engine.engine import Engine
from webui.engine.formats.detect import Family
from webui.engine.weights.gguf_load import quantize_where_possible, write_gguf
from webui.synthetic.ldm_export import (
    flux_to_bfl,
    write_a1111_checkpoint,
    write_clip_file,
    write_diffusers_folder,
    write_t5_file,
    write_vae_file,
)
from webui.synthetic.builders import (
    build_clip_text,
    build_flux_transformer,
    build_synthetic_model,
    build_t5_encoder,
    build_vae16,
)
from webui.engine.conditioning.t5_prompts import TOKENIZER_FOLDER
from webui.engine.conditioning.tokenizer import write_t5_tokenizer
from webui.settings import AppConfig

FIXTURE_VERSION = "1"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-models" / FIXTURE_VERSION
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # one torch thread pool per core would oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def demo_models() -> None:
    """The demo model's derived files, which the server writes at start: engines made here start without it."""
    paths = AppConfig.from_args(parse_args([])).paths
    ensure_demo_models(paths.builtin_models_dir, paths.builtin_modules_dir)


def _cached(name: str, make) -> Path:
    path = CACHE / name
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(CACHE / f".{name}.lock"):  # another worker may be writing it
        if not path.exists():
            tmp = CACHE / f".{name}.tmp"
            if tmp.is_dir():
                shutil.rmtree(tmp)
            tmp.unlink(missing_ok=True)
            make(tmp)
            tmp.rename(path)
    return path


def single_file(family: str, seed: int = 1, **kwargs) -> Path:
    """A tiny A1111 single-file checkpoint (fp16, original key names)."""
    suffix = "-".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    name = f"{family}-{seed}{'-' + suffix if suffix else ''}.safetensors"
    return _cached(name, lambda p: write_a1111_checkpoint(p, build_synthetic_model(family, "tiny", seed=seed, **kwargs),
                                                          dtype=torch.float16))


def diffusers_folder(family: str, seed: int = 1, **kwargs) -> Path:
    """The same tiny model as ``single_file`` as a diffusers folder (fp16 weights)."""
    suffix = "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))
    return _cached(f"{family}-{seed}{suffix}-diffusers", lambda p: write_diffusers_folder(
        p, build_synthetic_model(family, "tiny", seed=seed, **kwargs), dtype=torch.float16))


def _write_flux_gguf_models(root: Path) -> None:
    ckpts, encoders, vaes = root / "Stable-diffusion", root / "text_encoder", root / "VAE"
    for folder in (ckpts, encoders, vaes):
        folder.mkdir(parents=True)
    flux = build_flux_transformer("tiny", seed=1)
    bfl = flux_to_bfl({k: v.clone() for k, v in flux.state_dict().items()}, flux.config)
    write_gguf(ckpts / "flux-Q8_0.gguf", bfl, quantize_where_possible(Q.Q8_0), arch="flux")
    write_clip_file(encoders / "clip_l.safetensors", build_clip_text("clip_l", seed=3), projection=False)
    write_t5_file(encoders / "t5xxl_fp16.safetensors", build_t5_encoder(seed=5))
    write_vae_file(vaes / "ae.safetensors", build_vae16("tiny", Family.FLUX, seed=6))
    write_t5_tokenizer(encoders / TOKENIZER_FOLDER)


def flux_gguf_models() -> Path:
    """A models folder as a Flux GGUF user has it: Stable-diffusion/flux-Q8_0.gguf, text_encoder/clip_l and
    t5xxl_fp16 (+ t5_tokenizer), VAE/ae — the files named in FLUX_GGUF_MODULES."""
    return _cached("flux-gguf-models", _write_flux_gguf_models)


FLUX_GGUF_MODULES = ["ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]


@pytest.fixture(scope="session")
def sd1_file() -> Path:
    return single_file("sd1")


@pytest.fixture(scope="session")
def sdxl_file() -> Path:
    return single_file("sdxl")


@pytest.fixture(scope="session")
def sd1_folder() -> Path:
    return diffusers_folder("sd1")


@pytest.fixture(scope="session")
def sdxl_folder() -> Path:
    return diffusers_folder("sdxl")


def make_engine(data_dir: Path, *checkpoints: Path, extra_args: tuple[str, ...] = ()) -> Engine:
    """An engine over a fresh data folder whose models/Stable-diffusion links to the given checkpoints."""
    ckpt_dir = data_dir / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoints:
        (ckpt_dir / path.name).symlink_to(path, target_is_directory=path.is_dir())
    return Engine(AppConfig.from_args(parse_args(["--data-dir", str(data_dir), "--device", "cpu", *extra_args])))


@pytest.fixture
def engine(tmp_path: Path, sd1_file: Path) -> Engine:
    return make_engine(tmp_path, sd1_file)
