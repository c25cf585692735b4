"""k-diffusion's sampler functions and denoiser wrappers, without the rest of k-diffusion.

A1111 runs its k-samplers with Katherine Crowson's k-diffusion (MIT), and so do we where diffusers has no
such sampler: the same maths, not a copy of it. The PyPI package imports its training code (torchvision,
wandb, kornia, clean-fid …) from ``k_diffusion/__init__.py``, so it is installed with
``pip install --no-deps k-diffusion==0.1.1.post1`` and only ``sampling.py`` and ``external.py`` are loaded
from its folder, under a private package name; they need torch, scipy, torchsde, torchdiffeq, tqdm and
``utils.append_dims``, which is provided here.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

_PACKAGE = "webui_k_diffusion"  # private: a full k_diffusion, if one is installed, stays importable as itself


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """x with singleton dimensions appended up to ``target_dims`` (k_diffusion.utils.append_dims)."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is missing: pip install --no-deps k-diffusion==0.1.1.post1")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = []  # a package, but nothing is imported from it unless loaded here
        package.utils = types.ModuleType(f"{_PACKAGE}.utils")
        package.utils.append_dims = append_dims
        sys.modules[_PACKAGE], sys.modules[f"{_PACKAGE}.utils"] = package, package.utils
    module_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    setattr(sys.modules[_PACKAGE], name, module)
    module_spec.loader.exec_module(module)
    return module


sampling = _load("sampling")
external = _load("external")
