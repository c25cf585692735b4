"""Shared fixtures: tiny models written by the project's own code in the real file formats.

They are cached in .cache/test-models (keyed by FIXTURE_VERSION) so later runs skip writing them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from webui import extensions
from webui.cli import parse_args
from webui.engine import samplers
from webui.engine.engine import Engine
from webui.engine.ldm_export import write_a1111_checkpoint, write_diffusers_folder
from webui.engine.synthetic import build_synthetic_model
from webui.settings import AppConfig

FIXTURE_VERSION = "1"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-models" / FIXTURE_VERSION


@pytest.fixture(autouse=True)
def process_wide_registries(monkeypatch):
    """Samplers and schedule types are process-wide, and extensions add to them: give each test its own copy."""
    monkeypatch.setattr(samplers, "_samplers", dict(samplers._samplers))
    monkeypatch.setattr(samplers, "SCHEDULE_TYPES", samplers.SCHEDULE_TYPES)
    monkeypatch.setattr(extensions, "_claims", {})


def _cached(name: str, make) -> Path:
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
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


def diffusers_folder(family: str, seed: int = 1) -> Path:
    """The same tiny model as ``single_file`` as a diffusers folder (fp16 weights)."""
    return _cached(f"{family}-{seed}-diffusers", lambda p: write_diffusers_folder(
        p, build_synthetic_model(family, "tiny", seed=seed), dtype=torch.float16))


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
