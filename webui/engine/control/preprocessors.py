"""ControlNet preprocessors (sd-webui-controlnet's "modules"), by the names and labels that extension and Forge give
them: the detectors of controlnet_aux, and a few image operations it has no class for (invert, tile, blur, XDoG
scribble, threshold, recolor). Detectors that need weights read them from the preprocessor folder (Forge's
``models/ControlNetPreprocessor``; any subfolder, as Forge's ``hed/``, ``openpose/`` … or a flat copy of
lllyasviel/Annotators); nothing is downloaded: a missing file is a message naming it and the folder.

Every preprocessor takes an RGB array (H, W, 3, uint8) and gives one; ``resolution`` is the short side it detects
at (A1111's "Preprocessor Resolution"), ``a`` and ``b`` its two sliders ("Threshold A/B" in the API)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image

from webui.errors import UserError

Detect = Callable[[np.ndarray, int, float, float, Any], np.ndarray]  # image, resolution, a, b, loaded detector


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's settings, as sd-webui-controlnet describes it in ``/controlnet/module_list``."""

    label: str
    value: float
    minimum: float
    maximum: float
    step: float = 1.0

    def api(self) -> dict:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
MAX_RESOLUTION = 4096  # a processor_res beyond this is refused (an API client's slip, not a drawing)


@dataclass(frozen=True)
class Preprocessor:
    """``files``: weight files the detector reads (none: it runs on any install); ``load(folder, files)`` makes
    the controlnet_aux detector from them. ``seeded``: it draws random numbers (shuffle), seeded by the job."""

    name: str
    label: str
    detect: Detect
    resolution: bool = True
    sliders: tuple[Slider, ...] = ()
    files: tuple[str, ...] = ()
    load: Callable[[dict[str, Path]], Any] | None = None
    seeded: bool = False

    def settings(self) -> list[dict]:
        return [s.api() for s in ((RESOLUTION,) if self.resolution else ()) + self.sliders]

    def chosen(self, resolution: int | None, a: float | None, b: float | None) -> tuple[int, float, float]:
        """The resolution and sliders a detection uses: those given, each one left unset (None, or negative as
        sd-webui-controlnet's -1) its default; -1 for what this preprocessor does not have."""
        unset = [value is None or value < 0 for value in (resolution, a, b)]
        defaults = [RESOLUTION.value if self.resolution else -1] + [s.value for s in self.sliders] + [-1, -1]
        used = [default if unset[i] or default == -1 else given
                for i, (given, default) in enumerate(zip((resolution, a, b), defaults))]
        return int(used[0]), used[1], used[2]


def _aux(name: str) -> Any:
    """A controlnet_aux detector class (imported when first used: the package imports all its detectors, and says
    so for the optional ones it cannot, mediapipe's among them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux
    return getattr(controlnet_aux, name)


def _sized(image: np.ndarray, resolution: int) -> np.ndarray:
    from controlnet_aux.util import resize_image
    return resize_image(image, resolution)


def _gray3(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _canny(image, resolution, a, b, _):
    return np.asarray(_aux("CannyDetector")()(image, int(a), int(b), resolution, resolution, output_type="np"))


def _lineart_standard(image, resolution, a, b, _):
    found = _aux("LineartStandardDetector")()(image, detect_resolution=resolution, output_type="np")
    return np.asarray(found)


def _shuffle(image, resolution, a, b, _):
    return np.asarray(_aux("ContentShuffleDetector")()(image, detect_resolution=resolution,
                                                       image_resolution=resolution, output_type="np"))


def _invert(image, resolution, a, b, _):
    return 255 - image


def _tile(image, resolution, a, b, _):
    """A1111's tile_resample: the picture made smaller by the down-sampling rate (the ControlNet sees its blur)."""
    height, width = image.shape[:2]
    rate = max(a, 1e-3)
    return cv2.resize(image, (max(1, round(width / rate)), max(1, round(height / rate))),
                      interpolation=cv2.INTER_AREA)


def _blur(image, resolution, a, b, _):
    return cv2.GaussianBlur(_sized(image, resolution), (0, 0), max(a, 0.01))


