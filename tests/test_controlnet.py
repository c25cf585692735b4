"""ControlNet (issue 27) on the UNet families: files in A1111's and diffusers' layouts read with their architecture
from the tensors; images equal to diffusers' ControlNet pipelines on the same tiny weights, seed and sampler (weight,
guidance start/end, control modes, two units, img2img); bad units named."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffusers.models import MultiControlNetModel
from PIL import Image

from tests.conftest import make_engine
from tests.controlnet_files import control_picture, tiny_controlnet
from tests.test_img2img import init_picture, latent_mean  # noqa: F401 (a fixture)
from webui.engine.control.models import load_controlnet
from webui.engine.control.units import ControlUnit
from webui.engine.formats.detect import Family
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.engine.sampling.samplers import SamplerRegistry
from webui.errors import UserError
from webui.synthetic.ldm_export import write_controlnet

PROMPT, NEGATIVE, SEEDS, STEPS = "a red circle on the left", "blurry", [21, 22], 6
PIPELINES = {"sd1": StableDiffusionControlNetPipeline, "sdxl": StableDiffusionXLControlNetPipeline}


@pytest.fixture
def fixture_value(request):
    return request.getfixturevalue


def setup(tmp_path, fixture_value, family: str, count: int = 1):
    """An engine on ``family``'s tiny checkpoint with ``count`` ControlNets in its ControlNet folder (the first in
    A1111's layout, the second in diffusers'), and the models as diffusers' pipeline takes them."""
    folder, checkpoint = fixture_value(f"{family}_folder"), fixture_value(f"{family}_file")
    engine = make_engine(tmp_path, checkpoint)
    controls = engine.config.paths.controlnet_dir
    controls.mkdir(parents=True, exist_ok=True)
    models = [tiny_controlnet(folder, seed) for seed in range(count)]
    for index, model in enumerate(models):
        write_controlnet(controls / f"control-{family}-{index}.safetensors", model, ("ldm", "diffusers")[index % 2],
                         torch.float32)
    return engine, folder, checkpoint, models


def request(checkpoint, units, **fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=STEPS, cfg_scale=6.0,
                sampler_name="Euler a", scheduler="Automatic", seed=SEEDS[0], batch_size=len(SEEDS),
                checkpoint=checkpoint.name, save_images=False, controlnet=units)
    return GenerationRequest(**(base | fields))


def images(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images]).astype(int)


def reference(engine, folder, family: str, controlnet, sampler: str, schedule: str, cls=None, component="controlnet",
              **kwargs) -> np.ndarray:
    """diffusers' pipeline ``cls`` (the family's ControlNet one) with ``controlnet`` as its ``component``."""
    pipe = (cls or PIPELINES[family]).from_pretrained(folder, **{component: controlnet}, torch_dtype=torch.float32,
                                                      local_files_only=True)
    pipe.scheduler = SamplerRegistry().make_scheduler(sampler, schedule, engine.models.current.scheduler_config,
                                                      seed=SEEDS)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=STEPS,
               guidance_scale=6.0, num_images_per_prompt=len(SEEDS), output_type="pil",
               generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], **kwargs)
    return np.stack([np.asarray(image) for image in out.images]).astype(int)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("sampler,schedule", [("Euler a", "Automatic"), ("DPM++ 2M", "Karras")])
def test_one_unit_equals_diffusers_controlnet_pipeline(tmp_path, fixture_value, family, sampler, schedule):
    engine, folder, checkpoint, (model,) = setup(tmp_path, fixture_value, family)
    unit = ControlUnit(model=f"control-{family}-0", image=control_picture(), weight=0.8, guidance_end=0.7)
    result = engine.txt2img(request(checkpoint, [unit], sampler_name=sampler, scheduler=schedule))
    plain = engine.txt2img(request(checkpoint, None, sampler_name=sampler, scheduler=schedule))
    ref = reference(engine, folder, family, model, sampler, schedule, image=control_picture(),
                    controlnet_conditioning_scale=0.8, control_guidance_end=0.7)
    assert np.abs(images(plain) - images(result)).mean() > 2, "the ControlNet changes the picture"
    assert np.abs(images(result) - ref).max() <= 1
    info = parse_infotext(result.infotexts[0])
    assert info["ControlNet 0"].startswith("Module: none, Model: control-") and "Weight: 0.8" in info["ControlNet 0"]


