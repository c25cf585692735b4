"""LoRA files in every supported format, read back as updates of our modules: names, fused layers, refusals."""
from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from webui.engine.formats.detect import Family
from webui.engine.lora.keys import LoraWeights, convert_lora, lora_family
from webui.engine.weights.fp8 import cast_weights_fp8
from webui.engine.weights.quant import GGUFLinear, QuantTensor
from webui.synthetic.lora_export import FORMATS, random_lora, write_lora
from webui.synthetic.builders import (
    build_clip_text,
    build_flux_transformer,
    build_sd3_transformer,
    build_synthetic_model,
    build_t5_encoder,
)
from webui.errors import ModelFileError

RANK = 4
FAMILIES = (Family.SD1, Family.SDXL, Family.FLUX, Family.SD3)


def _sd_modules(family: str) -> dict[str, torch.nn.Module]:
    model = build_synthetic_model(family, "tiny")
    names = ("text_encoder", "text_encoder_2")
    return {"denoiser": model.denoiser, **dict(zip(names, model.text_encoders))}


@pytest.fixture(scope="module")
def models() -> dict[Family, dict[str, torch.nn.Module]]:
    """Each family's tiny components under the names ``convert_lora`` takes."""
    clip_l, clip_g, t5 = build_clip_text("clip_l"), build_clip_text("clip_g"), build_t5_encoder()
    return {
        Family.SD1: _sd_modules("sd1"),
        Family.SDXL: _sd_modules("sdxl"),
        Family.FLUX: {"denoiser": build_flux_transformer(), "text_encoder": clip_l, "text_encoder_2": t5},
        Family.SD3: {"denoiser": build_sd3_transformer(), "text_encoder": clip_l, "text_encoder_2": clip_g,
                     "text_encoder_3": t5},
    }


def written(tmp_path, weights, family, fmt) -> dict[str, torch.Tensor]:
    path = write_lora(tmp_path / "Lora" / f"{fmt}.safetensors", weights, family, fmt)
    return load_file(path)


