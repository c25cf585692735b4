"""ControlNet files as users have them, loaded offline with the architecture read from the tensors: A1111/LDM single
files (``control_model.input_blocks…``, with or without that prefix: lllyasviel's SD1.5 and thibaud's SD2.1
ControlNets), diffusers-keyed files or folders (``controlnet_cond_embedding…``: most SDXL ControlNets, xinsir's Union
ones with their ``task_embedding``), Flux and SD3 ControlNets in diffusers' layout (``controlnet_x_embedder``,
``pos_embed_input``: InstantX's, Stability's SD3.5 ones), and the IP-Adapter and T2I-Adapter files
sd-webui-controlnet keeps in the same folder (``ip_adapter``, ``t2i_adapter``). An LDM file is renamed by diffusers'
own single-file conversion (``convert_controlnet_checkpoint``), which needs only the number of layers per block, read
from where the first downsampling sits; an XLabs Flux ControlNet (Black Forest Labs' names, ``double_blocks…``, with
``input_hint_block.N`` and ``pos_embed_input``) by the Flux transformer's own table, into what diffusers'
``FluxControlNetModel`` with a hint block is."""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, FluxControlNetModel, SD3ControlNetModel, T2IAdapter
from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, LDM_CONTROLNET_KEY,
                                                  convert_controlnet_checkpoint)
from PIL import Image

from webui.engine.control import t2i_adapter
from webui.engine.control.apply import ActiveUnit
from webui.engine.control.ip_adapter import (IPAdapter, adapter_keys, for_flux, ip_adapter_family, is_ip_adapter,
                                             text_width)
from webui.engine.control.units import CONTROL_MODES, UNION_TYPES, ControlUnit
from webui.engine.families.flux import convert_flux_to_diffusers, rope_axes
from webui.engine.families.sd3 import HEAD_DIM, SAMPLE_SIZE
from webui.engine.formats.detect import NORM_GROUPS, Family, block_count
from webui.engine.formats.files import TensorInfo, find_files, load_state_dict
from webui.engine.loading.load import build_module
from webui.engine.memory import MB
from webui.engine.memory.manager import MemoryManager
from webui.engine.weights.fp8 import cast_weights_fp8, compute_dtype
from webui.errors import ModelFileError, UserError

log = logging.getLogger(__name__)
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")
COMPONENT = "controlnet:"  # their memory-manager components' names: this and the file's stem
UNION_HEADS = 8  # heads of a Union ControlNet's control-type transformer (xinsir's; no tensor's shape tells them)


def is_flux_controlnet(state_dict: dict) -> bool:
    return "controlnet_x_embedder.weight" in state_dict and "x_embedder.weight" in state_dict


def is_sd3_controlnet(state_dict: dict) -> bool:
    return "pos_embed_input.proj.weight" in state_dict


def is_xlabs_controlnet(state_dict: dict) -> bool:
    return "pos_embed_input.weight" in state_dict and "double_blocks.0.img_attn.qkv.weight" in state_dict


# An XLabs ControlNet's hint block is a Sequential of convolutions with SiLUs between them; diffusers' names for them
XLABS_HINT_BLOCK = {0: "conv_in", **{2 * (i + 1): f"blocks.{i}" for i in range(6)}, 14: "conv_out"}
XLABS_NAMES = {"pos_embed_input.": "controlnet_x_embedder.",
               **{f"input_hint_block.{n}.": f"input_hint_block.{name}." for n, name in XLABS_HINT_BLOCK.items()}}


def xlabs_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An XLabs Flux ControlNet under ``FluxControlNetModel``'s names: its double blocks and embedders as the Flux
    transformer's (no single blocks, no final layer), its hint block and input embedding by ``XLABS_NAMES``."""
    inner = state_dict["img_in.weight"].shape[0]
    head_dim = state_dict["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config = {"num_layers": block_count(state_dict, "double_blocks"), "num_single_layers": 0,
              "guidance_embeds": "guidance_in.in_layer.weight" in state_dict,
              "num_attention_heads": inner // head_dim, "attention_head_dim": head_dim}
    renamed = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in XLABS_NAMES if key.startswith(p)), None)
        renamed[key if prefix is None else XLABS_NAMES[prefix] + key.removeprefix(prefix)] = tensor
    return convert_flux_to_diffusers(renamed, config)