@pytest.mark.parametrize("mode,guess", [("ControlNet is more important", True), ("My prompt is more important", None)])
def test_control_modes(tmp_path, fixture_value, mode, guess):
    """"ControlNet is more important" is diffusers' guess mode (the conditional half only, scaled 0.1 … 1); "My
    prompt is more important" scales the residuals by 0.825 ** (12 - i), checked against the pipeline's balanced
    output with the ControlNet's outputs scaled so."""
    engine, folder, checkpoint, (model,) = setup(tmp_path, fixture_value, "sd1")
    unit = ControlUnit(model="control-sd1-0", image=control_picture(), control_mode=mode)
    ours = images(engine.txt2img(request(checkpoint, [unit])))
    if guess:
        ref = reference(engine, folder, "sd1", model, "Euler a", "Automatic", image=control_picture(), guess_mode=True)
    else:
        forward = model.forward

        def soft(*args, **kwargs):
            down, mid = forward(*args, **kwargs)[:2]
            return [r * 0.825 ** (len(down) - i) for i, r in enumerate(down)], mid

        model.forward = soft
        ref = reference(engine, folder, "sd1", model, "Euler a", "Automatic", image=control_picture())
    assert np.abs(ours - ref).max() <= 1


def test_two_units_equal_multicontrolnet_and_an_unused_model_is_let_go(tmp_path, fixture_value):
    engine, folder, checkpoint, models = setup(tmp_path, fixture_value, "sd1", count=2)
    units = [ControlUnit(model="control-sd1-0", image=control_picture(left=True), weight=0.6),
             ControlUnit(model="control-sd1-1 [0123abcd]", image=control_picture(left=False), weight=0.9,
                         guidance_start=0.2)]
    ours = images(engine.txt2img(request(checkpoint, units)))
    ref = reference(engine, folder, "sd1", MultiControlNetModel(models), "Euler a", "Automatic",
                    image=[control_picture(left=True), control_picture(left=False)],
                    controlnet_conditioning_scale=[0.6, 0.9], control_guidance_start=[0.0, 0.2],
                    control_guidance_end=[1.0, 1.0])
    assert np.abs(ours - ref).max() <= 1
    assert {n for n in engine.memory.components if n.startswith("controlnet:")} == {
        "controlnet:control-sd1-0", "controlnet:control-sd1-1"}
    engine.txt2img(request(checkpoint, units[:1], batch_size=1))
    assert {n for n in engine.memory.components if n.startswith("controlnet:")} == {"controlnet:control-sd1-0"}
    engine.txt2img(request(checkpoint, None, batch_size=1))
    assert not [n for n in engine.memory.components if n.startswith("controlnet:")], "no unit: none kept placed"


