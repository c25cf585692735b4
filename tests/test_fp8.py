"""FP8 weight storage: fp8 bytes stored and streamed, the same numbers computed as with the fp8 values upcast."""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tests.test_flux import inputs as flux_inputs
from webui.engine.formats.files import load_state_dict, read_safetensors_header
from webui.engine.weights import fp8
from webui.engine.weights.fp8 import (
    Fp8Conv2d,
    Fp8Linear,
    cast_weights_fp8,
    compute_dtype,
    enable_fp8_compute,
    fp8_state_dict_split,
    to_fp8,
)
from webui.engine.memory.manager import MemoryManager, MemoryPolicy, SimulatedMemory
from webui.engine.memory.stream import Streamer
from webui.errors import ModelFileError
from webui.synthetic.builders import build_flux_transformer, build_synthetic_model, flux_architecture

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CPU = torch.device("cpu")
# Relative L2 error of the output against the float32 model, every Linear/Conv2d in fp8 (min_numel=0).
# Measured: Flux tiny 0.053 (e4m3fn) / 0.123 (e5m2); SD1 UNet tiny 0.105 / 0.206. These random tiny
# models stack many layers of 3 (e4m3fn) or 2 (e5m2) mantissa bits; the bounds leave ~20 % headroom.
MAX_ERROR = {("flux", E4M3): 0.065, ("flux", E5M2): 0.15, ("unet", E4M3): 0.13, ("unet", E5M2): 0.25}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {"flux": build_flux_transformer("tiny", seed=3), "unet": build_synthetic_model("sd1", "tiny").denoiser}


def model_inputs(name: str, model: nn.Module, dtype: torch.dtype = torch.float32) -> dict:
    if name == "flux":
        raw = flux_inputs(model.config)
    else:
        g = torch.Generator().manual_seed(0)
        raw = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([500]),
               "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in raw.items()}


@torch.no_grad()
def run(name: str, model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model(**model_inputs(name, model, dtype)).sample


def fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8Conv2d))}


def converted(model: nn.Module, fp8_dtype: torch.dtype = E4M3) -> nn.Module:
    """A copy of ``model`` with every Linear/Conv2d weight in ``fp8_dtype``."""
    model = copy.deepcopy(model)
    cast_weights_fp8(model, fp8_dtype, min_numel=0)
    return model


def upcast_reference(model: nn.Module, fp8_model: nn.Module) -> nn.Module:
    """``model`` holding, in its own dtype, the fp8 values of ``fp8_model``'s weights: plain layers that
    must compute exactly what the fp8 layers do."""
    reference = copy.deepcopy(model)
    for name, layer in fp8_layers(fp8_model).items():
        target = reference.get_submodule(name)
        weight = layer.weight.to(target.weight.dtype)
        target.weight.data = weight * layer.scale_weight if layer.scale_weight is not None else weight
    return reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("name", ["flux", "unet"])
def test_converted_weights_take_half_the_bytes_of_bf16(models, name):
    bf16 = copy.deepcopy(models[name]).to(torch.bfloat16)
    before = {n: p.numel() * p.element_size() for n, p in bf16.named_parameters()}
    saved = cast_weights_fp8(bf16, min_numel=0)
    layers = fp8_layers(bf16)
    weights = {f"{n}.weight" for n in layers}
    assert len(layers) > 10 and any(isinstance(m, Fp8Conv2d) for m in layers.values()) == (name == "unet")
    for n, p in bf16.named_parameters():
        assert p.numel() * p.element_size() == (before[n] // 2 if n in weights else before[n]), n
        assert p.dtype == (E4M3 if n in weights else torch.bfloat16), n
    assert saved == sum(before[n] for n in weights) // 2
    assert all(isinstance(m, nn.Linear | nn.Conv2d) for m in layers.values()), "still Linear/Conv2d to other code"


def test_small_layers_stay_in_the_compute_dtype(models):
    model = copy.deepcopy(models["flux"])
    cast_weights_fp8(model, min_numel=10_000)
    assert model.x_embedder.weight.numel() < 10_000 and model.x_embedder.weight.dtype == torch.float32
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == E4M3
    assert model.transformer_blocks[0].attn.to_q.bias.dtype == torch.float32


def test_compute_dtype_ignores_fp8_weights(models):
    model = copy.deepcopy(models["flux"]).to(torch.bfloat16)
    cast_weights_fp8(model, min_numel=0)
    assert model.dtype == E4M3, "diffusers reports the first parameter's dtype"
    assert compute_dtype(model) == torch.bfloat16


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["flux", "unet"])
def test_output_is_exactly_that_of_the_upcast_fp8_values(models, name, dtype, fp8_dtype):
    original = copy.deepcopy(models[name]).to(dtype)
    model = converted(original, fp8_dtype)
    assert torch.equal(run(name, model, dtype), run(name, upcast_reference(original, model), dtype))


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("name", ["flux", "unet"])
def test_output_is_close_to_the_float32_model(models, name, fp8_dtype):
    error = relative_error(run(name, converted(models[name], fp8_dtype)), run(name, models[name]))
    assert 0 < error < MAX_ERROR[name, fp8_dtype]


