"""The checkpoint merger (issue 28): each method's tensors are its formula computed in float32 from the files
themselves (the reference), a baked LoRA draws what the LoRA draws online, a baked VAE is the VAE file's, a GGUF
result loads with its module files, and inputs that cannot merge are refused naming them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import make_engine, single_file
from tests.test_lora import SD_REQUEST, _lora_components, lora_folder, with_extensions
from webui.api import register_api
from webui.engine.formats.detect import Family
from webui.engine.merge.merger import MergeRequest
from webui.engine.request import GenerationRequest
from webui.errors import UserError
from webui.jobs import JobQueue
from webui.synthetic.lora_export import random_lora, write_lora


@pytest.fixture(scope="module")
def sd1_b():
    return single_file("sd1", seed=2)


@pytest.fixture(scope="module")
def sd1_c():
    return single_file("sd1", seed=3)


@pytest.fixture
def engine(tmp_path, sd1_file, sd1_b, sd1_c, sdxl_file):
    return with_extensions(make_engine(tmp_path, sd1_file, sd1_b, sd1_c, sdxl_file))


def floats(path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(path).items() if v.is_floating_point()}


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=int)


def test_weighted_sum_is_the_formula_on_every_tensor(engine, sd1_file, sd1_b):
    result = engine.merge_checkpoints(MergeRequest(sd1_file.name, sd1_b.name, method="Weighted sum", multiplier=0.3,
                                                   precision="fp32", custom_name="mixed"))
    path = result.paths[0]
    assert path.name == "mixed.safetensors" and result.family is Family.SD1
    a, b, merged = floats(sd1_file), floats(sd1_b), load_file(path)
    assert set(merged) == set(load_file(sd1_file)), "every tensor of the primary"
    for key, value in a.items():
        assert torch.equal(merged[key], value * 0.7 + b[key] * 0.3), key
    integers = {k: v for k, v in load_file(sd1_file).items() if not v.is_floating_point()}
    assert all(torch.equal(merged[k], v) for k, v in integers.items())
    with safe_open(str(path), "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["method"] == "Weighted sum" and recipe["models"] == [sd1_file.name, sd1_b.name]
    image = engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint="mixed"))
    assert image.images and image.model_name == "mixed", "the result is listed and loads"


def test_add_difference_in_fp16_and_the_default_name(engine, sd1_file, sd1_b, sd1_c):
    result = engine.merge_checkpoints(MergeRequest(sd1_file.name, sd1_b.name, sd1_c.name, method="Add difference",
                                                   multiplier=0.5))
    path = result.paths[0]
    assert path.name == "sd1-1-sd1-2-sd1-3_0.5-Add_difference-merged.safetensors"
    a, b, c, merged = floats(sd1_file), floats(sd1_b), floats(sd1_c), load_file(path)
    for key, value in a.items():
        assert merged[key].dtype == torch.float16
        assert torch.equal(merged[key], (value + (b[key] - c[key]) * 0.5).half()), key


def test_a_baked_lora_draws_what_the_lora_draws_online(engine, sd1_file, sdxl_file):
    """SD1 and SDXL (whose second text encoder fuses q, k and v in one tensor): the checkpoint with the LoRA baked
    in, kept in float32, draws the picture the checkpoint with the LoRA in the prompt draws."""
    for checkpoint, family in ((sd1_file, Family.SD1), (sdxl_file, Family.SDXL)):
        engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=checkpoint.name))
        name = f"bake-{family.value}"
        weights = random_lora(dict(_lora_components(engine.models.current)), family, rank=4, seed=5)
        assert any(owner.startswith("text_encoder") for owner, _ in weights), "the text encoders are adapted too"
        write_lora(lora_folder(engine) / f"{name}.safetensors", weights, family, "kohya")
        online = engine.txt2img(GenerationRequest(**{**SD_REQUEST, "prompt": f"a red circle <lora:{name}:0.8>"},
                                                  checkpoint=checkpoint.name))
        baked = engine.merge_checkpoints(MergeRequest(checkpoint.name, method="No interpolation", precision="fp32",
                                                      loras=((name, 0.8),), custom_name=f"{name}-baked"))
        plain = engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=checkpoint.name))
        merged = engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=baked.paths[0].stem))
        change = np.abs(pixels(online) - pixels(plain)).max()
        assert change > 20, "the LoRA changes the picture"
        assert np.abs(pixels(merged) - pixels(online)).max() <= 3, family


def test_a_baked_vae_is_the_vae_files(engine, sd1_file, sd1_b, tmp_path):
    vae_dir = engine.config.paths.vae_dir
    vae_dir.mkdir(parents=True, exist_ok=True)
    other = {k.removeprefix("first_stage_model."): v for k, v in load_file(sd1_b).items()
             if k.startswith("first_stage_model.")}
    from safetensors.torch import save_file
    save_file(other, vae_dir / "other-vae.safetensors")
    result = engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", bake_in_vae="other-vae",
                                                   custom_name="with-vae"))
    merged = load_file(result.paths[0])
    assert all(torch.equal(merged["first_stage_model." + k], v) for k, v in other.items())
    unet = "model.diffusion_model.out.2.weight"
    assert torch.equal(merged[unet], load_file(sd1_file)[unet])


def test_a_gguf_result_loads_with_its_module_files(engine, sd1_file):
    result = engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", file_format="gguf",
                                                   gguf_type="Q8_0", custom_name="small"))
    gguf, vae, clip = result.paths
    assert (gguf.name, vae.name, clip.name) == ("small-Q8_0.gguf", "small-vae.safetensors", "small-clip_l.safetensors")
    plain = engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=sd1_file.name))
    quantized = engine.txt2img(GenerationRequest(**SD_REQUEST, checkpoint=gguf.name, modules=[vae.name, clip.name]))
    assert np.abs(pixels(quantized) - pixels(plain)).mean() < 3, "Q8_0 draws nearly the same picture"


@pytest.mark.parametrize("request_fields,field,words", [
    (dict(primary="sd1-1", secondary="sdxl-1"), "secondary", "one family: sd1-1.safetensors is"),
    (dict(primary="sd1-1"), "secondary", "needs a secondary checkpoint"),
    (dict(primary="sd1-1", secondary="sd1-2", method="Add difference"), "tertiary", "needs a tertiary"),
    (dict(primary="sd1-1", secondary="nope"), "secondary", "no checkpoint named 'nope'"),
    (dict(primary="sd1-1", secondary="sd1-2", custom_name="../up"), "custom_name", "without folders"),
    (dict(primary="sd1-1", secondary="sd1-2", multiplier=5), "multiplier", "from -1 to 2"),
    (dict(primary="sd1-1", method="No interpolation", loras=(("nope", 1.0),)), "loras", "nope"),
    (dict(primary="sd1-1", method="No interpolation", bake_in_vae="nope"), "bake_in_vae", "no VAE named"),
    (dict(primary="sd1-1", method="No interpolation", file_format="ckpt"), "file_format", "must be one of"),
])
def test_what_cannot_merge_is_refused_naming_it(engine, request_fields, field, words):
    with pytest.raises(UserError) as e:
        engine.merge_checkpoints(MergeRequest(**request_fields))
    assert e.value.field == field and words in e.value.message, e.value.message
    assert not any(p.name.endswith(".tmp") for p in engine.config.paths.checkpoint_dirs[0].iterdir())


def test_an_existing_file_is_kept_unless_overwritten(engine, sd1_file):
    first = engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", custom_name="same"))
    with pytest.raises(UserError, match="exists already"):
        engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", custom_name="same"))
    again = engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", custom_name="same",
                                                  overwrite=True, precision="bf16"))
    assert again.paths == first.paths and load_file(again.paths[0])["model.diffusion_model.out.2.weight"].dtype \
        == torch.bfloat16


def test_the_api_route_merges_with_a1111s_field_names(engine, sd1_file, sd1_b):
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    reply = client.post("/sdapi/v1/merge-checkpoints", json={
        "primary_model_name": sd1_file.name, "secondary_model_name": "sd1-2", "interp_method": "Weighted sum",
        "multiplier": 0.5, "save_as_half": True, "custom_name": "from-api", "checkpoint_format": "safetensors"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["paths"][0].endswith("from-api.safetensors")
    assert "from-api" in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    bad = client.post("/sdapi/v1/merge-checkpoints", json={"primary_model_name": sd1_file.name,
                                                           "secondary_model_name": "sdxl-1"})
    assert bad.status_code == 422 and bad.json()["field"] == "secondary_model_name"


def test_a_scalar_and_an_inpainting_primarys_first_convolution_merge_as_a1111s():
    """SDXL's OpenCLIP has a 0-d logit_scale; an inpainting primary's first convolution takes 9 channels, the other's
    4: its first 4 are merged, the rest kept."""
    from webui.engine.formats.files import TensorInfo
    from webui.engine.merge.merger import _merged

    class Reader:
        def __init__(self, value):
            self.value = value

        def get_tensor(self, key):
            return self.value.clone()

    def merge(a, b):
        headers = [({"k": TensorInfo("F32", tuple(t.shape))}, {}) for t in (a, b)]
        return _merged(MergeRequest("a", "b", multiplier=0.25), "k", [Reader(a), Reader(b)], headers, ())

    assert merge(torch.tensor(1.0), torch.tensor(3.0)).item() == 1.5
    wide, narrow = torch.ones(2, 9, 3, 3), torch.full((2, 4, 3, 3), 5.0)
    out = merge(wide, narrow)
    assert torch.equal(out[:, :4], torch.full((2, 4, 3, 3), 2.0)) and torch.equal(out[:, 4:], wide[:, 4:])
    with pytest.raises(UserError, match="primary \\(A\\) must be the inpainting one"):
        merge(narrow, wide)


def test_an_interrupt_stops_the_merge_and_leaves_no_file(engine, sd1_file, monkeypatch):
    engine.progress.interrupt()  # given to an earlier job: not this one's
    done = engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", custom_name="first"))
    assert done.paths[0].is_file()
    steps = []

    def step(number, latents, family):
        steps.append(number)
        if number == 5:
            engine.progress.interrupt()

    monkeypatch.setattr(engine.progress, "step", step)
    with pytest.raises(UserError, match="interrupted: nothing was written"):
        engine.merge_checkpoints(MergeRequest(sd1_file.name, method="No interpolation", custom_name="second"))
    folder = engine.config.paths.checkpoint_dirs[0]
    assert not (folder / "second.safetensors").exists() and not list(folder.glob(".*.tmp")) and steps[-1] == 5