def test_img2img_takes_the_init_image_as_the_control_image(tmp_path, fixture_value, latent_mean):  # noqa: F811
    engine, folder, checkpoint, (model,) = setup(tmp_path, fixture_value, "sd1")
    unit = ControlUnit(model="control-sd1-0", weight=1.2)
    result = engine.img2img(request(checkpoint, [unit], init_images=[init_picture()], denoising_strength=0.75))
    run = 5  # A1111's int(0.75 x 6) + 1 steps: diffusers' at strength 5.5 / 6
    ref = reference(engine, folder, "sd1", model, "Euler a", "Automatic", cls=StableDiffusionControlNetImg2ImgPipeline,
                    image=init_picture(), control_image=init_picture(), strength=(run + 0.5) / STEPS,
                    controlnet_conditioning_scale=1.2)
    assert np.abs(images(result) - ref).max() <= 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_files_in_both_layouts_load_as_written(tmp_path, fixture_value, family):
    from diffusers import UNet2DConditionModel

    folder = fixture_value(f"{family}_folder")
    model = tiny_controlnet(folder, seed=3)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    for layout in ("ldm", "diffusers"):
        path = write_controlnet(tmp_path / f"{layout}.safetensors", model, layout, torch.float32)
        found, loaded = load_controlnet(path, unet, Family.SD1)
        assert found is {"sd1": Family.SD1, "sdxl": Family.SDXL}[family] and loaded.config.block_out_channels == model.config.block_out_channels
        expected, got = model.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_bad_units_name_the_unit_and_the_field(tmp_path, fixture_value, sdxl_file):
    engine, folder, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    write_controlnet(engine.config.paths.controlnet_dir / "xl.safetensors",
                     tiny_controlnet(fixture_value("sdxl_folder"), seed=1), "diffusers", torch.float32)
    (engine.config.paths.controlnet_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    picture = control_picture()
    cases = [
        (ControlUnit(model="xl", image=picture), "controlnet[0].model", "a ControlNet for SDXL"),
        (ControlUnit(model="nowhere", image=picture), "controlnet[0].model", "no ControlNet named 'nowhere'"),
        (ControlUnit(model="control-sd1-0", image=picture, weight=2.5), "controlnet[0].weight", "from 0.0 to 2.0"),
        (ControlUnit(model="control-sd1-0", image=picture, guidance_start=0.6, guidance_end=0.5),
         "controlnet[0].guidance_start", "below guidance_end"),
        (ControlUnit(model="control-sd1-0"), "controlnet[0].image", "no image"),
        (ControlUnit(model="control-sd1-0", image=picture, control_mode="Loud"), "controlnet[0].control_mode",
         "Balanced"),
    ]
    for unit, field, words in cases:
        with pytest.raises(UserError) as caught:
            engine.txt2img(request(checkpoint, [unit], batch_size=1))
        assert caught.value.field == field and words in str(caught.value), (field, str(caught.value))
    with pytest.raises(Exception) as caught:
        engine.txt2img(request(checkpoint, [ControlUnit(model="broken", image=picture)], batch_size=1))
    assert "broken.safetensors" in str(caught.value)
    after = engine.txt2img(request(checkpoint, [ControlUnit(model="control-sd1-0", image=picture)], batch_size=1))
    assert len(after.images) == 1, "a bad file fails only its request"


def test_the_api_takes_webuiapis_controlnet_units(tmp_path, fixture_value):
    """The body webuiapi sends (``ControlNetUnit.to_dict()`` in ``alwayson_scripts``), on txt2img and img2img: the
    engine's image for the same unit; the preprocessor settings module "none" has no use for named as ignored; the empty units
    webuiapi sends when it has none; indices for modes; bad units a 422 naming the unit's field."""
    import base64
    import io
    import json

    import webuiapi
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue

    engine, _, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    unit = webuiapi.ControlNetUnit(image=control_picture(), model="control-sd1-0", weight=0.7, control_mode=1,
                                   resize_mode="Crop and Resize", guidance_end=0.8)
    body = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=STEPS, cfg_scale=6.0,
                sampler_name="Euler a", seed=SEEDS[0], alwayson_scripts={"ControlNet": {"args": [unit.to_dict()]}})
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert {"ControlNet[0].processor_res", "ControlNet[0].threshold_a"} <= set(info["ignored_fields"])
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0])))).astype(int)
    same = ControlUnit(model="control-sd1-0", image=control_picture(), weight=0.7, guidance_end=0.8,
                       control_mode="My prompt is more important")
    expected = images(engine.txt2img(request(checkpoint, [same], batch_size=1)))[0]
    assert np.abs(got - expected).max() <= 1 and "ControlNet 0" in info["infotexts"][0]
    empty = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": []}}})
    assert empty.status_code == 200 and "ControlNet 0" not in json.loads(empty.json()["info"])["infotexts"][0]
    picture = base64.b64encode(_png(init_picture())).decode()
    img2img = client.post("/sdapi/v1/img2img", json={**body, "init_images": [picture], "alwayson_scripts": {
        "controlnet": {"args": [{"model": "control-sd1-0", "resize_mode": 0, "control_mode": "Balanced"}]}}})
    assert img2img.status_code == 200, img2img.text
    for args, field in (([{"model": "control-sd1-0", "image": picture, "weight": 3}], "controlnet[0].weight"),
                        (["on"], "ControlNet[0]"),
                        ([{"model": "control-sd1-0", "image": picture, "control_mode": 7}], "ControlNet[0].control_mode"),
                        ([{"model": "control-sd1-0", "image": picture, "union_control_type": "Sketch"}],
                         "ControlNet[0].union_control_type"),
                        ([{"model": "control-sd1-0"}], "controlnet[0].image")):
        refused = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": args}}})
        assert refused.status_code == 422 and refused.json()["field"] == field, (args, refused.text)


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_controlnet_routes_list_the_models(tmp_path, fixture_value):
    """sd-webui-controlnet's GET routes at the server's root, read by webuiapi's own calls."""
    import webuiapi
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue

    engine, *_ = setup(tmp_path, fixture_value, "sd1", count=2)
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1")
    api.session = client  # webuiapi's calls, answered by the app
    assert api.controlnet_version() == 2
    assert api.controlnet_model_list() == ["control-sd1-0", "control-sd1-1", "demo-canny"], "the built-in one after"
    assert api.controlnet_module_list()[:2] == ["none", "canny"]
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}


