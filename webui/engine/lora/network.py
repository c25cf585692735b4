"""LoRA applied online: each adapted layer computes with ``weight + scale * up @ down`` for that call only (LyCORIS
LoHa and LoKr: ``weight + delta W``, their delta computed once when the file is read).

The stored weights are never written. That is what makes a LoRA instant on GGUF and fp8 weights
(no dequantize, merge, requantize), correct on weights the memory manager streams (the update is
computed on the device, after the layer's copy) and exact to remove: giving the layers back their
own forward leaves the very computation the model had before. How the update is added — into the
weight the call unpacks, or onto its output — is chosen per layer and input shape by cost
(``LoraAdapter``).

The adapters of one model component live in one module registered with the memory manager as a
companion of that component (``lora:denoiser`` goes wherever ``denoiser`` goes): their bytes
count against the GPU budget, and they are streamed like any unit when the budget says so.

Prompt tags, as A1111: ``<lora:name:weight>`` (text encoders and denoiser alike),
``<lora:name:te_weight:unet_weight>``, or ``te=``/``unet=`` by name; several at once.
"""
from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from webui.engine.formats.files import find_files, load_state_dict, read_safetensors_header
from webui.engine.hooks import NetworkCall
from webui.engine.loading.load import LoadedModel
from webui.engine.lora.keys import FullDelta, LoraWeights, convert_lora, weight_shape
from webui.engine.memory.manager import MemoryManager
from webui.engine.weights import gguf_kernels
from webui.engine.weights.fp8 import compute_dtype, is_fp8, upcast_weight
from webui.engine.weights.quant import LowRank, QuantizedLayer, fuses_low_rank
from webui.errors import ModelFileError, UserError

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors",)


# What adding ``up @ down`` to a layer's weight costs per weight element, relative to what adding ``up(down(x))`` to
# its output costs per element of activations moved (x read, the output read and written): GPU time on an H100 for
# Flux's Q8_0 layers, rank 32 (``python3 -m benchmarks.lora_layers``): 0.75 ns a weight element in the unpacking
# kernel, 2.3 ns by addmm_ onto an unpacked or 16-bit weight, 1.65 ns an activation element.
MERGE_COST_FUSED = 0.45
MERGE_COST_ADDMM = 1.4


class LoraAdapter(nn.Module):
    """Every LoRA on one layer, as one low-rank update ``up @ down`` (their ranks side by side, each scale folded into
    its part of ``up``), computed for each call in whichever of two exact ways costs less:

    - added to the layer's output, ``output + (x @ down.T) @ up.T``: two thin matmuls over the activations,
      cheap for few tokens (text, modulation vectors);
    - added to the weight the call uses, ``F.linear(x, weight + up @ down)``: one pass over the weight, cheap
      for many tokens — and nearly free on Q8_0, whose unpacking kernel adds it (``quant.fuses_low_rank``). A
      GGUF or fp8 weight is added to in its unpacked copy; a 16-bit one into a temporary sum. The stored weight
      is never written.

    The adapter is called as a module from the layer's forward, so a streamed adapter is on the device then.
    For convolutions (LoCon) ``down`` has the layer's geometry and ``up`` is 1x1."""

    def __init__(self, parts: list[tuple[LoraWeights | FullDelta, float]], layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        shape = weight_shape(layer)
        low = [(w, m) for w, m in parts if isinstance(w, LoraWeights)]
        whole = [(w, m) for w, m in parts if isinstance(w, FullDelta)]
        down = torch.cat([w.down.float() for w, _ in low]) if low else torch.zeros(0, *shape[1:])
        up = torch.cat([w.up.float() * (w.scale * multiplier) for w, multiplier in low], dim=1) if low else \
            torch.zeros(shape[0], 0)
        self.down = nn.Parameter(down.flatten(1).to(dtype), requires_grad=False)  # (rank, the weight's columns)
        self.up = nn.Parameter(up.flatten(1).to(dtype), requires_grad=False)  # (the weight's rows, rank)
        # LyCORIS LoHa/LoKr: their delta W, summed (added into the weight at each call)
        self.full = None if not whole else nn.Parameter(
            sum(w.delta() * multiplier for w, multiplier in whole).reshape(shape[0], -1).to(dtype), requires_grad=False)
        self.conv = (down.shape, (layer.stride, layer.padding, layer.dilation, layer.groups)) if len(shape) == 4 \
            else None
        self._merges: dict[torch.Size, bool] = {}  # by input shape: whether to add into the weight

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up, self.down
        if up.dtype != x.dtype:  # a layer computing in another dtype than the model's
            up, down = up.to(x.dtype), down.to(x.dtype)
        if self.full is not None:  # a whole delta W: into the weight, with the low-rank part if any
            weight, bias = _weight_plus(layer, x, (up, down) if up.shape[1] else None)
            weight = weight + self.full.to(weight.dtype).view(weight.shape)
            return F.linear(x, weight, bias) if self.conv is None else F.conv2d(x, weight, bias, *self.conv[1])
        if torch.compiler.is_compiling():  # decided from the shapes in the graph (guards on them), not cached
            merge = self._merge_costs_less(layer, x)
        elif (merge := self._merges.get(x.shape)) is None:
            merge = self._merges[x.shape] = self._merge_costs_less(layer, x)
        if merge:
            weight, bias = _weight_plus(layer, x, (up, down))
            return F.linear(x, weight, bias) if self.conv is None else F.conv2d(x, weight, bias, *self.conv[1])
        output = layer.unadapted_forward(x)
        if self.conv is not None:
            shape, geometry = self.conv
            return output + F.conv2d(F.conv2d(x, down.view(shape), None, *geometry), up[:, :, None, None])
        low = F.linear(x, down)
        return torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]), up.t()).view(
            output.shape)

    def _merge_costs_less(self, layer: nn.Module, x: torch.Tensor) -> bool:
        rows, columns = self.up.shape[0], self.down.shape[1]
        in_features = x.shape[1] if self.conv is not None else x.shape[-1]
        positions = x.numel() // in_features
        fused = isinstance(layer, QuantizedLayer) and fuses_low_rank(layer.weight, layer.qtype, layer.weight_shape)
        per_weight_element = MERGE_COST_FUSED if fused else MERGE_COST_ADDMM
        return rows * columns * per_weight_element < positions * (in_features + 2 * rows)


