"""Flux / SD3 components built by ``synthetic`` and written by ``ldm_export`` in the layouts users download,
read back by the engine's loaders; the tiny T5 tokenizer; the full-size builders' real parameter counts."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, is_t5_in_single_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5TokenizerFast

from tests.test_flux import inputs as flux_inputs
from webui.engine.families.flux import load_flux_transformer
from webui.engine.formats.detect import Family
from webui.engine.formats.files import load_state_dict, read_tensor_infos
from webui.engine.weights.fp8 import FP8_DTYPES, to_fp8
from webui.synthetic.ldm_export import (
    write_clip_file,
    write_flux_all_in_one,
    write_sd3_all_in_one,
    write_t5_file,
    write_vae_file,
)
from webui.synthetic.builders import (
    build_clip_text,
    build_flux_transformer,
    build_t5_encoder,
    build_vae16,
    t5_architecture,
)
from webui.engine.conditioning.text_encoders import load_clip_file, load_t5_encoder, load_vae16
from webui.engine.conditioning.tokenizer import clip_tokenizer, write_t5_tokenizer

E4M3 = torch.float8_e4m3fn
PROMPT = "a photo of a cat"
# Top-level parts of the all-in-one files: Comfy-Org's flux1-dev-fp8 and Stability's SD3 files.
FLUX_PARTS = {
    "model.diffusion_model.": "F8_E4M3",
    "text_encoders.clip_l.transformer.text_model.": "F16",
    "text_encoders.clip_l.transformer.text_projection.weight": "F16",
    "text_encoders.clip_l.logit_scale": "F32",
    "text_encoders.t5xxl.transformer.encoder.": "F8_E4M3",
    "text_encoders.t5xxl.transformer.shared.weight": "F8_E4M3",
    "text_encoders.t5xxl.logit_scale": "F32",
    "vae.": "F32",
}
SD3_PARTS = {
    "model.diffusion_model.": "F16",
    "first_stage_model.": "F16",
    "text_encoders.clip_l.transformer.text_model.": "F16",
    "text_encoders.clip_g.transformer.text_model.": "F16",
    "text_encoders.clip_g.transformer.text_projection.weight": "F16",
    "text_encoders.t5xxl.transformer.encoder.": "F8_E4M3",
    "text_encoders.t5xxl.transformer.shared.weight": "F8_E4M3",
}
# Stability-named stand-ins for an SD3 transformer, whose conversion is tested on its own.
SD3_TRANSFORMER = {
    "joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.linspace(-1, 1, 12),
    "x_embedder.proj.weight": torch.linspace(-1, 1, 64).reshape(4, 16, 1, 1),
}


@pytest.fixture(scope="module")
def t5():
    return build_t5_encoder()


@pytest.fixture(scope="module")
def clips():
    return {kind: build_clip_text(kind) for kind in ("clip_l", "clip_g")}


@pytest.fixture(scope="module")
def vae():
    return build_vae16()


def as_stored(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A float32 copy of ``model`` whose weights are rounded as a file in ``dtype`` stores them."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(to_fp8(param, dtype) if dtype in FP8_DTYPES else param.to(dtype))
    return rounded


def parts(path, expected: dict[str, str]) -> dict[str, set[str]]:
    """The dtypes found under each expected prefix; fails on a tensor under none of them."""
    found: dict[str, set[str]] = {}
    for key, info in read_tensor_infos(path)[0].items():
        prefix = next((p for p in expected if key.startswith(p)), None)
        assert prefix is not None, f"unexpected tensor {key}"
        found.setdefault(prefix, set()).add(info.dtype)
    return found


def t5_output(model) -> torch.Tensor:
    ids = torch.randint(0, t5_architecture("tiny").vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def clip_outputs(model) -> list[torch.Tensor]:
    """Hidden states, pooled output and, with a projection, the projected one, for a real tokenized prompt."""
    ids = clip_tokenizer()(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        body = getattr(model, "text_model", model)  # transformers 5's CLIPTextModel has no text_model level
        out = body(input_ids=ids)
        outputs = [out.last_hidden_state, out.pooler_output]
        if isinstance(model, CLIPTextModelWithProjection):
            outputs.append(model(input_ids=ids).text_embeds)
    return outputs


def vae_output(model) -> torch.Tensor:
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.decode(latent).sample


def flux_output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs(model.config)).sample


def assert_same(actual: list[torch.Tensor] | torch.Tensor, expected: list[torch.Tensor] | torch.Tensor) -> None:
    # Same weights, but safetensors data is only 8-byte aligned: CPU kernels may round the last bits differently.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, E4M3])
def test_t5_file_loads_as_built(tmp_path, t5, dtype):
    path = write_t5_file(tmp_path / "t5xxl.safetensors", t5, dtype)
    infos = read_tensor_infos(path)[0]
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= infos.keys()
    assert {info.dtype for info in infos.values()} == {"F16" if dtype == torch.float16 else "F8_E4M3"}
    loaded = load_t5_encoder(path, torch.float32)
    assert loaded.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == (torch.float32 if dtype == torch.float16
                                                                             else E4M3)
    assert_same(t5_output(loaded), t5_output(as_stored(t5, dtype)))


@pytest.mark.parametrize("kind,projection", [("clip_l", False), ("clip_l", True), ("clip_g", True)])
def test_clip_file_loads_as_built(tmp_path, clips, kind, projection):
    path = write_clip_file(tmp_path / f"{kind}.safetensors", clips[kind], torch.float32, projection=projection)
    assert ("text_projection.weight" in read_tensor_infos(path)[0]) == projection
    loaded = load_clip_file(path, kind, torch.float32)
    assert type(loaded) is (CLIPTextModelWithProjection if projection else CLIPTextModel)
    assert loaded.config.hidden_act == clips[kind].config.hidden_act
    expected = clip_outputs(clips[kind])
    assert_same(clip_outputs(loaded), expected if projection else expected[:2])


@pytest.mark.parametrize("family", [Family.FLUX, Family.SD3])
def test_vae16_file_loads_as_built(tmp_path, family):
    built = build_vae16(family=family)
    path = write_vae_file(tmp_path / "ae.safetensors", built)
    assert "encoder.conv_in.weight" in read_tensor_infos(path)[0]
    loaded = load_vae16(path, torch.float32, family)
    for key in ("latent_channels", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv"):
        assert loaded.config[key] == built.config[key], key
    assert list(loaded.config.block_out_channels) == list(built.config.block_out_channels)
    assert_same(vae_output(loaded), vae_output(built))


def test_flux_all_in_one_has_comfy_orgs_layout_and_loads_as_built(tmp_path, t5, clips, vae):
    transformer = build_flux_transformer()
    path = write_flux_all_in_one(tmp_path / "flux1-dev-fp8.safetensors", transformer, clips["clip_l"], t5, vae)
    assert parts(path, FLUX_PARTS) == {prefix: {dtype} for prefix, dtype in FLUX_PARTS.items()}

    assert_same(flux_output(load_flux_transformer(path, torch.float32)), flux_output(as_stored(transformer, E4M3)))
    assert_same(clip_outputs(load_clip_file(path, "clip_l", torch.float32)),
                clip_outputs(as_stored(clips["clip_l"], torch.float16)))
    assert_same(t5_output(load_t5_encoder(path, torch.float32)), t5_output(as_stored(t5, E4M3)))
    assert_same(vae_output(load_vae16(path, torch.float32, Family.FLUX)), vae_output(vae))


def test_sd3_all_in_one_has_stabilitys_layout_and_loads_as_built(tmp_path, t5, clips):
    vae = build_vae16(family=Family.SD3)
    path = write_sd3_all_in_one(tmp_path / "sd3_medium_incl_clips_t5xxlfp8.safetensors", SD3_TRANSFORMER,
                                clips["clip_l"], clips["clip_g"], t5, vae, torch.float16, t5_dtype=E4M3)
    assert parts(path, SD3_PARTS) == {prefix: {dtype} for prefix, dtype in SD3_PARTS.items()}
    tensors = load_state_dict(path)
    assert CHECKPOINT_KEY_NAMES["clip_sd3"] in tensors and CHECKPOINT_KEY_NAMES["open_clip_sd3"] in tensors
    assert is_t5_in_single_file(tensors)
    for key, value in SD3_TRANSFORMER.items():
        assert torch.equal(tensors[f"model.diffusion_model.{key}"], value.half())

    clip_l = load_clip_file(path, "clip_l", torch.float32)
    assert type(clip_l) is CLIPTextModel  # SD3 pools CLIP-L without a projection
    assert_same(clip_outputs(clip_l), clip_outputs(as_stored(clips["clip_l"], torch.float16))[:2])
    assert_same(clip_outputs(load_clip_file(path, "clip_g", torch.float32)),
                clip_outputs(as_stored(clips["clip_g"], torch.float16)))
    assert_same(t5_output(load_t5_encoder(path, torch.float32)), t5_output(as_stored(t5, E4M3)))
    sd3_vae = load_vae16(path, torch.float32, Family.SD3)
    assert_same(vae_output(sd3_vae), vae_output(as_stored(vae, torch.float16)))


def test_sd3_file_without_text_encoders_holds_transformer_and_vae(tmp_path):
    path = write_sd3_all_in_one(tmp_path / "sd3.5_large.safetensors", SD3_TRANSFORMER, None, None, None,
                                build_vae16(family=Family.SD3), torch.bfloat16)
    assert parts(path, SD3_PARTS) == {"model.diffusion_model.": {"BF16"}, "first_stage_model.": {"BF16"}}


def test_tiny_t5_tokenizer_loads_offline_and_ends_with_eos(tmp_path, t5):
    tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "tokenizer"), local_files_only=True)
    assert len(tokenizer) <= t5.config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(PROMPT).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"]
    spelled = tokenizer("Zebra€", padding="max_length", max_length=12).input_ids
    assert tokenizer.convert_ids_to_tokens(spelled[:8]) == ["▁", "Z", "e", "b", "r", "a", "<unk>", "</s>"]
    assert spelled[8:] == [0] * 4
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    with torch.no_grad():
        assert t5(input_ids=torch.tensor([ids])).last_hidden_state.shape == (1, 6, t5.config.d_model)


def test_builders_depend_only_on_the_seed(t5):
    assert torch.equal(build_t5_encoder(seed=0).shared.weight, t5.shared.weight)
    assert not torch.equal(build_t5_encoder(seed=1).shared.weight, t5.shared.weight)
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert build_clip_text("clip_l", dtype=torch.bfloat16).text_projection.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("build,parameters", [
    # T5-XXL's encoder, CLIP-L and bigG with their projections, Flux's ae.safetensors: 4,762,310,656 and
    # 123,650,304 are the float8 and float16 bytes of those parts of Comfy-Org's flux1-dev-fp8 file.
    (lambda: build_t5_encoder("full", device="meta"), 4_762_310_656),
    (lambda: build_clip_text("clip_l", "full", device="meta"), 123_650_304),
    (lambda: build_clip_text("clip_g", "full", device="meta"), 694_659_840),
    (lambda: build_vae16("full", device="meta"), 83_819_683),
], ids=["t5xxl", "clip_l", "clip_g", "vae16"])
def test_full_size_builders_have_the_real_parameter_counts(build, parameters):
    model = build()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == parameters