def test_the_ui_units_generate_what_the_engine_does(tmp_path, fixture_value):
    """txt2img's ControlNet accordion through Gradio's API (the form's ``controlnet__i`` fields): a switched-on unit
    gives the engine's image for the same unit; switched off, none; /controlnet/settings says how many units."""
    from gradio_client import handle_file

    from tests.test_ui import ui_client
    from webui.ui.controlnet import UNIT_FIELDS

    engine, _, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    picture = tmp_path / "edges.png"
    control_picture().save(picture)
    unit = dict(enabled=True, image=handle_file(str(picture)), model="control-sd1-0", weight=0.7, guidance_start=0.0,
                guidance_end=0.9, control_mode="Balanced", resize_mode="Crop and Resize")
    fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=STEPS, cfg_scale=6.0,
                  sampler_name="Euler a", scheduler="Automatic", seed=SEEDS[0])
    with ui_client(engine) as client:
        on = client.predict(**fields, **{f"controlnet__{UNIT_FIELDS.index(k)}": v for k, v in unit.items()},
                            api_name="/txt2img")
        off = client.predict(**fields, api_name="/txt2img")
    assert "ControlNet 0" in on[3] and "Weight: 0.7" in on[3] and "ControlNet" not in off[3]
    same = ControlUnit(model="control-sd1-0", image=control_picture(), weight=0.7, guidance_end=0.9)
    expected = images(engine.txt2img(request(checkpoint, [same], batch_size=1)))[0]
    got = np.asarray(Image.open(on[1][0]["image"])).astype(int)
    assert np.abs(got - expected).max() <= 1


def test_a_hires_checkpoint_of_another_family_is_refused_with_controlnet_units(tmp_path, fixture_value, sdxl_file):
    import shutil

    engine, _, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    shutil.copy(sdxl_file, engine.config.paths.checkpoint_dirs[0] / sdxl_file.name)
    engine.models.refresh()
    unit = ControlUnit(model="control-sd1-0", image=control_picture())
    with pytest.raises(UserError) as caught:
        engine.txt2img(request(checkpoint, [unit], batch_size=1, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                               denoising_strength=0.5, hr_checkpoint_name=sdxl_file.name))
    assert caught.value.field == "hr_checkpoint_name" and "ControlNet units are for SD1.x" in str(caught.value)
    hires = engine.txt2img(request(checkpoint, [unit], batch_size=1, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                                   denoising_strength=0.5))
    assert hires.images[0].size == (128, 128) and "ControlNet 0" in hires.infotexts[0]