def _weight_plus(layer: nn.Module, x: torch.Tensor,
                 plus: LowRank | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight for ``x`` (device, dtype) plus ``up @ down`` where given, and its bias."""
    if isinstance(layer, QuantizedLayer):
        return layer.weight_and_bias(x, plus)
    bias = None if layer.bias is None else layer.bias.to(x.device, x.dtype)
    if is_fp8(layer.weight):
        weight = upcast_weight(layer, x)  # a fresh copy: added to in place
        if plus is not None:
            weight.view(weight.shape[0], -1).addmm_(*plus)
        return weight, bias
    weight = layer.weight.to(x.device, x.dtype)
    if plus is None:
        return weight, bias
    return torch.addmm(weight.view(weight.shape[0], -1), *plus).view(weight.shape), bias


def _adapt(layer: nn.Module, adapter: LoraAdapter) -> None:
    """Route the layer's forward through the adapter (inside the layer's call, so the layer's own hooks — streaming
    its weights — still run around it): the layer becomes its class's adapted subclass, the adapter a plain
    attribute (not a submodule: its weights are the LoRA component's). Every adapted layer of a class shares one
    forward, so a compiled block's guards are the same for all of them and for any LoRA (a per-layer forward
    object would compile each block again, for every LoRA). ``_unadapt`` gives the layer its class back."""
    _unadapt(layer)  # (one adapter a layer: it holds every LoRA's update)
    layer.__class__ = _adapted_class(type(layer))
    object.__setattr__(layer, "_lora", adapter)


def _unadapt(layer: nn.Module) -> None:
    if hasattr(type(layer), "unadapted_forward"):
        layer.__class__ = type(layer).__bases__[0]
        layer.__dict__.pop("_lora", None)


@functools.cache
def _adapted_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with its forward through the layer's LoRA adapter; ``unadapted_forward`` is ``cls``'s own."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._lora(self, x)

    def unadapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return cls.forward(self, x)

    # (a class of this module's: dynamo takes torch's own layers' weights as static, an adapter's rank too)
    return type(cls.__name__, (cls,), {"forward": forward, "unadapted_forward": unadapted_forward})


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
    """The LoRA files under ``folder`` and then ``builtin`` (the demo's), subfolders included, by name: the path
    without suffix, or the stem."""

    def __init__(self, folder: Path, sha256: Callable[[Path], str], builtin: Path | None = None):
        self.folder = folder
        self.roots = [folder] + ([builtin] if builtin is not None else [])
        self.sha256 = sha256
        self._files: dict[str, Path] | None = None

    def files(self) -> dict[str, Path]:
        if self._files is None:
            self.refresh()
        return self._files

    def refresh(self) -> None:
        found = [p for root in reversed(self.roots) for p in sorted(find_files(root, LORA_SUFFIXES))]
        self._files = {p.stem: p for p in found}  # the user's win over built-in ones of the same name
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
        """A file's name in tags and lists: its path under its LoRA folder, without suffix."""
        return path.relative_to(self.roots[self._root_index(path)]).with_suffix("").as_posix()

    def _root_index(self, path: Path) -> int:
        return next(i for i, root in enumerate(self.roots) if path.is_relative_to(root))

    def names(self) -> list[str]:
        return sorted(self.name_of(p) for p in set(self.files().values()))

    def describe(self) -> list[dict]:
        """A1111's /sdapi/v1/loras answer: name, alias, path and the file's training metadata."""
        answer = []
        files = set(self.files().values())
        for path in sorted(files, key=lambda p: (self._root_index(p), p)):
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
        self._layers: list[weakref.ref] = []  # the adapted layers (weakly: an unloaded model is let go)
        self._components: list[tuple[str, nn.Module]] = []  # memory manager name, adapters

    def names(self) -> list[str]:
        return self.library.names()

    def refresh(self) -> None:
        self.library.refresh()

    def path(self, name: str) -> Path:
        return self.library.find(name)

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
                     len(self._layers))
        return self._infotext(uses)

    def remove(self) -> None:
        """Take every adapter off: the model computes exactly as loaded (a model since unloaded is let be)."""
        for ref in self._layers:
            if (layer := ref()) is not None:
                _unadapt(layer)
        for name, container in self._components:
            component = self.memory.components.get(name)
            if component is not None and component.module is container:
                self.memory.unregister(name)
        self._layers, self._components, self._applied, self._model = [], [], (), None

    def _infotext(self, uses: tuple[LoraUse, ...]) -> dict[str, str]:
        if not uses:
            return {}
        return {"Lora hashes": ", ".join(f"{u.name}: {self.library.short_hash(u.path)}" for u in uses)}

    def _read(self, path: Path, model: LoadedModel) -> dict[tuple[str, str], LoraWeights | FullDelta]:
        """The file's updates for this model; a corrupt file, or one for another family or format, is refused by
        the reader (header checked first) and the converter, pointed at the prompt tag that asked for it."""
        try:
            return convert_lora(load_state_dict(path), model.family, dict(_lora_components(model)), path.name)
        except ModelFileError as e:
            raise ModelFileError(e.message, field="prompt") from e

    def _apply(self, model: LoadedModel, weights: list[tuple[LoraUse, dict[tuple[str, str], LoraWeights]]]) -> None:
        components = {name: (memory_name, module) for name, memory_name, module in _targets(model)}
        parts: dict[tuple[str, str], list[tuple[LoraWeights | FullDelta, float]]] = {}
        for use, by_layer in weights:
            for (component, path), lora in by_layer.items():
                parts.setdefault((component, path), []).append((lora, use.unet if component == "denoiser" else use.te))
        adapters: dict[str, nn.ModuleList] = {}
        for (component, path), layer_parts in parts.items():
            memory_name, root = components[component]
            layer = root.get_submodule(path)
            adapter = LoraAdapter(layer_parts, layer, compute_dtype(root))
            adapters.setdefault(memory_name, nn.ModuleList()).append(adapter)
            _adapt(layer, adapter)
            self._layers.append(weakref.ref(layer))
        for owner, container in adapters.items():
            name = f"lora:{owner}"
            self.memory.register(name, container, companion_of=owner)
            self._components.append((name, container))


