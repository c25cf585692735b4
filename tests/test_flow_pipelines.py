"""Flux and SD3.x through the engine, against diffusers' own FluxPipeline / StableDiffusion3Pipeline.

Tiny models are written by the project's code in the layouts users download (all-in-one checkpoints,
transformer-only files with separate clip_l / clip_g / t5xxl / ae files, GGUF); the references are
diffusers' pipelines over the modules the files were written from, in float32 on the CPU.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from gguf import GGMLQuantizationType as Q
from transformers import T5TokenizerFast

from tests.conftest import make_engine
from webui.engine.formats.detect import Family
from webui.engine.infotext import parse_infotext
from webui.engine.weights.gguf_load import quantize_where_possible, write_gguf
from webui.synthetic.ldm_export import (
    flux_to_bfl,
    sd3_to_sai,
    write_clip_file,
    write_flux_all_in_one,
    write_flux_transformer,
    write_sd3_all_in_one,
    write_t5_file,
    write_vae_file,
)
from webui.engine.request import GenerationRequest
from webui.synthetic.builders import (
    build_clip_text,
    build_flux_transformer,
    build_sd3_transformer,
    build_t5_encoder,
    build_vae16,
)
from webui.engine.conditioning.tokenizer import clip_tokenizer, write_t5_tokenizer
from webui.errors import UserError

PROMPT = "a red circle on the left, blue background"
NEGATIVE = "blurry"
SEEDS = [42, 43]
SIZE = 64
STEPS = 4


def images(result) -> np.ndarray:
    return np.stack([np.asarray(img) for img in result.images]).astype(int)


def generators() -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in SEEDS]


@pytest.fixture(scope="module")
def parts() -> dict:
    return {
        "flux": build_flux_transformer("tiny", seed=1),
        "sd3": build_sd3_transformer("tiny", seed=2),
        "clip_l": build_clip_text("clip_l", seed=3),
        "clip_g": build_clip_text("clip_g", seed=4),
        "t5": build_t5_encoder(seed=5),
        "flux_vae": build_vae16("tiny", Family.FLUX, seed=6),
        "sd3_vae": build_vae16("tiny", Family.SD3, seed=7),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, parts) -> Path:
    """A models folder as a Flux/SD3 user has it."""
    root = tmp_path_factory.mktemp("flow-models")
    ckpts, encoders, vaes = root / "Stable-diffusion", root / "text_encoder", root / "VAE"
    for folder in (ckpts, encoders, vaes):
        folder.mkdir()
    f32 = torch.float32
    write_flux_all_in_one(ckpts / "flux-aio.safetensors", parts["flux"], parts["clip_l"], parts["t5"], parts["flux_vae"],
                          dtype=f32)
    write_flux_transformer(ckpts / "flux-transformer.safetensors", parts["flux"], f32)
    sai = sd3_to_sai({k: v.clone() for k, v in parts["sd3"].state_dict().items()}, parts["sd3"].config)
    write_sd3_all_in_one(ckpts / "sd3-aio.safetensors", sai, parts["clip_l"], parts["clip_g"], parts["t5"],
                         parts["sd3_vae"], dtype=f32)
    bfl = flux_to_bfl({k: v.clone() for k, v in parts["flux"].state_dict().items()}, parts["flux"].config)
    write_gguf(ckpts / "flux-Q8_0.gguf", bfl, quantize_where_possible(Q.Q8_0), arch="flux")
    write_clip_file(encoders / "clip_l.safetensors", parts["clip_l"], f32, projection=False)
    write_t5_file(encoders / "t5xxl_fp32.safetensors", parts["t5"], f32)
    write_vae_file(vaes / "ae.safetensors", parts["flux_vae"], f32)
    write_t5_tokenizer(encoders / "t5_tokenizer")
    return root


def engine_for(tmp_path: Path, files: Path, *names: str, device: str = "cpu"):
    return make_engine(tmp_path, *(files / "Stable-diffusion" / n for n in names),
                       extra_args=("--vae-dir", str(files / "VAE"), "--text-encoder-dir", str(files / "text_encoder"),
                                   "--device", device))


def flux_request(checkpoint: str, **overrides) -> GenerationRequest:
    fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=1.0,
                  distilled_cfg_scale=3.5, sampler_name="Euler", scheduler="Automatic", seed=SEEDS[0],
                  batch_size=len(SEEDS), checkpoint=checkpoint, save_images=False)
    return GenerationRequest(**(fields | overrides))


def flux_pipeline(cls, parts: dict, files: Path, transformer: torch.nn.Module | None = None):
    """diffusers' Flux pipeline ``cls`` over the modules the test files were written from (another transformer:
    ``transformer``)."""
    clip_l = copy.deepcopy(parts["clip_l"])
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=parts["flux_vae"], text_encoder=clip_l.text_model if hasattr(clip_l, "text_model") else clip_l,
        tokenizer=clip_tokenizer(), text_encoder_2=parts["t5"],
        tokenizer_2=T5TokenizerFast.from_pretrained(files / "text_encoder" / "t5_tokenizer", local_files_only=True),
        transformer=parts["flux"] if transformer is None else transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_reference(parts: dict, files: Path) -> np.ndarray:
    out = flux_pipeline(FluxPipeline, parts, files)(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
               num_images_per_prompt=len(SEEDS), max_sequence_length=256, generator=generators())
    return np.stack([np.asarray(img) for img in out.images]).astype(int)


def test_flux_all_in_one_matches_diffusers(tmp_path, parts, files):
    engine = engine_for(tmp_path, files, "flux-aio.safetensors")
    result = engine.txt2img(flux_request("flux-aio.safetensors"))
    ours, ref = images(result), flux_reference(parts, files)
    assert ours.shape == ref.shape == (2, SIZE, SIZE, 3) and ref.std() > 5
    diff = np.abs(ours - ref)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
    params = parse_infotext(result.infotexts[0])
    assert params["Distilled CFG Scale"] == "3.5" and "Shift" not in params
    assert engine.models.current.family is Family.FLUX


def test_flux_transformer_only_file_takes_the_chosen_modules(tmp_path, files):
    engine = engine_for(tmp_path, files, "flux-aio.safetensors", "flux-transformer.safetensors")
    whole = images(engine.txt2img(flux_request("flux-aio.safetensors")))
    with pytest.raises(UserError) as missing:
        engine.txt2img(flux_request("flux-transformer.safetensors"))
    assert missing.value.field == "forge_additional_modules" and "VAE / Text Encoder" in str(missing.value)
    engine.options.update({"forge_additional_modules": ["ae.safetensors", "clip_l.safetensors",
                                                        "t5xxl_fp32.safetensors"]})
    result = engine.txt2img(flux_request("flux-transformer.safetensors"))
    assert np.array_equal(images(result), whole), "the same weights from separate files give the same images"
    params = parse_infotext(result.infotexts[0])
    assert [params[f"Module {i}"] for i in (1, 2, 3)] == ["ae", "clip_l", "t5xxl_fp32"]


def test_flux_gguf_q8_0_stays_close_to_the_float_model(tmp_path, files):
    engine = engine_for(tmp_path, files, "flux-aio.safetensors", "flux-Q8_0.gguf")
    engine.options.update({"forge_additional_modules": ["ae.safetensors", "clip_l.safetensors",
                                                        "t5xxl_fp32.safetensors"]})
    full = images(engine.txt2img(flux_request("flux-aio.safetensors")))
    quantized = images(engine.txt2img(flux_request("flux-Q8_0.gguf")))
    # Q8_0 keeps about 8 bits per weight: measured mean difference 0.3 levels of 255 here.
    assert np.abs(quantized - full).mean() < 2.0 and np.abs(quantized - full).max() <= 24


def test_flux_cfg_uses_the_negative_prompt_and_sizes_must_be_multiples_of_16(tmp_path, files):
    engine = engine_for(tmp_path, files, "flux-aio.safetensors")
    plain = images(engine.txt2img(flux_request("flux-aio.safetensors")))
    guided = images(engine.txt2img(flux_request("flux-aio.safetensors", cfg_scale=3.0)))
    assert np.abs(plain - guided).mean() > 1
    with pytest.raises(UserError) as bad:
        engine.txt2img(flux_request("flux-aio.safetensors", width=72))
    assert bad.value.field == "width" and "16" in str(bad.value)


def test_missing_t5_tokenizer_is_a_clear_error(tmp_path, files, monkeypatch):
    monkeypatch.setattr("webui.engine.conditioning.t5_prompts.HUB_CACHE_REPOS", ())
    engine = make_engine(tmp_path, files / "Stable-diffusion" / "flux-aio.safetensors")
    with pytest.raises(UserError) as missing:
        engine.txt2img(flux_request("flux-aio.safetensors"))
    assert "tokenizer" in str(missing.value) and "t5_tokenizer" in str(missing.value)
    assert engine.txt2img(GenerationRequest(steps=1, width=64, height=64, save_images=False,
                                            checkpoint="demo-shapes")).images, "the app keeps working"


def sd3_pipeline_parts(parts: dict, files: Path, with_t5: bool) -> dict:
    """The modules diffusers' SD3 pipelines take, as the test files were written from."""
    clip_l = copy.deepcopy(parts["clip_l"])  # SD3's files carry CLIP-L without a projection: diffusers' identity
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(clip_l.config.hidden_size))
    t5_tokenizer = T5TokenizerFast.from_pretrained(files / "text_encoder" / "t5_tokenizer", local_files_only=True)
    return dict(
        transformer=parts["sd3"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=parts["sd3_vae"],
        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=parts["clip_g"], tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=parts["t5"] if with_t5 else None, tokenizer_3=t5_tokenizer if with_t5 else None)


def sd3_reference(parts: dict, files: Path, with_t5: bool) -> np.ndarray:
    pipe = StableDiffusion3Pipeline(**sd3_pipeline_parts(parts, files, with_t5))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, num_inference_steps=STEPS,
               guidance_scale=5.0, num_images_per_prompt=len(SEEDS), max_sequence_length=256,
               sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)), generator=generators())
    return np.stack([np.asarray(img) for img in out.images]).astype(int)


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_all_in_one_matches_diffusers(tmp_path, parts, files, with_t5):
    engine = engine_for(tmp_path, files, "sd3-aio.safetensors")
    engine.options.update({"sd3_enable_t5": with_t5})
    req = flux_request("sd3-aio.safetensors", cfg_scale=5.0)
    result = engine.txt2img(req)
    ours, ref = images(result), sd3_reference(parts, files, with_t5)
    assert ours.shape == ref.shape and ref.std() > 5
    diff = np.abs(ours - ref)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
    assert (engine.models.current.t5 is not None) == with_t5
    params = parse_infotext(result.infotexts[0])
    assert params["Shift"] == "3" and "Distilled CFG Scale" not in params


