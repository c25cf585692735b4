"""Flux and SD3 ControlNets (issue 27), in diffusers' layout as InstantX and Stability ship them: the engine's images
equal diffusers' FluxControlNetPipeline / StableDiffusion3ControlNetPipeline on the same tiny weights, seed and steps
(one unit, its weight and guidance end; two units as FluxMultiControlNetModel; XLabs' layout; InstantX's and SD3.5's
SD3 kinds),
with the control image's latents taken as the mean of the VAE's distribution in both (the pipelines sample it).
Union models run in the unit's control type; control modes are refused naming the field."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline
from diffusers.models import FluxMultiControlNetModel
from diffusers.pipelines.flux import pipeline_flux_controlnet
from safetensors import safe_open
from safetensors.torch import save_file

from tests.controlnet_files import control_picture
from tests.test_flow_pipelines import (NEGATIVE, SEEDS, SIZE, STEPS, PROMPT, engine_for, files,  # noqa: F401
                                       flux_pipeline, flux_request, generators, images, parts)
from webui.engine.control.units import ControlUnit
from webui.engine.infotext import parse_infotext
from webui.errors import UserError
from webui.synthetic.ldm_export import write_controlnet

CHECKPOINT = "flux-aio.safetensors"


def flux_controlnet(transformer, seed: int, union: bool = False, xlabs: bool = False) -> FluxControlNetModel:
    """A ControlNet grown from the transformer (InstantX's shape: fewer blocks; XLabs': two double blocks and an
    input hint block), its zero layers made non-zero."""
    config = transformer.config
    model = FluxControlNetModel.from_transformer(transformer, num_layers=2 if xlabs else 1,
                                                 num_single_layers=0 if xlabs else 1,
                                                 attention_head_dim=config.attention_head_dim,
                                                 num_attention_heads=config.num_attention_heads)
    if union or xlabs:
        grown = model
        hinted = dict(conditioning_embedding_channels=16, patch_size=2)
        model = FluxControlNetModel.from_config(model.config, **(dict(num_mode=10) if union else hinted))
        model.load_state_dict(grown.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder",
                            "input_hint_block.conv_out")):
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    return model.eval()


@pytest.fixture
def setup(tmp_path, parts, files):  # noqa: F811
    engine = engine_for(tmp_path, files, CHECKPOINT)
    folder = engine.config.paths.controlnet_dir
    folder.mkdir(parents=True)
    models = [flux_controlnet(parts["flux"], seed) for seed in (1, 2)]
    for index, model in enumerate(models):
        save_file(model.state_dict(), folder / f"flux-control-{index}.safetensors")
    return engine, models


def reference(parts, files, controlnet, monkeypatch, **kwargs) -> np.ndarray:  # noqa: F811
    monkeypatch.setattr(pipeline_flux_controlnet, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    pipe = flux_pipeline(functools.partial(FluxControlNetPipeline, controlnet=controlnet), parts, files)
    out = pipe(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
               num_images_per_prompt=len(SEEDS), max_sequence_length=256, generator=generators(), **kwargs)
    return np.stack([np.asarray(img) for img in out.images]).astype(int)


def test_one_flux_controlnet_equals_diffusers(setup, parts, files, monkeypatch):  # noqa: F811
    engine, (model, _) = setup
    unit = ControlUnit(model="flux-control-0", image=control_picture(SIZE), weight=0.8, guidance_end=0.75,
                       resize_mode="Just Resize")
    result = engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit]))
    expected = reference(parts, files, model, monkeypatch, control_image=control_picture(SIZE),
                         controlnet_conditioning_scale=0.8, control_guidance_end=0.75)
    plain = images(engine.txt2img(flux_request(CHECKPOINT)))
    got = images(result)
    assert np.abs(got - plain).mean() > 1, "the ControlNet changes the picture"
    assert np.abs(got - expected).max() <= 2, np.abs(got - expected).max()
    assert "Model: flux-control-0" in parse_infotext(result.infotexts[0])["ControlNet 0"]


def test_two_flux_controlnets_equal_the_multi_controlnet(setup, parts, files, monkeypatch):  # noqa: F811
    engine, models = setup
    pictures = [control_picture(SIZE), control_picture(SIZE, left=False)]
    units = [ControlUnit(model=f"flux-control-{i}", image=p, weight=w, resize_mode="Just Resize")
             for i, (p, w) in enumerate(zip(pictures, (0.7, 0.5)))]
    got = images(engine.txt2img(flux_request(CHECKPOINT, controlnet=units)))
    expected = reference(parts, files, FluxMultiControlNetModel(models), monkeypatch, control_image=pictures,
                         controlnet_conditioning_scale=[0.7, 0.5], control_mode=None)
    assert np.abs(got - expected).max() <= 2


def test_an_xlabs_controlnet_equals_diffusers(setup, parts, files, monkeypatch):  # noqa: F811
    """XLabs' layout (BFL's names, a hint block that takes the picture itself, its residuals repeated over the
    transformer's double blocks): the engine reads the file as diffusers' FluxControlNetModel with that hint block, and
    draws what diffusers' pipeline draws with it."""
    engine, _ = setup
    model = flux_controlnet(parts["flux"], 4, xlabs=True)
    path = write_controlnet(engine.config.paths.controlnet_dir / "xlabs-canny.safetensors", model, "xlabs",
                            torch.float32)
    with safe_open(path, "pt") as file:
        assert {"pos_embed_input.weight", "input_hint_block.14.weight", "double_blocks.1.img_attn.qkv.weight",
                "controlnet_blocks.1.weight"} <= set(file.keys())
    picture = control_picture(SIZE)
    unit = ControlUnit(model="xlabs-canny", image=picture, weight=0.7, resize_mode="Just Resize")
    got = images(engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit])))
    expected = reference(parts, files, model, monkeypatch, control_image=picture, controlnet_conditioning_scale=0.7)
    assert np.abs(got - images(engine.txt2img(flux_request(CHECKPOINT)))).mean() > 1, "the ControlNet counts"
    assert np.abs(got - expected).max() <= 2