def assert_same_updates(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    differing = [k for k in expected if not torch.allclose(actual[k].delta(), expected[k].delta(), atol=1e-6)]
    assert not differing, differing[:3]


@pytest.mark.parametrize("targets", ["all", "attention+mlp"])  # "all": every Linear and Conv2d (LoCon)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_format_reads_back_as_the_updates_written(tmp_path, models, family, fmt, targets):
    weights = random_lora(models[family], family, RANK, targets, alpha=2.0)  # alpha != rank
    state_dict = written(tmp_path, weights, family, fmt)
    assert lora_family(state_dict) is family
    assert_same_updates(convert_lora(state_dict, family, models[family], "x.safetensors"), weights)


def test_alpha_defaults_to_the_rank(tmp_path, models):
    weights = random_lora(models[Family.SD1], Family.SD1, RANK)
    state_dict = written(tmp_path, weights, Family.SD1, "diffusers-old")
    assert not any(k.endswith(".alpha") for k in state_dict)
    converted = convert_lora(state_dict, Family.SD1, models[Family.SD1], "x")
    assert all(lora.alpha is None and lora.scale == 1.0 for lora in converted.values())
    assert_same_updates(converted, weights)
    kohya = convert_lora(written(tmp_path, weights, Family.SD1, "kohya"), Family.SD1, models[Family.SD1], "x")
    assert {lora.alpha for lora in kohya.values()} == {float(RANK)}
    assert_same_updates(kohya, weights)


def test_tensors_keep_the_files_dtype(tmp_path, models):
    weights = random_lora(models[Family.FLUX], Family.FLUX, RANK, alpha=1.0)
    path = write_lora(tmp_path / "x.safetensors", weights, Family.FLUX, "kohya", dtype=torch.bfloat16)
    converted = convert_lora(load_file(path), Family.FLUX, models[Family.FLUX], "x")
    assert {lora.up.dtype for lora in converted.values()} == {torch.bfloat16}
    key = ("denoiser", "single_transformer_blocks.0.proj_mlp")
    torch.testing.assert_close(converted[key].delta(), weights[key].delta(), rtol=0.02, atol=0.02)


def test_scale_is_alpha_over_rank():
    lora = LoraWeights(torch.ones(4, 3), torch.ones(2, 4), alpha=2.0)
    assert (lora.rank, lora.scale) == (4, 0.5)
    assert torch.equal(lora.delta(), torch.full((2, 3), 2.0))


def test_delta_is_what_merging_it_into_the_weight_adds(models):
    unet = models[Family.SD1]["denoiser"]
    g = torch.Generator().manual_seed(0)
    linear = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    for layer, x in ((linear, torch.randn(5, linear.in_features, generator=g)), (conv, torch.randn(1, 32, 8, 8))):
        shape = layer.weight.shape
        lora = LoraWeights(torch.randn(RANK, *shape[1:], generator=g),
                           torch.randn(shape[0], RANK, *(1,) * (len(shape) - 2), generator=g), alpha=3.0)
        delta = lora.delta()
        assert delta.dtype == torch.float32 and delta.shape == shape
        merged = copy.deepcopy(layer)
        merged.weight.data += delta
        if isinstance(layer, torch.nn.Linear):
            added = x @ delta.T
        else:
            added = F.conv2d(x, delta, None, layer.stride, layer.padding)
        torch.testing.assert_close(layer(x) + added, merged(x), rtol=1e-4, atol=1e-4)


def lora_tensors(name: str, down_shape, up_shape, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{name}.lora_down.weight": torch.randn(down_shape, generator=g),
            f"{name}.lora_up.weight": torch.randn(up_shape, generator=g), f"{name}.alpha": torch.tensor(alpha)}


def lora_for(name: str, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """kohya tensors for ``name`` that fit ``layer``."""
    shape = layer.weight.shape
    return lora_tensors(name, (RANK, *shape[1:]), (shape[0], RANK, *(1,) * (len(shape) - 2)))


# Names written by hand (not by write_lora) and the layers they must reach.
KOHYA_NAMES = {
    Family.SD1: [
        ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
         "denoiser", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("lora_unet_input_blocks_1_1_proj_in", "denoiser", "down_blocks.0.attentions.0.proj_in"),
        ("lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_0_proj",
         "denoiser", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
         "denoiser", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("lora_unet_output_blocks_3_1_proj_out", "denoiser", "up_blocks.1.attentions.1.proj_out"),
        ("lora_unet_input_blocks_1_0_in_layers_2", "denoiser", "down_blocks.0.resnets.0.conv1"),
        ("lora_unet_input_blocks_3_0_out_layers_3", "denoiser", "down_blocks.1.resnets.0.conv2"),
        ("lora_unet_input_blocks_3_0_skip_connection", "denoiser", "down_blocks.1.resnets.0.conv_shortcut"),
        ("lora_unet_middle_block_2_emb_layers_1", "denoiser", "mid_block.resnets.1.time_emb_proj"),
        ("lora_unet_input_blocks_2_0_op", "denoiser", "down_blocks.0.downsamplers.0.conv"),
        ("lora_unet_output_blocks_1_1_conv", "denoiser", "up_blocks.0.upsamplers.0.conv"),
        ("lora_unet_time_embed_0", "denoiser", "time_embedding.linear_1"),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
         "denoiser", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
        ("lora_unet_up_blocks_0_resnets_1_conv_shortcut", "denoiser", "up_blocks.0.resnets.1.conv_shortcut"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
        ("lora_te_text_model_encoder_layers_2_mlp_fc1", "text_encoder", "encoder.layers.2.mlp.fc1"),
    ],
    Family.SDXL: [
        ("lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v",
         "denoiser", "up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_v"),
        ("lora_unet_label_emb_0_0", "denoiser", "add_embedding.linear_1"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "text_encoder", "encoder.layers.0.self_attn.k_proj"),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "text_encoder_2", "text_model.encoder.layers.1.mlp.fc2"),
    ],
    Family.FLUX: [
        ("lora_unet_double_blocks_0_img_attn_proj", "denoiser", "transformer_blocks.0.attn.to_out.0"),
        ("lora_unet_double_blocks_0_txt_attn_proj", "denoiser", "transformer_blocks.0.attn.to_add_out"),
        ("lora_unet_double_blocks_0_img_mlp_0", "denoiser", "transformer_blocks.0.ff.net.0.proj"),
        ("lora_unet_double_blocks_0_txt_mlp_2", "denoiser", "transformer_blocks.0.ff_context.net.2"),
        ("lora_unet_double_blocks_0_img_mod_lin", "denoiser", "transformer_blocks.0.norm1.linear"),
        ("lora_unet_single_blocks_1_linear2", "denoiser", "single_transformer_blocks.1.proj_out"),
        ("lora_unet_single_blocks_0_modulation_lin", "denoiser", "single_transformer_blocks.0.norm.linear"),
        ("lora_unet_time_in_in_layer", "denoiser", "time_text_embed.timestep_embedder.linear_1"),
        ("lora_transformer_single_transformer_blocks_0_attn_to_k", "denoiser", "single_transformer_blocks.0.attn.to_k"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q",
         "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q"),
    ],
    Family.SD3: [
        ("lora_unet_joint_blocks_0_context_block_mlp_fc1", "denoiser", "transformer_blocks.0.ff_context.net.0.proj"),
        ("lora_unet_joint_blocks_0_x_block_attn2_proj", "denoiser", "transformer_blocks.0.attn2.to_out.0"),
        ("lora_unet_x_embedder_proj", "denoiser", "pos_embed.proj"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
         "text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wo",
         "text_encoder_3", "encoder.block.1.layer.1.DenseReluDense.wo"),
    ],
}


@pytest.mark.parametrize(("family", "name", "component", "module"),
                         [(f, *case) for f, cases in KOHYA_NAMES.items() for case in cases], ids=lambda v: str(v))
def test_kohya_names_reach_their_layers(models, family, name, component, module):
    layer = models[family][component].get_submodule(module)
    state_dict = lora_for(name, layer)
    [(key, lora)] = convert_lora(state_dict, family, models[family], "x").items()
    assert key == (component, module)
    assert lora.down is state_dict[f"{name}.lora_down.weight"] and lora.alpha == 2.0
    assert torch.equal(lora.up, state_dict[f"{name}.lora_up.weight"])


# Fused original layers: (name, our layers in row order, input width). Tiny Flux is 128 wide, its MLP 512.
FUSED = [
    (Family.FLUX, "lora_unet_double_blocks_0_img_attn_qkv",
     ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"), 128),
    (Family.FLUX, "transformer.double_blocks.0.txt_attn.qkv",
     ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
      "transformer_blocks.0.attn.add_v_proj"), 128),
    (Family.FLUX, "diffusion_model.single_blocks.1.linear1",
     ("single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
      "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp"), 128),
    (Family.SD3, "lora_unet_joint_blocks_0_x_block_attn_qkv",
     ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"), 128),
]


@pytest.mark.parametrize(("family", "name", "modules", "width"), FUSED, ids=lambda v: str(v))
def test_fused_layers_split_their_up_rows_and_share_down_and_alpha(models, family, name, modules, width):
    denoiser = models[family]["denoiser"]
    rows = [denoiser.get_submodule(m).out_features for m in modules]
    state_dict = lora_tensors(name, (RANK, width), (sum(rows), RANK))
    converted = convert_lora(state_dict, family, models[family], "x")
    assert sorted(converted) == sorted(("denoiser", m) for m in modules)
    up = state_dict[f"{name}.lora_up.weight"]
    for module, part in zip(modules, up.split(rows)):
        lora = converted["denoiser", module]
        assert lora.down is state_dict[f"{name}.lora_down.weight"] and lora.alpha == 2.0
        assert torch.equal(lora.up, part)


@pytest.mark.parametrize(("family", "name", "module"), [
    (Family.FLUX, "lora_unet_final_layer_adaLN_modulation_1", "norm_out.linear"),
    (Family.SD3, "lora_unet_final_layer_adaLN_modulation_1", "norm_out.linear"),
    # SD3's last block's text stream is pre-only: its modulation is the final layer's kind.
    (Family.SD3, "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1",
     "transformer_blocks.2.norm1_context.linear"),
])
def test_modulations_stored_shift_first_get_their_halves_swapped(models, family, name, module):
    layer = models[family]["denoiser"].get_submodule(module)
    state_dict = lora_for(name, layer)
    shift, scale = state_dict[f"{name}.lora_up.weight"].chunk(2)
    [lora] = convert_lora(state_dict, family, models[family], "x").values()
    assert torch.equal(lora.up, torch.cat([scale, shift]))


def test_other_modulations_keep_their_order(models):
    name = "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"
    layer = models[Family.SD3]["denoiser"].get_submodule("transformer_blocks.0.norm1_context.linear")
    state_dict = lora_for(name, layer)
    [lora] = convert_lora(state_dict, Family.SD3, models[Family.SD3], "x").values()
    assert torch.equal(lora.up, state_dict[f"{name}.lora_up.weight"])


@pytest.mark.parametrize(("family", "fmt", "old", "new"), [
    (Family.SDXL, "diffusers", "unet.", ""),
    (Family.SDXL, "diffusers", "unet.", "base_model.model."),
    (Family.FLUX, "comfy", "diffusion_model.", "transformer."),
    (Family.FLUX, "comfy", "diffusion_model.", ""),
    (Family.FLUX, "kohya", "lora_unet_", "lora_flux_"),
    (Family.FLUX, "kohya", "lora_te1_", "lora_te_"),
    (Family.FLUX, "kohya", "lora_te3_", "lora_te2_"),
    (Family.FLUX, "kohya-diffusers-names", "lora_transformer_", "lora_unet_"),
])
def test_other_prefixes_trainers_use(tmp_path, models, family, fmt, old, new):
    weights = random_lora(models[family], family, RANK, alpha=8.0)
    state_dict = written(tmp_path, weights, family, fmt)
    assert any(k.startswith(old) for k in state_dict)
    renamed = {new + k.removeprefix(old) if k.startswith(old) else k: v for k, v in state_dict.items()}
    assert lora_family(renamed) is family
    assert_same_updates(convert_lora(renamed, family, models[family], "x"), weights)


@pytest.mark.parametrize(("key", "shape", "family"), [
    # Real models' cross-attention widths and SD1's convolutional attention projections.
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight", (4, 768), Family.SD1),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight", (4, 1024), Family.SD2),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v.lora_down.weight", (4, 2048), Family.SDXL),
    ("unet.mid_block.attentions.0.proj_in.lora_A.weight", (4, 1280, 1, 1), Family.SD1),
    ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", (4, 320), Family.SD2),
    # SDXL's stacked transformer blocks; Flux's and SD3's own names; T5 under diffusers' Flux name.
    ("lora_unet_middle_block_1_transformer_blocks_7_attn1_to_q.lora_down.weight", (4, 1280), Family.SDXL),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", (4, 3072), Family.FLUX),
    ("transformer.transformer_blocks.0.attn2.to_q.lora_A.weight", (4, 1536), Family.SD3),
    ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight", (4, 4096), None),
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (4, 3072), Family.FLUX),
    ("transformer_blocks.0.attn.to_q.lora_A.weight", (4, 2432), Family.SD3),
    # Names every MMDiT has, or every UNet, at widths of no real model: the family is not known.
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (4, 128), None),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", (4, 1280), None),
])
def test_family_from_names_and_shapes(key, shape, family):
    assert lora_family({key: torch.empty(shape, device="meta")}) is family


def sd1_lora(models, name="lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"):
    return lora_for(name, models[Family.SD1]["denoiser"].get_submodule(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"))


@pytest.mark.parametrize(("suffix", "what"), [
    ("hada_t1", "LoHa with Tucker"), ("lokr_t2", "LoKr with Tucker"), ("on_input", r"\(IA\)\^3"),
    ("oft_blocks", "OFT"), ("lora_mid.weight", "Tucker"),
])
def test_other_algorithms_are_refused(models, suffix, what):
    state_dict = sd1_lora(models) | {f"lora_unet_input_blocks_1_1_proj_in.{suffix}": torch.ones(2)}
    with pytest.raises(ModelFileError, match=f"x.safetensors is a .*{what}.*LoRA, LoCon, LoHa and LoKr files are"):
        convert_lora(state_dict, Family.SD1, models[Family.SD1], "x.safetensors")


def test_a_lora_for_another_family_is_refused(tmp_path, models):
    state_dict = written(tmp_path, random_lora(models[Family.SDXL], Family.SDXL, RANK), Family.SDXL, "kohya")
    with pytest.raises(ModelFileError,
                       match=r"x.safetensors: this LoRA is for SDXL \(it has lora_.*the loaded model is Flux"):
        convert_lora(state_dict, Family.FLUX, models[Family.FLUX], "x.safetensors")


def test_layers_we_do_not_have_are_refused_by_name(models):
    state_dict = sd1_lora(models) | lora_tensors("lora_unet_input_blocks_1_1_transformer_blocks_0_attn9_to_q",
                                                 (RANK, 32), (32, RANK))
    with pytest.raises(ModelFileError, match="x: 1 of this LoRA's layers match no layer of the loaded SD1.x model, "
                                             "e.g. lora_unet_input_blocks_1_1_transformer_blocks_0_attn9_to_q"):
        convert_lora(state_dict, Family.SD1, models[Family.SD1], "x")


def test_a_component_left_out_cannot_be_adapted(models):
    state_dict = lora_for("lora_te_text_model_encoder_layers_0_mlp_fc1",
                          models[Family.SD1]["text_encoder"].get_submodule("encoder.layers.0.mlp.fc1"))
    with pytest.raises(ModelFileError, match="match no layer"):
        convert_lora(state_dict, Family.SD1, {"denoiser": models[Family.SD1]["denoiser"]}, "x")


@pytest.mark.parametrize(("down", "up"), [((RANK, 33), (32, RANK)), ((RANK, 32), (31, RANK)), ((RANK, 32), (32, 3))])
def test_shapes_that_do_not_fit_are_refused(models, down, up):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    shapes = re.escape(f"(down {list(down)}, up {list(up)})")
    with pytest.raises(ModelFileError, match=rf"x: LoRA layer {name} {shapes} does not fit denoiser .*attn1.to_q "
                                             r"\(weight \[32, 32\]\)"):
        convert_lora(lora_tensors(name, down, up), Family.SD1, models[Family.SD1], "x")


def test_fused_layers_of_the_wrong_width_are_refused(models):
    state_dict = lora_tensors("lora_unet_double_blocks_0_img_attn_qkv", (RANK, 128), (3 * 128 + 1, RANK))
    with pytest.raises(ModelFileError, match=r"does not fit denoiser transformer_blocks.0.attn.to_q \+ .*to_k \+ "):
        convert_lora(state_dict, Family.FLUX, models[Family.FLUX], "x")


@pytest.mark.parametrize(("drop", "missing"), [("lora_up", "up"), ("lora_down", "down")])
def test_a_layer_missing_a_matrix_is_refused(models, drop, missing):
    state_dict = {k: v for k, v in sd1_lora(models).items() if drop not in k}
    with pytest.raises(ModelFileError, match=f"x: LoRA layer .*attn1_to_q has no {missing} matrix"):
        convert_lora(state_dict, Family.SD1, models[Family.SD1], "x")


def test_full_weight_differences_are_skipped_and_logged(models, caplog):
    state_dict = sd1_lora(models) | {"lora_unet_input_blocks_1_1_norm.diff": torch.ones(32),
                                     "lora_unet_input_blocks_1_1_proj_in.diff_b": torch.ones(32)}
    with caplog.at_level(logging.INFO, logger="webui.engine.lora.keys"):
        converted = convert_lora(state_dict, Family.SD1, models[Family.SD1], "x")
    assert len(converted) == 1
    assert "x: ignored 2 full-weight difference tensors" in caplog.text


def test_quantized_and_fp8_layers_are_adapted_by_their_computed_shape(models):
    flux = copy.deepcopy(models[Family.FLUX]["denoiser"])
    attn = flux.transformer_blocks[0].attn
    weight = attn.to_q.weight.detach().contiguous()
    attn.to_q = GGUFLinear(QuantTensor(weight.view(torch.uint8), Q.F32, weight.shape), attn.to_q.bias)
    cast_weights_fp8(flux, min_numel=0)
    state_dict = lora_tensors("lora_unet_double_blocks_0_img_attn_qkv", (RANK, 128), (3 * 128, RANK))
    state_dict |= lora_tensors("lora_unet_double_blocks_0_img_mlp_0", (RANK, 128), (512, RANK))
    converted = convert_lora(state_dict, Family.FLUX, {"denoiser": flux}, "x")
    assert converted["denoiser", "transformer_blocks.0.attn.to_q"].up.shape == (128, RANK)
    assert converted["denoiser", "transformer_blocks.0.ff.net.0.proj"].up.shape == (512, RANK)
    bad = lora_tensors("lora_unet_double_blocks_0_img_attn_qkv", (RANK, 127), (3 * 128, RANK))
    with pytest.raises(ModelFileError, match=r"weight \[128, 128\] \+ \[128, 128\] \+ \[128, 128\]"):
        convert_lora(bad, Family.FLUX, {"denoiser": flux}, "x")


def test_writing_a_fused_layer_needs_all_its_parts_with_one_down(tmp_path, models):
    modules = models[Family.FLUX]
    weights = random_lora(modules, Family.FLUX, RANK, targets="attention")
    del weights["denoiser", "transformer_blocks.0.attn.to_k"]
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.qkv fuses 3 of our layers"):
        write_lora(tmp_path / "x.safetensors", weights, Family.FLUX, "kohya")
    write_lora(tmp_path / "x.safetensors", weights, Family.FLUX, "diffusers")  # diffusers' names: unfused
