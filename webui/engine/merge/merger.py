"""A1111's checkpoint merger: two or three checkpoints of one family merged tensor by tensor, a VAE and LoRAs baked in,
written as safetensors (fp16, bf16 or fp32) or as GGUF.

Methods, as A1111's: *Weighted sum* A·(1−M) + B·M, *Add difference* A + (B − C)·M, *No interpolation* A alone (to
bake a VAE or LoRAs, change the precision, convert to GGUF, or drop weights). Every tensor is read from the files
(read, not memory-mapped), merged in float32, its LoRA updates added (``bake``), and written at once
(``streamed``), so a merge holds a few tensors in memory, not the checkpoints: two SDXL files merge in far less
memory than one takes (BENCHMARKS.md). Tensors only the primary has are kept as they are; an inpainting (or instruct-pix2pix) primary's
wider first convolution is merged over the channels the other has, as A1111 does. Integer tensors (position ids)
are the primary's.

A GGUF result is the denoiser, quantized (``gguf_type``), with the VAE and text encoders of an SD1.x/SDXL
checkpoint written beside it as files of models/VAE and models/text_encoder, named after it, as the app's GGUF
checkpoints take them.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q
from webui.engine.formats.detect import SD1_CLIP, SDXL_CLIP_L, SDXL_OPENCLIP, UNET, Family, detect_family, infer_arch
from webui.engine.formats.files import TensorInfo, read_safetensors_header
from webui.engine.merge.bake import Update, lora_updates
from webui.engine.merge.streamed import TORCH_DTYPES, TensorReader, write_safetensors
from webui.engine.progress import Progress
from webui.engine.weights.gguf_load import SHAPE_FIX_ARCHS, quantize_where_possible, write_gguf
from webui.errors import ModelFileError, UserError

METHODS = ("No interpolation", "Weighted sum", "Add difference")  # A1111's, in its order
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("safetensors", "gguf")
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "F16")
VAE_PREFIXES = ("first_stage_model.", "vae.")
GGUF_ARCHS = {Family.SD1: "sd1", Family.SDXL: "sdxl", Family.FLUX: "flux"}
# The parts of an SD checkpoint a GGUF's denoiser needs beside it: (prefix in the checkpoint, folder, file suffix)
GGUF_MODULES = {Family.SD1: ((SD1_CLIP, "text_encoder", "clip_l"),),
                Family.SDXL: ((SDXL_CLIP_L, "text_encoder", "clip_l"), (SDXL_OPENCLIP, "text_encoder", "clip_g"))}


@dataclass(frozen=True)
class MergeRequest:
    """What to merge and how (the API's fields are A1111's names for them)."""

    primary: str
    secondary: str | None = None
    tertiary: str | None = None
    method: str = "Weighted sum"
    multiplier: float = 0.3
    precision: str = "fp16"  # of the float tensors: fp16, bf16 or fp32
    file_format: str = "safetensors"  # or "gguf"
    gguf_type: str = "Q8_0"
    bake_in_vae: str | None = None  # a file of models/VAE
    loras: tuple[tuple[str, float], ...] = ()  # LoRAs baked in, by name, with their weights
    custom_name: str = ""
    discard_weights: str = ""  # a regular expression: the tensors whose names match are left out
    overwrite: bool = False

    def checked(self) -> MergeRequest:
        """UserError naming the first field that cannot be honoured."""
        for name, value, allowed in (("method", self.method, METHODS), ("precision", self.precision, PRECISIONS),
                                     ("file_format", self.file_format, FORMATS),
                                     ("gguf_type", self.gguf_type, GGUF_TYPES)):
            if value not in allowed:
                raise UserError(f"must be one of {', '.join(allowed)}, got {value!r}", field=name)
        if self.method != "No interpolation" and not self.secondary:
            raise UserError(f"{self.method} needs a secondary checkpoint (B)", field="secondary")
        if self.method == "Add difference" and not self.tertiary:
            raise UserError("Add difference needs a tertiary checkpoint (C): A + (B - C) x M", field="tertiary")
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) \
                or not -1 <= self.multiplier <= 2:
            raise UserError(f"must be a number from -1 to 2, got {self.multiplier!r}", field="multiplier")
        if re.search(r"[/\\]|^\.|\.\.", self.custom_name.strip()):
            raise UserError("a file name, without folders", field="custom_name")
        try:
            re.compile(self.discard_weights)
        except re.error as e:
            raise UserError(f"is not a regular expression: {e}", field="discard_weights") from None
        for name, weight in self.loras:
            if not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise UserError(f"{name}: the weight must be a number, got {weight!r}", field="loras")
        return self

    @property
    def sources(self) -> list[str]:
        """The checkpoints the method reads: A, then B and C as it uses them."""
        used = {"No interpolation": 1, "Weighted sum": 2, "Add difference": 3}[self.method]
        return [name for name in (self.primary, self.secondary, self.tertiary)[:used] if name]


@dataclass(frozen=True)
class MergeInputs:
    """The request's files, found: the checkpoints it reads, a VAE, LoRAs with weights, and where results go."""

    checkpoints: list[Path]
    vae: Path | None
    loras: list[tuple[Path, float]]
    checkpoint_dir: Path
    vae_dir: Path
    text_encoder_dir: Path


