"""LyCORIS LoHa and LoKr (issue 28): applied online on 16-bit and GGUF layers, equal to the weights merged in float32
by LyCORIS's own maths (written out here, apart from the loader's), beside a plain LoRA on the same layers, removed
exactly; through a prompt tag on a whole model, text encoders included."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import make_engine
from tests.test_lora import UNetOnly, images, lora_folder, merged_reference, relative_error, with_extensions
from webui.engine.formats.detect import Family
from webui.engine.hooks import NetworkCall
from webui.engine.lora.keys import weight_shape
from webui.engine.lora.network import LoraLibrary, LoraNetwork
from webui.engine.memory.manager import MemoryManager
from webui.engine.request import GenerationRequest
from webui.synthetic.lora_export import DoraWeights, LycorisWeights, random_lora, random_lycoris, write_lora


def lycoris_delta(lora: LycorisWeights, shape: tuple[int, ...]) -> torch.Tensor:
    """LyCORIS's delta W (its LohaModule/LokrModule maths), float32, shaped like the weight."""
    p = {k: v.double() for k, v in lora.parts.items()}
    if "hada_w1_a" in p:
        delta, rank = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]), p["hada_w1_b"].shape[0]
    else:
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        delta, rank = torch.kron(p["lokr_w1"], w2), (p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None)
    scale = lora.alpha / rank if lora.alpha is not None and rank is not None else 1.0
    return (delta * scale).reshape(shape).float()


def as_deltas(module, weights: dict) -> dict:
    """The LyCORIS layers as the merged reference reads updates: each with its ``delta()``."""
    return {key: SimpleNamespace(delta=functools.partial(lycoris_delta, lora, weight_shape(module.get_submodule(key[1]))))
            for key, lora in weights.items()}


@pytest.mark.parametrize("kind,alpha", [("loha", 2.0), ("lokr", 3.0), ("lokr-full", 5.0), ("loha", None)])
@pytest.mark.parametrize("storage", ["16-bit", "Q8_0"])
def test_loha_and_lokr_equal_the_merged_float32_weights(tmp_path, kind, alpha, storage):
    """Every Linear and Conv2d of a UNet adapted by a LyCORIS file and a plain LoRA at once: the merged float32 model's
    output (LoKr with both factors whole ignores alpha, as LyCORIS does); removed: bit-identical."""
    from gguf import GGMLQuantizationType as Q

    from tests.test_gguf_unet import load, unet_inputs, write_unet
    from webui.engine.formats.ldm_keys import unet_to_ldm
    from webui.synthetic.builders import build_synthetic_model

    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser.float()
    if storage == "Q8_0":
        unet, _ = load(write_unet(tmp_path, "sd1", unet_to_ldm(unet.state_dict(), unet.config), Q.Q8_0), "sd1")
    model = UNetOnly(unet, Family.SD1)
    lycoris = random_lycoris({"denoiser": unet}, Family.SD1, kind, rank=4, targets="all", seed=3, alpha=alpha)
    plain = random_lora({"denoiser": unet}, Family.SD1, rank=2, targets="attention", seed=4)
    assert any(len(weight_shape(unet.get_submodule(p))) == 4 for _, p in lycoris), "convolutions adapted too"
    write_lora(tmp_path / "Lora" / "lyco.safetensors", lycoris, Family.SD1, "kohya")
    write_lora(tmp_path / "Lora" / "plain.safetensors", plain, Family.SD1, "kohya")
    network = LoraNetwork(LoraLibrary(tmp_path / "Lora", lambda path: "0" * 64), MemoryManager(torch.device("cpu")))
    inputs = unet_inputs(unet.config)
    with torch.no_grad():
        before = unet(**inputs).sample
        network.activate(model, [NetworkCall("lora", "lyco", ("0.8",)), NetworkCall("lora", "plain", ("0.5",))])
        online = unet(**inputs).sample
        reference = merged_reference(merged_reference(unet, plain, "denoiser", 0.5), as_deltas(unet, lycoris),
                                     "denoiser", 0.8)(**inputs).sample
        network.activate(model, [])
        after = unet(**inputs).sample
    assert relative_error(online, reference) < 1e-4 and relative_error(online, before) > 1e-3
    assert torch.equal(after, before), "removed: bit-identical"


def test_a_loha_tag_on_a_whole_model(tmp_path, sd1_file):
    """<lora:name:w> with a LoHa file adapts the UNet and the text encoder; the picture changes, Lora hashes names
    it, and without the tag the picture is the plain one again."""
    engine = with_extensions(make_engine(tmp_path, sd1_file))
    request = dict(prompt="a red circle", negative_prompt="", width=64, height=64, steps=3, cfg_scale=5.0, seed=2,
                   sampler_name="Euler", save_images=False)
    plain = engine.txt2img(GenerationRequest(**request))
    model = engine.models.current
    components = {"denoiser": model.denoiser, "text_encoder": model.text_encoders[0].model}
    weights = random_lycoris(components, model.family, "loha", rank=4, seed=5, alpha=4.0)
    assert {owner for owner, _ in weights} == {"denoiser", "text_encoder"}
    write_lora(lora_folder(engine) / "hada.safetensors", weights, model.family, "kohya")
    styled = engine.txt2img(GenerationRequest(**{**request, "prompt": "a red circle <lora:hada:1>"}))
    assert np.abs(images(styled) - images(plain)).mean() > 1 and "hada: " in styled.infotexts[0]
    assert np.array_equal(images(engine.txt2img(GenerationRequest(**request))), images(plain))