def test_out_of_range_weights_saturate():
    big = torch.tensor([1e6, -1e6, 1.0])
    assert to_fp8(big, E5M2).float().tolist() == [57344.0, -57344.0, 1.0]
    assert to_fp8(big, E4M3).float().tolist() == [448.0, -448.0, 1.0]


def meta_flux(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, scales: dict) -> FluxTransformer2DModel:
    """What ``load.build_module`` does with a file's tensors, with the fp8 steps in place."""
    with init_empty_weights():
        model = FluxTransformer2DModel(**flux_architecture("tiny"))
    model.load_state_dict(state_dict, strict=True, assign=True)
    enable_fp8_compute(model, scales, dtype)
    return model.eval()


@pytest.mark.parametrize("fp8_dtype, stored", [(E4M3, "F8_E4M3"), (E5M2, "F8_E5M2")])
def test_fp8_file_tensors_stay_fp8_through_loading(tmp_path, models, fp8_dtype, stored):
    model = converted(models["flux"], fp8_dtype)
    path = tmp_path / "flux-fp8.safetensors"
    tensors = model.state_dict()
    tensors["norm_out.linear.bias"] = tensors["norm_out.linear.bias"].to(fp8_dtype)  # some files store biases in fp8
    save_file(tensors, path)

    header, _ = read_safetensors_header(path)
    assert header["x_embedder.weight"].dtype == stored and header["x_embedder.bias"].dtype == "F32"
    with safe_open(path, "pt") as f:
        assert f.get_tensor("x_embedder.weight").dtype == fp8_dtype

    weights, scales = fp8_state_dict_split(load_state_dict(path), torch.float32)
    assert weights["x_embedder.weight"].dtype == fp8_dtype and scales == {}
    loaded = meta_flux(weights, torch.float32, scales)
    assert loaded.x_embedder.weight.dtype == fp8_dtype and isinstance(loaded.x_embedder, Fp8Linear)
    assert loaded.norm_out.linear.bias.dtype == torch.float32, "fp8 outside a layer's weight is upcast once"
    model.norm_out.linear.bias.data = tensors["norm_out.linear.bias"].float()
    assert torch.equal(run("flux", loaded), run("flux", model))


