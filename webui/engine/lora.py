"""LoRA applied online: each adapted layer adds ``scale * up(down(x))`` to its output.

The model's weights are never touched. That is what makes a LoRA instant on GGUF and fp8 weights
(no dequantize, merge, requantize), correct on weights the memory manager streams (the low-rank
update is computed on the device, from the input, after the layer's copy) and exact to remove:
taking the hooks away leaves the very computation the model had before.

The adapters of one model component live in one module registered with the memory manager as a
companion of that component (``lora:denoiser`` goes wherever ``denoiser`` goes): their bytes
count against the GPU budget, and they are streamed like any unit when the budget says so.

Prompt tags, as A1111: ``<lora:name:weight>`` (text encoders and denoiser alike),
``<lora:name:te_weight:unet_weight>``, or ``te=``/``unet=`` by name; several at once.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from webui.engine.detect import Family
from webui.engine.files import load_state_dict, read_safetensors_header
from webui.engine.fp8 import compute_dtype
from webui.engine.hooks import NetworkCall
from webui.engine.load import LoadedModel
from webui.engine.lora_keys import LoraWeights, convert_lora
from webui.engine.memory import MemoryManager
from webui.errors import ModelFileError, UserError

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors",)


class LoraAdapter(nn.Module):
    """One layer's low-rank update, added to the layer's output: ``output + (x @ down.T) @ (scale * up).T``.

    The scale is folded into ``up`` once, and the second product accumulates straight into the output
    (``addmm``): the update costs two thin matmuls per call and no separate scaling or addition pass.
    For convolutions (LoCon) ``down`` is a convolution with the layer's geometry and ``up`` a 1x1 one."""

    def __init__(self, weights: LoraWeights, multiplier: float, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Parameter(weights.down.to(dtype), requires_grad=False)
        self.up = nn.Parameter((weights.up.float() * (weights.scale * multiplier)).to(dtype), requires_grad=False)
        self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.down.dim() == 4 else None

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)  # no-ops unless a layer computes in another dtype
        if self.conv is not None:
            return output + F.conv2d(F.conv2d(x, down, None, *self.conv), up)
        low = F.linear(x, down)
        return torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]), up.t()).view(
            output.shape)


def _add_to_output(adapter: LoraAdapter) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return adapter(args[0], output)
    return hook


@dataclass(frozen=True)
class LoraUse:
    """One tag: a LoRA file and its multipliers for the text encoders and the denoiser."""

    name: str
    path: Path
    te: float
    unet: float


def parse_call(call: NetworkCall, find: Callable[[str], Path]) -> LoraUse:
    """A ``<lora:...>`` tag's file and weights (UserError on field "prompt" for a bad one)."""
    positional = [a for a in call.args if "=" not in a]
    named = dict(a.split("=", 1) for a in call.args if "=" in a)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        raise UserError(f"<lora:{call.name}:{':'.join(call.args)}>: weights must be numbers, as in "
                        f"<lora:{call.name}:0.8> or <lora:{call.name}:1:0.5>", field="prompt") from None
    return LoraUse(call.name, find(call.name), te, unet)


class LoraLibrary:
    """The LoRA files under ``folder`` (subfolders included), by name: the path without suffix, or the stem."""

    def __init__(self, folder: Path, sha256: Callable[[Path], str]):
        self.folder = folder
        self.sha256 = sha256
        self._files: dict[str, Path] | None = None

    def files(self) -> dict[str, Path]:
        if self._files is None:
            self.refresh()
        return self._files

    def refresh(self) -> None:
        found = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()) \
            if self.folder.is_dir() else []
        self._files = {p.stem: p for p in found}
        self._files.update({self.name_of(p): p for p in found})

    def find(self, name: str) -> Path:
        def lookup() -> Path | None:
            files = self.files()
            return files.get(name) or next((p for n, p in files.items() if n.lower() == name.lower()), None)

        path = lookup()
        if path is None:
            self.refresh()  # a file added since the last look
            path = lookup()
        if path is None:
            known = ", ".join(self.names()[:8]) or f"none in {self.folder}"
            raise UserError(f"LoRA {name!r} not found (known: {known}). Put .safetensors LoRA files in "
                            f"{self.folder} and refresh.", field="prompt")
        return path

    def name_of(self, path: Path) -> str:
        """A file's name in tags and lists: its path under the LoRA folder, without suffix."""
        return path.relative_to(self.folder).with_suffix("").as_posix()

    def names(self) -> list[str]:
        return sorted(self.name_of(p) for p in set(self.files().values()))

    def describe(self) -> list[dict]:
        """A1111's /sdapi/v1/loras answer: name, alias, path and the file's training metadata."""
        answer = []
        for path in sorted(set(self.files().values())):
            try:
                metadata = read_safetensors_header(path)[1]
            except ModelFileError as e:
                metadata = {"error": str(e)}
            name = self.name_of(path)
            answer.append({"name": name, "alias": metadata.get("ss_output_name", name), "path": str(path),
                           "metadata": metadata})
        return answer

    def short_hash(self, path: Path) -> str:
        """A1111's LoRA hash in the infotext: the first 12 hex digits of the file's sha256."""
        return self.sha256(path)[:12]


