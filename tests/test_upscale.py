"""Upscalers and the Extras tab: model files read by spandrel from A1111's and Forge's folders (tiny ESRGAN and
Real-ESRGAN-compact models written here in the real key layouts), tiled runs, A1111's /upscalers and Extras API, and
clear errors for bad files, names, images and face restoration.

Where spandrel cannot be imported (it needs a torchvision built for the installed torch), the tests of model files
are skipped; the built-in upscalers, the file checks and the API run everywhere."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gradio_client import handle_file
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import make_engine
from tests.test_ui import ui_client
from webui.api import register_api
from webui.engine.memory.manager import MemoryManager, SimulatedMemory
from webui.engine.outputs import png_bytes
from webui.engine.upscale.extras import ExtrasRequest, crop_centre
from webui.engine.upscale.model import to_image, to_tensor
from webui.engine.upscale.tiles import upscale_tiled
from webui.synthetic.upscalers import compact_state, esrgan_state
from webui.errors import UserError
from webui.jobs import JobQueue
from webui.ui.extras_tab import upscale_form

ESRGAN_NAME, COMPACT_NAME = "4x-tiny-esrgan", "realesr-tiny-x2"


def spandrel_or_skip():
    try:
        import spandrel
    except Exception as e:  # not installed, or a torchvision built for another torch
        pytest.skip(f"spandrel cannot be imported here ({type(e).__name__}: {e})")
    return spandrel


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """The engine's models folder with a .pth ESRGAN (in BasicSR's params_ema wrapper) in models/ESRGAN and a
    .safetensors compact model in Forge's models/upscale_models."""
    esrgan, forge = tmp_path / "models" / "ESRGAN", tmp_path / "models" / "upscale_models"
    esrgan.mkdir(parents=True)
    forge.mkdir(parents=True)
    torch.save({"params_ema": esrgan_state()}, esrgan / f"{ESRGAN_NAME}.pth")
    save_file(compact_state(), forge / f"{COMPACT_NAME}.safetensors")
    return tmp_path / "models"


@pytest.fixture
def upscaling(tmp_path, sd1_file, models):
    return make_engine(tmp_path, sd1_file)


@pytest.fixture
def client(upscaling):
    app = FastAPI()
    register_api(app, JobQueue(upscaling))
    return TestClient(app)