def _xdog(image, resolution, a, b, _):
    """A scribble from a picture: where a narrow blur differs from a wide one by more than the threshold (the
    difference of Gaussians), white lines on black."""
    picture = _sized(image, resolution).astype(np.float32)
    narrow, wide = cv2.GaussianBlur(picture, (0, 0), 0.5), cv2.GaussianBlur(picture, (0, 0), 5.0)
    lines = np.min(wide - narrow, axis=2) * 2 > a
    return _gray3(lines * 255.0)


def _threshold(image, resolution, a, b, _):
    picture = _sized(image, resolution)
    return _gray3((picture.mean(axis=2) > a) * 255.0)


def _recolor(channel: Callable[[np.ndarray], np.ndarray]) -> Detect:
    """A recolor preprocessor: one brightness channel, gamma-corrected, as a grey picture to colour again."""
    def detect(image, resolution, a, b, _):
        level = channel(_sized(image, resolution)).astype(np.float32) / 255.0
        return _gray3(np.power(level, max(a, 1e-3)) * 255.0)
    return detect


def _run(**fixed) -> Detect:
    """A loaded controlnet_aux detector, called at the resolution with ``fixed`` keyword arguments."""
    def detect(image, resolution, a, b, detector):
        found = detector(image, detect_resolution=resolution, image_resolution=resolution, output_type="np", **fixed)
        return np.asarray(found)
    return detect


def _mlsd(image, resolution, a, b, detector):
    return np.asarray(detector(image, thr_v=a, thr_d=b, detect_resolution=resolution, image_resolution=resolution,
                               output_type="np"))


def _loader(cls: str, *keywords: str) -> Callable[[dict[str, Path]], Any]:
    """``cls.from_pretrained`` on the files found: the first file's folder, each file given by its full path (which
    the folder joined to it leaves as it is), so that the files may lie in different subfolders."""
    def load(files: dict[str, Path]) -> Any:
        paths = list(files.values())
        return _aux(cls).from_pretrained(str(paths[0].parent), **{k: str(p) for k, p in zip(keywords, paths)})
    return load


HED = ("ControlNetHED.pth",)
PIDINET = ("table5_pidinet.pth",)
LINEART = ("sk_model.pth", "sk_model2.pth")
OPENPOSE = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
LOAD_HED, LOAD_PIDINET = _loader("HEDdetector", "filename"), _loader("PidiNetDetector", "filename")
LOAD_LINEART = _loader("LineartDetector", "filename", "coarse_filename")
LOAD_OPENPOSE = _loader("OpenposeDetector", "filename", "hand_filename", "face_filename")
GAMMA = Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001)


def _openpose(label: str, **parts) -> Preprocessor:
    return Preprocessor(label, label, _run(**parts), files=OPENPOSE, load=LOAD_OPENPOSE)


