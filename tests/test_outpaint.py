"""Outpainting, A1111's img2img script "Poor man's outpainting": the canvas and mask it makes, the generation as the
inpainting of that canvas on the one img2img path, and the API's script_name / script_args."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_engine
from tests.test_api import client  # noqa: F401 (the API's fixture)
from tests.test_clients import image_of
from webui.engine.infotext import parse_infotext
from tests.test_img2img import WEBUIAPI_BODY, as_array, b64, canvas, init_picture, request, ui  # noqa: F401 (ui)
from webui.engine.outpaint import DIRECTIONS, MK2_TITLE, SCRIPT_TITLE, Outpaint, matched_noise
from webui.errors import UserError


def test_the_canvas_grows_the_chosen_sides_to_multiples_of_64():
    picture = init_picture(100, 64)
    canvas, mask, latent_mask = Outpaint(pixels=32, mask_blur=4, directions=("left", "right")).canvas(picture)
    assert canvas.size == mask.size == (192, 64)  # 100 + 2 x 32 = 164, up to 192: 46 more each side
    assert np.array_equal(np.asarray(canvas)[:, 46:146], np.asarray(picture)), "the picture in the middle"
    assert not np.asarray(canvas)[:, :46].any() and not np.asarray(canvas)[:, 146:].any(), "black where new"
    painted = np.asarray(mask) == 255
    # the new sides and twice the blur into the picture are painted; up and down are not extended, so kept
    assert painted[:, :54].all() and painted[:, 138:].all() and not painted[:, 54:138].any()
    latent = np.asarray(latent_mask) == 255  # A1111's: half the blur into the picture
    assert latent[:, :48].all() and latent[:, 144:].all() and not latent[:, 48:144].any()

    canvas, mask, _ = Outpaint(pixels=40, mask_blur=0, directions=("up",)).canvas(init_picture(64, 70))
    assert canvas.size == (64, 128) and Outpaint(pixels=40, directions=("up",)).margins(64, 70) == (0, 58, 0, 0)
    assert (np.asarray(mask)[:58] == 255).all() and not np.asarray(mask)[58:].any()
    left, top, right, bottom = Outpaint(pixels=8, directions=("down",)).margins(100, 64)
    assert (left + right, top, bottom) == (28, 0, 64), "a side not chosen still reaches a multiple of 64, painted"


def test_outpainting_is_the_inpainting_of_its_canvas(tmp_path, sd1_file):
    """The script's request equals an img2img request with its canvas and mask made by hand: one image, the mask's
    blur twice the script's, the whole picture repainted at the canvas's size; the picture is kept where the mask
    keeps it, and the new border is painted."""
    engine = make_engine(tmp_path, sd1_file)
    outpaint = Outpaint(pixels=16, mask_blur=2, fill=0, directions=("left", "down"))
    result = engine.img2img(request(None, **outpaint.fields(), batch_size=2, denoising_strength=0.8))
    canvas, mask, latent_mask = outpaint.canvas(init_picture())
    by_hand = engine.img2img(request(None, init_images=[canvas], mask=mask, latent_mask=latent_mask, mask_blur=4,
                                     inpainting_fill=0,
                                     inpaint_full_res=False, width=128, height=128, batch_size=1,
                                     denoising_strength=0.8))
    assert len(result.images) == 1 and result.images[0].size == (128, 128)
    assert np.array_equal(as_array(result.images), as_array(by_hand.images)), "the same generation"
    image = as_array(result.images)[0]
    assert np.array_equal(image[:48, 80:], np.asarray(init_picture())[:48, 16:]), "kept beyond the blur's reach"
    assert image[64:, :].mean() > 5 and image[:, :64].mean() > 5, "the new border is painted, not left black"
    again = engine.img2img(request(None, **outpaint.fields(), denoising_strength=0.8))
    assert np.array_equal(as_array(again.images), as_array(result.images)), "same seed, same picture"


@pytest.mark.parametrize("args", [[0], [64, 100], [64, 4, 7], [64, 4, 0, ["sideways"]], [64, 4, 0, []],
                                  [64, 4, 0, "left"], ["64"], [64, 4, 0, ["left"], "extra"]])
def test_bad_script_args_are_named(args):
    with pytest.raises(UserError) as bad:
        Outpaint.from_args(args)
    assert bad.value.field == "script_args"


def test_a_canvas_past_the_largest_side_is_refused(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    engine.options.update({"max_image_side": 128})
    with pytest.raises(UserError) as bad:
        engine.img2img(request(None, **Outpaint(pixels=128).fields()))
    assert bad.value.field == "script_args" and "expand by fewer pixels" in str(bad.value)
    assert engine.img2img(request(None, **Outpaint(pixels=16).fields(), batch_size=1)).images, "the app goes on"


def test_the_api_outpaints_with_a1111s_script_request(client):
    """The body an A1111 client sends for the script (its title, its four arguments): an image the canvas's size;
    what the script sets itself (size, mask, batch) is named in info as ignored; a wrong script or argument is a
    422 naming its field; /scripts and /script-info list it."""
    body = {**WEBUIAPI_BODY, "init_images": [b64(init_picture())], "script_name": SCRIPT_TITLE,
            "script_args": [32, 4, "fill", ["left", "right"]], "denoising_strength": 0.9}
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    images = reply.json()["images"]
    assert len(images) == 1 and image_of(images[0]).size == (128, 64)
    info = json.loads(reply.json()["info"])
    assert {"width", "height", "batch_size", "mask_blur"} <= set(info["ignored_fields"])
    assert "script_args" not in info["ignored_fields"]
    lower = client.post("/sdapi/v1/img2img", json={**body, "script_name": SCRIPT_TITLE.lower(), "batch_size": 1})
    assert lower.status_code == 200 and "batch_size" not in json.loads(lower.json()["info"])["ignored_fields"]
    for change, field in (({"script_name": "loopback"}, "script_name"),
                          ({"script_args": [32, 4, 0, ["inwards"]]}, "script_args")):
        reply = client.post("/sdapi/v1/img2img", json={**body, **change})
        assert reply.status_code == 422 and reply.json()["field"] == field, reply.text
    assert SCRIPT_TITLE.lower() in client.get("/sdapi/v1/scripts").json()["img2img"]
    info = next(s for s in client.get("/sdapi/v1/script-info").json() if s["name"] == SCRIPT_TITLE.lower())
    assert info["is_img2img"] and [a["value"] for a in info["args"]] == [128, 4, "fill", list(DIRECTIONS)]
    mk2 = {**body, "script_name": "Outpainting mk2", "script_args": ["", 32, 4, ["right"], 1.0, 0.05]}
    reply = client.post("/sdapi/v1/img2img", json=mk2)
    assert reply.status_code == 200, reply.text
    assert [image_of(i).size for i in reply.json()["images"]] == [(128, 64)] * WEBUIAPI_BODY["batch_size"]
    assert "batch_size" not in json.loads(reply.json()["info"])["ignored_fields"], "mk2 makes the batch"
    reply = client.post("/sdapi/v1/img2img", json={**mk2, "script_args": ["", 32, 40]})
    assert reply.status_code == 422 and reply.json()["field"] == "script_args"
    assert "outpainting mk2" in client.get("/sdapi/v1/scripts").json()["img2img"]


def test_the_img2img_tab_outpaints_where_a_direction_is_chosen(ui, tmp_path):
    """The Outpainting accordion: a direction chosen extends the image that way, the rest kept."""
    picture = tmp_path / "init.png"
    init_picture(64, 64).save(picture)
    _preview, gallery, status, *_ = ui.predict(
        prompt="a large red circle on the left, blue background", init_images=canvas(picture), width=64, height=64,
        steps=4, seed=3, denoising_strength=0.9, outpaint_directions=["right"], outpaint_pixels=64,
        outpaint_mask_blur=2, api_name="/img2img")
    assert "Done" in status and len(gallery) == 1, status
    image = np.asarray(Image.open(gallery[0]["image"]).convert("RGB")).astype(int)
    assert image.shape == (64, 128, 3)
    assert (image[:, :48] == np.asarray(init_picture()).astype(int)[:, :48]).all(), "the picture kept"
    assert image[:, 64:].mean() > 5, "the new side painted"


def test_matched_noise_takes_the_pictures_colours_and_keeps_the_picture():
    """mk2's start: the painted part's values are the kept part's, rank for rank, channel by channel; the kept part
    is untouched; the same call gives the same noise."""
    picture = np.asarray(init_picture(64, 48), dtype=np.float64) / 255
    painted = np.zeros((48, 64), bool)
    painted[:, 40:] = True
    noise = matched_noise(picture, painted, 1.0, 0.05, np.random.default_rng(0))
    assert np.array_equal(noise[~painted], picture[~painted])
    for c in range(3):
        made, kept = np.sort(noise[..., c][painted]), np.sort(picture[..., c][~painted])
        assert np.allclose(np.quantile(made, [0.1, 0.5, 0.9]), np.quantile(kept, [0.1, 0.5, 0.9]), atol=0.02)
    assert noise[painted].std() > 0.05, "not one flat colour"
    assert np.array_equal(noise, matched_noise(picture, painted, 1.0, 0.05, np.random.default_rng(0)))


def test_outpainting_mk2_paints_the_border_from_matched_noise(tmp_path, sd1_file):
    """mk2 on the same path: the border starts from matched noise (masked content original), the blur four times the
    script's on the extended axis only, a batch of images; the picture is kept beyond the blur."""
    engine = make_engine(tmp_path, sd1_file)
    outpaint = Outpaint(pixels=32, mask_blur=2, directions=("right",), method=MK2_TITLE)
    result = engine.img2img(request(None, **outpaint.fields(), batch_size=2, denoising_strength=0.8))
    assert [image.size for image in result.images] == [(128, 64)] * 2
    params = parse_infotext(result.infotexts[0])
    assert params.get("Mask blur") is None and "Masked content" not in params, "8 across, 0 down; original"
    canvas, mask, latent_mask = outpaint.canvas(init_picture())
    by_hand = engine.img2img(request(None, init_images=[canvas], mask=mask, latent_mask=latent_mask, mask_blur_x=8,
                                     mask_blur_y=0, inpainting_fill=1, inpaint_full_res=False, width=128, height=64,
                                     batch_size=2, denoising_strength=0.8))
    assert np.array_equal(as_array(result.images), as_array(by_hand.images))
    image = as_array(result.images)[0]
    assert np.array_equal(image[:, :40], np.asarray(init_picture())[:, :40]), "kept beyond the blur's reach"
    assert image[:, 64:].mean() > 5
