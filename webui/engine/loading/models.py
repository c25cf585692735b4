"""Which checkpoints and VAEs exist, which one is loaded, and switching between them.

Names given by users (UI dropdowns, API fields, options) are only ever looked up in the lists
found on disk, so a name can never point outside the model folders.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.engine.families.base import FlowFamily
from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family
from webui.engine.loading.assemble import checkpoint_family, load_flow_model, load_gguf_unet_model
from webui.engine.loading.demo import DEMO_NAME
from webui.engine.formats.files import (
    CheckpointInfo,
    HashCache,
    checkpoint_kind,
    checkpoint_title,
    find_checkpoints,
    find_files,
    regular_files,
    short_hash,
)
from webui.engine.conditioning.t5_prompts import TOKENIZER_FOLDER
from webui.engine.loading.load import LoadedModel, load_model
from webui.engine.loading.modules import FIELD as MODULE_FIELD
from webui.engine.loading.modules import MODULE_SUFFIXES, ModuleFile, assign, identify
from webui.engine.memory.manager import MB, MemoryManager
from webui.engine.memory.model_cache import CachedModel, ModelCache, keep_limits
from webui.engine.memory.stream import param_bytes
from webui.engine.weights.fp8 import cast_weights_fp8
from webui.engine.weights.t5_storage import check_t5_storage, store_t5
from webui.errors import UserError

log = logging.getLogger(__name__)
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# Forge's "Diffusion in Low Bits" choices that this app supports: how the denoiser's weights are stored.
STORAGE_DTYPES = {"Automatic": None, "float8-e4m3fn": torch.float8_e4m3fn, "float8-e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Dtypes:
    """Compute dtypes: SD1/SD2/SDXL UNets, Flux/SD3 transformers (bf16 where the GPU has it: fp16 overflows
    there), and VAEs."""

    unet: torch.dtype
    flow: torch.dtype
    vae: torch.dtype


TITLE_RE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-f]{8,10})\]$")


class ModelManager:
    def __init__(self, checkpoint_dirs: list[Path], builtin_dir: Path, vae_dir: Path, text_encoder_dir: Path,
                 builtin_modules_dir: Path, hashes: HashCache, memory: MemoryManager, dtypes: Dtypes,
                 families: Families | None = None):
        self.checkpoint_dirs = checkpoint_dirs
        self.builtin_dir = builtin_dir
        self.vae_dir, self.text_encoder_dir, self.builtin_modules_dir = vae_dir, text_encoder_dir, builtin_modules_dir
        self.hashes = hashes
        self.memory, self.dtypes = memory, dtypes
        self.families = families or Families()
        self.current: LoadedModel | None = None
        self.current_sha256 = ""
        self.identity: tuple = ()
        self.cache = ModelCache()
        self._lock = threading.RLock()
        self._checkpoints: list[CheckpointInfo] = []
        self._given: list[CheckpointInfo] = []  # checkpoints named by path outside the folders (--ckpt)
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the folders: the user's checkpoints first, the built-in demo models last (the demo itself first
        of them: the default when the user has none)."""
        builtin = sorted(find_checkpoints([self.builtin_dir]), key=lambda info: info.name != DEMO_NAME)
        self._checkpoints = self._given + find_checkpoints(self.checkpoint_dirs) + builtin

    def add_checkpoint(self, path: Path) -> CheckpointInfo:
        """A checkpoint named by its path (A1111's --ckpt): the one found there when it is in a checkpoint folder,
        else listed first from now on, by its file name."""
        path = path.resolve()
        kind = checkpoint_kind(path) if path.exists() else None
        if kind is None:
            raise UserError(f"{path} is not a checkpoint (a .safetensors, .gguf, .ckpt or .pt file, or a diffusers "
                            "folder)", field="sd_model_checkpoint")
        found = next((info for info in self._checkpoints if info.path.resolve() == path), None)
        if found is None:
            found = CheckpointInfo(path.name, path, kind)
            self._given.append(found)
            self.refresh()
        return found

    def checkpoints(self) -> list[CheckpointInfo]:
        return list(self._checkpoints)

    def title(self, info: CheckpointInfo) -> str:
        return checkpoint_title(info, self.hashes.cached(info.path))

    def find(self, name: str) -> CheckpointInfo:
        """A checkpoint by name, title, file stem or short hash, as A1111 accepts them."""
        wanted = name.strip()
        match = TITLE_RE.match(wanted)
        bare = match.group("name") if match else wanted
        for info in self._checkpoints:
            title = self.title(info)
            if bare in (info.name, info.model_name, title) or wanted == title:
                return info
        if match or re.fullmatch(r"[0-9a-f]{10}", wanted):
            digest = match.group("hash") if match else wanted
            for info in self._checkpoints:
                sha = self.hashes.cached(info.path)
                if sha and short_hash(sha).startswith(digest):
                    return info
        known = ", ".join(c.name for c in self._checkpoints[:10]) or "none"
        raise UserError(f"no checkpoint named {name!r}; known checkpoints: {known}", field="sd_model_checkpoint")

    def default_checkpoint(self, preferred: str) -> CheckpointInfo:
        if preferred:
            try:
                return self.find(preferred)
            except UserError:
                log.warning("Checkpoint %r from settings not found; using another.", preferred)
        if not self._checkpoints:
            raise UserError("no checkpoints found: put a .safetensors model in models/Stable-diffusion",
                            field="sd_model_checkpoint")
        return self._checkpoints[0]

    def vaes(self) -> list[Path]:
        return find_files(self.vae_dir, VAE_SUFFIXES)

    def vae_name(self, path: Path) -> str:
        return path.relative_to(self.vae_dir).as_posix()

    def find_vae(self, name: str | None) -> Path | None:
        """None for "Automatic"/"None" (the checkpoint's own VAE), else a file found in the VAE folder."""
        if not name or name in ("Automatic", "None"):
            return None
        for path in self.vaes():
            if name in (self.vae_name(path), path.name, path.stem):
                return path
        known = ", ".join(self.vae_name(p) for p in self.vaes()[:10]) or "none"
        raise UserError(f"no VAE named {name!r}; known VAEs: {known}", field="sd_vae")

    def module_files(self) -> list[Path]:
        """Files for Forge's "VAE / Text Encoder" selector: the VAE folder's, the text encoder folder's, then the
        built-in ones (the demo's)."""
        return [path for folder in (self.vae_dir, self.text_encoder_dir, self.builtin_modules_dir)
                for path in find_files(folder, MODULE_SUFFIXES)]

    def module_name(self, path: Path) -> str:
        return path.name

    def find_modules(self, names: list[str]) -> dict[str, ModuleFile]:
        """The chosen VAE / text encoder files by role; only files found in the two folders can be named."""
        files = {self.module_name(p): p for p in self.module_files()}
        unknown = [n for n in names if n not in files]
        if unknown:
            known = ", ".join(list(files)[:10]) or "none"
            raise UserError(f"no VAE or text encoder file named {unknown[0]!r}; known: {known}", field=MODULE_FIELD)
        return assign([identify(files[n]) for n in dict.fromkeys(names)])

    def get(self, info: CheckpointInfo, vae_name: str | None, storage: str = "Automatic",
            module_names: tuple[str, ...] = (), use_t5: bool = True, t5_storage: str = "Automatic",
            keep: int = 1) -> LoadedModel:
        """The loaded model for this checkpoint, VAE, separate modules, denoiser storage ("Diffusion in Low
        Bits") and T5 storage: the current one, one kept from before (``keep``: the "sd_checkpoints_limit"
        option, models kept in memory), or loaded now."""
        vae_file = self.find_vae(vae_name)
        fp8 = STORAGE_DTYPES[storage]
        identity = self._identity(info, vae_name, storage, module_names, use_t5, t5_storage)
        with self._lock:
            if self.current is not None and self.identity == identity:
                return self.current
            modules = self.find_modules(list(module_names))
            family = checkpoint_family(info)
            if family is not None and isinstance(self.families[family], FlowFamily):  # before the model is let go
                check_t5_storage(t5_storage, self.memory.device)
            sha = self.hashes.sha256(info.path)
            key = (sha, *(_file_identity(f) for f in (vae_file, *(m.path for m in modules.values()))),
                   *identity[2:])
            self._set_current_aside()
            count, nbytes = keep_limits(keep)
            cached = self.cache.use(key)
            if cached is None:
                self.cache.evict(count - 1, nbytes, room=_file_identity(info.path)[1])
                model = self._load_new(info, family, vae_file, modules, use_t5, module_names, fp8, t5_storage, sha)
                cached = CachedModel(model, sum(param_bytes(m) for m in model.modules()))
                self.cache.add(key, cached)
            else:
                log.info("Switched to %s [%s], kept in memory (%d model(s) kept: %s)", info.name, short_hash(sha),
                         len(self.cache), ", ".join(self.cache.names()))
            self.current, self.current_sha256, self.identity = cached.model, sha, identity
            self.cache.evict(count, nbytes, keep=key)
            for name, module in self.current.components().items():
                self.memory.register(name, module)
            return self.current

    def loaded(self, info: CheckpointInfo, vae_name: str | None, storage: str = "Automatic",
               module_names: tuple[str, ...] = (), use_t5: bool = True,
               t5_storage: str = "Automatic") -> LoadedModel | None:
        """The current model if it is the one ``get`` would give for these arguments (else None: it would load or
        switch)."""
        identity = self._identity(info, vae_name, storage, module_names, use_t5, t5_storage)
        current = self.current
        return current if current is not None and self.identity == identity else None

    def _identity(self, info: CheckpointInfo, vae_name: str | None, storage: str, module_names: tuple[str, ...],
                  use_t5: bool, t5_storage: str) -> tuple:
        vae_file = self.find_vae(vae_name)
        return info, vae_file.name if vae_file else None, STORAGE_DTYPES[storage], tuple(module_names), use_t5, t5_storage

    def _load_new(self, info: CheckpointInfo, family: Family | None, vae_file: Path | None,
                  modules: dict[str, ModuleFile], use_t5: bool, module_names: tuple[str, ...],
                  fp8: torch.dtype | None, t5_storage: str, sha: str) -> LoadedModel:
        log.info("Loading %s [%s]%s", info.name, short_hash(sha), f" with VAE {vae_file.name}" if vae_file else "")
        model = self._load(info, family, vae_file, modules, use_t5)
        model.kind = self.families[model.family]
        model.module_names = list(dict.fromkeys(module_names))
        if fp8 is not None:
            saved = cast_weights_fp8(model.denoiser, fp8)
            log.info("Diffusion in Low Bits: denoiser weights stored as %s (%.0f MB saved)", fp8, saved / MB)
        if model.t5 is not None and t5_storage != "Automatic":
            saved = store_t5(model.t5.model, t5_storage, self.memory.device)
            log.info("T5 weights stored as %s (%.0f MB saved)", t5_storage, saved / MB)
        log.info("Loaded %s (%s, %.0f MB) into host memory in %.1f s", info.name, model.family.value,
                 sum(param_bytes(m) for m in model.modules()) / MB, model.load_seconds)
        return model

    def _set_current_aside(self) -> None:
        """The current model's weights back to host memory and out of the memory manager's hands; it stays in the
        cache (or leaves it, by the limit), its prompt cache emptied (those tensors may be on the device)."""
        if self.current is None:
            return
        self.memory.release_all()
        self.current.conditioning_cache = (None, None)
        self.current, self.current_sha256, self.identity = None, "", ()

    def _load(self, info: CheckpointInfo, family: Family | None, vae_file: Path | None,
              modules: dict[str, ModuleFile], use_t5: bool) -> LoadedModel:
        start = time.perf_counter()
        kind = self.families[family] if family is not None else None  # None: known once read (.ckpt, folders)
        # A VAE chosen for another family (Flux's 16-channel ae beside an SDXL checkpoint) is left out, as in Forge.
        if "vae" in modules and modules["vae"].width != (kind.latent_channels if kind else 4):
            del modules["vae"]
        if isinstance(kind, FlowFamily):
            sd_vae = identify(vae_file) if vae_file is not None and "vae" not in modules else None
            if sd_vae is not None and sd_vae.width == 16:
                modules["vae"] = sd_vae
            model = load_flow_model(info, kind, modules, self.dtypes.flow, self.dtypes.vae,
                                    [self.text_encoder_dir / TOKENIZER_FOLDER], use_t5)
        elif kind is not None and info.kind == "gguf":
            model = load_gguf_unet_model(info, kind, modules, vae_file, self.dtypes.unet, self.dtypes.vae)
        else:
            chosen_vae = modules["vae"].path if "vae" in modules else vae_file
            model = load_model(info, chosen_vae, self.dtypes.unet, self.dtypes.vae, self.families)
        model.load_seconds = time.perf_counter() - start
        return model

    def unload(self) -> None:
        """Let every model go, the current one and those kept (A1111's unload-checkpoint)."""
        with self._lock:
            self._set_current_aside()
            self.cache.clear()


def _file_identity(path: Path | None) -> tuple[str, int, int] | None:
    """A file (or a diffusers folder) as part of a fingerprint: its path, size and modification time."""
    if path is None:
        return None
    files = [path] if path.is_file() else list(regular_files(path))
    stats = [f.stat() for f in files]
    return str(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