def test_diffusion_in_low_bits_stores_the_controlnet_in_fp8_too(tmp_path, fixture_value, monkeypatch):
    """With "Diffusion in Low Bits" at float8-e4m3fn the ControlNet's layers are stored in fp8 as the UNet's (its
    component the smaller for it), the picture close to the 16-bit one; back at Automatic it is read again as it
    was, and draws exactly the first picture."""
    import functools

    from webui.engine.control import models
    from webui.engine.loading import models as loading
    from webui.engine.weights.fp8 import Fp8Conv2d, cast_weights_fp8

    for module in (models, loading):  # (the tiny models' layers are all below the size fp8 storage starts at)
        monkeypatch.setattr(module, "cast_weights_fp8", functools.partial(cast_weights_fp8, min_numel=0))
    engine, _, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    unit = ControlUnit(model="control-sd1-0", image=control_picture())
    full = images(engine.txt2img(request(checkpoint, [unit])))
    full_bytes = engine.memory.components["controlnet:control-sd1-0"].nbytes
    engine.options.update({"forge_unet_storage_dtype": "float8-e4m3fn"})
    low = images(engine.txt2img(request(checkpoint, [unit])))
    (_, controlnet), = engine.controlnets.loaded.values()
    assert isinstance(controlnet.conv_in, Fp8Conv2d) and controlnet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert engine.memory.components["controlnet:control-sd1-0"].nbytes < 0.6 * full_bytes
    assert 0 < np.abs(low - full).mean() < 12
    engine.options.update({"forge_unet_storage_dtype": "Automatic"})
    assert np.array_equal(images(engine.txt2img(request(checkpoint, [unit]))), full)


def test_a_pth_controlnet_and_a_file_added_after_the_first_job_are_found(tmp_path, fixture_value):
    """lllyasviel's ControlNets are .pth pickles (read weights-only); a file copied in while the app runs is found by
    the next job that names it (the folder is read again for a name not seen)."""
    from safetensors.torch import load_file

    engine, _, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    picture = control_picture()
    first = engine.txt2img(request(checkpoint, [ControlUnit(model="control-sd1-0", image=picture)], batch_size=1))
    folder = engine.config.paths.controlnet_dir
    torch.save(load_file(folder / "control-sd1-0.safetensors"), folder / "lllyasviel.pth")
    again = engine.txt2img(request(checkpoint, [ControlUnit(model="lllyasviel", image=picture)], batch_size=1))
    assert np.abs(images(again) - images(first)).max() <= 1


def test_an_sdxl_union_controlnet_runs_in_the_units_control_type(tmp_path, fixture_value):
    """xinsir's kind (one model, a control type per image): a unit whose union_control_type is "Depth" draws what
    diffusers' StableDiffusionXLControlNetUnionPipeline draws with control_mode 1; left "Unknown", a canny unit
    runs as "Hard Edge" (3); a type the model lacks is refused naming the field."""
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline, UNet2DConditionModel

    engine, folder, checkpoint, _ = setup(tmp_path, fixture_value, "sdxl")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    grown = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    width = unet.config.block_out_channels[0]  # its control-type transformer as wide as the first level
    union = ControlNetUnionModel.from_config(grown.config, num_trans_channel=width, num_proj_channel=width)
    union.load_state_dict({k: v for k, v in grown.state_dict().items()
                           if not k.startswith(("task_embedding", "transformer_layes", "spatial_ch_projs"))},
                          strict=False)
    generator = torch.Generator().manual_seed(5)
    for name, parameter in union.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding",
                            "spatial_ch_projs")):
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    write_controlnet(engine.config.paths.controlnet_dir / "union.safetensors", union.eval(), "diffusers",
                     torch.float32)
    picture = control_picture()
    got = images(engine.txt2img(request(checkpoint, [ControlUnit(model="union", image=picture,
                                                                 union_control_type="Depth")])))
    expected = reference(engine, folder, "sdxl", union, "Euler a", "Automatic",
                         cls=StableDiffusionXLControlNetUnionPipeline, control_image=[picture], control_mode=[1])
    assert np.abs(got - expected).max() <= 1
    edges = ControlUnit(model="union", image=picture, module="canny", processor_res=64)
    as_edges = images(engine.txt2img(request(checkpoint, [edges])))
    expected = reference(engine, folder, "sdxl", union, "Euler a", "Automatic",
                         cls=StableDiffusionXLControlNetUnionPipeline,
                         control_image=[engine.detect("canny", [picture], 64)[0]], control_mode=[3])
    assert np.abs(as_edges - expected).max() <= 1
    with pytest.raises(UserError) as caught:
        engine.txt2img(request(checkpoint, [ControlUnit(model="union", image=picture, union_control_type="Inpaint")]))
    assert caught.value.field == "controlnet[0].union_control_type" and "knows OpenPose, Depth" in str(caught.value)


