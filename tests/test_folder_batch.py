"""img2img over a folder (A1111's img2img Batch tab): each image through the one img2img path, masks by name, PNG info
taken where asked, outputs named after the inputs and never overwritten, bad files skipped, and the UI's button."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_engine
from tests.test_img2img import as_array, init_picture, request, ui  # noqa: F401 (ui: fixture)
from tests.requests import mask_picture
from webui.engine.folder_batch import FolderBatch
from webui.engine.infotext import parse_infotext, read_png_infotext
from webui.engine.outputs import png_bytes
from webui.errors import UserError


@pytest.fixture
def folders(tmp_path):
    """An input folder: two pictures (one with PNG info) and a file that is no image."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(png_bytes(init_picture(), "a blue square\nNegative prompt: fog\nSteps: 3, "
                                                             "Seed: 77, CFG scale: 4"))
    init_picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(inputs / "b.png")
    (inputs / "broken.png").write_bytes(b"not a picture")
    (inputs / "notes.txt").write_text("not an image type: not listed")
    return tmp_path


def base(**fields):
    return request(None, batch_size=1, **fields)


def test_each_image_goes_through_img2img_and_is_written_under_its_name(tmp_path, sd1_file, folders):
    engine = make_engine(tmp_path / "app", sd1_file)
    result = engine.img2img_folder(base(), FolderBatch(str(folders / "in"), str(folders / "out")))
    assert len(result.images) == 2 and [p.name for p in result.paths] == ["a.png", "b.png"]
    assert any("broken.png skipped" in notice for notice in result.notices)
    alone = engine.img2img(base(init_images=[init_picture()]))
    assert np.array_equal(as_array(result.images[:1]), as_array(alone.images)), "the same as img2img of that image"
    written = Image.open(folders / "out" / "a.png")
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(result.images[0]))
    assert read_png_infotext(folders / "out" / "a.png") == result.infotexts[0]
    again = engine.img2img_folder(base(), FolderBatch(str(folders / "in"), str(folders / "out")))
    assert [p.name for p in again.paths] == ["a-2.png", "b-2.png"], "nothing already made is overwritten"
    assert not list((tmp_path / "app").rglob("img2img-images/*.png")), "with an output folder, written only there"


def test_png_info_adds_the_prompt_and_sets_the_fields_asked(tmp_path, sd1_file, folders):
    engine = make_engine(tmp_path / "app", sd1_file)
    batch = FolderBatch(str(folders / "in"), str(folders / "out"), use_png_info=True,
                        png_info_fields=("Prompt", "Negative prompt", "Seed"))
    result = engine.img2img_folder(base(prompt="oil painting", negative_prompt="blurry", steps=4), batch)
    first, second = (parse_infotext(text) for text in result.infotexts)
    assert first["Prompt"] == "oil painting a blue square" and first["Negative prompt"] == "blurry fog"
    assert first["Seed"] == "77" and first["Steps"] == "4" and first.get("CFG scale") != "4", "only what is asked"
    assert second["Prompt"] == "oil painting" and second["Seed"] != "77", "no PNG info: the form's"
    info = folders / "info"  # PNG info from files of the same names elsewhere: only their text is read
    info.mkdir()
    (info / "a.png").write_bytes(png_bytes(Image.new("RGB", (8, 8)), "a red star\nSteps: 3, Seed: 5, CFG scale: 4"))
    (info / "b.png").write_bytes(b"broken")
    result = engine.img2img_folder(base(prompt="ink"), FolderBatch(
        str(folders / "in"), use_png_info=True, png_info_dir=str(info), png_info_fields=("Prompt", "Seed")))
    first, second = (parse_infotext(text) for text in result.infotexts)
    assert (first["Prompt"], first["Seed"]) == ("ink a red star", "5") and second["Prompt"] == "ink"
    with pytest.raises(UserError) as bad:
        engine.img2img_folder(base(), FolderBatch(str(folders / "in"), use_png_info=True,
                                                  png_info_fields=("Model",)))
    assert bad.value.field == "img2img_batch_png_info_props"


def test_masks_by_name_or_one_for_all_inpaint(tmp_path, sd1_file, folders):
    engine = make_engine(tmp_path / "app", sd1_file)
    masks = folders / "masks"
    masks.mkdir()
    mask_picture().save(masks / "only.png")
    inpaint = dict(mask_blur=0, inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9)
    result = engine.img2img_folder(base(**inpaint), FolderBatch(str(folders / "in"), mask_dir=str(masks)))
    kept = np.asarray(mask_picture()) == 0
    for image, source in zip(result.images, ("a.png", "b.png")):
        original = np.asarray(Image.open(folders / "in" / source).convert("RGB")).astype(int)
        picture = np.asarray(image).astype(int)
        assert (picture[kept] == original[kept]).all() and np.abs(picture[~kept] - original[~kept]).mean() > 5
    mask_picture(64, 64, (0, 0, 32, 64)).save(masks / "b.png")  # two masks now: each image needs its own
    result = engine.img2img_folder(base(**inpaint), FolderBatch(str(folders / "in"), mask_dir=str(masks)))
    assert len(result.images) == 1 and any("a.png skipped: no mask named a" in n for n in result.notices)


def test_bad_folders_are_named_and_the_flag_turns_the_batch_off(tmp_path, sd1_file, folders):
    engine = make_engine(tmp_path / "app", sd1_file)
    for batch, field in ((FolderBatch(str(folders / "missing")), "img2img_batch_input_dir"),
                         (FolderBatch(str(folders)), "img2img_batch_input_dir"),  # no images in it
                         (FolderBatch(str(folders / "in"), mask_dir=str(folders / "nope")),
                          "img2img_batch_inpaint_mask_dir")):
        with pytest.raises(UserError) as bad:
            engine.img2img_folder(base(), batch)
        assert bad.value.field == field
    hidden = make_engine(tmp_path / "hidden", sd1_file, extra_args=("--hide-ui-dir-config",))
    with pytest.raises(UserError) as off:
        hidden.img2img_folder(base(), FolderBatch(str(folders / "in")))
    assert "--hide-ui-dir-config" in str(off.value)


def test_the_img2img_tab_runs_a_batch(ui, folders):
    _preview, gallery, status, infotext, *_ = ui.predict(
        prompt="a large red circle on the left, blue background", steps=3, width=64, height=64, seed=3,
        denoising_strength=0.5, img2img_batch_input_dir=str(folders / "in"),
        img2img_batch_output_dir=str(folders / "out"), api_name="/img2img_batch")
    assert "Done" in status and len(gallery) == 2, status
    assert sorted(p.name for p in (folders / "out").iterdir()) == ["a.png", "b.png"]
    status = ui.predict(prompt="x", img2img_batch_input_dir=str(folders / "missing"), api_name="/img2img_batch")[2]
    assert "Input directory (img2img_batch_input_dir)" in status and "not a folder" in status, status
