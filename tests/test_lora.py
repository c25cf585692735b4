"""LoRA through the built-in extension: online on 16-bit and GGUF bases equals the merged fp32 weights,
removal restores the model exactly, tags and hashes, refusals, and the memory manager's budget."""
from __future__ import annotations

import copy
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import make_engine
from tests.test_flow_pipelines import engine_for, files, flux_request, images, parts  # noqa: F401 (fixtures)
from tests.test_flux import inputs as flux_inputs
from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family
from webui.engine.graphs import GRAPHS
from webui.engine.infotext import parse_infotext
from webui.engine.lora import network as lora_module
from webui.engine.lora.network import _lora_components, _unadapt
from webui.engine.request import GenerationRequest
from webui.engine.weights.quant import QuantizedLayer, dequantize
from webui.errors import ModelFileError, UserError
from webui.extensions import load_extensions
from webui.synthetic.lora_export import random_lora, write_lora

FLUX_MODULES = ["ae.safetensors", "clip_l.safetensors", "t5xxl_fp32.safetensors"]
SD_REQUEST = dict(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=3, cfg_scale=5.0,
                  sampler_name="Euler", seed=11, save_images=False)


@pytest.fixture(params=["into the weight", "onto the output"])
def lora_route(request, monkeypatch):
    """Each of the two ways an adapter adds its update, forced for every layer (else chosen by cost)."""
    cost = 0.0 if request.param == "into the weight" else float("inf")
    monkeypatch.setattr(lora_module, "MERGE_COST_FUSED", cost)
    monkeypatch.setattr(lora_module, "MERGE_COST_ADDMM", cost)
    return request.param


def with_extensions(engine):
    load_extensions(engine)
    assert "lora" in engine.hooks.networks, "LoRA ships as a built-in extension"
    return engine


def lora_folder(engine):
    folder = engine.config.paths.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def merged_reference(module: nn.Module, weights: dict, component: str, multiplier: float) -> nn.Module:
    """A float32 copy of ``module`` whose adapted layers hold weight + multiplier * delta (GGUF layers dequantized
    first), without the adapters: the reference an online LoRA must equal."""
    captured = getattr(module, GRAPHS, None)  # (CUDA graphs of the module's calls, which cannot be copied: left out)
    reference = copy.deepcopy(module, {id(captured): None} if captured is not None else None).float()
    for sub in reference.modules():
        _unadapt(sub)  # the copy of an adapted layer's routing through its adapter
    for (owner, path), lora in weights.items():
        if owner != component:
            continue
        layer = reference.get_submodule(path)
        if isinstance(layer, QuantizedLayer):
            weight = dequantize(layer.weight, layer.qtype, layer.weight_shape, torch.float32)
            conv = hasattr(layer, "stride")
            plain = (nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], layer.stride, layer.padding,
                               layer.dilation, layer.groups) if conv else nn.Linear(weight.shape[1], weight.shape[0]))
            plain.bias = None if layer.bias is None else nn.Parameter(layer.bias.float())
            plain.weight = nn.Parameter(weight)
            parent, _, child = path.rpartition(".")
            setattr(reference.get_submodule(parent), child, plain)
            layer = plain
        layer.weight.data += multiplier * lora.delta().to(layer.weight.device)
    return reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("family,fmt", [("sd1", "kohya"), ("sd1", "diffusers"), ("sdxl", "kohya"),
                                        ("sdxl", "diffusers")])
def test_sd_lora_equals_the_merged_float32_weights(tmp_path, request, family, fmt, lora_route):
    engine = with_extensions(make_engine(tmp_path, request.getfixturevalue(f"{family}_file")))
    plain = engine.txt2img(GenerationRequest(**SD_REQUEST))
    model = engine.models.current
    weights = random_lora(dict(_lora_components(model)), model.family, rank=4, seed=1)
    write_lora(lora_folder(engine) / "style.safetensors", weights, model.family, fmt)
    styled = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:style:0.7>"}))
    assert "Lora hashes" in parse_infotext(styled.infotexts[0])
    assert np.abs(images(styled) - images(plain)).mean() > 1, "the LoRA changes the picture"

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, model.denoiser.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = None
    if model.family is Family.SDXL:
        config = model.denoiser.config
        text_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, text_width), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    call = dict(encoder_hidden_states=context, added_cond_kwargs=added)
    with torch.no_grad():
        online = model.denoiser(sample, torch.tensor([500]), **call).sample
        merged = merged_reference(model.denoiser, weights, "denoiser", 0.7)(sample, torch.tensor([500]), **call).sample
        encoder = model.text_encoders[0].model
        tokens = torch.randint(0, encoder.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(2))
        online_text = encoder(tokens).last_hidden_state
        merged_text = merged_reference(encoder, weights, "text_encoder", 0.7)(tokens).last_hidden_state
    assert relative_error(online, merged) < 1e-5
    assert relative_error(online_text, merged_text) < 1e-5

    again = engine.txt2img(GenerationRequest(**SD_REQUEST))
    assert np.array_equal(images(again), images(plain)), "removed: bit-identical to never having applied it"
    assert "Lora hashes" not in parse_infotext(again.infotexts[0])


