"""Which upscalers exist: A1111's built-in ones that need no file, then the model files of the upscaler folders.

Names given by users (dropdowns, API fields) are only ever looked up in this list, so a name can never point outside
the folders.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from webui.engine.formats.files import find_files
from webui.errors import UserError

UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
NONE, LANCZOS, NEAREST = "None", "Lanczos", "Nearest"
BUILTIN = (NONE, LANCZOS, NEAREST)  # A1111's first three, in its order
DEFAULT_SCALE = 4  # A1111 lists an upscaler at 4x where nothing says otherwise
# "4x-UltraSharp", "RealESRGAN_x4plus", "realesr-general-x4v3", "2x_foo": the scale a file's name gives
_SCALE_IN_NAME = re.compile(r"(?<![a-z0-9])(?:x(\d{1,2})|(\d{1,2})x)(?!\d)", re.IGNORECASE)


@dataclass(frozen=True)
class UpscalerInfo:
    """One upscaler the user can pick: a built-in one (``path`` None) or a model file, and the folder it is in."""

    name: str
    path: Path | None = None
    folder: str | None = None  # the upscaler folder's name (ESRGAN, RealESRGAN, ..., upscale_models)

    @property
    def scale(self) -> int:
        """The scale its name says (what A1111 lists before the model is loaded), else 4."""
        match = _SCALE_IN_NAME.search(self.name)
        return int(match.group(1) or match.group(2)) if match and self.path is not None else DEFAULT_SCALE


def find_upscalers(folders: Iterable[Path]) -> list[UpscalerInfo]:
    """The built-in upscalers, then every model file under the folders (subfolders too), named by file stem; where
    two files share a stem the first folder's is listed."""
    found: dict[str, UpscalerInfo] = {name: UpscalerInfo(name) for name in BUILTIN}
    for folder in folders:
        for path in find_files(folder, UPSCALER_SUFFIXES) if folder.is_dir() else ():
            found.setdefault(path.stem, UpscalerInfo(path.stem, path, folder.name))
    return list(found.values())


def find_upscaler(upscalers: list[UpscalerInfo], name: str, field: str) -> UpscalerInfo:
    """The upscaler of that name in the list found on disk; UserError naming ``field`` for any other name."""
    for info in upscalers:
        if info.name == name:
            return info
    known = ", ".join(info.name for info in upscalers[:20])
    raise UserError(f"no upscaler named {name!r}; known upscalers: {known} (model files go in models/ESRGAN, "
                    "models/RealESRGAN, models/SwinIR, models/DAT, models/HAT or models/upscale_models)", field=field)