def compile_kernels(model: LoadedModel, device: torch.device) -> None:
    """Compile the kernel that adds a LoRA while unpacking a GGUF weight, if this model has such weights and runs on
    CUDA: when the model loads, rather than in the first step of its first LoRA (~0.5 s the first time on a
    machine; Triton's disk cache makes it milliseconds after)."""
    if device.type != "cuda":
        return
    qtypes = {m.qtype for m in model.denoiser.modules() if isinstance(m, QuantizedLayer)}
    gguf_kernels.low_rank_kernels.prepare(device, (compute_dtype(model.denoiser),), qtypes)


def _targets(model: LoadedModel) -> Iterator[tuple[str, str, nn.Module]]:
    """(the name LoRA files give a component (diffusers pipeline attributes), the memory manager's name for it
    (``LoadedModel.components``), the module) for each component a LoRA can adapt."""
    yield "denoiser", "denoiser", model.denoiser
    names = [encoder.component for encoder in model.kind.lora_text_encoders]  # the CLIPs', then T5's
    for name, slot in zip(names, model.text_encoders):
        yield name, name, slot.model
    if model.t5 is not None:
        yield names[len(model.text_encoders)], "t5", model.t5.model


def _lora_components(model: LoadedModel) -> Iterator[tuple[str, nn.Module]]:
    """Our modules under the component names LoRA files use."""
    return ((name, module) for name, _memory_name, module in _targets(model))