@pytest.mark.parametrize("checkpoint", ["flux-transformer.safetensors", "flux-Q8_0.gguf"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_lora_equals_the_merged_float32_weights_on_16_bit_and_gguf(tmp_path, files, checkpoint, fmt,  # noqa: F811
                                                                      lora_route):
    engine = with_extensions(engine_for(tmp_path, files, checkpoint))
    engine.options.update({"forge_additional_modules": FLUX_MODULES})
    plain = engine.txt2img(flux_request(checkpoint, batch_size=1))
    model = engine.models.current
    weights = random_lora(dict(_lora_components(model)), Family.FLUX, rank=4, seed=2)
    write_lora(lora_folder(engine) / "flux-style.safetensors", weights, Family.FLUX, fmt)
    styled = engine.txt2img(flux_request(checkpoint, batch_size=1, prompt="a cat <lora:flux-style:1.2>"))
    assert np.abs(images(styled) - images(plain)).mean() > 1, "the LoRA changes the picture"
    x = flux_inputs(model.denoiser.config)
    with torch.no_grad():
        online = model.denoiser(**x).sample
        merged = merged_reference(model.denoiser, weights, "denoiser", 1.2)(**x).sample
    assert relative_error(online, merged) < 1e-5
    again = engine.txt2img(flux_request(checkpoint, batch_size=1))
    assert np.array_equal(images(again), images(plain)), "removed: bit-identical to never having applied it"


def test_lora_tags_weights_hashes_and_refusals(tmp_path, sd1_file, sdxl_file):
    engine = with_extensions(make_engine(tmp_path, sd1_file, sdxl_file))
    engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=sdxl_file.name))
    sdxl_model = engine.models.current
    write_lora(lora_folder(engine) / "xl.safetensors",
               random_lora(dict(_lora_components(sdxl_model)), Family.SDXL, rank=2, seed=3), Family.SDXL, "kohya")
    del sdxl_model
    plain = engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=sd1_file.name))
    model = engine.models.current
    weights = random_lora(dict(_lora_components(model)), Family.SD1, rank=2, seed=4)
    write_lora(lora_folder(engine) / "a.safetensors", weights, Family.SD1, "kohya")
    write_lora(lora_folder(engine) / "sub" / "b.safetensors", weights, Family.SD1, "diffusers")

    with pytest.raises(UserError, match="for SDXL") as wrong_family:
        engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "x <lora:xl:1>"}, checkpoint=sd1_file.name))
    assert wrong_family.value.field == "prompt"
    with pytest.raises(UserError, match="not found") as unknown:
        engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "x <lora:nope:1>"}))
    assert unknown.value.field == "prompt"
    with pytest.raises(UserError, match="must be numbers"):
        engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "x <lora:a:strong>"}))

    both = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:a:0.5> <lora:sub/b:0.5>"}))
    single = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:a:1>"}))
    assert np.abs(images(both) - images(single)).max() <= 2, "two halves of one LoRA make the whole"
    hashes = parse_infotext(both.infotexts[0])["Lora hashes"]
    assert hashes.startswith("a: ") and ", sub/b: " in hashes and len(hashes.split(", ")[0]) == len("a: ") + 12
    assert both.prompts[0] == "a red circle <lora:a:0.5> <lora:sub/b:0.5>", "the infotext keeps the tags"

    te_only = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:a:1:0>"}))
    unet_only = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:a:te=0:unet=1>"}))
    assert not np.array_equal(images(te_only), images(plain)) and not np.array_equal(images(unet_only), images(plain))
    assert not np.array_equal(images(te_only), images(unet_only))
    assert np.array_equal(images(engine.txt2img(GenerationRequest(**SD_REQUEST))), images(plain))


