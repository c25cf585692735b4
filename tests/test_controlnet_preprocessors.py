"""ControlNet preprocessors (issue 27): controlnet_aux's detectors under sd-webui-controlnet's module names, their
weights read from models/ControlNetPreprocessor (files in lllyasviel/Annotators' layouts, random values); the
reference is controlnet_aux's own call on the same picture and files. A unit's preprocessor feeds the ControlNet
what the detector draws; /controlnet/detect and /controlnet/module_list answer webuiapi's calls."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import make_engine
from tests.controlnet_files import tiny_controlnet
from webui.engine.control.preprocessors import PREPROCESSORS, find_preprocessor, pixel_perfect_resolution
from webui.engine.control.units import ControlUnit
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.errors import UserError
from webui.synthetic.ldm_export import write_controlnet
from webui.synthetic.preprocessors import write_preprocessor_weights

# module, controlnet_aux's class, its files (from_pretrained's keywords: where they lie, in Forge's subfolders or
# flat as in a copy of lllyasviel/Annotators) and the detector's settings for the module
DETECTORS = [
    ("hed", "HEDdetector", {"filename": "hed/ControlNetHED.pth"}, {}),
    ("pidinet_scribble", "PidiNetDetector", {"filename": "table5_pidinet.pth"}, {"scribble": True}),
    ("lineart_coarse", "LineartDetector", {"filename": "lineart/sk_model.pth",
                                           "coarse_filename": "lineart/sk_model2.pth"}, {"coarse": True}),
    ("mlsd", "MLSDdetector", {"filename": "mlsd/mlsd_large_512_fp32.pth"}, {"thr_v": 0.08, "thr_d": 0.12}),
]


def picture(width: int = 96, height: int = 64) -> Image.Image:
    """Dark shapes and a coloured line on white: something for every detector to find."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 6, width * 3 // 4, height * 5 // 6), fill=(20, 20, 20))
    draw.line((0, height - 4, width, 5), fill=(30, 60, 200), width=3)
    return image


def array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(int)


def aux(name: str):
    import controlnet_aux
    return getattr(controlnet_aux, name)


@pytest.fixture
def engine(tmp_path, sd1_file):
    return make_engine(tmp_path, sd1_file)


def test_model_free_preprocessors_draw_what_controlnet_aux_draws(engine):
    """canny, lineart_standard and shuffle are controlnet_aux's detectors, called with the unit's settings (-1: the
    slider's default); shuffle draws its noise from the seed."""
    image = picture()
    canny = engine.detect("canny", [image], 128, 50, 150)[0]
    expected = aux("CannyDetector")()(array(image).astype(np.uint8), 50, 150, 128, 128, output_type="np")
    assert np.array_equal(array(canny), array(expected)) and array(canny).max() == 255
    defaults = engine.detect("canny", [image], -1, -1, -1)[0]
    assert np.array_equal(array(defaults), array(aux("CannyDetector")()(array(image).astype(np.uint8), 100, 200,
                                                                        512, 512, output_type="np")))
    lines = engine.detect("lineart_standard (from white bg & black line)", [image])[0]
    assert np.array_equal(array(lines), array(aux("LineartStandardDetector")()(image, detect_resolution=512,
                                                                                output_type="np")))
    assert array(lines).max() > 0
    detectors = engine.detectors
    shuffle = find_preprocessor("shuffle", "module")
    first, again, other = (detectors.detect(shuffle, image, 128, -1, -1, engine.memory, seed) for seed in (3, 3, 4))
    assert np.array_equal(array(first), array(again)) and not np.array_equal(array(first), array(other))


def test_image_operations(engine):
    """The preprocessors controlnet_aux has no class for: invert, tile, blur, XDoG scribble, threshold, recolor."""
    image = picture()
    inverted, tile, blur, scribble, binary, recolor = (
        array(engine.detect(name, [image], 64, a)[0]) for name, a in (
            ("invert", -1), ("tile_resample", 2.0), ("blur_gaussian", 3.0), ("scribble_xdog", 16),
            ("threshold", 100), ("recolor_luminance", 1.0)))
    assert np.array_equal(inverted, 255 - array(image))
    assert tile.shape == (32, 48, 3)
    assert blur.shape == (64, 128, 3) and 0 < blur.std()  # sized as controlnet_aux sizes: sides of 64s
    assert set(np.unique(scribble)) == {0, 255} and set(np.unique(binary)) == {0, 255}
    assert binary[32, 48, 0] == 0 and binary[2, 2, 0] == 255, "the dark ellipse is black, the white ground white"
    assert np.all(recolor[..., 0] == recolor[..., 1]) and recolor[2, 2, 0] > recolor[32, 48, 0]