PREPROCESSORS: tuple[Preprocessor, ...] = (
    Preprocessor("none", "none", lambda image, *_: image, resolution=False),
    Preprocessor("canny", "canny", _canny, sliders=(Slider("Low Threshold", 100, 1, 255),
                                                    Slider("High Threshold", 200, 1, 255))),
    Preprocessor("invert", "invert (from white bg & black line)", _invert, resolution=False),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _lineart_standard),
    Preprocessor("shuffle", "shuffle", _shuffle, seeded=True),
    Preprocessor("tile_resample", "tile_resample", _tile, resolution=False,
                 sliders=(Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01),)),
    Preprocessor("blur_gaussian", "blur_gaussian", _blur, sliders=(Slider("Sigma", 9.0, 0.01, 64.0, 0.01),)),
    Preprocessor("scribble_xdog", "scribble_xdog", _xdog, sliders=(Slider("XDoG Threshold", 32, 1, 64),)),
    Preprocessor("threshold", "threshold", _threshold, sliders=(Slider("Binarization Threshold", 127, 0, 255),)),
    Preprocessor("recolor_luminance", "recolor_luminance",
                 _recolor(lambda image: cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 0]), sliders=(GAMMA,)),
    Preprocessor("recolor_intensity", "recolor_intensity",
                 _recolor(lambda image: cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 2]), sliders=(GAMMA,)),
    Preprocessor("hed", "softedge_hed", _run(), files=HED, load=LOAD_HED),
    Preprocessor("hed_safe", "softedge_hedsafe", _run(safe=True), files=HED, load=LOAD_HED),
    Preprocessor("scribble_hed", "scribble_hed", _run(scribble=True), files=HED, load=LOAD_HED),
    Preprocessor("pidinet", "softedge_pidinet", _run(), files=PIDINET, load=LOAD_PIDINET),
    Preprocessor("pidinet_safe", "softedge_pidisafe", _run(safe=True), files=PIDINET, load=LOAD_PIDINET),
    Preprocessor("pidinet_scribble", "scribble_pidinet", _run(scribble=True), files=PIDINET, load=LOAD_PIDINET),
    Preprocessor("lineart", "lineart_realistic", _run(), files=LINEART, load=LOAD_LINEART),
    Preprocessor("lineart_coarse", "lineart_coarse", _run(coarse=True), files=LINEART, load=LOAD_LINEART),
    Preprocessor("lineart_anime", "lineart_anime", _run(), files=("netG.pth",),
                 load=_loader("LineartAnimeDetector", "filename")),
    Preprocessor("mlsd", "mlsd", _mlsd, files=("mlsd_large_512_fp32.pth",), load=_loader("MLSDdetector", "filename"),
                 sliders=(Slider("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01),
                          Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01))),
    Preprocessor("depth", "depth_midas", _run(), files=("dpt_hybrid-midas-501f0c75.pt",),
                 load=_loader("MidasDetector", "filename")),
    _openpose("openpose"),
    _openpose("openpose_hand", include_hand=True),
    _openpose("openpose_face", include_face=True),
    _openpose("openpose_faceonly", include_body=False, include_face=True),
    _openpose("openpose_full", include_hand=True, include_face=True),
    # IP-Adapter units' "preprocessors": the picture as it is; the CLIP vision encoder the adapter needs encodes it
    *(Preprocessor(name, label, lambda image, *_: image, resolution=False) for name, label in (
        ("ip-adapter_clip_sd15", "ip-adapter_clip_h"), ("ip-adapter_clip_sdxl", "ip-adapter_clip_g"),
        ("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith"), ("ip-adapter-auto", "ip-adapter-auto"))),
)


def find_preprocessor(name: Any, field: str) -> Preprocessor:
    """A preprocessor by the name or label a client sends (any case; "None" too); a UserError listing them."""
    wanted = str(name or "none").strip().lower()
    for preprocessor in PREPROCESSORS:
        if wanted in (preprocessor.name.lower(), preprocessor.label.lower()):
            return preprocessor
    raise UserError(f"no preprocessor {name!r}; there are: {', '.join(p.name for p in PREPROCESSORS)}", field=field)


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, outer_fit: bool) -> int:
    """sd-webui-controlnet's "Pixel Perfect": the detect resolution at which the control image, resized as the unit's
    resize mode will resize it, keeps one detected pixel per generated pixel."""
    scales = height / image.height, width / image.width
    scale = min(scales) if outer_fit else max(scales)
    return max(RESOLUTION.minimum, round(scale * min(image.size)))


def weight_files(preprocessor: Preprocessor, folder: Path, field: str) -> dict[str, Path]:
    """The preprocessor's weight files, each found anywhere under ``folder``; a UserError naming the missing ones."""
    found = {}
    for name in preprocessor.files:
        path = next(iter(sorted(folder.rglob(name))), None) if folder.is_dir() else None
        if path is None:
            missing = [n for n in preprocessor.files if not (folder.is_dir() and any(folder.rglob(n)))]
            raise UserError(f"preprocessor {preprocessor.label} needs {', '.join(missing)} in {folder} (any "
                            "subfolder; lllyasviel/Annotators has them): nothing is downloaded here", field=field)
        found[name] = path
    return found


def as_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def checked_resolution(value: Any, field: str) -> int | None:
    """A processor_res: None where unset (-1 or less), else a whole number of pixels within reason."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            RESOLUTION.minimum <= value <= MAX_RESOLUTION):
        raise UserError(f"must be -1 (the preprocessor's default) or {RESOLUTION.minimum:.0f} to {MAX_RESOLUTION} "
                        f"pixels, got {value!r}", field=field)
    return int(value)