def test_an_xlabs_flux_ip_adapter_equals_diffusers(setup, parts, files, monkeypatch):  # noqa: F811
    """XLabs' Flux IP-Adapter (read by diffusers' own loader in the reference): the image tokens beside the text in
    every double block, at the unit's weight, give diffusers' FluxPipeline's picture with ``load_ip_adapter`` — with
    real CFG too (CFG's other half: a black picture's embedding, as the pipeline's); a second unit outside its guidance
    start and end adds exactly nothing (its layers' biases notwithstanding)."""
    from diffusers import FluxPipeline
    from transformers import CLIPImageProcessor

    from webui.synthetic.ip_adapter import flux_ip_adapter_state, write_clip_vision

    engine, _ = setup
    folder = engine.config.paths.controlnet_dir
    save_file(flux_ip_adapter_state(parts["flux"], embedding=24, seed=3), folder / "flux-ip-adapter.safetensors")
    encoder = write_clip_vision(engine.config.paths.clip_vision_dir / "clip_vision_l.safetensors", projection=24)
    picture = control_picture(SIZE)
    unit = ControlUnit(model="flux-ip-adapter", image=picture, module="ip-adapter-auto", weight=0.8)
    got = images(engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit])))
    with_cfg = images(engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit], cfg_scale=2.0)))
    idle = ControlUnit(model="flux-ip-adapter", image=control_picture(SIZE, left=False), weight=1.0,
                       guidance_start=0.9)  # (of STEPS 4: never)
    assert np.array_equal(images(engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit, idle]))), got)
    assert np.abs(got - images(engine.txt2img(flux_request(CHECKPOINT)))).mean() > 1, "the image prompt counts"

    size = encoder.config.image_size
    pipe = flux_pipeline(functools.partial(FluxPipeline, image_encoder=encoder, feature_extractor=CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size})), parts, files,
        transformer=copy.deepcopy(parts["flux"]))
    pipe.load_ip_adapter(str(folder), weight_name="flux-ip-adapter.safetensors")
    pipe.set_ip_adapter_scale(0.8)
    for cfg, ours in ((1.0, got), (2.0, with_cfg)):
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=cfg, width=SIZE, height=SIZE,
                   num_inference_steps=STEPS, guidance_scale=3.5, num_images_per_prompt=len(SEEDS),
                   max_sequence_length=256, generator=generators(), ip_adapter_image=picture)
        expected = np.stack([np.asarray(img) for img in out.images]).astype(int)
        assert np.abs(ours - expected).max() <= 2, (cfg, np.abs(ours - expected).max())


def test_a_union_model_runs_in_the_units_control_type(setup, parts, files, monkeypatch):  # noqa: F811
    """A Flux Union ControlNet in the mode of the unit's union_control_type (sd-webui-controlnet's names: "Depth" is
    its mode 2), as diffusers' pipeline with that control_mode; in the mode its preprocessor implies where the type
    is "Unknown"; refused naming the field where neither says one it knows."""
    engine, _ = setup
    union = flux_controlnet(parts["flux"], 3, union=True)
    save_file(union.state_dict(), engine.config.paths.controlnet_dir / "union.safetensors")
    picture = control_picture(SIZE)
    unit = ControlUnit(model="union", image=picture, union_control_type="Depth", resize_mode="Just Resize")
    result = engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit]))
    expected = reference(parts, files, union, monkeypatch, control_image=picture, control_mode=2)
    assert np.abs(images(result) - expected).max() <= 2
    assert "Union Control Type: Depth" in parse_infotext(result.infotexts[0])["ControlNet 0"]
    tile = ControlUnit(model="union", image=picture, module="tile_resample", resize_mode="Just Resize")
    tiled = reference(parts, files, union, monkeypatch, control_image=picture, control_mode=1)
    assert np.abs(images(engine.txt2img(flux_request(CHECKPOINT, controlnet=[tile]))) - tiled).max() <= 2
    for unit, field, words in (
            (ControlUnit(model="union", image=picture), "controlnet[0].union_control_type", "knows Hard Edge, Tile"),
            (ControlUnit(model="union", image=picture, union_control_type="Segmentation"),
             "controlnet[0].union_control_type", "'Segmentation'"),
            (ControlUnit(model="flux-control-0", image=picture, control_mode="My prompt is more important"),
             "controlnet[0].control_mode", "no control modes")):
        with pytest.raises(UserError) as caught:
            engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit], batch_size=1))
        assert caught.value.field == field and words in str(caught.value)