def to_diffusers_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An LDM or XLabs ControlNet's tensors under diffusers' names (a diffusers-keyed one as it is)."""
    if ("controlnet_cond_embedding.conv_in.weight" in state_dict or is_flux_controlnet(state_dict)
            or is_sd3_controlnet(state_dict)):
        return state_dict
    if is_xlabs_controlnet(state_dict):
        return xlabs_to_diffusers(state_dict)
    state_dict = {k.removeprefix(LDM_CONTROLNET_KEY): v for k, v in state_dict.items()}
    if "input_hint_block.0.weight" not in state_dict:
        raise ModelFileError("This file is no ControlNet (it has neither an input hint block nor a conditioning "
                             "embedding): put ControlNets in models/ControlNet.")
    blocks = block_count(state_dict, "input_blocks")
    downsample = next((i for i in range(1, blocks) if f"input_blocks.{i}.0.op.weight" in state_dict), blocks)
    converted = convert_controlnet_checkpoint({LDM_CONTROLNET_KEY + k: v for k, v in state_dict.items()},
                                              {"layers_per_block": downsample - 1})
    # SDXL's added embedding, which diffusers' conversion leaves out
    added = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
    return converted | {ours: state_dict[ldm] for ours, ldm in added.items() if ldm in state_dict}


def controlnet_config(infos: dict[str, TensorInfo], time_embed_dim: int = 256) -> tuple[Family, dict]:
    """The family a diffusers-keyed ControlNet is for and its ``ControlNetModel`` config, from the tensor shapes.
    ``time_embed_dim``: SDXL's size conditioning's width (its UNet's; no tensor holds it)."""
    levels = block_count(infos, "down_blocks")
    channels = [infos[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    depths = [len({m.group(1) for k in infos if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks"
                                                               r"\.(\d+)\.", k))}) for i in range(levels)]
    context = next((infos[k].shape[1] for k in infos if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in infos if k.endswith(".proj_in.weight")), None)
    if context is None or proj_in is None:
        raise ModelFileError("This ControlNet has no cross-attention layers: it is for no SD1.x, SD2.x or SDXL model.")
    linear = len(infos[proj_in].shape) == 2  # SD2.x and SDXL project linearly, SD1.x through 1x1 convolutions
    family = Family.SDXL if "add_embedding.linear_1.weight" in infos else Family.SD2 if linear else Family.SD1
    embedding = block_count(infos, "controlnet_cond_embedding.blocks")
    config = {
        "conditioning_channels": infos["controlnet_cond_embedding.conv_in.weight"].shape[1],
        "conditioning_embedding_out_channels": [infos["controlnet_cond_embedding.conv_in.weight"].shape[0]] + [
            infos[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in range(1, embedding, 2)],
        "in_channels": infos["conv_in.weight"].shape[1],
        "block_out_channels": channels,
        "layers_per_block": block_count(infos, "down_blocks.0.resnets"),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "cross_attention_dim": context,
        "use_linear_projection": linear,
        "norm_num_groups": NORM_GROUPS,
        "attention_head_dim": 8 if family is Family.SD1 else [max(c // 64, 1) for c in channels],
    }
    if family is Family.SDXL:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
                      projection_class_embeddings_input_dim=infos["add_embedding.linear_1.weight"].shape[1])
    if "task_embedding" in infos:  # a Union ControlNet (xinsir's): its control types' embedding and transformer
        config.update(num_control_type=infos["task_embedding"].shape[0],
                      num_trans_channel=infos["task_embedding"].shape[1],
                      num_trans_layer=block_count(infos, "transformer_layes"),
                      num_proj_channel=infos["spatial_ch_projs.weight"].shape[0],
                      num_trans_head=UNION_HEADS)
    return family, config


def flux_controlnet_config(infos: dict[str, TensorInfo]) -> dict:
    """A ``FluxControlNetModel`` config from the tensor shapes (its blocks are the transformer's; a Union model has a
    mode embedding, one converted from XLabs' layout an input hint block, whose last convolution's width diffusers
    calls ``conditioning_embedding_channels``)."""
    inner, in_channels = infos["x_embedder.weight"].shape
    norm = next((k for k in infos if k.endswith("attn.norm_q.weight")), None)
    if norm is None:
        raise ModelFileError("This Flux ControlNet has no attention blocks: the file is incomplete.")
    head_dim = infos[norm].shape[0]
    hinted = "input_hint_block.conv_out.weight" in infos
    return {
        "patch_size": 2 if hinted else 1,  # (diffusers packs a hint block's output in 2x2 patches by it, only that)
        "in_channels": in_channels,
        "num_layers": block_count(infos, "transformer_blocks"),
        "num_single_layers": block_count(infos, "single_transformer_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": infos["context_embedder.weight"].shape[1],
        "pooled_projection_dim": infos["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in infos,
        "axes_dims_rope": rope_axes(head_dim),
        "num_mode": infos["controlnet_mode_embedder.weight"].shape[0] if "controlnet_mode_embedder.weight" in infos
        else None,
        "conditioning_embedding_channels": infos["input_hint_block.conv_out.weight"].shape[0] if hinted else None,
    }


def sd3_controlnet_config(infos: dict[str, TensorInfo], saved: dict) -> dict:
    """An ``SD3ControlNetModel`` config from the tensor shapes: InstantX's (its own position embedding and text
    blocks) or SD3.5's (neither: the transformer's position embedding, blocks without text). Whether the pooled
    text is zeroed is no tensor's: a diffusers folder's config.json (``saved``) says, else the kind tells (InstantX's
    zero it, SD3.5's do not)."""
    inner, channels, patch, _ = infos["pos_embed_input.proj.weight"].shape
    context = infos.get("context_embedder.weight")
    positions = infos.get("pos_embed.pos_embed")
    layers = block_count(infos, "transformer_blocks")
    config = {
        "sample_size": SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": channels,
        "num_layers": layers,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": inner // HEAD_DIM,
        "joint_attention_dim": None if context is None else context.shape[1],
        "caption_projection_dim": inner if context is None else context.shape[0],
        "pooled_projection_dim": infos["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        "out_channels": channels,
        "pos_embed_max_size": math.isqrt(positions.shape[1]) if positions is not None else 96,
        "dual_attention_layers": tuple(i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in infos),
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in infos else None,
        "use_pos_embed": "pos_embed.proj.weight" in infos,
        "force_zeros_for_pooled_projection": context is not None,
    }
    return config | {k: saved[k] for k in ("force_zeros_for_pooled_projection", "sample_size") if k in saved}


def load_controlnet(path: Path, denoiser: torch.nn.Module, family: Family) -> tuple[Family, torch.nn.Module | None]:
    """A ControlNet file (or a diffusers folder's weights) in host memory, in ``denoiser``'s dtype (an SDXL one with
    its size conditioning's width); an IP-Adapter file as its layers made for ``denoiser`` (of ``family``), or None
    where it is for another family (the caller says so)."""
    dtype, time_embed_dim = compute_dtype(denoiser), denoiser.config.get("addition_time_embed_dim") or 256
    saved = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            saved = json.loads((path / "config.json").read_text())
        path = next(path.glob("diffusion_pytorch_model*.safetensors"), path / "diffusion_pytorch_model.bin")
    state_dict = load_state_dict(path)
    if is_ip_adapter(state_dict):
        state_dict = adapter_keys(state_dict)
        width = denoiser.config.get("cross_attention_dim") or denoiser.config.get("joint_attention_dim")
        if for_flux(state_dict) == (family is Family.FLUX) and text_width(state_dict) == width:
            return family, IPAdapter(state_dict, denoiser, dtype)
        return ip_adapter_family(state_dict), None
    if t2i_adapter.is_t2i_adapter(state_dict):
        state_dict = t2i_adapter.to_diffusers_keys(state_dict)
        config = t2i_adapter.t2i_adapter_config({k: TensorInfo(str(v.dtype), tuple(v.shape))
                                                 for k, v in state_dict.items()})
        model = build_module(T2IAdapter, config, state_dict, path.name, dtype)
        return t2i_adapter.adapter_family(config, family), model.requires_grad_(False).eval()
    state_dict = to_diffusers_keys(state_dict)
    infos = {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in state_dict.items()}
    if is_flux_controlnet(infos):
        family, cls, config = Family.FLUX, FluxControlNetModel, flux_controlnet_config(infos)
    elif is_sd3_controlnet(infos):
        family, cls, config = Family.SD3, SD3ControlNetModel, sd3_controlnet_config(infos, saved)
    else:
        family, config = controlnet_config(infos, time_embed_dim)
        cls = ControlNetUnionModel if "num_control_type" in config else ControlNetModel
    model = build_module(cls, config, state_dict, path.name, dtype)
    return family, model.requires_grad_(False).eval()


class ControlNets:
    """The models of the ControlNet folder and then of ``builtin`` (the demo's): listed by name (the folders read
    again when asked for the list, or when a job names a model not in the last reading), loaded when a job first
    uses one and kept while jobs use it, each a memory-manager component placed with the denoiser (budgeted,
    resident or streamed like its weights)."""

    def __init__(self, folder: Path, builtin: Path | None = None):
        self.folder = folder
        self.roots = [folder] + ([builtin] if builtin is not None else [])
        self.loaded: dict[Path, tuple[Family, torch.nn.Module]] = {}
        self._storage: dict[Path, torch.dtype | None] = {}  # the fp8 dtype each loaded model's weights are stored in
        self._files: list[Path] = []

    def files(self) -> list[Path]:
        """Model files and diffusers folders (their ``diffusion_pytorch_model`` weights), by name: the folders now;
        a built-in model the user has one of the same name of is left out."""
        found = [p for root in self.roots if root.is_dir() for p in find_files(root, CONTROLNET_SUFFIXES)]
        models = [p.parent if p.stem == "diffusion_pytorch_model" else p for p in found]
        first = {}
        for path in models:
            first.setdefault(_name(path), path)
        self._files = sorted(first.values(), key=lambda p: p.name.lower())
        return self._files

    def names(self) -> list[str]:
        """As sd-webui-controlnet lists them: the file's stem."""
        return [_name(path) for path in self.files()]

    def find(self, name: str, field: str) -> Path:
        """A model by its name as clients send it: the stem, the file name, or the stem with " [hash]" after it."""
        wanted = name.split(" [")[0]

        def named(files: list[Path]) -> Path | None:
            return next((path for path in files if wanted in (_name(path), path.name)), None)

        path = named(self._files) or named(self.files())
        if path is not None:
            return path
        raise UserError(f"no ControlNet named {name!r} in {self.folder} (there: "
                        f"{', '.join(map(_name, self._files)) or 'none'})", field=field)

    def activate(self, units: list[tuple[ControlUnit, Image.Image]], family: Family, denoiser: torch.nn.Module,
                 memory: MemoryManager, storage: torch.dtype | None = None) -> list[ActiveUnit]:
        """The units (each with its control image) with their models loaded (in ``denoiser``'s dtype; their layers'
        weights stored in ``storage``, the fp8 dtype "Diffusion in Low Bits" stores the denoiser's in, if any) and
        registered with ``memory`` beside it; models no unit uses any more are let go."""
        active, used = [], set()
        for index, (unit, image) in enumerate(units):
            path = self.find(unit.model, f"controlnet[{index}].model")
            if path not in self.loaded or self.loaded[path][1] is None or self._storage[path] != storage:
                self._load(path, denoiser, family, storage, memory)  # (None: an IP-Adapter met with another family)
            model_family, model = self.loaded[path]
            if model_family is not family:
                raise UserError(f"{path.name} is a ControlNet for {model_family.value}, and the checkpoint is "
                                f"{family.value}: pick one made for {family.value}", field=f"controlnet[{index}].model")
            if model is None:
                raise UserError(f"{path.name} is an IP-Adapter for {family.value} whose layers are not as wide as this "
                                "checkpoint's: pick one made for this model", field=f"controlnet[{index}].model")
            if isinstance(model, SD3ControlNetModel) and model.pos_embed is None:  # SD3.5's: the transformer's
                model.pos_embed = model._get_pos_embed_from_transformer(denoiser).to(compute_dtype(denoiser))
            if isinstance(model, (FluxControlNetModel, SD3ControlNetModel, IPAdapter, T2IAdapter)) \
                    and unit.control_mode != CONTROL_MODES[0]:
                raise UserError(f"{type(model).__name__.removesuffix('Model')}s have no control modes: leave it at "
                                f"{CONTROL_MODES[0]}", field=f"controlnet[{index}].control_mode")
            field = f"controlnet[{index}].union_control_type"
            mode = (union_mode(unit, FLUX_UNION_MODES, field) if getattr(model, "union", False) else
                    union_mode(unit, SDXL_UNION_MODES[:model.config.num_control_type], field)
                    if isinstance(model, ControlNetUnionModel) else None)
            active.append(ActiveUnit(unit, model, image, mode=mode))
            used.add(path)
        for path in self.loaded.keys() - used:
            del self.loaded[path]
        for path in self._storage.keys() - self.loaded.keys():
            del self._storage[path]
        names = {COMPONENT + _name(path): model for path, (_, model) in self.loaded.items()}
        for name in [n for n in memory.components if n.startswith(COMPONENT) and n not in names]:
            memory.unregister(name)
        for name, model in names.items():
            if name not in memory.components:
                memory.register(name, model, companion_of="denoiser")
        return active


    def _load(self, path: Path, denoiser: torch.nn.Module, family: Family, storage: torch.dtype | None,
              memory: MemoryManager) -> None:
        """``path``'s model (again, where it was loaded with other storage: its component goes first)."""
        if COMPONENT + _name(path) in memory.components:
            memory.unregister(COMPONENT + _name(path))
        self.loaded[path] = model_family, model = load_controlnet(path, denoiser, family)
        self._storage[path] = storage
        if model is not None and storage is not None:
            saved = cast_weights_fp8(model, storage)
            log.info("Diffusion in Low Bits: %s stored as %s (%.0f MB saved)", path.name, storage, saved / MB)


# Union ControlNets' modes, in order, by the control types of ``UNION_TYPES``: xinsir's SDXL Union (ProMax: all
# eight; the first: six), and InstantX's and Shakker-Labs' Flux Union (canny, tile, depth, blur, pose, gray, low
# quality); and the type a preprocessor's image is
SDXL_UNION_MODES = UNION_TYPES[1:9]
FLUX_UNION_MODES = ("Hard Edge", "Tile", "Depth", "Blur", "OpenPose", "Gray", "Low Quality")
PREPROCESSOR_TYPES = {"canny": "Hard Edge", "invert": "Hard Edge", "lineart_standard": "Hard Edge",
                      "lineart": "Hard Edge", "lineart_coarse": "Hard Edge", "lineart_anime": "Hard Edge",
                      "mlsd": "Hard Edge", "scribble_xdog": "Hard Edge", "threshold": "Hard Edge",
                      "hed": "Soft Edge", "hed_safe": "Soft Edge", "scribble_hed": "Soft Edge", "pidinet": "Soft Edge",
                      "pidinet_safe": "Soft Edge", "pidinet_scribble": "Soft Edge", "depth": "Depth",
                      "tile_resample": "Tile", "blur_gaussian": "Blur", "recolor_luminance": "Gray",
                      "recolor_intensity": "Gray"}


def union_mode(unit: ControlUnit, modes: tuple[str, ...], field: str) -> int:
    """The mode a Union ControlNet with ``modes`` runs a unit in: its union_control_type's, else (left "Unknown") its
    preprocessor's; a UserError naming the types the model knows where neither is one of them."""
    kind = unit.union_control_type
    if kind == UNION_TYPES[0]:
        kind = PREPROCESSOR_TYPES.get(unit.module) or ("OpenPose" if unit.module.startswith("openpose") else kind)
    if kind in modes:
        return modes.index(kind)
    raise UserError(f"this Union ControlNet knows {', '.join(modes)}: set union_control_type to one of them, or pick "
                    f"a preprocessor that makes one (the unit says {unit.union_control_type!r} with preprocessor "
                    f"{unit.module!r})", field=field)


def _name(path: Path) -> str:
    return path.stem if path.is_file() else path.name
