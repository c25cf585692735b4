"""Family and architecture from tensor names and shapes — tiny and full-size take the same path."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import single_file
from webui.engine.formats.detect import Family, detect_family, infer_arch
from webui.engine.formats.files import TensorInfo, read_safetensors_header
from webui.errors import ModelFileError
from webui.synthetic.builders import build_synthetic_model
from webui.synthetic.ldm_export import ldm_state_dict

COMPARED = ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
            "down_block_types", "up_block_types", "in_channels", "out_channels")


def plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def infos_of(state_dict) -> dict[str, TensorInfo]:
    return {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in state_dict.items()}


@pytest.mark.parametrize("family,expected", [("sd1", Family.SD1), ("sd2", Family.SD2), ("sdxl", Family.SDXL)])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_architecture_inferred_from_shapes(family, expected, size):
    model = build_synthetic_model(family, size, device="meta")
    arch = infer_arch(infos_of(ldm_state_dict(model)))
    assert arch.family is expected
    for key in (*COMPARED, "attention_head_dim"):
        assert plain(arch.unet[key]) == plain(model.denoiser.config[key]), key
    assert list(arch.vae["block_out_channels"]) == list(model.vae.config.block_out_channels)
    for enc, te in zip(arch.text_encoders, model.text_encoders):
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "hidden_act"):
            assert enc.config[key] == getattr(te.config, key), key


def test_full_size_unet_configs_match_the_real_models():
    sd15 = infer_arch(infos_of(ldm_state_dict(build_synthetic_model("sd1", "full", device="meta")))).unet
    assert sd15["block_out_channels"] == [320, 640, 1280, 1280] and sd15["cross_attention_dim"] == 768
    sdxl = infer_arch(infos_of(ldm_state_dict(build_synthetic_model("sdxl", "full", device="meta")))).unet
    assert sdxl["transformer_layers_per_block"] == [1, 2, 10] and sdxl["cross_attention_dim"] == 2048
    assert sdxl["addition_time_embed_dim"] == 256 and sdxl["projection_class_embeddings_input_dim"] == 2816


def test_v_prediction_where_the_file_says_so():
    infos, metadata = read_safetensors_header(single_file("sd2", prediction_type="v_prediction"))
    assert infer_arch(infos, metadata).prediction_type == "v_prediction"
    infos, metadata = read_safetensors_header(single_file("sd1"))
    assert infer_arch(infos, metadata).prediction_type == "epsilon"


def one_tensor_file(tmp_path, *keys: str):
    path = tmp_path / "x.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return read_safetensors_header(path)


@pytest.mark.parametrize("key,family", [
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "SD3.x"),
])
def test_sd3_and_flux_are_recognised_and_refused_clearly(tmp_path, key, family):
    infos, metadata = one_tensor_file(tmp_path, key)
    assert detect_family(infos).value == family
    with pytest.raises(ModelFileError, match=f"This is a {family} checkpoint.*cannot be loaded"):
        infer_arch(infos, metadata)


def test_unknown_architecture_never_falls_back(tmp_path):
    infos, metadata = one_tensor_file(tmp_path, "encoder.layer.0.attention.weight", "classifier.bias")
    with pytest.raises(ModelFileError, match="Unknown model architecture"):
        infer_arch(infos, metadata)


def test_vae_and_unet_only_files_are_named(tmp_path):
    infos, _ = one_tensor_file(tmp_path, "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight")
    with pytest.raises(ModelFileError, match="is a VAE"):
        detect_family(infos)
    infos, _ = one_tensor_file(tmp_path, "model.diffusion_model.input_blocks.0.0.weight")
    with pytest.raises(ModelFileError, match="no text encoder"):
        detect_family(infos)
