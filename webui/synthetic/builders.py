"""Stable Diffusion models with random, seeded weights, for tests and benchmarks.

``build_synthetic_model(family, "tiny")`` gives a model small and fast enough for CPU tests at 64x64 px;
``"full"`` gives the real SD1.5 / SD2.1 / SDXL-base architecture for GPU benchmarks (build it on
``device="meta"`` to inspect shapes without allocating).

Sizes follow the conventions the checkpoint loader infers architecture from:

* GroupNorm always has 32 groups, so every UNet/VAE channel count is a multiple of 32. The VAE keeps
  4 levels (8x downscale) and 4 latent channels.
* Text encoders use the real CLIP vocabulary (49408 tokens) and 77 positions, one attention head per
  64 channels (at least one) and an MLP 4x as wide as the model. OpenAI CLIP-L uses ``quick_gelu``,
  OpenCLIP (SD2's ViT-H, SDXL's bigG) uses ``gelu``.
* UNet attention: SD1 has 8 heads everywhere; SD2 and SDXL have one head per 64 channels and linear
  ``proj_in``/``proj_out``.
* SD2: single files hold all OpenCLIP-H resblocks, but diffusers' ``CLIPTextModel`` stops one short
  (SD2 conditions on the penultimate layer, so diffusers drops the last resblock and the unused text
  projection). The diffusers text encoder therefore has one layer fewer than the file;
  ``SyntheticModel.text_encoder_extras`` holds random weights for what diffusers drops so that
  exported files look like real ones.

Flux's transformer: ``build_flux_transformer``.
``"full"`` is Flux-dev (11.9B parameters: 19 double + 38 single blocks, 24 heads of 128 channels);
``"tiny"`` has 2 heads of 64 channels, so that tests also cover a head dim other than Flux's 128.
Its weights are drawn tensor by tensor on the target device, never as a float32 model on the CPU.
SD3 transformers are built the same way (``build_sd3_transformer``): ``"full"`` is SD3.5 Large (8.1B
parameters: 38 blocks of 38 heads of 64 channels); ``"tiny"`` has 3 blocks of 2 heads, with q/k norms
and one dual-attention block (SD3.5 Medium's) besides the last, pre-only one, so tests cover every kind of block.

Flux's and SD3's other components are built the same way: ``build_t5_encoder`` (T5 v1.1; full size is
T5-XXL's encoder), ``build_clip_text`` (CLIP-L or bigG, with text projection) and ``build_vae16`` (the
16-channel VAE). Tiny T5 is 128 wide, tiny CLIP-L 32 and bigG 64: the two CLIPs differ so that swapping
them fails, and together they stay narrower than T5, which SD3 zero-pads them to (as 768 + 1280 to 4096).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from webui.engine.conditioning.text_encoders import CLIP_ACTIVATIONS, VAE16_LATENT_SCALE
from webui.engine.families.flux import rope_axes
from webui.engine.formats.detect import Family

FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
SIZES: tuple[str, ...] = ("tiny", "full")

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_POSITIONS = 77
# Relative std of the noise added to every parameter (see _perturb).
PERTURB_SCALE = 0.02


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Constructor arguments for one family at one size."""

    unet: dict
    vae: dict
    text_encoders: tuple[CLIPTextConfig, ...]


@dataclasses.dataclass
class SyntheticModel:
    """The diffusers components of one model.

    ``text_encoders`` is ``[CLIPTextModel]`` for SD1/SD2 and ``[CLIPTextModel, CLIPTextModelWithProjection]``
    for SDXL. ``text_encoder_extras`` holds diffusers-layout weights (keys as in
    ``CLIPTextModelWithProjection.state_dict()``) of the first text encoder that single files carry but
    diffusers drops; empty except for SD2.
    """

    family: str
    size: str
    denoiser: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel | CLIPTextModelWithProjection]
    text_encoder_extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    prediction_type: str = "epsilon"


def _check_choice(what: str, value: object, choices: Iterable) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(choices)}")