def test_flow_models_refuse_samplers_and_schedules_they_lack(tmp_path, files):
    engine = engine_for(tmp_path, files, "sd3-aio.safetensors")
    for fields, field in (({"sampler_name": "LMS"}, "sampler_name"), ({"scheduler": "Karras"}, "scheduler")):
        with pytest.raises(UserError) as bad:
            engine.txt2img(flux_request("sd3-aio.safetensors", **fields))
        assert bad.value.field == field
    seeds_again = engine.txt2img(flux_request("sd3-aio.safetensors", sampler_name="DPM++ 2M", batch_size=1))
    assert seeds_again.images and np.asarray(seeds_again.images[0]).std() > 1


def test_ui_shows_the_fields_of_the_checkpoints_family(tmp_path, files):
    pytest.importorskip("gradio")  # the GPU machine has no UI packages
    from webui.ui.model_row import module_choices
    from webui.ui.txt2img import fields_for_family

    engine = engine_for(tmp_path, files, "flux-aio.safetensors", "sd3-aio.safetensors")
    distilled, shift, clip_skip, width, _, _, cfg, *_ = fields_for_family(engine, "flux-aio.safetensors")
    assert distilled["visible"] and not shift["visible"] and not clip_skip["visible"] and cfg["value"] == 1.0
    distilled, shift, clip_skip, width, _, _, cfg, *_ = fields_for_family(engine, "sd3-aio.safetensors")
    assert not distilled["visible"] and shift["visible"] and shift["value"] == 3.0 and "value" not in cfg
    assert "value" not in width, "no declared resolution: the size is left alone"
    distilled, shift, clip_skip, width, height, *preset = fields_for_family(engine, "demo-shapes.safetensors")
    assert all("value" not in update for update in preset), "no few-step model: steps, CFG, sampler unchanged"
    assert width["value"] == height["value"] == 128, "the demo's declared resolution"
    assert not distilled["visible"] and not shift["visible"] and clip_skip["visible"]
    names, chosen = module_choices(engine)
    assert {"ae.safetensors", "clip_l.safetensors", "t5xxl_fp32.safetensors"} <= set(names) and chosen == []