def ip_adapter_reference(engine, folder, encoder, states: list[dict], scales: list[float], pictures: list
                         ) -> np.ndarray:
    """diffusers' pipeline with the IP-Adapters ``states`` loaded at ``scales``, one picture for each."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.register_modules(image_encoder=encoder)
    pipe.load_ip_adapter([{part: {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
                           for part in ("image_proj", "ip_adapter")} for state in states],
                         subfolder=[""] * len(states), weight_name=[""] * len(states), image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scales)
    pipe.scheduler = SamplerRegistry().make_scheduler("Euler a", "Automatic", engine.models.current.scheduler_config,
                                                      seed=SEEDS)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=STEPS,
               guidance_scale=6.0, num_images_per_prompt=len(SEEDS), ip_adapter_image=pictures,
               generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS])
    return np.stack([np.asarray(image) for image in out.images]).astype(int)

def test_an_ip_adapter_unit_equals_diffusers_ip_adapter(tmp_path, fixture_value):
    """An IP-Adapter file in models/ControlNet and a CLIP vision encoder in models/clip_vision (tiny, random): the
    unit's image tokens beside the text give diffusers' pipeline's picture with ``load_ip_adapter`` and the same
    scale; the UNet's processors are its own again after the job; without an encoder as wide as the adapter takes,
    a 422 naming the unit's model."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from webui.synthetic.ip_adapter import ip_adapter_state, write_clip_vision

    engine, folder, checkpoint, _ = setup(tmp_path, fixture_value, "sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    state = ip_adapter_state(unet, embedding=24, seed=3)
    save_file(state, engine.config.paths.controlnet_dir / "ip-adapter_tiny.safetensors")
    picture = init_picture()
    unit = ControlUnit(model="ip-adapter_tiny", image=picture, module="ip-adapter_clip_h", weight=0.8)
    with pytest.raises(UserError) as caught:
        engine.txt2img(request(checkpoint, [unit], batch_size=1))
    assert caught.value.field == "controlnet[0].model" and "CLIP vision encoder with 24-wide output" in str(caught.value)
    encoder = write_clip_vision(engine.config.paths.clip_vision_dir / "clip_vision_h.safetensors", projection=24)
    processors = dict(engine.models.current.denoiser.attn_processors) if engine.models.current else None
    got = images(engine.txt2img(request(checkpoint, [unit])))
    plain = images(engine.txt2img(request(checkpoint, [])))
    assert dict(engine.models.current.denoiser.attn_processors) == (processors or dict(
        engine.models.current.denoiser.attn_processors)), "its own processors again"
    expected = ip_adapter_reference(engine, folder, encoder, [state], [0.8], [picture])
    assert np.abs(got - plain).mean() > 1, "the image prompt changes the picture"
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()



def test_two_ip_adapter_units_equal_diffusers_with_two_adapters(tmp_path, fixture_value):
    """Two IP-Adapter units (two files, two pictures, two weights): diffusers' pipeline with both adapters loaded and
    those scales; a unit outside its guidance start and end adds nothing (the picture of the other unit alone)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from webui.synthetic.ip_adapter import ip_adapter_state, write_clip_vision

    engine, folder, checkpoint, _ = setup(tmp_path, fixture_value, "sd1", count=0)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    states = [ip_adapter_state(unet, embedding=24, seed=seed) for seed in (3, 4)]
    for name, state in zip(("ip-a", "ip-b"), states):
        save_file(state, engine.config.paths.controlnet_dir / f"{name}.safetensors")
    encoder = write_clip_vision(engine.config.paths.clip_vision_dir / "clip_vision_h.safetensors", projection=24)
    pictures = [init_picture(), control_picture()]
    units = [ControlUnit(model=name, image=picture, module="ip-adapter_clip_h", weight=weight)
             for name, picture, weight in zip(("ip-a", "ip-b"), pictures, (0.8, 0.5))]
    got = images(engine.txt2img(request(checkpoint, units)))
    expected = ip_adapter_reference(engine, folder, encoder, states, [0.8, 0.5], pictures)
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()
    alone = images(engine.txt2img(request(checkpoint, units[:1])))
    idle = images(engine.txt2img(request(checkpoint, [units[0], replace(units[1], guidance_start=0.9,
                                                                          guidance_end=0.95)])))
    assert np.abs(got - alone).mean() > 1 and np.array_equal(idle, alone)

def test_a_t2i_adapter_unit_equals_diffusers_adapter_pipeline(tmp_path, fixture_value):
    """TencentARC's T2I-Adapters in models/ControlNet (an original-layout file, a one-channel one, a light one in
    diffusers' layout): read with their architecture from the tensors; a unit's picture equals diffusers'
    StableDiffusionAdapterPipeline's with the same scale; its guidance end and weight act; an adapter of another
    family is refused naming the unit's model."""
    from diffusers import StableDiffusionAdapterPipeline, UNet2DConditionModel

    from webui.engine.control.t2i_adapter import adapter_family
    from webui.synthetic.t2i_adapter import random_t2i_adapter, write_t2i_adapter

    engine, folder, checkpoint, _ = setup(tmp_path, fixture_value, "sd1", count=0)
    channels = list(UNet2DConditionModel.load_config(folder, subfolder="unet")["block_out_channels"])
    adapters = {"t2iadapter_tiny_sd14v1": random_t2i_adapter(channels, 1),
                "t2iadapter_tiny_gray": random_t2i_adapter(channels, 2, in_channels=1),
                "t2iadapter_tiny_light": random_t2i_adapter(channels + [channels[-1]], 3, kind="light_adapter")}
    plain = images(engine.txt2img(request(checkpoint, None)))
    for (name, adapter), layout in zip(adapters.items(), ("original", "original", "diffusers")):
        path = write_t2i_adapter(engine.config.paths.controlnet_dir / f"{name}.safetensors", adapter, layout)
        family, loaded = load_controlnet(path, engine.models.current.denoiser, Family.SD1)
        assert family is Family.SD1 and dict(loaded.config) == dict(adapter.config)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapter.state_dict().items())
    for name, adapter in adapters.items():
        unit = ControlUnit(model=name, image=control_picture(), weight=0.8)
        got = images(engine.txt2img(request(checkpoint, [unit])))
        picture = control_picture().convert("L") if adapter.config.in_channels == 1 else control_picture()
        expected = reference(engine, folder, "sd1", adapter, "Euler a", "Automatic",
                             cls=StableDiffusionAdapterPipeline, component="adapter", image=picture,
                             adapter_conditioning_scale=0.8)
        assert np.abs(got - plain).mean() > 1, f"{name} changes the picture"
        assert np.abs(got - expected).max() <= 1, (name, np.abs(got - expected).max())
    unit = ControlUnit(model="t2iadapter_tiny_sd14v1", image=control_picture(), weight=0.8)
    early = images(engine.txt2img(request(checkpoint, [replace(unit, guidance_end=0.5)])))
    assert 0 < np.abs(early - got).mean() and 0 < np.abs(early - plain).mean(), "its guidance end acts"
    with pytest.raises(UserError) as caught:
        engine.txt2img(request(checkpoint, [replace(unit, control_mode="My prompt is more important")]))
    assert caught.value.field == "controlnet[0].control_mode"
    assert adapter_family({"adapter_type": "full_adapter_xl"}, Family.SD1) is Family.SDXL
    assert adapter_family({"adapter_type": "full_adapter"}, Family.SDXL) is Family.SD1


