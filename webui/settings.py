"""The one settings store: launch flags, folders, and the user's options (config.json).

The UI and the API read and write the same ``Options`` object, so both make the same
decisions. Options are typed by their defaults; a wrong type is refused with the key's name.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from webui.errors import UserError

log = logging.getLogger(__name__)
_MISSING = object()  # an option with no stored value
INSTALL_CACHE = Path(__file__).resolve().parent.parent / ".cache"

OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": "",
    "sd_vae": "Automatic",
    "sd_checkpoints_limit": 0,  # models kept in memory; 0: automatic (up to 3, within half of the RAM)
    "CLIP_stop_at_last_layers": 1,
    "forge_inference_memory": 1024,
    # Streamed weights copied ahead on a side stream from page-locked memory: 10x the pageable, in-line copies
    # of Forge's defaults (Queue, CPU) on a small card (BENCHMARKS.md, issue 24). Pinning falls back to pageable
    # memory by itself where the system refuses it.
    "forge_async_loading": "Async",
    "forge_pin_shared_memory": "Shared",
    "forge_unet_storage_dtype": "Automatic",
    "forge_additional_modules": [],
    "sd3_enable_t5": True,
    "t5_storage_dtype": "Automatic",
    "sd3_shift": 3.0,
    "eta_ancestral": 1.0,  # the eta of ancestral and SDE samplers when a request gives none (A1111's)
    "eta_ddim": 0.0,  # DDIM's eta when a request gives none
    "samples_save": True,
    "samples_format": "png",
    "outdir_txt2img_samples": "",
    "outdir_img2img_samples": "",
    "img2img_fix_steps": False,  # img2img runs exactly the steps asked for (of a longer schedule), not strength x steps
    "initial_noise_multiplier": 1.0,  # img2img's starting noise times this (A1111's)
    "grid_save": True,
    "outdir_txt2img_grids": "",
    "outdir_img2img_grids": "",
    "live_previews_enable": True,
    "show_progress_every_n_steps": 1,
    "max_image_side": 4096,
    "max_steps": 150,
    "max_batch_size": 8,
    "max_batch_count": 100,
    "max_prompt_length": 20_000,
    "max_plot_cells": 1000,
    "max_queued_jobs": 100,
    "max_job_seconds": 0,  # 0: no limit
    "xyz_axis_numbering": "A1111",  # which list an X/Y/Z axis index sent to the API counts in
    "outdir_extras_samples": "",
    "ESRGAN_tile": 192,  # upscaler models run on tiles of this many pixels (0: the whole image at once)
    "ESRGAN_tile_overlap": 8,  # pixels the tiles overlap, blended so that no seam shows
    "dp_enabled": True,  # dynamic prompts and wildcards (sd-dynamic-prompts' option names)
    "dp_combinatorial": False,
    "cuda_graphs": True,  # --disable-cuda-graphs turns it off for a session
    "compile_denoiser": False,  # off until proven on every family (issue 26); --compile turns it on for a session
    "attention_backend": "SDPA",  # --attention sets it for a session
    "fp8_matrix_mult": False,  # --fast fp8_matrix_mult sets it for a session (ComfyUI's flag)
    "control_net_unit_count": 3,  # sd-webui-controlnet's name; read when the page is built
}
# A1111 options for things this app always does one way: listed (clients read and post back the whole store) and
# accepted at that value only, so that a request asking for another one is refused rather than quietly ignored.
FIXED_OPTIONS: dict[str, Any] = {
    "eta_noise_seed_delta": 0,
    "randn_source": "CPU",  # the initial noise comes from a CPU generator: the same image on any device
    "emphasis": "Original",
    "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False,
    "token_merging_ratio": 0.0,
}
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "forge_async_loading": ("Queue", "Async"),
    "forge_pin_shared_memory": ("CPU", "Shared"),
    "forge_unet_storage_dtype": ("Automatic", "float8-e4m3fn", "float8-e5m2"),
    "t5_storage_dtype": ("Automatic", "float8-e4m3fn", "float8-e5m2", "bnb-int8"),
    "samples_format": ("png",),
    "xyz_axis_numbering": ("A1111", "Forge"),
    "attention_backend": ("SDPA", "SageAttention", "FlashAttention"),  # webui.engine.attention.BACKENDS
}
OUTPUT_FOLDER_OPTIONS = {"outdir_txt2img_samples": "txt2img-images", "outdir_txt2img_grids": "txt2img-grids",
                         "outdir_img2img_grids": "img2img-grids",
                         "outdir_extras_samples": "extras-images",
                         "outdir_img2img_samples": "img2img-images"}
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "sd_checkpoints_limit": (0, 16),
    "CLIP_stop_at_last_layers": (1, 12),
    "forge_inference_memory": (0, 1 << 20),
    "sd3_shift": (0.1, 20.0),
    "eta_ancestral": (0.0, 1.0),
    "eta_ddim": (0.0, 1.0),
    "show_progress_every_n_steps": (1, 1000),
    "max_image_side": (64, 16384),
    "max_steps": (1, 1000),
    "max_batch_size": (1, 64),
    "max_batch_count": (1, 1000),
    "max_prompt_length": (100, 1_000_000),
    "max_plot_cells": (1, 100_000),
    "max_queued_jobs": (1, 10_000),
    "max_job_seconds": (0, 7 * 24 * 3600),
    "ESRGAN_tile": (0, 4096),
    "ESRGAN_tile_overlap": (0, 512),
    "initial_noise_multiplier": (0.0, 2.0),
    "control_net_unit_count": (1, 10),
}
# What one request may ask for: set in Settings or POST /options, never by a request's override_settings.
LIMIT_OPTIONS = {
    "max_image_side": "Largest width or height (pixels)",
    "max_steps": "Most sampling steps",
    "max_batch_size": "Largest batch size",
    "max_batch_count": "Largest batch count",
    "max_prompt_length": "Longest prompt or negative prompt (characters)",
    "max_plot_cells": "Most X/Y/Z plot cells",
    "max_queued_jobs": "Most jobs waiting in the queue (one more is refused as busy: the API's 503)",
    "max_job_seconds": "Longest a job may run, in seconds (0: no limit); then it is interrupted, what it made is kept",
}

# The Settings tab, by section: each option with its label. The others are on the model row and the txt2img tab.
OPTION_SECTIONS: dict[str, dict[str, str]] = {
    "Saving images": {
        "samples_save": "Always save all generated images",
        "samples_format": "File format for images",
        "outdir_txt2img_samples": "Folder for txt2img images, inside the outputs folder (empty: txt2img-images)",
        "grid_save": "Always save all generated image grids",
        "outdir_txt2img_grids": "Folder for txt2img grids, inside the outputs folder (empty: txt2img-grids)",
        "outdir_img2img_grids": "Folder for img2img grids, inside the outputs folder (empty: img2img-grids)",
        "outdir_extras_samples": "Folder for Extras images, inside the outputs folder (empty: extras-images)",
        "outdir_img2img_samples": "Folder for img2img images, inside the outputs folder (empty: img2img-images)",
    },
    "Live previews": {
        "live_previews_enable": "Show live previews of the created image",
        "show_progress_every_n_steps": "Live preview display period (in sampling steps)",
    },
    "img2img": {
        "img2img_fix_steps": "With img2img, do exactly the amount of steps the slider specifies (normally you'd do "
                             "less with less denoising)",
        "initial_noise_multiplier": "Noise multiplier for img2img",
    },
    "Upscaling": {
        "ESRGAN_tile": "Tile size for upscaler models, in pixels (0: no tiling)",
        "ESRGAN_tile_overlap": "Tile overlap for upscaler models, in pixels",
    },
    "Sampler parameters": {
        "eta_ancestral": "Eta for k-diffusion samplers (noise multiplier; ancestral and SDE samplers)",
        "eta_ddim": "Eta for DDIM (noise multiplier)",
    },
    "Dynamic prompts": {
        "dp_enabled": "Dynamic prompts: {a|b} variants and __wildcards__ from the wildcards folder, each image its own "
                      "prompt (off: the prompt as written)",
        "dp_combinatorial": "Combinatorial: every combination once, one image each (instead of a random pick for each "
                            "image from its seed)",
    },
    "Models and memory": {
        "sd_checkpoints_limit": "Checkpoints to keep in memory (0: as many as fit, up to 3, in half of the RAM)",
        "sd3_enable_t5": "Use the T5 text encoder of SD3.x checkpoints",
    },
    "Speed": {
        "cuda_graphs": "Replay the denoiser as a CUDA graph where its weights are all on the GPU (the same images, "
                       "far fewer kernel launches; each new size captures once)",
        "compile_denoiser": "Compile the denoiser (its repeated blocks, once; the first image waits for it; blocks "
                            "whose weights stream run eager)",
        "attention_backend": "Attention (SageAttention and FlashAttention where their package imports, on a CUDA GPU, "
                             "for the head sizes they take; else SDPA, said in the log)",
        "fp8_matrix_mult": "fp8 matrix multiplication for weights stored in float8-e4m3fn (GPUs with fp8 tensor "
                           "cores: compute capability 8.9 and up; slightly less exact than upcasting them)",
    },
    "ControlNet": {
        "control_net_unit_count": "ControlNet units in txt2img and img2img (after a restart; the API takes any number)",
    },
    "Limits (the API's too)": LIMIT_OPTIONS,
    "API": {
        "xyz_axis_numbering": "X/Y/Z plot axis numbers in script_args count in the list of (A1111: webuiapi and "
                              "A1111 scripts; Forge: Forge's, with Distilled CFG Scale 8th); names always work",
    },
}
# A1111 1.10's options with their defaults (names and values only): clients read them from GET /options (send_seed,
# samples_format...) and post them back. Options of this app's own replace them; the others are kept as given.
A1111_OPTIONS_FILE = Path(__file__).resolve().parent / "assets" / "a1111_options.json"
# Bounds on what the store keeps of options it does not know (A1111's, other clients'), so that no stored value can
# make reading the options fail or every save slow; a value beyond them is refused naming its key.
KEPT_KEY_CHARS = 200
KEPT_VALUE_CHARS = 10_000  # as JSON
KEPT_VALUE_DEPTH = 4  # lists and objects inside one another
KEPT_KEYS = 1_000
# Upscaler model folders under models/: A1111's, then Forge's (webui.engine.upscale lists their files).
# The upscaler folders under models/, and the A1111 flag that puts each elsewhere (--esrgan-models-path DIR ...)
UPSCALER_FOLDERS = {"ESRGAN": "esrgan_models_path", "RealESRGAN": "realesrgan_models_path",
                    "SwinIR": "swinir_models_path", "DAT": "dat_models_path", "HAT": None, "upscale_models": None}


@dataclass(frozen=True)
class Paths:
    data_dir: Path
    models_dir: Path
    checkpoint_dirs: tuple[Path, ...]
    lora_dir: Path
    controlnet_dir: Path
    controlnet_preprocessor_dir: Path
    clip_vision_dir: Path
    vae_dir: Path
    text_encoder_dir: Path
    outdir: Path
    builtin_models_dir: Path  # the demo checkpoints made at first start, shared by every --data-dir of the install
    builtin_modules_dir: Path  # the VAE and text encoder files its GGUF twin needs
    extensions_dir: Path
    styles_file: Path
    embeddings_dir: Path
    wildcards_dir: Path
    upscaler_dirs: tuple[Path, ...] = ()

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.json"

    @property
    def hash_cache_file(self) -> Path:
        return self.data_dir / "cache.json"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Paths:
        data = Path(args.data_dir).resolve()
        models = Path(args.models_dir or data / "models").resolve()
        ckpt_dirs = [models / "Stable-diffusion"] + ([Path(args.ckpt_dir).resolve()] if args.ckpt_dir else [])
        return cls(
            data_dir=data,
            models_dir=models,
            checkpoint_dirs=tuple(ckpt_dirs),
            lora_dir=Path(args.lora_dir or models / "Lora").resolve(),
            controlnet_dir=Path(args.controlnet_dir or models / "ControlNet").resolve(),
            controlnet_preprocessor_dir=Path(args.controlnet_preprocessor_models_dir
                                             or models / "ControlNetPreprocessor").resolve(),
            clip_vision_dir=(models / "clip_vision").resolve(),
            vae_dir=Path(args.vae_dir or models / "VAE").resolve(),
            text_encoder_dir=Path(args.text_encoder_dir or models / "text_encoder").resolve(),
            outdir=Path(args.outdir or data / "outputs").resolve(),
            builtin_models_dir=INSTALL_CACHE / "builtin-models",
            builtin_modules_dir=INSTALL_CACHE / "builtin-modules",
            extensions_dir=Path(args.extensions_dir or data / "extensions").resolve(),
            styles_file=Path(args.styles_file or data / "styles.csv").resolve(),
            embeddings_dir=Path(args.embeddings_dir or data / "embeddings").resolve(),
            wildcards_dir=Path(args.wildcards_dir or data / "wildcards").resolve(),
            upscaler_dirs=tuple(Path((flag and getattr(args, flag)) or models / name).resolve()
                                for name, flag in UPSCALER_FOLDERS.items()),
        )

    def output_folder(self, key: str, value: str, default: str) -> Path:
        """Where images go for an output-folder option: its value (relative: inside the outputs folder) or
        ``default``. It must stay inside the outputs folder, so that no request can write elsewhere."""
        try:
            folder = (self.outdir / (value or default)).resolve()
        except (ValueError, OSError) as e:  # a NUL in the name, a name too long for the file system
            raise UserError(f"is not a usable folder name ({e}), got {value!r}", field=key) from None
        if any(len(part.encode()) > 255 for part in folder.parts):
            raise UserError("has a folder name longer than 255 bytes, which no file system takes", field=key)
        if not folder.is_relative_to(self.outdir):
            raise UserError(f"must be a folder inside {self.outdir} (start with --outdir to save elsewhere), "
                            f"got {value!r}", field=key)
        return folder

    def create(self) -> None:
        for folder in (*self.checkpoint_dirs[:1], self.lora_dir, self.vae_dir, self.text_encoder_dir, self.outdir):
            folder.mkdir(parents=True, exist_ok=True)


class Options:
    """User options persisted to config.json; thread-safe; listeners hear every change.

    Extensions add their own options with ``register``; they are checked and saved like the built-in ones.
    """

    def __init__(self, path: Path | None, checks: dict[str, Callable[[Any], Any]] | None = None):
        """``checks``: more tests for some options' values (raising UserError), beyond type, range and choices."""
        self.path = path
        self._checks = dict(checks or {})
        self._defaults = {**OPTION_DEFAULTS, **FIXED_OPTIONS}
        self._choices = dict(OPTION_CHOICES)
        self._a1111 = json.loads(A1111_OPTIONS_FILE.read_text(encoding="utf-8"))
        self._values = {**self._a1111, **self._defaults}
        self._beneath: dict[str, Any] = {}  # the stored values of options overridden now (what a save writes)
        self._lock = threading.RLock()
        self.problems: list[str] = []  # what went wrong reading config.json, for the UI to show
        if path is not None:
            self._temp_path.unlink(missing_ok=True)  # a save cut short; config.json is intact
            if path.exists():
                self._load(path)

    def _load(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            backup = path.with_suffix(".json.bad")
            shutil.copyfile(path, backup)
            problem = f"{path} is corrupt ({e}); a copy is kept as {backup.name} and the defaults are in use."
            log.error(problem)
            self.problems.append(problem)
            return
        for key, value in stored.items():
            try:
                self._store(key, self._checked(key, value))
            except UserError as e:
                log.warning("config.json: ignoring %s", e)
                self.problems.append(f"config.json: {key} ignored ({e.message}); its default is in use.")

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def knows(self, key: str) -> bool:
        """Whether ``key`` is an option of this app or of a loaded extension (others are only kept)."""
        with self._lock:
            return key in self._defaults

    def checked(self, changes: dict[str, Any]) -> dict[str, Any]:
        """The values as they would be stored; UserError naming the first bad one. Nothing is changed. A null for
        an option this app does not know asks for its default: A1111's, or none (the key is removed: _MISSING)."""
        with self._lock:
            checked = {key: self._checked(key, value) for key, value in changes.items()}
            kept = {k for k in self._values if k not in self._defaults} | {
                k for k, v in checked.items() if k not in self._defaults and v is not _MISSING}
            if len(kept) > KEPT_KEYS:
                new = next(k for k in checked if k not in self._values and k not in self._defaults)
                raise UserError(f"the store keeps at most {KEPT_KEYS} options this app does not use; send null for "
                                "some to remove them first", field=new)
            return checked

    def update(self, changes: dict[str, Any]) -> None:
        """Set several options at once: all are checked before any is applied, then saved — all or nothing: when the
        save fails, nothing changes in memory either."""
        with self._lock:
            checked = self.checked(changes)
            before, beneath = dict(self._values), dict(self._beneath)
            for key, value in checked.items():
                self._store(key, value)
            self._beneath.update({k: v for k, v in checked.items() if k in self._beneath})
            try:
                self.save()
            except OSError as e:
                self._values, self._beneath = before, beneath
                raise OSError(f"the settings could not be saved to {self.path} ({e.strerror or e}); nothing was "
                              "changed") from e

    @contextmanager
    def overridden(self, changes: dict[str, Any]) -> Iterator[None]:
        """Options set for the duration of a block (one X/Y/Z cell, a request's override_settings, --ckpt): checked
        like any change, never saved (a save meanwhile writes the values beneath), and put back afterwards. A value
        stored meanwhile (update) is the one put back."""
        if not changes:
            yield
            return
        with self._lock:
            checked = self.checked(changes)
            previous = {key: self._values.get(key, _MISSING) for key in checked}
            outermost = [key for key in checked if key not in self._beneath]
            self._beneath.update({key: previous[key] for key in outermost})
            for key, value in checked.items():
                self._store(key, value)
        try:
            yield
        finally:
            with self._lock:
                for key in checked:
                    self._store(key, self._beneath.pop(key) if key in outermost else previous[key])

    def register(self, key: str, default: Any, choices: Sequence[str] | None = None) -> None:
        """Add an option at run time, typed by its default (true/false, whole number, number, text or a list of
        names), limited to ``choices`` when given. A value config.json already holds is kept if it passes."""
        if not isinstance(default, (bool, int, float, str, list)):
            raise ValueError(f"option {key!r}: the default must be a bool, int, float, str or list, not {default!r}")
        with self._lock:
            if key in self._defaults:
                raise ValueError(f"option {key!r} already exists")
            self._defaults[key] = default
            if choices is not None:
                self._choices[key] = tuple(choices)
            try:
                self._checked(key, default)
            except UserError as e:
                del self._defaults[key]
                self._choices.pop(key, None)
                raise ValueError(f"the default does not fit the option: {e}") from None
            try:
                self._values[key] = self._checked(key, self._values.get(key, default))
            except UserError as e:
                log.warning("config.json: ignoring %s", e)
                self._values[key] = default

    def choices(self, key: str) -> tuple[str, ...] | None:
        """The values an option is limited to; None: any value of its type."""
        return self._choices.get(key)

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            tmp = self._temp_path
            stored = {**self._values, **self._beneath}
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({k: v for k, v in stored.items() if v is not _MISSING}, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError:
                tmp.unlink(missing_ok=True)  # config.json keeps what it had
                raise

    def _store(self, key: str, value: Any) -> None:
        """Set an option's value in memory; _MISSING removes the key."""
        if value is _MISSING:
            self._values.pop(key, None)
        else:
            self._values[key] = value

    def _kept(self, key: str, value: Any) -> Any:
        """An option this app does not know (A1111 clients', an extension's not loaded now), kept as given within
        bounds; null asks for A1111's default, or for the key to go."""
        if len(key) > KEPT_KEY_CHARS:
            raise UserError(f"an option name is at most {KEPT_KEY_CHARS} characters, got {len(key)}", field=key[:80])
        if value is None:
            return self._a1111.get(key, _MISSING)
        if _depth(value) > KEPT_VALUE_DEPTH:
            raise UserError(f"this app keeps options it does not use only {KEPT_VALUE_DEPTH} lists or objects deep",
                            field=key)
        size = len(json.dumps(value))
        if size > KEPT_VALUE_CHARS:
            raise UserError(f"this app keeps options it does not use only up to {KEPT_VALUE_CHARS} characters of "
                            f"JSON, got {size}", field=key)
        return value

    @property
    def _temp_path(self) -> Path:
        return self.path.with_suffix(".json.tmp")

    def _checked(self, key: str, value: Any) -> Any:
        if key not in self._defaults:
            return self._kept(key, value)
        if key in FIXED_OPTIONS:
            fixed = FIXED_OPTIONS[key]
            if value != fixed or isinstance(value, bool) != isinstance(fixed, bool):
                raise UserError(f"this app always works with {key}={fixed!r}; it cannot do {value!r}", field=key)
            return fixed
        default = self._defaults[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"must be true or false, got {value!r}", field=key)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise UserError(f"must be a whole number, got {value!r}", field=key)
            value = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"must be a number, got {value!r}", field=key)
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise UserError(f"must be text, got {value!r}", field=key)
        elif isinstance(default, list):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"must be a list of names, got {value!r}", field=key)
            value = list(value)
        if key in OPTION_RANGES:
            low, high = OPTION_RANGES[key]
            if not low <= value <= high:
                raise UserError(f"must be between {low} and {high}, got {value}", field=key)
        if key in self._checks:
            self._checks[key](value)
        choices = self._choices.get(key)
        if choices is not None and not all(v in choices for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"must be one of {', '.join(choices)}, got {value!r}", field=key)
        return value


def _depth(value: Any) -> int:
    """How many lists or objects deep a JSON value is (iteratively: a hostile value cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth + 1)
            if deepest > KEPT_VALUE_DEPTH:
                return deepest
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@dataclass
class AppConfig:
    """What the process was started with: flags, folders and the options store."""

    args: argparse.Namespace
    paths: Paths
    options: Options

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AppConfig:
        paths = Paths.from_args(args)
        paths.data_dir.mkdir(parents=True, exist_ok=True)
        paths.create()
        checks = {key: partial(paths.output_folder, key, default=default)
                  for key, default in OUTPUT_FOLDER_OPTIONS.items()}  # no request may write elsewhere
        return cls(args, paths, Options(paths.config_file, checks))
