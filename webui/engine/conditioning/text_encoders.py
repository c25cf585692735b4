"""Components that Flux and SD3.x users pick as separate files: the T5-XXL and CLIP-L/G text encoders
and the 16-channel VAEs.

As for checkpoints, configs come from tensor shapes (never from the hub or the file name) and modules
are built by ``load.build_module``, so a tiny test file and a full-size one take the same path and fp8
files stay fp8.
"""
from __future__ import annotations

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

from webui.engine.memory import host_pages
from webui.engine.formats.detect import (
    Family,
    block_count,
    clip_l_arch,
    find_prefix,
    open_clip_arch,
    strip_prefix,
    tensor_shape,
    vae_config,
)
from webui.engine.formats.files import Source, TensorInfo, source_infos, source_tensors
from webui.engine.loading.load import build_module
from webui.engine.weights.fp8 import SCALE_SUFFIX, is_fp8
from webui.errors import ModelFileError

StateDict = dict[str, torch.Tensor]

# ComfyUI's all-in-one files keep each text encoder under its own prefix; separate files are bare.
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "")
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
# Files store the token embedding under either name, or both; the model ties them.
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
CLIP_MARKER = "text_model.embeddings.token_embedding.weight"
OPEN_CLIP_MARKER = "token_embedding.weight"
# OpenAI's CLIP-L was trained with quick_gelu, OpenCLIP's bigG with gelu; shapes cannot tell them apart.
CLIP_ACTIVATIONS = {"clip_l": "quick_gelu", "clip_g": "gelu"}
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
VAE_MARKER = "encoder.conv_in.weight"
# (scaling_factor, shift_factor) of each family's 16-channel latent space.
VAE16_LATENT_SCALE = {Family.FLUX: (0.3611, 0.1159), Family.SD3: (1.5305, 0.0609)}


def t5_config(infos: dict[str, TensorInfo]) -> dict:
    """A ``T5Config`` (as a dict) for a T5 v1.1 encoder (gated GELU, as T5-XXL) from its tensor shapes.

    ``infos`` may carry ComfyUI's ``text_encoders.t5xxl.transformer.`` prefix.
    """
    infos = strip_prefix(infos, find_prefix(infos, T5_PREFIXES, T5_MARKER, "a T5 encoder"))
    what = "T5 encoder"
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = tensor_shape(infos, f"{attention}relative_attention_bias.weight", what)
    inner, d_model = tensor_shape(infos, f"{attention}q.weight", what)
    embedding = next((k for k in T5_EMBEDDINGS if k in infos), None)
    if embedding is None:
        raise ModelFileError(f"This {what} has no token embedding ({' or '.join(T5_EMBEDDINGS)}); the file is incomplete.")
    if inner % heads:
        raise ModelFileError(f"This {what}'s attention width {inner} is not a whole number of its {heads} heads; "
                             "the file is inconsistent.")
    return {
        "vocab_size": infos[embedding].shape[0],
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": tensor_shape(infos, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", what)[0],
        "num_layers": block_count(infos, "encoder.block"),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def _unquantized_wo(state_dict: StateDict, dtype: torch.dtype) -> StateDict:
    """fp8 ``wo`` weights upcast (with their scale, in scaled fp8 files) before the module takes them."""
    out, spans = dict(state_dict), host_pages.model_file_mappings()
    for key in [k for k, v in state_dict.items() if k.endswith(".DenseReluDense.wo.weight") and is_fp8(v)]:
        scale = out.pop(key.removesuffix(".weight") + SCALE_SUFFIX, None)
        stored, weight = out[key], out[key].float()
        out[key] = (weight if scale is None else weight * scale.float()).to(dtype)
        host_pages.release([stored], spans)
    return out