def test_a_lycoris_layer_that_does_not_fit_is_named(tmp_path, sd1_file):
    from webui.engine.lora.keys import convert_lora
    from webui.errors import ModelFileError
    from webui.synthetic.builders import build_synthetic_model

    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    layer = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    rows, columns = layer.weight.shape
    broken = {f"{name}.hada_w1_a": torch.ones(rows, 2), f"{name}.hada_w1_b": torch.ones(2, columns + 1),
              f"{name}.hada_w2_a": torch.ones(rows, 2), f"{name}.hada_w2_b": torch.ones(2, columns + 1)}
    with pytest.raises(ModelFileError, match=r"x.safetensors: LyCORIS layer .*to_q \(delta W .*does not fit"):
        convert_lora(broken, Family.SD1, {"denoiser": unet}, "x.safetensors")
    with pytest.raises(ModelFileError, match="incomplete"):
        convert_lora({f"{name}.hada_w1_a": torch.ones(rows, 2)}, Family.SD1, {"denoiser": unet}, "x.safetensors")


@pytest.mark.parametrize("convention", ["dora_scale-columns", "dora_scale-rows", "lora_magnitude_vector"])
@pytest.mark.parametrize("storage", ["16-bit", "Q8_0"])
def test_dora_equals_the_decomposed_float32_weights(tmp_path, convention, storage):
    """A DoRA file (LyCORIS's dora_scale per input column or per output row, PEFT's lora_magnitude_vector): the model
    computes with m * (W + delta) / ||W + delta|| (times the tag's weight, as LyCORIS blends it), from the layer's
    own weight, unpacked where it is GGUF; removed: bit-identical."""
    from gguf import GGMLQuantizationType as Q

    from tests.test_gguf_unet import load, unet_inputs, write_unet
    from webui.engine.formats.ldm_keys import unet_to_ldm
    from webui.engine.lora.keys import dense_weight
    from webui.synthetic.builders import build_synthetic_model

    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser.float()
    if storage == "Q8_0":
        unet, _ = load(write_unet(tmp_path, "sd1", unet_to_ldm(unet.state_dict(), unet.config), Q.Q8_0), "sd1")
    generator, key = torch.Generator().manual_seed(9), "dora_scale" if "dora" in convention else "lora_magnitude_vector"
    weights = {}
    for (owner, module), lora in random_lora({"denoiser": unet}, Family.SD1, rank=4, targets="all", seed=6,
                                             alpha=2.0).items():
        shape = weight_shape(unet.get_submodule(module))
        magnitude = (torch.rand(1, shape[1], *(1,) * (len(shape) - 2), generator=generator) + 0.5
                     if convention == "dora_scale-columns" else torch.rand(shape[0], generator=generator) + 0.5)
        weights[owner, module] = DoraWeights(lora.down, lora.up, lora.alpha, magnitude, key)
    write_lora(tmp_path / "Lora" / "dora.safetensors", weights, Family.SD1, "kohya")
    magnitudes = {module: lora.magnitude for (_, module), lora in weights.items()}

    def decomposed(module: str, lora) -> torch.Tensor:
        weight = dense_weight(unet.get_submodule(module)).double()
        merged = weight + lora.delta().double()
        m = magnitudes[module].double()
        if convention == "dora_scale-columns":
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            return merged * (m.flatten() / norm).view(1, -1, *(1,) * (merged.dim() - 2)) - weight
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        return merged * (m / norm).view(-1, *(1,) * (merged.dim() - 1)) - weight

    reference_updates = {key: SimpleNamespace(delta=functools.partial(lambda k, lo: decomposed(k, lo).float(),
                                                                      key[1], lora))
                         for key, lora in weights.items()}
    network = LoraNetwork(LoraLibrary(tmp_path / "Lora", lambda p: "0" * 64), MemoryManager(torch.device("cpu")))
    inputs = unet_inputs(unet.config)
    with torch.no_grad():
        before = unet(**inputs).sample
        network.activate(UNetOnly(unet, Family.SD1), [NetworkCall("lora", "dora", ("0.7",))])
        online = unet(**inputs).sample
        reference = merged_reference(unet, reference_updates, "denoiser", 0.7)(**inputs).sample
        network.activate(UNetOnly(unet, Family.SD1), [])
        after = unet(**inputs).sample
    assert relative_error(online, reference) < 1e-4 and relative_error(online, before) > 1e-3
    assert torch.equal(after, before)


def test_a_dora_magnitude_of_the_wrong_size_is_named():
    from webui.engine.lora.keys import convert_lora
    from webui.errors import ModelFileError
    from webui.synthetic.builders import build_synthetic_model

    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    rows, columns = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight.shape
    broken = {f"{name}.lora_down.weight": torch.ones(2, columns), f"{name}.lora_up.weight": torch.ones(rows, 2),
              f"{name}.dora_scale": torch.ones(rows + 3)}
    with pytest.raises(ModelFileError, match=r"x.safetensors: DoRA layer .*to_q has a magnitude of \d+ values"):
        convert_lora(broken, Family.SD1, {"denoiser": unet}, "x.safetensors")