def test_detectors_read_their_weights_from_the_preprocessor_folder(engine):
    """HED, PiDiNet, lineart and MLSD files anywhere under models/ControlNetPreprocessor: the app's map is
    controlnet_aux's own, from the same files and settings."""
    folder = engine.config.paths.controlnet_preprocessor_dir
    image = picture()
    for seed, (module, cls, files, settings) in enumerate(DETECTORS):
        paths = {key: write_preprocessor_weights(folder / place, seed) for key, place in files.items()}
        got = engine.detect(module, [image], 128, settings.get("thr_v", -1), settings.get("thr_d", -1))[0]
        detector = aux(cls).from_pretrained(str(folder), **{key: str(path) for key, path in paths.items()})
        expected = detector(array(image).astype(np.uint8), detect_resolution=128, image_resolution=128,
                            output_type="np", **settings)
        assert np.array_equal(array(got), array(expected)) and array(got).std() > 0, module


def test_a_missing_or_hostile_weight_file_fails_only_its_request(engine):
    folder = engine.config.paths.controlnet_preprocessor_dir
    with pytest.raises(UserError) as caught:
        engine.detect("depth_midas", [picture()])
    assert "dpt_hybrid-midas-501f0c75.pt" in str(caught.value) and str(folder) in str(caught.value)
    with pytest.raises(UserError) as caught:
        engine.detect("lineart_realistic", [picture()])
    assert "sk_model.pth, sk_model2.pth" in str(caught.value)
    hostile = folder / "hed" / "ControlNetHED.pth"
    hostile.parent.mkdir(parents=True)
    import pickle
    hostile.write_bytes(pickle.dumps(print))  # a pickle that would call a function: refused (weights only)
    with pytest.raises(UserError) as caught:
        engine.detect("softedge_hed", [picture()])
    assert "ControlNetHED.pth could not be read" in str(caught.value) and caught.value.field == "controlnet_module"
    with pytest.raises(UserError) as caught:
        engine.detect("depth_anything_v9", [picture()])
    assert "no preprocessor 'depth_anything_v9'" in str(caught.value)
    assert array(engine.detect("canny", [picture()], 64)[0]).max() == 255, "the app goes on"


def test_a_units_preprocessor_feeds_the_controlnet_its_map(engine, sd1_file, sd1_folder):
    """A unit with a preprocessor draws what the same unit draws from the detected map with "none"; the infotext
    says the settings used (the slider defaults, a pixel-perfect resolution)."""
    controls = engine.config.paths.controlnet_dir
    controls.mkdir(parents=True)
    write_controlnet(controls / "edges.safetensors", tiny_controlnet(sd1_folder, 0), "ldm")
    image = picture()

    def generate(unit: ControlUnit):
        return engine.txt2img(GenerationRequest(prompt="a circle", width=64, height=64, steps=4, seed=7,
                                                sampler_name="Euler", checkpoint=sd1_file.name, save_images=False,
                                                controlnet=[unit]))

    detected = generate(ControlUnit(model="edges", image=image, module="canny", pixel_perfect=True))
    resolution = pixel_perfect_resolution(image, 64, 64, outer_fit=False)
    edges = engine.detect("canny", [image], resolution)[0]
    assert resolution == 64
    given = generate(ControlUnit(model="edges", image=edges))
    assert np.array_equal(array(detected.images[0]), array(given.images[0]))
    plain = generate(ControlUnit(model="edges", image=image))
    assert not np.array_equal(array(detected.images[0]), array(plain.images[0])), "the map, not the picture"
    info = parse_infotext(detected.infotexts[0])["ControlNet 0"]
    assert "Module: canny" in info and "Processor Res: 64" in info and "Threshold A: 100" in info
    assert "Threshold B: 200" in info and "Pixel Perfect: True" in info


def test_pixel_perfect_resolution_follows_the_resize_mode():
    image = Image.new("RGB", (300, 200))
    assert pixel_perfect_resolution(image, 512, 512, outer_fit=False) == 512  # cropped: the short side fills
    assert pixel_perfect_resolution(image, 512, 512, outer_fit=True) == round(512 / 300 * 200)
    assert pixel_perfect_resolution(image, 1024, 768, outer_fit=False) == 768