@dataclass
class MergeResult:
    paths: list[Path]  # the checkpoint first (a GGUF's module files after it)
    family: Family
    tensors: int
    seconds: float
    largest_tensor_mb: float  # the merge's working set is a few tensors of this size, not the checkpoints
    notices: list[str] = field(default_factory=list)


def merge_checkpoints(request: MergeRequest, inputs: MergeInputs, progress: Progress) -> MergeResult:
    """Merge as ``request`` says (checked first, then every input's header, before any tensor is read)."""
    start = time.monotonic()
    headers = [_header(path) for path in inputs.checkpoints]
    family = _one_family(inputs.checkpoints, headers)
    primary_infos, primary_meta = headers[0]
    notices: list[str] = []
    updates = lora_updates(inputs.loras, infer_arch(primary_infos, primary_meta), primary_infos) if inputs.loras \
        else {}
    discard = re.compile(request.discard_weights) if request.discard_weights else None
    keys = [key for key in primary_infos if not (discard and discard.search(key))]
    vae_keys, vae_path = _vae(inputs.vae, primary_infos) if inputs.vae else ({}, None)
    outputs = _outputs(request, inputs, family, keys, vae_keys)
    merged_away = sum(1 for key in keys if all(key in infos for infos, _ in headers[1:]))
    if len(headers) > 1 and merged_away < len(keys):
        notices.append(f"{len(keys) - merged_away} tensors only the primary has are kept as they are")
    dtype = PRECISIONS[request.precision]
    largest = max((math.prod(info.shape) * 4 for info in primary_infos.values()), default=0)  # float32
    with ExitStack() as stack:
        files = [stack.enter_context(TensorReader(path)) for path in inputs.checkpoints]
        vae_file = stack.enter_context(TensorReader(vae_path)) if vae_path else None
        done = 0
        progress.begin("Merging checkpoints", 1, len(keys))

        def tensor(key: str) -> torch.Tensor:
            nonlocal done
            if progress.interrupted:
                raise UserError("the merge was interrupted: nothing was written")
            value = vae_file.get_tensor(vae_keys[key]) if key in vae_keys else \
                _merged(request, key, files, headers, updates.get(key, ()))
            done += 1
            progress.step(done, None, family)
            return value

        try:
            for output in outputs:
                output.write(tensor, primary_infos, dtype, _metadata(request, inputs, primary_meta, output.path))
        finally:
            progress.end()
    return MergeResult([o.path for o in outputs], family, done, time.monotonic() - start, largest / 2**20, notices)


def lora_entry(entry: object) -> tuple[str, float]:
    """ "name:weight" (or a name: weight 1), as a prompt's tag gives them; UserError naming "loras" otherwise."""
    if not isinstance(entry, str) or not entry.strip():
        raise UserError(f'each LoRA is "name:weight", got {entry!r}', field="loras")
    name, _, weight = entry.strip().rpartition(":") if ":" in entry else (entry.strip(), "", "1")
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise UserError(f'{entry!r}: the weight after ":" must be a number', field="loras") from None