def test_api_request_takes_distilled_cfg_and_modules_per_request(tmp_path, files):
    pytest.importorskip("fastapi")
    from webui.api_body import read_txt2img

    engine = engine_for(tmp_path, files, "flux-aio.safetensors", "flux-transformer.safetensors")
    whole = images(engine.txt2img(flux_request("flux-aio.safetensors", distilled_cfg_scale=5.0)))
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": SIZE, "height": SIZE, "steps": STEPS,
            "cfg_scale": 1, "distilled_cfg_scale": 5.0, "sampler_name": "Euler", "seed": SEEDS[0],
            "batch_size": len(SEEDS), "override_settings": {
                "sd_model_checkpoint": "flux-transformer.safetensors",
                "forge_additional_modules": ["ae.safetensors", "clip_l.safetensors", "t5xxl_fp32.safetensors"]}}
    call = read_txt2img(body, engine.options, engine.known_schedule_type)
    assert np.array_equal(images(engine.txt2img(call.request)), whole)
    assert engine.options["forge_additional_modules"] == [], "a per-request override leaves the settings alone"
    with pytest.raises(UserError) as bad:
        engine.txt2img(flux_request("flux-transformer.safetensors", modules=["../../etc/passwd"]))
    assert bad.value.field == "forge_additional_modules"