def clip_config(hidden: int, layers: int, act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    """A CLIP text encoder of any width and depth with the real vocabulary and 77 positions, one head per 64
    channels, as the loaders derive it from a file."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
    )


def _heads_per_64(channels: Iterable[int]) -> tuple[int, ...]:
    """Diffusers' ``attention_head_dim`` for SD2/SDXL is really the head count: one per 64 channels."""
    return tuple(max(1, c // 64) for c in channels)


def vae_body(channels: tuple[int, ...], layers_per_block: int) -> dict:
    """What the VAEs of every family share: 4 levels (8x downscale) and GroupNorm's 32 groups."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=32,
    )


def _vae_body(size: str) -> dict:
    full = size == "full"
    return vae_body((128, 256, 512, 512) if full else (32, 32, 64, 64), 2 if full else 1)


def _vae_config(family: str, size: str) -> dict:
    full = size == "full"
    return _vae_body(size) | dict(
        latent_channels=4,
        sample_size={"sd1": 512, "sd2": 768, "sdxl": 1024}[family] if full else 64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def sd1_unet_config(levels: tuple[int, ...], layers_per_block: int, cross_attention_dim: int,
                    sample_size: int) -> dict:
    """An SD1.x UNet of any widths: cross-attention at every level but the deepest, 8 heads (SD1's convention)."""
    return dict(
        sample_size=sample_size,
        down_block_types=("CrossAttnDownBlock2D",) * (len(levels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(levels) - 1),
        block_out_channels=levels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        use_linear_projection=False,
    )


def _sd1_architecture(size: str) -> Architecture:
    full = size == "full"
    levels = (320, 640, 1280, 1280) if full else (32, 64)
    text = clip_config(768, 12, "quick_gelu") if full else clip_config(32, 3, "quick_gelu")
    unet = sd1_unet_config(levels, 2 if full else 1, text.hidden_size, 64 if full else 8)
    return Architecture(unet=unet, vae=_vae_config("sd1", size), text_encoders=(text,))


def _sd2_architecture(size: str) -> Architecture:
    full = size == "full"
    levels = (320, 640, 1280, 1280) if full else (64, 128)
    # Diffusers' layer count: one fewer than OpenCLIP-H's 24 resblocks (see the module docstring).
    text = clip_config(1024, 23, "gelu") if full else clip_config(32, 3, "gelu")
    unet = dict(
        sample_size=96 if full else 8,
        down_block_types=("CrossAttnDownBlock2D",) * (len(levels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(levels) - 1),
        block_out_channels=levels,
        layers_per_block=2 if full else 1,
        cross_attention_dim=text.hidden_size,
        attention_head_dim=_heads_per_64(levels),
        use_linear_projection=True,
    )
    return Architecture(unet=unet, vae=_vae_config("sd2", size), text_encoders=(text,))


def _sdxl_architecture(size: str) -> Architecture:
    full = size == "full"
    levels = (320, 640, 1280) if full else (32, 64, 64)
    clip_l = clip_config(768, 12, "quick_gelu") if full else clip_config(32, 3, "quick_gelu")
    # At least 10 bigG layers: diffusers recognises SDXL files by resblock 9 of the second embedder.
    clip_g = clip_config(1280, 32, "gelu", projection_dim=1280) if full else clip_config(64, 10, "gelu", 32)
    time_embed_dim = 256 if full else 8
    unet = dict(
        sample_size=128 if full else 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=levels,
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10) if full else (1, 1, 2),
        cross_attention_dim=clip_l.hidden_size + clip_g.hidden_size,
        attention_head_dim=_heads_per_64(levels),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # Pooled bigG embedding + 6 size/crop conditioning values, each embedded at time_embed_dim.
        projection_class_embeddings_input_dim=clip_g.projection_dim + 6 * time_embed_dim,
    )
    return Architecture(unet=unet, vae=_vae_config("sdxl", size), text_encoders=(clip_l, clip_g))


def architecture(family: str, size: str) -> Architecture:
    """Constructor arguments of ``family``; ``size="full"`` is the real SD1.5 / SD2.1 / SDXL-base model.

    For SD2 the text encoder config is diffusers' (one layer fewer than the file holds).
    """
    _check_choice("size", size, SIZES)
    _check_choice("family", family, FAMILIES)
    builders = {"sd1": _sd1_architecture, "sd2": _sd2_architecture, "sdxl": _sdxl_architecture}
    return builders[family](size)


@torch.no_grad()
def _perturb(tensors: Iterable[torch.Tensor]) -> None:
    """Add small noise to every tensor so that no weight is zero or a plain constant.

    Default init leaves norm weights at 1 and most biases at 0; a random model with those would hide
    conversion bugs that swap or drop such tensors. The noise is relative to each tensor's spread (or
    absolute for constant tensors), which keeps activations in their usual range.
    """
    for t in tensors:
        spread = t.float().std().item() if t.numel() > 1 and t.device.type != "meta" else 0.0
        t.add_(torch.randn_like(t), alpha=PERTURB_SCALE * (spread or 1.0))


def _sd2_text_encoder_extras(config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP-H's final resblock and text projection: in real SD2 files, dropped by diffusers."""
    last = CLIPEncoderLayer(config)
    prefix = f"text_model.encoder.layers.{config.num_hidden_layers}."
    extras = {prefix + k: v for k, v in last.state_dict().items()}
    width = config.hidden_size
    extras["text_projection.weight"] = torch.randn(width, width) * width**-0.5
    return extras


def build_synthetic_model(
    family: str,
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    prediction_type: str = "epsilon",
    inpainting: bool = False,
) -> SyntheticModel:
    """Build ``family`` at ``size`` with random weights that depend only on ``seed`` and the device type.

    ``device="meta"`` builds the architecture without memory. The caller's global RNG state is left
    untouched. ``prediction_type`` is what the exported scheduler config says ("v_prediction" for
    SD2-768-style models); the weights don't depend on it. ``inpainting``: an inpainting model's UNet, whose
    input has 9 channels (the latents, the mask, the masked picture's latents).
    """
    arch = architecture(family, size)
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch.unet, **({"in_channels": 9} if inpainting else {}))
        vae = AutoencoderKL(**arch.vae)
        text_encoders = [CLIPTextModel(arch.text_encoders[0])]
        if family == "sdxl":
            text_encoders.append(CLIPTextModelWithProjection(arch.text_encoders[1]))
        extras = _sd2_text_encoder_extras(arch.text_encoders[0]) if family == "sd2" else {}
        for module in (unet, vae, *text_encoders):
            _perturb(module.parameters())
        _perturb(extras.values())
    for module in (unet, vae, *text_encoders):
        module.eval()
    return SyntheticModel(family, size, unet, vae, text_encoders, extras, prediction_type)


def flux_architecture(size: str) -> dict:
    """``FluxTransformer2DModel`` constructor arguments; ``size="full"`` is Flux-dev."""
    _check_choice("size", size, SIZES)
    full = size == "full"
    head_dim = 128 if full else 64
    return dict(
        patch_size=1,
        in_channels=64,  # 2x2 patches of the 16-channel latent
        out_channels=64,
        num_layers=19 if full else 1,
        num_single_layers=38 if full else 2,
        attention_head_dim=head_dim,
        num_attention_heads=24 if full else 2,
        joint_attention_dim=4096 if full else 128,  # T5's width (tiny T5: 128)
        pooled_projection_dim=768 if full else 32,  # CLIP-L's width (tiny: 32)
        guidance_embeds=True,
        axes_dims_rope=rope_axes(head_dim),
    )


def _random_tensor(name: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random weights of default-init scale that, like ``_perturb``'s, are never zero or constant.

    Matrices get std ``1/sqrt(fan_in)``; norm scales (the only 1-D weights) 1 plus noise; biases noise.
    Drawn in float32 so that the values do not depend on ``dtype``.
    """
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if len(shape) > 1:
        noise *= shape[1] ** -0.5
    else:
        noise *= PERTURB_SCALE
        if name.endswith("weight"):
            noise += 1.0
    return noise.to(dtype)


def _random_model(cls: type[torch.nn.Module], config: dict | PretrainedConfig, seed: int,
                  device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``cls(**config)`` (``cls(config)`` for transformers) with its parameters on the meta device, then each
    tensor of its state dict drawn on ``device`` and cast to ``dtype``.

    No float32 copy of the model ever exists; ``device="meta"`` stops after the first step. Buffers left out
    of the state dict (CLIP's position ids) are made on ``device`` as the model makes them; a tied weight
    (T5's token embedding) is drawn once. The weights depend only on ``seed`` and the device type; the
    caller's global RNG state is left untouched.
    """
    device = torch.device(device)
    with init_empty_weights(include_buffers=False), device:
        model = cls(config) if isinstance(config, PretrainedConfig) else cls(**config)
    tied = getattr(model, "all_tied_weights_keys", {})
    shapes = {k: v for k, v in model.state_dict().items() if k not in tied}
    if device.type == "meta":
        weights = {k: v.to(dtype) for k, v in shapes.items()}
    else:
        generator = torch.Generator(device).manual_seed(seed)
        weights = {k: _random_tensor(k, v.shape, generator, dtype) for k, v in shapes.items()}
    model.load_state_dict(weights, strict=False, assign=True)  # only the tied weights are left out
    if isinstance(model, PreTrainedModel):
        model.tie_weights()
    return model.eval()


def build_flux_transformer(
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fill: bool = False,
) -> FluxTransformer2DModel:
    """Flux at ``size`` with random weights (see ``_random_model``); full size in bfloat16 takes 23.8 GB. ``fill``:
    Flux Fill's input width (the latents, the masked picture's latents and the mask's 8x8 patches, packed)."""
    config = flux_architecture(size) | ({"in_channels": 4 * (16 + 16 + 64)} if fill else {})
    return _random_model(FluxTransformer2DModel, config, seed, device, dtype)


def sd3_architecture(size: str) -> dict:
    """``SD3Transformer2DModel`` constructor arguments; ``size="full"`` is SD3.5 Large."""
    _check_choice("size", size, SIZES)
    full = size == "full"
    width = 2432 if full else 128
    return dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=38 if full else 3,
        attention_head_dim=64,
        num_attention_heads=width // 64,
        joint_attention_dim=4096 if full else 128,  # T5's width, also room for CLIP-L and CLIP-G side by side
        caption_projection_dim=width,
        pooled_projection_dim=2048 if full else 96,  # CLIP-L's and CLIP-G's pooled outputs (tiny: 32 + 64)
        out_channels=16,
        pos_embed_max_size=192 if full else 8,
        dual_attention_layers=() if full else (0,),
        qk_norm="rms_norm",
    )


def build_sd3_transformer(
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SD3Transformer2DModel:
    """SD3 at ``size`` with random weights (see ``_random_model``); full size in bfloat16 takes 16.3 GB."""
    return _random_model(SD3Transformer2DModel, sd3_architecture(size), seed, device, dtype)


CLIP_KINDS: tuple[str, ...] = tuple(CLIP_ACTIVATIONS)
# (width, layers) of each CLIP text encoder at each size.
CLIP_TEXT_SIZES = {"clip_l": {"full": (768, 12), "tiny": (32, 2)}, "clip_g": {"full": (1280, 32), "tiny": (64, 2)}}


def t5_architecture(size: str) -> T5Config:
    """A T5 v1.1 encoder config (gated GELU, as Flux and SD3 use); ``size="full"`` is T5-XXL's encoder.

    Tiny T5's 128 tokens leave room for the tiny tokenizer's pieces (``tokenizer.write_t5_tokenizer``), as
    T5-XXL's 32128 do for its 32100.
    """
    _check_choice("size", size, SIZES)
    full = size == "full"
    return T5Config(
        vocab_size=32128 if full else 128,
        d_model=4096 if full else 128,
        d_kv=64,
        d_ff=10240 if full else 256,
        num_layers=24 if full else 2,
        num_heads=64 if full else 2,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )


def build_t5_encoder(
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> T5EncoderModel:
    """T5's encoder at ``size`` with random weights (see ``_random_model``); full size in bfloat16 takes 9.5 GB."""
    return _random_model(T5EncoderModel, t5_architecture(size), seed, device, dtype)


def clip_text_architecture(kind: str, size: str) -> CLIPTextConfig:
    """OpenAI CLIP-L's (``kind="clip_l"``) or OpenCLIP bigG's (``"clip_g"``) text encoder config, its text
    projection as wide as the model; ``size="full"`` is the real one."""
    _check_choice("kind", kind, CLIP_KINDS)
    _check_choice("size", size, SIZES)
    width, layers = CLIP_TEXT_SIZES[kind][size]
    return clip_config(width, layers, CLIP_ACTIVATIONS[kind])


def build_clip_text(
    kind: str,
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPTextModelWithProjection:
    """CLIP-L or bigG at ``size`` with random weights (see ``_random_model``), with its text projection.

    SD3 pools both encoders through their projections; Flux takes CLIP-L's pooled output before it, and
    Flux's ``clip_l.safetensors`` has no projection (``ldm_export.write_clip_file(..., projection=False)``).
    """
    return _random_model(CLIPTextModelWithProjection, clip_text_architecture(kind, size), seed, device, dtype)


def vae16_architecture(family: Family, size: str) -> dict:
    """``AutoencoderKL`` arguments of Flux's or SD3's VAE: the SD VAE's body with 16 latent channels, no
    quant convs (BFL's and Stability's files have none) and the family's latent scale and shift."""
    _check_choice("family", family, VAE16_LATENT_SCALE)
    _check_choice("size", size, SIZES)
    scaling, shift = VAE16_LATENT_SCALE[family]
    return _vae_body(size) | dict(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling,
        shift_factor=shift,
        sample_size=1024 if size == "full" else 64,
    )


def build_vae16(
    size: str = "tiny",
    family: Family = Family.FLUX,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKL:
    """Flux's or SD3's 16-channel VAE at ``size`` with random weights (see ``_random_model``)."""
    return _random_model(AutoencoderKL, vae16_architecture(family, size), seed, device, dtype)