def scaled_fp8_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 layout: each Linear's weight divided by a per-tensor scale, then fp8."""
    tensors = dict(model.state_dict())
    for name, layer in model.named_modules():
        if type(layer) is nn.Linear:
            scale = layer.weight.abs().max() / torch.finfo(E4M3).max
            tensors[f"{name}.weight"] = to_fp8(layer.weight / scale, E4M3)
            tensors[f"{name}.scale_weight"] = scale.reshape(())
            tensors[f"{name}.scale_input"] = torch.ones(())
    tensors["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return tensors


def test_scaled_fp8_weights_are_multiplied_by_their_scale(models):
    weights, scales = fp8_state_dict_split(scaled_fp8_file(models["flux"]), torch.float32)
    assert "scaled_fp8" not in weights and not any(k.endswith(".scale_input") for k in weights)
    model = meta_flux(weights, torch.float32, scales)
    assert model.proj_out.scale_weight == scales["proj_out"]
    assert torch.equal(run("flux", model), run("flux", upcast_reference(models["flux"], model)))
    assert relative_error(run("flux", model), run("flux", models["flux"])) < MAX_ERROR["flux", E4M3]


def test_scales_for_unknown_layers_are_a_clear_error(models):
    tensors = scaled_fp8_file(models["flux"])
    tensors["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(())  # BFL names, not converted
    weights, scales = fp8_state_dict_split(tensors, torch.float32)
    with pytest.raises(ModelFileError, match="scaled fp8 .*double_blocks.0.img_attn.qkv"):
        meta_flux(weights, torch.float32, scales)


@pytest.mark.parametrize("name", ["flux", "unet"])
def test_streamed_fp8_model_computes_what_it_does_resident(models, name, monkeypatch):
    """The streamer moves the fp8 bytes and every fp8 layer computes with the device copy. On the CPU a
    'device copy' is the host tensor itself; it is cloned here so that a layer reading the host tensor
    (its weight read before the streamer's hook ran) is caught."""
    model = converted(models[name])
    resident = run(name, model)
    copy_unit = Streamer._copy
    monkeypatch.setattr(Streamer, "_copy",
                        lambda self, unit, stream=None: ([t.clone() for t in copy_unit(self, unit, stream)[0]], None))
    manager = MemoryManager(CPU, SimulatedMemory(CPU, 0), min_unit_bytes=16 * 1024)
    component = manager.register(name, model)
    manager.memory.total_bytes = component.nbytes // 2 + component.upcast_bytes
    manager.begin(MemoryPolicy(inference_mb=0), activation=0)
    manager.prepare([name])
    streamer = component.streamer
    streamed = [p for unit in streamer.units for p in unit.parameters()]
    hosts = {t.data_ptr() for tensors in streamer._host.values() for t in tensors}
    assert any(p.dtype == E4M3 for p in streamed) and 0 < component.streamed_bytes() < component.nbytes

    read_from_host = []
    upcast = fp8.upcast_weight

    def checked(layer, like):
        read_from_host.append(layer.weight.data_ptr() in hosts)
        return upcast(layer, like)

    monkeypatch.setattr(fp8, "upcast_weight", checked)
    assert torch.equal(run(name, model), resident)
    assert manager._copies.bytes == sum(p.numel() * p.element_size() for p in streamed), "fp8 bytes cross, 1 each"
    assert read_from_host.count(False) == len(fp8_layers(model)) and not any(read_from_host)


def test_fp8_single_file_loads_as_fp8_and_generates(tmp_path, sd1_file):
    """An A1111 file whose UNet weights are stored in fp8 stays fp8 in memory and draws close to the fp16 file."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_engine
    from webui.engine.request import GenerationRequest

    tensors = load_file(sd1_file)
    fp8 = {k: to_fp8(v, torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.ndim >= 2 else v
           for k, v in tensors.items()}
    save_file(fp8, str(tmp_path / "sd1-fp8.safetensors"))
    engine = make_engine(tmp_path / "data", sd1_file, tmp_path / "sd1-fp8.safetensors")
    request = dict(prompt="a cat", width=64, height=64, steps=3, seed=5, save_images=False)
    reference = np.asarray(engine.txt2img(GenerationRequest(checkpoint="sd1-1.safetensors", **request)).images[0])
    image = np.asarray(engine.txt2img(GenerationRequest(checkpoint="sd1-fp8.safetensors", **request)).images[0])
    unet = engine.models.current.denoiser
    assert isinstance(unet.conv_in, Fp8Conv2d) and unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 12


def test_diffusion_in_low_bits_option_stores_the_unet_in_fp8_and_back(tmp_path, sd1_file, monkeypatch):
    import functools

    import numpy as np

    from tests.conftest import make_engine
    from webui.engine.loading import models
    from webui.engine.request import GenerationRequest

    # The tiny UNet's layers are all below the size threshold that real models pass: convert them all.
    monkeypatch.setattr(models, "cast_weights_fp8", functools.partial(cast_weights_fp8, min_numel=0))
    engine = make_engine(tmp_path, sd1_file)
    request = dict(prompt="a cat", width=64, height=64, steps=3, seed=5, save_images=False)
    reference = np.asarray(engine.txt2img(GenerationRequest(**request)).images[0]).astype(int)
    full_bytes = engine.memory.components["denoiser"].nbytes
    engine.options.update({"forge_unet_storage_dtype": "float8-e4m3fn"})
    image = np.asarray(engine.txt2img(GenerationRequest(**request)).images[0]).astype(int)
    unet = engine.models.current.denoiser
    assert isinstance(unet.conv_in, Fp8Conv2d) and engine.memory.components["denoiser"].nbytes < 0.6 * full_bytes
    assert np.abs(image - reference).mean() < 12
    engine.options.update({"forge_unet_storage_dtype": "Automatic"})
    again = np.asarray(engine.txt2img(GenerationRequest(**request)).images[0]).astype(int)
    assert np.array_equal(again, reference), "back to 16-bit storage: the model is reloaded as it was"