class FeedForwardInInputDtype(T5DenseGatedActDense):
    """T5's gated feed-forward whose output layer computes in its input's dtype (made by swapping ``__class__``).

    transformers' forward casts ``wo``'s input to ``wo``'s weight dtype, for a weight kept in float32; with an
    fp8 weight that would round the activations to fp8. Here an fp8 ``wo`` stays fp8 and upcasts its weight
    per call, like every other fp8 layer.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        return self.wo(self.dropout(hidden))


def load_t5_encoder(source: Source, dtype: torch.dtype = torch.bfloat16) -> T5EncoderModel:
    """The T5 encoder of a file such as ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` (or a
    state dict), bare or under ComfyUI's prefix, on the CPU in ``dtype`` (fp8 weights stay fp8).

    In float16 the feed-forward outputs (``wo``) are float32, as transformers' from_pretrained keeps them
    (``_keep_in_fp32_modules``): T5's activations there overflow fp16.
    """
    name, infos = source_infos(source)
    prefix = find_prefix(infos, T5_PREFIXES, T5_MARKER, "a T5 encoder", name)
    config = t5_config(infos)
    state_dict = source_tensors(source, prefix)
    embedding = next(state_dict[k] for k in T5_EMBEDDINGS if k in state_dict)
    state_dict.update(dict.fromkeys(T5_EMBEDDINGS, embedding))
    fp16 = dtype == torch.float16
    model = build_module(T5EncoderModel, T5Config(**config), _unquantized_wo(state_dict, dtype) if fp16 else state_dict,
                         name, dtype)
    # Assigning tensors one by one broke the tie. One module, not two sharing a weight: the memory manager
    # moves a module's weights around the calls of that module, and only the encoder's is called.
    model.encoder.embed_tokens = model.shared
    for module in model.modules():
        if isinstance(module, T5DenseGatedActDense):
            if fp16:
                module.wo.float()
            elif is_fp8(module.wo.weight):
                module.__class__ = FeedForwardInInputDtype
    return model.requires_grad_(False).eval()


def load_clip_file(source: Source, kind: str, dtype: torch.dtype = torch.float16,
                   projection: bool = True) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A separate CLIP-L or CLIP-G (``kind``: "clip_l" / "clip_g") text encoder (a file, or the part of an
    all-in-one file): transformers layout (bare or under ComfyUI's ``text_encoders.<kind>.transformer.``),
    or OpenCLIP's layout for CLIP-G. With a text projection in the file and ``projection``, the model has
    one (SD3 pools through it); ``projection=False`` drops it (Flux pools without)."""
    if kind not in CLIP_ACTIVATIONS:
        raise ValueError(f"kind must be one of {sorted(CLIP_ACTIVATIONS)}, not {kind!r}")
    name, infos = source_infos(source)
    prefixes = (f"text_encoders.{kind}.transformer.", "")
    if any(p + CLIP_MARKER in infos for p in prefixes):
        prefix = find_prefix(infos, prefixes, CLIP_MARKER, "a CLIP text encoder", name)
        config = clip_l_arch(infos, prefix).config | {"hidden_act": CLIP_ACTIVATIONS[kind]}
        shape = infos.get(f"{prefix}text_projection.weight") if projection else None
        if shape is not None:
            config["projection_dim"] = shape.shape[0]
        cls = CLIPTextModel if shape is None else CLIPTextModelWithProjection
        state_dict = source_tensors(source, prefix)
        if shape is None:
            state_dict.pop("text_projection.weight", None)
    elif kind == "clip_g" and OPEN_CLIP_MARKER in infos:
        config = open_clip_arch(infos, "", with_projection=True).config
        cls = CLIPTextModelWithProjection
        with init_empty_weights():
            shell = cls(CLIPTextConfig(**config))
        state_dict = convert_open_clip_checkpoint(shell, source_tensors(source), prefix="")
    else:
        layouts = "the transformers layout (text_model.*)" + (" or OpenCLIP's" if kind == "clip_g" else "")
        raise ModelFileError(f"{name} is not a {kind.replace('_', '-').upper()} text encoder in {layouts}. "
                             f"It has {len(infos)} tensors, e.g. {', '.join(sorted(infos)[:3])}.")
    return build_module(cls, CLIPTextConfig(**config), state_dict, name, dtype).requires_grad_(False).eval()


def vae16_config(infos: dict[str, TensorInfo], prefix: str, family: Family) -> dict:
    """An ``AutoencoderKL`` config for a Flux / SD3.x VAE: 16 latent channels, scaled and shifted, and
    no quant convs in BFL's and Stability's files."""
    scaling, shift = VAE16_LATENT_SCALE[family]
    return vae_config(infos, prefix, family) | {
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": f"{prefix}quant_conv.weight" in infos,
        "use_post_quant_conv": f"{prefix}post_quant_conv.weight" in infos,
        "sample_size": 1024,
    }


def load_vae16(source: Source, dtype: torch.dtype, family: Family) -> AutoencoderKL:
    """The 16-channel VAE of Flux (``ae.safetensors``) or SD3.x, in the LDM layout (bare, ``vae.`` or
    ``first_stage_model.``), from a file or a state dict."""
    if family not in VAE16_LATENT_SCALE:
        raise ValueError(f"family must be one of {[f.value for f in VAE16_LATENT_SCALE]}, not {family}")
    name, infos = source_infos(source)
    prefix = find_prefix(infos, VAE_PREFIXES, VAE_MARKER, "a VAE in the LDM layout", name)
    config = vae16_config(infos, prefix, family)
    if config["latent_channels"] != 16:
        raise ModelFileError(f"{name} is a VAE with {config['latent_channels']} latent channels; {family.value} "
                             "needs its 16-channel VAE (Flux: ae.safetensors).")
    state_dict = source_tensors(source, prefix)
    return build_module(AutoencoderKL, config, convert_ldm_vae_checkpoint(state_dict, config), name,
                        dtype).requires_grad_(False).eval()