def test_detect_and_module_list_answer_webuiapi(engine):
    """webuiapi's controlnet_module_list and controlnet_detect (its older ``controlnet_images`` field) against the
    app; the extension's ``alias_names`` list; bad bodies a 422 naming the field."""
    import webuiapi
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue

    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1")
    api.session = client
    modules = api.controlnet_module_list()
    assert modules[0] == "none" and {"canny", "hed", "depth", "openpose_full", "mlsd"} <= set(modules)
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert aliases["module_list"] == [p.label for p in PREPROCESSORS] and "softedge_hed" in aliases["module_list"]
    assert aliases["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1.0},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1.0}]
    image = picture()
    result = api.controlnet_detect([image], module="canny", processor_res=128, threshold_a=50, threshold_b=150)
    expected = aux("CannyDetector")()(array(image).astype(np.uint8), 50, 150, 128, 128, output_type="np")
    assert result.info == "Success" and np.array_equal(array(result.images[0]), array(expected))
    for body, field in (({"controlnet_module": "canny", "controlnet_input_images": []}, "controlnet_input_images"),
                        ({"controlnet_module": "sketchy", "controlnet_images": [webuiapi.b64_img(image)]},
                         "controlnet_module"),
                        ({"controlnet_module": "canny", "controlnet_images": [webuiapi.b64_img(image)],
                          "controlnet_processor_res": 100000}, "controlnet_processor_res"),
                        ({"controlnet_module": "canny", "controlnet_images": ["not base64"]},
                         "controlnet_input_images[0]")):
        refused = client.post("/controlnet/detect", json=body)
        assert refused.status_code == 422 and refused.json()["field"] == field, (body, refused.text)


def test_the_ui_units_preprocessor_fields_reach_the_engine(engine, sd1_file, sd1_folder, tmp_path):
    """The accordion's preprocessor, resolution, sliders and Pixel Perfect (``controlnet__i`` fields through Gradio's
    API): the engine's image for the same unit."""
    from gradio_client import handle_file

    from tests.test_ui import ui_client
    from webui.ui.controlnet import UNIT_FIELDS

    controls = engine.config.paths.controlnet_dir
    controls.mkdir(parents=True)
    write_controlnet(controls / "edges.safetensors", tiny_controlnet(sd1_folder, 0), "ldm")
    path = tmp_path / "picture.png"
    picture().save(path)
    unit = dict(enabled=True, image=handle_file(str(path)), model="edges", module="canny", processor_res=128,
                threshold_a=60, threshold_b=140, pixel_perfect=False)
    fields = dict(prompt="a circle", width=64, height=64, steps=4, seed=7, sampler_name="Euler")
    with ui_client(engine) as client:
        made = client.predict(**fields, **{f"controlnet__{UNIT_FIELDS.index(k)}": v for k, v in unit.items()},
                              api_name="/txt2img")
    same = ControlUnit(model="edges", image=picture(), module="canny", processor_res=128, threshold_a=60,
                       threshold_b=140)
    expected = engine.txt2img(GenerationRequest(**fields, checkpoint=sd1_file.name, save_images=False,
                                                controlnet=[same]))
    assert "Module: canny" in made[3] and "Threshold A: 60" in made[3]
    assert np.abs(array(Image.open(made[1][0]["image"])) - array(expected.images[0])).max() <= 1


def test_send_to_txt2img_fills_the_units_an_infotext_describes():
    """PNG Info's Send to txt2img: unit 0 takes the settings of the infotext's ``ControlNet 0`` (its preprocessor by
    its label, as the dropdown shows it), its image is left as it is, unit 1 (not described) is switched off; an
    unreadable value is left out."""
    import gradio as gr

    from webui.engine.sampling.samplers import SamplerRegistry
    from webui.ui.controlnet import UNIT_FIELDS, unit_key
    from webui.ui.png_info import form_updates

    unit = ControlUnit(model="edges", module="hed", weight=0.7, guidance_end=0.8, processor_res=384, threshold_a=-1,
                       pixel_perfect=True, union_control_type="Soft Edge", control_mode="My prompt is more important")
    infotext = (f'a fox\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, ControlNet 0: '
                f'"{unit.infotext().replace("Guidance Start: 0.0", "Guidance Start: soon")}"')
    with gr.Blocks():
        form = {"prompt": gr.Textbox("typed")} | {unit_key(i, name): gr.Textbox() for i in range(2)
                                                   for name in UNIT_FIELDS}
    values = {name: update.get("value", "kept") for name, update in
              zip(form, form_updates(form, infotext, SamplerRegistry().resolve))}
    first = {name: values[unit_key(0, name)] for name in UNIT_FIELDS}
    assert first == {"enabled": True, "pixel_perfect": True, "image": "kept", "module": "softedge_hed",
                     "processor_res": 384, "threshold_a": -1.0, "threshold_b": -1.0, "model": "edges",
                     "union_control_type": "Soft Edge", "weight": 0.7, "guidance_start": "kept",
                     "guidance_end": 0.8, "control_mode": "My prompt is more important",
                     "resize_mode": "Crop and Resize"}
    assert values[unit_key(1, "enabled")] is False and values[unit_key(1, "model")] == "kept"