def _header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise UserError(f"{path.name}: the merger reads .safetensors checkpoints (convert a .ckpt with No "
                        "interpolation in A1111, or pick its .safetensors)", field="primary")
    try:
        return read_safetensors_header(path)
    except ModelFileError as e:
        raise UserError(e.message, field="primary") from e


def _one_family(paths: list[Path], headers: list[tuple[dict, dict]]) -> Family:
    families = []
    for path, (infos, metadata) in zip(paths, headers):
        try:
            families.append(detect_family(infos, metadata))
        except ModelFileError as e:
            raise UserError(f"{path.name}: {e.message}", field="primary") from e
    if len(set(families)) > 1:
        named = ", ".join(f"{path.name} is {family.value}" for path, family in zip(paths, families))
        raise UserError(f"a merge needs checkpoints of one family: {named}", field="secondary")
    return families[0]


def _merged(request: MergeRequest, key: str, files: list, headers: list[tuple[dict, dict]],
            updates: tuple[Update, ...] | list[Update]) -> torch.Tensor:
    """One tensor of the result, in float32 (an integer one as the primary has it)."""
    a = files[0].get_tensor(key)
    if not a.is_floating_point():
        return a
    a = a.float()
    others = [f.get_tensor(key).float() if key in infos else None for f, (infos, _) in zip(files[1:], headers[1:])]
    if all(other is not None for other in others) and others:
        region = _common_region(key, a, others)
        b = others[0]
        if request.method == "Weighted sum":
            a[region] = a[region] * (1 - request.multiplier) + b * request.multiplier
        elif request.method == "Add difference":
            a[region] = a[region] + (b - others[1]) * request.multiplier
    for update in updates:
        update.apply(a)
    return a


def _common_region(key: str, a: torch.Tensor, others: list[torch.Tensor]) -> tuple:
    """Where the others' values go in the primary's tensor: all of it (a scalar's too), or an inpainting
    (instruct-pix2pix) primary's first convolution's channels the others have."""
    region: tuple = (Ellipsis,)
    for other in others:
        if other.shape == a.shape:
            continue
        if a.dim() == 4 and other.dim() == 4 and a.shape[0] == other.shape[0] and a.shape[2:] == other.shape[2:]:
            if a.shape[1] < other.shape[1]:
                raise UserError("merging an inpainting (or instruct-pix2pix) checkpoint with a plain one: the primary "
                                "(A) must be the inpainting one", field="primary")
            region = (slice(None), slice(0, other.shape[1]))
            continue
        raise UserError(f"tensor {key} is {list(a.shape)} in the primary and {list(other.shape)} in another: these "
                        "checkpoints are different variants and cannot be merged", field="secondary")
    return region


def _vae(path: Path, primary: dict[str, TensorInfo]) -> tuple[dict[str, str], Path]:
    """The checkpoint's VAE keys, each with the VAE file's tensor that replaces it (an LDM-named VAE, as A1111's)."""
    prefix = next((p for p in VAE_PREFIXES if f"{p}encoder.conv_in.weight" in primary), None)
    infos, _ = _header(path)
    bare = {key.removeprefix("first_stage_model."): key for key in infos}
    if prefix is None or "encoder.conv_in.weight" not in bare:
        raise UserError(f"{path.name} is no VAE in A1111's (LDM) layout for this checkpoint", field="bake_in_vae")
    mapping = {prefix + name: key for name, key in bare.items() if prefix + name in primary}
    wrong = [key for key, vae_key in mapping.items() if primary[key].shape != infos[vae_key].shape]
    if wrong or len(mapping) < sum(1 for key in primary if key.startswith(prefix)):
        raise UserError(f"{path.name} does not fit this checkpoint's VAE (another family's?)", field="bake_in_vae")
    return mapping, path