def test_an_sdxl_t2i_adapter_unit_equals_diffusers_sdxl_adapter_pipeline(tmp_path, fixture_value):
    """An SDXL T2I-Adapter (diffusers' layout, as TencentARC shares them: ``full_adapter_xl``) with its guidance end:
    StableDiffusionXLAdapterPipeline's picture with that ``adapter_conditioning_factor``."""
    from diffusers import StableDiffusionXLAdapterPipeline, UNet2DConditionModel

    from webui.synthetic.t2i_adapter import random_t2i_adapter, write_t2i_adapter

    engine, folder, checkpoint, _ = setup(tmp_path, fixture_value, "sdxl", count=0)
    channels = list(UNet2DConditionModel.load_config(folder, subfolder="unet")["block_out_channels"])
    adapter = random_t2i_adapter(channels, 4, kind="full_adapter_xl")
    write_t2i_adapter(engine.config.paths.controlnet_dir / "t2i-adapter-tiny-sdxl.safetensors", adapter, "diffusers")
    unit = ControlUnit(model="t2i-adapter-tiny-sdxl", image=control_picture(), weight=0.9, guidance_end=0.5)
    got = images(engine.txt2img(request(checkpoint, [unit])))
    expected = reference(engine, folder, "sdxl", adapter, "Euler a", "Automatic", cls=StableDiffusionXLAdapterPipeline,
                         component="adapter", image=control_picture(), adapter_conditioning_scale=0.9,
                         adapter_conditioning_factor=0.5)
    assert np.abs(got - images(engine.txt2img(request(checkpoint, None)))).mean() > 1
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()