def test_lora_adapters_count_against_the_budget_and_stream_like_weights(tmp_path, sd1_file):
    from webui.engine.memory.manager import MemoryManager, SimulatedMemory

    engine = with_extensions(make_engine(tmp_path, sd1_file))
    plain = engine.txt2img(GenerationRequest(**SD_REQUEST))
    model = engine.models.current
    write_lora(lora_folder(engine) / "a.safetensors",
               random_lora(dict(_lora_components(model)), Family.SD1, rank=8, seed=5), Family.SD1, "kohya")
    tagged = GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:a:1>"})
    resident = engine.txt2img(tagged)
    assert "lora:denoiser" in engine.memory.components and "lora:text_encoder" in engine.memory.components
    assert engine.memory.components["lora:denoiser"].companion_of == "denoiser"

    small = make_engine(tmp_path / "small", sd1_file)
    device = torch.device("cpu")
    small.memory = small.models.memory = MemoryManager(device, SimulatedMemory(device, total_mb=64),
                                                       min_unit_bytes=16 * 1024)
    with_extensions(small)
    small.options.update({"forge_inference_memory": 60})
    lora_folder(small)
    (small.config.paths.lora_dir / "a.safetensors").symlink_to(engine.config.paths.lora_dir / "a.safetensors")
    streamed = small.txt2img(tagged)
    assert streamed.memory.streamed_mb > 0
    assert small.memory.components["lora:denoiser"].streamed_bytes() > 0, "the adapters are streamed too"
    assert np.array_equal(images(streamed), images(resident)), "streamed adapters compute what resident ones do"
    assert not np.array_equal(images(resident), images(plain))


