"""The img2img tab: the txt2img tab's form and output column (``txt2img.generation_tab``) with an init image,
the resize mode, A1111's "Resize by" (width and height from the image's size) and the denoising strength; Generate
goes to the queue's img2img."""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from webui.engine.engine import Engine
from webui.engine.init_image import RESIZE_MODES
from webui.engine.request import MIN_SIDE, SIDE_MULTIPLE
from webui.jobs import JobQueue
from webui.ui.common import Components
from webui.ui.png_info import img2img_updates
from webui.ui.txt2img import GenerationTab, generation_tab, slider


class InitImage(gr.Image):
    """The init image box: the request takes a list of init images (one here, for the whole batch). ``is_template``:
    drawn as the stock image box."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        image = super().preprocess(payload)
        return None if image is None else [image]


def img2img_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue, checkpoint: gr.Dropdown) -> GenerationTab:
    """The img2img tab; its form (request field → input) is what "Send to img2img" fills."""
    extra: dict[str, gr.Slider] = {}
    tab = generation_tab(demo, engine, jobs, checkpoint, "img2img", jobs.submit_img2img,
                         lambda form: _image_inputs(form, extra))
    form = tab.form
    extra["resize_by"].input(lambda images, by: resized_by(images, by, engine.options["max_image_side"]),
                             [form["init_images"], extra["resize_by"]], [form["width"], form["height"]],
                             api_visibility="private")
    return tab


def resized_by(images: list[Image.Image] | None, scale: float, largest: int) -> tuple[dict, dict]:
    """Width and height ``scale`` times the init image's, down to the sizes a request takes (A1111's Resize by)."""
    if not images:
        return gr.update(), gr.update()
    return tuple(gr.update(value=min(max(int(side * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE, MIN_SIDE), largest))
                 for side in images[0].size)


def send_to_img2img(engine: Engine, source: GenerationTab, img2img: GenerationTab, tabs: gr.Tabs) -> None:
    """A gallery's Send to img2img (A1111's): the picked image (the first before any is picked) and its
    parameters into img2img's form, and the img2img tab shown."""
    def send(gallery: list[tuple[str, str | None]] | None, infotexts: list[str], selected: int) -> tuple:
        if not gallery:
            return (*(gr.update() for _ in img2img.form), gr.update())
        index = min(selected, len(gallery) - 1)
        text = infotexts[index] if index < len(infotexts) else ""
        return (*img2img_updates(img2img.form, gallery[index][0], text, engine.canonical_sampler),
                gr.Tabs(selected="img2img"))

    source.send_to_img2img.click(send, [source.out["gallery"], source.out["infotexts"], source.out["selected"]],
                                 [*img2img.form.values(), tabs], api_visibility="private")


def _image_inputs(form: Components, extra: dict[str, gr.Slider]) -> None:
    form["init_images"] = InitImage(type="pil", image_mode="RGBA", sources=["upload", "clipboard"], label="Image",
                                    height=360, elem_id="img2img_image")
    form["resize_mode"] = gr.Radio([(name, i) for i, name in enumerate(RESIZE_MODES)],
                                   value=0, label="Resize mode", elem_id="img2img_resize_mode")
    extra["resize_by"] = gr.Slider(0.05, 4, value=1, step=0.05, label="Resize by (sets width and height)",
                                   elem_id="img2img_resize_by")
    form["denoising_strength"] = slider("denoising_strength", "Denoising strength", 0, 1, 0.75, step=0.01,
                                        tab="img2img")