def test_a_pickled_clip_vision_encoder_is_chosen_by_its_width_and_read_once(tmp_path, fixture_value, monkeypatch):
    """``models/clip_vision`` with a ``.bin`` encoder of another width and the fitting one as a ``.bin`` too (a pickle
    has no header): the fitting one is loaded with the file's weights, each file read once."""
    from diffusers import UNet2DConditionModel

    from webui.engine.control import ip_adapter
    from webui.engine.control.ip_adapter import ClipVisionEncoders, IPAdapter
    from webui.synthetic.ip_adapter import ip_adapter_state, write_clip_vision

    unet = UNet2DConditionModel.from_pretrained(fixture_value("sd1_folder"), subfolder="unet", local_files_only=True)
    adapter = IPAdapter(ip_adapter_state(unet, embedding=24, seed=3), unet, torch.float32)
    folder = tmp_path / "clip_vision"
    folder.mkdir()
    for name, width in (("a_other.bin", 16), ("b_fits.bin", 24)):
        model = write_clip_vision(tmp_path / f"{name}.safetensors", projection=width, seed=width)
        torch.save(model.state_dict(), folder / name)
    reads = []
    real = ip_adapter.load_state_dict
    monkeypatch.setattr(ip_adapter, "load_state_dict", lambda path: reads.append(path.name) or real(path))
    encoder = ClipVisionEncoders(folder).for_adapter(adapter, torch.float32, "controlnet[0].model")
    assert encoder.config.projection_dim == 24 and reads == ["a_other.bin", "b_fits.bin"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.state_dict().items())