def test_lora_list_in_the_api_and_the_ui_inserts_the_tag(tmp_path, sd1_file):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue
    from webui.synthetic.builders import build_synthetic_model
    from webui.ui import build_ui
    from webui.ui.network_browser import matching, toggle_network_tag

    engine = with_extensions(make_engine(tmp_path, sd1_file))
    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser
    weights = random_lora({"denoiser": unet}, Family.SD1, rank=2, seed=6)
    write_lora(lora_folder(engine) / "a.safetensors", weights, Family.SD1, "kohya")
    BUILTIN = ["demo-dusk", "demo-outline"]  # the demo model's, listed after the user's
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    listed = client.get("/sdapi/v1/loras").json()
    assert [entry["name"] for entry in listed] == ["a", *BUILTIN] and listed[0]["path"].endswith("a.safetensors")
    write_lora(lora_folder(engine) / "styles" / "b.safetensors", weights, Family.SD1, "diffusers")
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert [entry["name"] for entry in client.get("/sdapi/v1/loras").json()] == ["a", "styles/b", *BUILTIN]

    demo = build_ui(engine, JobQueue(engine))
    assert any(c["props"].get("elem_id") == "txt2img_lora_cards" for c in demo.config["components"])
    network = engine.hooks.networks["lora"][1]
    assert network.names() == ["a", *BUILTIN, "styles/b"]
    assert matching(network.names(), "DEMO") == BUILTIN and matching(network.names(), "s b") == ["styles/b"]
    assert toggle_network_tag("lora", "a cat", "styles/b") == "a cat <lora:styles/b:1>"

    from PIL import Image

    from webui.ui.network_browser import CARD_SIZE, card_image, placeholder_card

    Image.new("RGB", (640, 320), (0, 200, 0)).save(lora_folder(engine) / "a.preview.png")
    (lora_folder(engine) / "styles" / "b.png").write_text("not an image")
    card = card_image(network, "a")
    assert card.size == (CARD_SIZE, CARD_SIZE // 2) and card.getpixel((5, 5)) == (0, 200, 0), "a.preview.png, scaled"
    assert card_image(network, "styles/b") == placeholder_card("styles/b"), "an unreadable preview: the named card"
    assert card_image(network, "demo-outline").size == (128, 128), "the demo LoRAs come with their previews"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_locon_on_a_gguf_q8_0_unet_equals_the_merged_float32_weights(tmp_path, family, lora_route):
    """Every Linear and Conv2d of a quantized UNet adapted (LoCon) by two LoRAs at once, applied online after the
    layers unpack."""
    from gguf import GGMLQuantizationType as Q

    from tests.test_gguf_unet import load, unet_inputs, write_unet
    from webui.engine.formats.ldm_keys import unet_to_ldm
    from webui.engine.hooks import NetworkCall
    from webui.engine.lora.network import LoraLibrary, LoraNetwork
    from webui.engine.memory.manager import MemoryManager
    from webui.synthetic.builders import build_synthetic_model

    unet = build_synthetic_model(family, "tiny", seed=1).denoiser.float()
    quantized, _ = load(write_unet(tmp_path, family, unet_to_ldm(unet.state_dict(), unet.config), Q.Q8_0), family)
    model = UNetOnly(quantized, {"sd1": Family.SD1, "sdxl": Family.SDXL}[family])
    weights = random_lora({"denoiser": quantized}, model.family, rank=4, targets="all", seed=7)
    other = random_lora({"denoiser": quantized}, model.family, rank=2, targets="attention", seed=8)
    assert any(w.down.dim() == 4 for w in weights.values()), "convolutions adapted too"
    write_lora(tmp_path / "Lora" / "locon.safetensors", weights, model.family, "kohya")
    write_lora(tmp_path / "Lora" / "other.safetensors", other, model.family, "diffusers")
    network = LoraNetwork(LoraLibrary(tmp_path / "Lora", lambda path: "0" * 64), MemoryManager(torch.device("cpu")))
    inputs = unet_inputs(quantized.config)
    with torch.no_grad():
        before = quantized(**inputs).sample
        network.activate(model, [NetworkCall("lora", "locon", ("0.6",)), NetworkCall("lora", "other", ("-0.5",))])
        online = quantized(**inputs).sample
        merged = merged_reference(merged_reference(quantized, weights, "denoiser", 0.6), other, "denoiser", -0.5)
        merged = merged(**inputs).sample
        network.activate(model, [])
        after = quantized(**inputs).sample
    assert relative_error(online, merged) < 1e-5 and relative_error(online, before) > 1e-3
    assert torch.equal(after, before), "removed: bit-identical"


class UNetOnly:
    """What a LoRA network reads of a loaded model, for a bare UNet."""

    def __init__(self, denoiser: nn.Module, family: Family):
        self.denoiser, self.family, self.text_encoders, self.t5 = denoiser, family, [], None
        self.kind = Families()[family]


# ---- bad files fail their request, never the extension (issue 22) ------------------------------------------------


def header_only(path, header: bytes) -> None:
    """A .safetensors file of just this header, made by hand (no writer makes a bad one)."""
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_bad_lora_file_fails_its_request_not_the_extension(tmp_path, sd1_file):
    """An alpha of several values, a rank of 0, a file deleted since the list was made: each raised something else
    than a UserError, which disabled the LoRA extension until a restart (later tags dropped without a word)."""
    engine = with_extensions(make_engine(tmp_path, sd1_file))
    plain = engine.txt2img(GenerationRequest(**SD_REQUEST))
    folder = lora_folder(engine)
    write_lora(folder / "a.safetensors", random_lora(dict(_lora_components(engine.models.current)), Family.SD1,
                                                     rank=2, seed=4), Family.SD1, "kohya")
    tensors = load_file(folder / "a.safetensors")
    alpha = next(key for key in tensors if key.endswith(".alpha"))
    save_file({**tensors, alpha: torch.ones(3)}, folder / "alphas.safetensors")
    empty = {key: value[:, :0] if key.endswith("lora_up.weight") else value[:0] if key.endswith("down.weight")
             else value for key, value in tensors.items()}
    save_file(empty, folder / "rank0.safetensors")
    save_file(tensors, folder / "gone.safetensors")
    engine.hooks.networks["lora"][1].refresh()
    (folder / "gone.safetensors").unlink()
    for name, message in [("alphas", "has 3 alpha values"), ("rank0", "has an empty down or up matrix"),
                          ("gone", "could not be read")]:
        with pytest.raises(ModelFileError, match=f"{name}.safetensors.* {message}") as refused:
            engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": f"a red circle <lora:{name}:1>"}))
        assert refused.value.field == "prompt" and not engine.hooks.disabled
    tagged = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": "a red circle <lora:a:1>"}))
    assert not np.array_equal(images(tagged), images(plain)), "the extension still applies LoRAs"


def test_bad_lora_files_are_listed_by_the_api_and_refused_with_a_422(tmp_path, sd1_file):
    """/sdapi/v1/loras answered 500 for a header's "\\ud800" (not UTF-8 once decoded), for a file name that is not
    UTF-8 and for a file deleted since the list was made; each readable name is listed with what could be read of
    it, and a tag naming a bad file is a 422 that names it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue

    engine = with_extensions(make_engine(tmp_path, sd1_file))
    folder = lora_folder(engine)
    header_only(folder / "surrogate.safetensors", b'{"__metadata__": {"ss_output_name": "\\ud800"}}')
    header_only(folder / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    header_only(folder / "gone.safetensors", b"{}")
    header_only(folder / os.fsdecode(b"\xff.safetensors"), b"{}")
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    assert client.get("/sdapi/v1/loras").status_code == 200
    (folder / "gone.safetensors").unlink()
    reply = client.get("/sdapi/v1/loras")
    assert reply.status_code == 200, reply.text
    listed = {entry["name"]: entry for entry in reply.json()}
    assert {"surrogate", "deep", "gone"} <= listed.keys() and listed["surrogate"]["alias"] == "?"
    assert "nested too deep" in listed["deep"]["metadata"]["error"]
    assert "gone.safetensors could not be read" in listed["gone"]["metadata"]["error"]
    for name in ("deep", "gone"):
        body = {**SD_REQUEST, "save_images": False, "prompt": f"a red circle <lora:{name}:1>"}
        refused = client.post("/sdapi/v1/txt2img", json=body)
        assert refused.status_code == 422 and f"{name}.safetensors" in refused.json()["detail"], refused.text
    assert client.get("/sdapi/v1/loras").status_code == 200 and not engine.hooks.disabled