class LoraNetwork:
    """The ``<lora:...>`` network: puts exactly the prompt's LoRAs on the model, and nothing else."""

    def __init__(self, library: LoraLibrary, memory: MemoryManager):
        self.library = library
        self.memory = memory
        self._applied: tuple[LoraUse, ...] = ()
        self._model: weakref.ref | None = None
        self._handles: list = []
        self._components: list[tuple[str, nn.Module]] = []  # memory manager name, adapters

    def names(self) -> list[str]:
        return self.library.names()

    def refresh(self) -> None:
        self.library.refresh()

    def activate(self, model: LoadedModel, calls: list[NetworkCall]) -> dict[str, str]:
        uses = tuple(parse_call(call, self.library.find) for call in calls)
        if self._model is not None and self._model() is model and uses == self._applied:
            return self._infotext(uses)
        self.remove()
        weights = [(use, self._read(use.path, model)) for use in uses]
        self._apply(model, weights)
        self._applied, self._model = uses, weakref.ref(model)
        if uses:
            log.info("LoRA: %s on %d layers", ", ".join(f"{u.name} ({u.te:g}/{u.unet:g})" for u in uses),
                     len(self._handles))
        return self._infotext(uses)

    def remove(self) -> None:
        """Take every adapter off: the model computes exactly as loaded (a model since unloaded is let be)."""
        for handle in self._handles:
            handle.remove()
        for name, container in self._components:
            component = self.memory.components.get(name)
            if component is not None and component.module is container:
                self.memory.unregister(name)
        self._handles, self._components, self._applied, self._model = [], [], (), None

    def _infotext(self, uses: tuple[LoraUse, ...]) -> dict[str, str]:
        if not uses:
            return {}
        return {"Lora hashes": ", ".join(f"{u.name}: {self.library.short_hash(u.path)}" for u in uses)}

    def _read(self, path: Path, model: LoadedModel) -> dict[tuple[str, str], LoraWeights]:
        """The file's updates for this model; a corrupt file, or one for another family or format, is refused by
        the reader (header checked first) and the converter, pointed at the prompt tag that asked for it."""
        try:
            return convert_lora(load_state_dict(path), model.family, dict(_lora_components(model)), path.name)
        except ModelFileError as e:
            raise ModelFileError(e.message, field="prompt") from e

    def _apply(self, model: LoadedModel, weights: list[tuple[LoraUse, dict[tuple[str, str], LoraWeights]]]) -> None:
        components = {name: (memory_name, module) for name, memory_name, module in _targets(model)}
        adapters: dict[str, nn.ModuleList] = {}
        for use, by_layer in weights:
            for (component, path), lora in by_layer.items():
                memory_name, root = components[component]
                layer = root.get_submodule(path)
                multiplier = use.unet if component == "denoiser" else use.te
                adapter = LoraAdapter(lora, multiplier, layer, compute_dtype(root))
                adapters.setdefault(memory_name, nn.ModuleList()).append(adapter)
                self._handles.append(layer.register_forward_hook(_add_to_output(adapter)))
        for owner, container in adapters.items():
            name = f"lora:{owner}"
            self.memory.register(name, container, companion_of=owner)
            self._components.append((name, container))


def _targets(model: LoadedModel) -> Iterator[tuple[str, str, nn.Module]]:
    """(the name LoRA files give a component (diffusers pipeline attributes), the memory manager's name for it
    (``LoadedModel.components``), the module) for each component a LoRA can adapt."""
    yield "denoiser", "denoiser", model.denoiser
    for name, slot in zip(("text_encoder", "text_encoder_2"), model.text_encoders):
        yield name, name, slot.model
    if model.t5 is not None:
        yield ("text_encoder_2" if model.family is Family.FLUX else "text_encoder_3"), "t5", model.t5.model


def _lora_components(model: LoadedModel) -> Iterator[tuple[str, nn.Module]]:
    """Our modules under the component names LoRA files use."""
    return ((name, module) for name, _memory_name, module in _targets(model))