@dataclass
class _Output:
    """One file the merge writes: its path, which of the checkpoint's keys it holds (under which names), and how."""

    path: Path
    names: dict[str, str]  # checkpoint key -> name in this file
    gguf: tuple[str, Q] | None = None  # (arch, type) for the GGUF denoiser

    def write(self, tensor: Callable[[str], torch.Tensor], infos: dict[str, TensorInfo], dtype: torch.dtype,
              metadata: dict[str, str]) -> None:
        """``tensor(key)`` gives each merged tensor in float32: a GGUF quantizes from it, safetensors store ``dtype``."""
        if self.gguf is not None:
            arch, qtype = self.gguf
            produced = ((name, tensor(key)) for key, name in self.names.items())
            write_gguf(self.path, produced, quantize_where_possible(qtype, arch in SHAPE_FIX_ARCHS), arch)
            return
        cast: Iterator[tuple[str, torch.Tensor]] = (
            (name, value.to(dtype) if value.is_floating_point() else value)
            for name, value in ((name, tensor(key)) for key, name in self.names.items()))
        stored = {key: TORCH_DTYPES[infos[key].dtype] for key in self.names}
        planned = {name: (dtype if stored[key].is_floating_point else stored[key], infos[key].shape)
                   for key, name in self.names.items()}
        write_safetensors(self.path, planned, cast, metadata)


def _outputs(request: MergeRequest, inputs: MergeInputs, family: Family, keys: list[str],
             vae_keys: dict[str, str]) -> list[_Output]:
    stem = request.custom_name.strip() or _default_name(request, inputs)
    stem = re.sub(r"\.(safetensors|gguf)$", "", stem)
    if request.file_format == "safetensors":
        outputs = [_Output(inputs.checkpoint_dir / f"{stem}.safetensors", {key: key for key in keys})]
    else:
        if family not in GGUF_ARCHS:
            raise UserError(f"GGUF results are made of SD1.x, SDXL and Flux checkpoints; this is {family.value}",
                            field="file_format")
        prefix = UNET if any(key.startswith(UNET) for key in keys) else ""
        denoiser = {key: key.removeprefix(prefix) for key in keys if key.startswith(prefix)
                    and not key.startswith(VAE_PREFIXES + tuple(p for p, _, _ in GGUF_MODULES.get(family, ())))}
        outputs = [_Output(inputs.checkpoint_dir / f"{stem}-{request.gguf_type}.gguf", denoiser,
                           (GGUF_ARCHS[family], Q[request.gguf_type]))]
        if family in GGUF_MODULES:
            outputs.append(_Output(inputs.vae_dir / f"{stem}-vae.safetensors",
                                   {key: key.removeprefix(VAE_PREFIXES[0]) for key in keys
                                    if key.startswith(VAE_PREFIXES[0])}))
            outputs += [_Output(inputs.text_encoder_dir / f"{stem}-{suffix}.safetensors",
                                {key: key.removeprefix(prefix) for key in keys if key.startswith(prefix)})
                        for prefix, _folder, suffix in GGUF_MODULES[family]]
    for output in outputs:
        if output.path.exists() and not request.overwrite:
            raise UserError(f"{output.path.name} exists already: choose another name, or overwrite it",
                            field="custom_name")
        output.path.parent.mkdir(parents=True, exist_ok=True)
    return outputs


def _default_name(request: MergeRequest, inputs: MergeInputs) -> str:
    """A1111's name for a merge: the checkpoints with their shares and the method."""
    names = [path.stem for path in inputs.checkpoints]
    m = request.multiplier
    if request.method == "Weighted sum":
        return f"{names[0]}_{round(1 - m, 2)}-{names[1]}_{round(m, 2)}-Weighted_sum-merged"
    if request.method == "Add difference":
        return f"{names[0]}-{names[1]}-{names[2]}_{round(m, 2)}-Add_difference-merged"
    return f"{names[0]}-{'-'.join(path.stem for path, _ in inputs.loras) or 'converted'}"


def _metadata(request: MergeRequest, inputs: MergeInputs, primary: dict[str, str], path: Path) -> dict[str, str]:
    """The primary's ModelSpec (its architecture, resolution) with the result's title, and the merge recipe, as
    A1111 records it (``sd_merge_recipe``)."""
    kept = {key: value for key, value in primary.items() if key.startswith("modelspec.")}
    recipe = {"type": "webui", **asdict(request), "loras": [list(lora) for lora in request.loras],
              "models": [p.name for p in inputs.checkpoints]}
    return {**kept, "modelspec.title": path.stem, "format": "pt", "sd_merge_recipe": json.dumps(recipe)}