def test_a_flux_controlnet_on_a_gguf_model_draws_what_it_draws_on_the_float_model(tmp_path, files, parts):  # noqa: F811
    """The ControlNet beside a Q8_0 transformer (and with CFG, its block samples for both halves): close to the
    float model's picture with the same unit, as the GGUF model alone is."""
    engine = engine_for(tmp_path, files, CHECKPOINT, "flux-Q8_0.gguf")
    engine.config.paths.controlnet_dir.mkdir(parents=True)
    save_file(flux_controlnet(parts["flux"], 1).state_dict(), engine.config.paths.controlnet_dir / "edges.safetensors")
    engine.options.update({"forge_additional_modules": ["ae.safetensors", "clip_l.safetensors",
                                                        "t5xxl_fp32.safetensors"]})
    unit = ControlUnit(model="edges", image=control_picture(SIZE))
    full = images(engine.txt2img(flux_request(CHECKPOINT, controlnet=[unit], cfg_scale=2.0)))
    quantized = images(engine.txt2img(flux_request("flux-Q8_0.gguf", controlnet=[unit], cfg_scale=2.0)))
    assert np.abs(quantized - full).mean() < 2.0


def sd3_controlnet(transformer, seed: int, sd35: bool = False) -> torch.nn.Module:
    """An SD3 ControlNet as InstantX's are made (the transformer's embedders and first block), or as SD3.5's
    (``sd35``: no position embedding of its own, blocks without text, the pooled text not zeroed); its output layers
    and the control image's embedding made non-zero."""
    from diffusers import SD3ControlNetModel

    kind = dict(use_pos_embed=False, joint_attention_dim=None, force_zeros_for_pooled_projection=False) if sd35 else {}
    model = SD3ControlNetModel.from_config(dict(transformer.config), num_layers=1, extra_conditioning_channels=0,
                                           **kind)
    for part in ("time_text_embed",) if sd35 else ("pos_embed", "time_text_embed", "context_embedder"):
        getattr(model, part).load_state_dict(getattr(transformer, part).state_dict())
    if not sd35:
        model.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.startswith(("controlnet_blocks", "pos_embed_input")):
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    return model.eval()


@pytest.mark.parametrize("sd35", [False, True])
def test_an_sd3_controlnet_equals_diffusers(tmp_path, parts, files, monkeypatch, sd35):  # noqa: F811
    """InstantX's kind (zeroed pooled text, unshifted control latents) and SD3.5's (the transformer's position
    embedding, no text), with CFG: diffusers' StableDiffusion3ControlNetPipeline's images (its control latents sampled
    there: the mean here and there)."""
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from tests.test_flow_pipelines import NEGATIVE, sd3_pipeline_parts

    model = sd3_controlnet(parts["sd3"], 4, sd35)
    engine = engine_for(tmp_path, files, "sd3-aio.safetensors")
    engine.config.paths.controlnet_dir.mkdir(parents=True)
    save_file(model.state_dict(), engine.config.paths.controlnet_dir / "sd3-edges.safetensors")
    unit = ControlUnit(model="sd3-edges", image=control_picture(SIZE), weight=0.9, guidance_end=0.75,
                       resize_mode="Just Resize")
    got = images(engine.txt2img(flux_request("sd3-aio.safetensors", cfg_scale=5.0, controlnet=[unit])))
    plain = images(engine.txt2img(flux_request("sd3-aio.safetensors", cfg_scale=5.0)))
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    pipe = StableDiffusion3ControlNetPipeline(**sd3_pipeline_parts(parts, files, with_t5=True),
                                              controlnet=copy.deepcopy(model))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, num_inference_steps=STEPS,
               guidance_scale=5.0, num_images_per_prompt=len(SEEDS), max_sequence_length=256,
               sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)), generator=generators(),
               control_image=control_picture(SIZE), controlnet_conditioning_scale=0.9, control_guidance_end=0.75)
    expected = np.stack([np.asarray(img) for img in out.images]).astype(int)
    assert np.abs(got - plain).mean() > 1, "the ControlNet changes the picture"
    assert np.abs(got - expected).max() <= 2, np.abs(got - expected).max()