def picture(width: int = 40, height: int = 24, seed: int = 0) -> Image.Image:
    """A small picture with edges and gradients (so that a wrong pixel shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 / width, y * 255 / height, (x + y) % 16 * 16], axis=-1)
    array = array + rng.normal(0, 12, array.shape)
    return Image.fromarray(array.clip(0, 255).astype(np.uint8), "RGB")


def b64(image: Image.Image, infotext: str = "") -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_upscalers_lists_builtin_then_model_files_with_a1111_fields(client, models):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", ESRGAN_NAME, COMPACT_NAME]
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in listed)
    assert listed[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    assert listed[3] | {"model_path": None} == {"name": ESRGAN_NAME, "model_name": "ESRGAN", "model_path": None,
                                                "model_url": None, "scale": 4}
    assert Path(listed[3]["model_path"]) == models / "ESRGAN" / f"{ESRGAN_NAME}.pth"
    assert listed[4]["scale"] == 2 and listed[4]["model_name"] == "upscale_models"


@pytest.mark.parametrize("name, path", [(ESRGAN_NAME, f"ESRGAN/{ESRGAN_NAME}.pth"),
                                        (COMPACT_NAME, f"upscale_models/{COMPACT_NAME}.safetensors")])
def test_model_upscale_equals_spandrel_forward(upscaling, models, name, path):
    """The app reads the file by its own rules and runs it tiled; spandrel reads the same file itself and runs it
    whole: the same image."""
    spandrel = spandrel_or_skip()
    upscaling.options.update({"ESRGAN_tile": 0})
    image = picture(32, 24)
    own = spandrel.ModelLoader().load_from_file(models / path).eval()
    expected = to_image(own(to_tensor(image)))
    result = upscaling.extras(ExtrasRequest([image], upscaling_resize=own.scale, upscaler_1=name))
    assert result.images[0].size == (32 * own.scale, 24 * own.scale)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    assert result.infotexts == [f"Postprocess upscale by: {own.scale}, Postprocess upscaler: {name}"]


def test_tiles_equal_the_whole_image_where_the_overlap_covers_the_receptive_field(models):
    """The compact model sees 3 pixels around each: with an overlap of 16 (its blend ignores each tile's outer 4),
    tiles of 16 give the untiled image; ESRGAN sees farther, so its seams differ slightly with the default overlap."""
    spandrel = spandrel_or_skip()
    compact = spandrel.ModelLoader().load_from_file(models / "upscale_models" / f"{COMPACT_NAME}.safetensors")
    esrgan = spandrel.ModelLoader().load_from_file(models / "ESRGAN" / f"{ESRGAN_NAME}.pth")
    image = to_tensor(picture(72, 40))
    whole = compact(image)
    tiled = upscale_tiled(compact, image, compact.scale, tile=24, overlap=16)
    assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-5)
    whole, tiled = esrgan(image), upscale_tiled(esrgan, image, esrgan.scale, tile=32, overlap=8)
    assert (tiled - whole).abs().mean() < 2e-3 and (tiled - whole).abs().max() < 0.05


def test_tiles_blend_a_plain_function_exactly():
    """A 2x nearest upscale with a 3x3 blur (receptive field 1): tiled with overlap 8 it equals the whole run."""
    def run(tile: torch.Tensor) -> torch.Tensor:
        blurred = torch.nn.functional.avg_pool2d(tile, 3, stride=1, padding=1, count_include_pad=False)
        return torch.nn.functional.interpolate(blurred, scale_factor=2, mode="nearest")

    image = to_tensor(picture(50, 30))
    assert torch.allclose(upscale_tiled(run, image, 2, tile=16, overlap=8), run(image), atol=1e-6)
    with pytest.raises(UserError) as refused:
        upscale_tiled(run, image, 2, tile=16, overlap=16)
    assert refused.value.field == "ESRGAN_tile_overlap"


def test_extra_single_image_has_a1111_shape_and_sizes(client):
    image = picture()
    reply = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64(image, "a red circle\nSteps: 3, Seed: 42, Size: 40x24"), "upscaling_resize": 2,
        "upscaler_1": "Lanczos", "show_extras_results": True, "unknown_field": 1})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert {"html_info", "image"} <= set(data)
    out = decoded(data["image"])
    assert out.size == (80, 48)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(image.resize((80, 48), Image.Resampling.LANCZOS)))
    assert data["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"
    assert out.text["parameters"].startswith("a red circle")  # the source's parameters are kept
    assert out.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert set(json.loads(data["info"])["ignored_fields"]) == {"show_extras_results", "unknown_field"}


def test_extra_batch_images_resize_to_crops_to_fit(client):
    images = [picture(40, 24, seed=1), picture(30, 30, seed=2)]
    body = {"imageList": [{"data": b64(image), "name": f"{n}.png"} for n, image in enumerate(images)],
            "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 48, "upscaler_1": "Nearest"}
    data = client.post("/sdapi/v1/extra-batch-images", json=body).json()
    assert [decoded(d).size for d in data["images"]] == [(64, 48), (64, 48)]
    data = client.post("/sdapi/v1/extra-batch-images", json={**body, "upscaling_crop": False}).json()
    assert [decoded(d).size for d in data["images"]] == [(80, 48), (64, 64)]  # covers 64x48, rounded to 8s
    assert "Postprocess upscale to: 64x48" in data["html_info"]


def test_second_upscaler_is_blended_by_its_visibility(upscaling):
    image = picture()
    result = upscaling.extras(ExtrasRequest([image], upscaler_1="Lanczos", upscaler_2="Nearest",
                                            extras_upscaler_2_visibility=0.25))
    lanczos, nearest = image.resize((80, 48), Image.Resampling.LANCZOS), image.resize((80, 48), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(Image.blend(lanczos, nearest, 0.25)))
    assert result.infotexts[0].endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest")


def test_upscaler_none_returns_the_image_and_crop_is_centred(upscaling):
    image = picture()
    result = upscaling.extras(ExtrasRequest([image], upscaler_1="None", upscaling_resize=4))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(image)) and result.infotexts == [""]
    cropped = crop_centre(image, 20, 10)
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[7:17, 10:30])


def test_extras_saved_in_a1111_folder_with_png_info(upscaling, tmp_path):
    request = ExtrasRequest([picture()], upscaler_1="Lanczos", save=True)
    result = upscaling.extras(request, ["a red circle\nSteps: 3, Seed: 42, Size: 40x24"])
    [path] = result.paths
    assert path.parent.parent == tmp_path / "outputs" / "extras-images" and "-42-a red circle" in path.name
    saved = Image.open(path)
    assert saved.text["postprocessing"] == result.infotexts[0] and saved.text["parameters"].startswith("a red")


def test_model_on_a_limited_device_is_a_memory_manager_component(upscaling, monkeypatch):
    """On a budgeted device the upscaler is registered, placed by prepare (on this small card: streamed) and let go
    after the job; the image is the one the CPU makes without the memory manager."""
    spandrel_or_skip()
    request = ExtrasRequest([picture()], upscaler_1=COMPACT_NAME)
    plain = upscaling.extras(request).images[0]
    cpu = torch.device("cpu")
    manager = MemoryManager(cpu, SimulatedMemory(cpu, total_mb=64), min_unit_bytes=1024)
    upscaling.memory = upscaling.models.memory = manager
    placed = []
    prepare = manager.prepare
    monkeypatch.setattr(manager, "prepare", lambda names, *a, **k: placed.append(
        (list(names), manager.components[names[0]].nbytes)) or prepare(names, *a, **k))
    streamed = upscaling.extras(request).images[0]
    assert placed and placed[0][0] == ["upscaler"] and placed[0][1] > 0
    assert manager.last.streamed_mb > 0 and streamed.tobytes() == plain.tobytes()
    assert "upscaler" not in manager.components and manager.last.activation_mb > 0


@pytest.mark.parametrize("body, field, words", [
    ({"upscaler_1": "no such upscaler"}, "upscaler_1", "no upscaler named"),
    ({"upscaler_1": "../../Stable-diffusion/sd1-1"}, "upscaler_1", "no upscaler named"),
    ({"upscaler_1": "/etc/passwd"}, "upscaler_1", "no upscaler named"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "nope", "extras_upscaler_2_visibility": 0.5}, "upscaler_2", "no upscaler"),
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "face restoration is not supported"),
    ({"codeformer_visibility": 1}, "codeformer_visibility", "face restoration is not supported"),
    ({"upscaling_resize": 0}, "upscaling_resize", "above 0"),
    ({"upscaling_resize": "two"}, "upscaling_resize", "must be a number"),
    ({"resize_mode": 2}, "resize_mode", "scale by"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "image": None}, "image", "base64"),
    ({"image": base64.b64encode(b"not an image at all").decode()}, "image", "is not an image"),
    ({"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": 2, "upscaler_2": "Nearest"},
     "extras_upscaler_2_visibility", "between 0 and 1"),
])
def test_bad_requests_are_422_naming_the_field(client, body, field, words):
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), **body})
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] == field and words in reply.json()["detail"]


def test_too_large_a_result_or_source_is_refused_before_work(client, upscaling):
    upscaling.options.update({"max_image_side": 64})
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "upscaler_1": "Lanczos",
                                                              "upscaling_resize": 4})
    assert reply.status_code == 422 and reply.json()["field"] == "upscaling_resize"
    reply = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64(picture(80, 8))}]})
    assert reply.status_code == 422 and reply.json()["field"] == "imageList[0].data"


@pytest.mark.parametrize("name, content, words", [
    ("broken.pth", b"\x80\x02not a pickle", "refused"),
    ("broken.safetensors", b"\xff" * 64, "not a safetensors file"),
    ("code.pth", None, "refused"),
])
def test_a_bad_upscaler_file_fails_only_its_request_naming_the_file(client, models, name, content, words):
    path = models / "ESRGAN" / name
    if content is None:  # a pickle that would run code when loaded
        torch.save({"weights": torch.zeros(1), "evil": print}, path)
    else:
        path.write_bytes(content)
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "upscaler_1": path.stem})
    assert reply.status_code == 422 and reply.json()["field"] == "upscaler_1"
    assert name in reply.json()["detail"] and words in reply.json()["detail"]
    assert client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "upscaler_1": "Lanczos"}
                       ).status_code == 200


def test_a_file_spandrel_does_not_know_is_a_clear_error(client, models):
    spandrel_or_skip()
    save_file({"some.weight": torch.zeros(4, 4)}, models / "ESRGAN" / "not-an-upscaler.safetensors")
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()),
                                                              "upscaler_1": "not-an-upscaler"})
    assert reply.status_code == 422 and reply.json()["field"] == "upscaler_1"
    assert "not-an-upscaler.safetensors" in reply.json()["detail"] and "architecture" in reply.json()["detail"]


def test_extras_tab_upscales_saves_and_names_a_bad_input(upscaling, tmp_path):
    source = tmp_path / "source.png"
    source.write_bytes(png_bytes(picture(), "a red circle\nSteps: 3, Seed: 7, Size: 40x24"))
    with ui_client(upscaling) as client:  # the file is read while the server runs: its close empties Gradio's cache
        made, status, infotext = client.predict(handle_file(str(source)), "Scale by", 2, 512, 512, True, "Lanczos",
                                                "Nearest", 0, api_name="/extras")
        assert Image.open(made).size == (80, 48) and "80x48" in status and "saved as" in status
    assert infotext == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    [saved] = (tmp_path / "outputs" / "extras-images").rglob("*.png")
    assert Image.open(saved).text["parameters"].startswith("a red circle")
    jobs = JobQueue(upscaling)
    labels = {"upscaling_resize": "Resize by", "image": "Source"}
    _, status, _ = upscale_form(upscaling, jobs, labels, None, 0, 2, 512, 512, True, "Lanczos", "None", 0)
    assert "Source (image): drop an image" in status
    _, status, _ = upscale_form(upscaling, jobs, labels, str(source), 0, 9, 512, 512, True, "Lanczos", "None", 0)
    assert "Resize by (upscaling_resize)" in status


def test_send_to_extras_takes_the_picked_image(upscaling, tmp_path):
    """The galleries' Send to extras (txt2img's and img2img's) and PNG Info's: the picked image (the first before
    one is picked) becomes the Extras tab's source, and that tab shows; with nothing to send, nothing changes."""
    from webui.ui import build_ui

    demo = build_ui(upscaling, JobQueue(upscaling))
    gallery_sends = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "send_picked"]
    assert len(gallery_sends) == 2
    picked = tmp_path / "picked.png"
    picture().save(picked)
    image, tab = gallery_sends[0]([(str(tmp_path / "other.png"), None), (str(picked), None)], 1)
    assert image["value"] == str(picked) and tab.selected == "extras"
    assert all("value" not in update for update in gallery_sends[1](None, 0)), "no image yet: nothing changes"
    png_info_send = next(f.fn for f in demo.fns.values()
                         if f.outputs and getattr(f.outputs[0], "elem_id", None) == "extras_image"
                         and f.fn not in gallery_sends)
    image, tab = png_info_send(str(picked))
    assert image["value"] == str(picked) and tab.selected == "extras"
