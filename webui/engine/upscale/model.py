"""Upscaler model files loaded by spandrel (it tells the architecture from the tensors) and run on the engine's
device, their weights placed by the memory manager like any other component's.

The file is read by the checkpoints' rules first (``formats.files``: a safetensors header checked before any data,
a pickle unpickled with ``weights_only``); spandrel only ever sees tensors. spandrel is imported when a model file is
first used, so that the app runs (with the built-in upscalers) where it cannot be imported.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from webui.engine.formats.files import load_pickled_state_dict, load_state_dict
from webui.engine.memory.manager import MemoryManager, MemoryPolicy
from webui.engine.upscale.tiles import upscale_tiled
from webui.errors import UserError

log = logging.getLogger(__name__)
COMPONENT = "upscaler"  # its name among the memory manager's components
# Activation bytes per output pixel and byte of the compute dtype: the last layers of an ESRGAN-type model hold a few
# 64-channel feature maps at output size. An estimate, for the memory manager's budget.
ACTIVATION_PER_OUTPUT_PIXEL = 256
PURPOSES = ("SR", "Restoration")  # spandrel's purposes of image-to-image models; FaceSR is face restoration


def spandrel_module() -> Any:
    """spandrel, or a UserError saying why it cannot be used (not installed; a torchvision that does not fit torch)."""
    try:
        import spandrel
    except Exception as e:  # ImportError, or torchvision's RuntimeError when it was built for another torch
        raise UserError(f"upscaler model files are read by spandrel, which could not be imported ({e}). Install it "
                        "(pip install spandrel) with a torchvision built for the installed torch; the built-in "
                        "upscalers (Lanczos, Nearest) work without it") from None
    return spandrel


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by the checkpoints' rules: safetensors with its header checked, else a weights-only
    pickle (.pth/.pt/.ckpt, BasicSR's "params_ema" wrapper unwrapped)."""
    return load_state_dict(path) if path.suffix.lower() == ".safetensors" else load_pickled_state_dict(path)


def load_upscaler(path: Path, field: str) -> Any:
    """An upscaler model file as spandrel's ImageModelDescriptor (on the CPU, in eval mode); a UserError naming the
    file and ``field`` (the request field that chose it) for a file that cannot be one."""
    try:
        tensors = read_tensors(path)
    except UserError as e:
        raise UserError(f"{e.message} Replace the upscaler file or remove it from its folder.", field=field) from None
    spandrel = spandrel_module()
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(spandrel.canonicalize_state_dict(tensors))
    except spandrel.UnsupportedModelError:
        raise UserError(f"{path.name}: spandrel does not know this model's architecture; it is no upscaler model "
                        "spandrel reads (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT ...). Remove it from the upscaler "
                        "folder", field=field) from None
    except Exception as e:  # a known architecture whose tensors do not fit it: spandrel's own errors vary
        raise UserError(f"{path.name} could not be loaded by spandrel ({type(e).__name__}: {e}); the file may be "
                        "corrupt or of an unsupported variant. Replace it or remove it from the upscaler folder",
                        field=field) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in PURPOSES:
        raise UserError(f"{path.name} is a {descriptor.architecture.name} model for {descriptor.purpose}, not an "
                        "upscaler (face restoration and inpainting models are not supported)", field=field)
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UserError(f"{path.name} takes {descriptor.input_channels}-channel images and gives "
                        f"{descriptor.output_channels}; only RGB upscalers are supported", field=field)
    return descriptor.eval()


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (1, 3, H, W) float32 tensor in [0, 1], spandrel's input."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


@dataclass(frozen=True)
class UpscaleSetup:
    """How the engine runs upscaler models: its memory manager and policy, the compute dtype it would use for
    half-precision-capable models, the options' tiling, and the running job's Interrupt."""

    memory: MemoryManager
    policy: MemoryPolicy
    half: torch.dtype
    tile: int
    overlap: int
    interrupted: Callable[[], bool]


@contextmanager
def model_on_device(descriptor: Any, setup: UpscaleSetup, largest: tuple[int, int],
                    own_job: bool = True) -> Iterator[Callable[[Image.Image], Image.Image]]:
    """A function that runs the model once over an image (tiled), while the model is placed; ``largest``: the
    largest (width, height) it will be given, for the activation estimate. On a GPU the model is a memory-manager
    component for the block (resident, or streamed where it does not fit beside what is there); on the CPU it just
    runs. ``own_job``: the block is the manager's job (Extras); else a phase of the running one (hires. fix)."""
    memory = setup.memory
    dtype = setup.half if descriptor.supports_half else torch.float32
    module = descriptor.model.to(dtype)

    def run(tile: torch.Tensor) -> torch.Tensor:
        return descriptor(tile.to(memory.device, dtype)).float().cpu()

    def upscale(image: Image.Image) -> Image.Image:
        return to_image(upscale_tiled(run, to_tensor(image), descriptor.scale, setup.tile, setup.overlap,
                                      setup.interrupted))

    if not memory.limited:
        yield upscale
        return
    width, height = (min(side, setup.tile or side) for side in largest)
    activation = width * height * descriptor.scale ** 2 * ACTIVATION_PER_OUTPUT_PIXEL * torch.finfo(dtype).bits // 8
    if own_job:
        memory.begin(setup.policy, activation)
    memory.register(COMPONENT, module)
    try:
        memory.prepare([COMPONENT], activation, phase="upscale")  # its name in the memory panel, where traced
        yield upscale
    finally:
        memory.unregister(COMPONENT)
        if own_job:
            memory.finish()
