"""The img2img tab: the txt2img tab's form and output column (``txt2img.generation_tab``) with an init image,
the resize mode, A1111's "Resize by" (width and height from the image's size) and the denoising strength; Generate
goes to the queue's img2img. Painting on the image (or uploading a mask) inpaints: the painted part is the mask,
used as the Inpainting accordion's fields say (A1111's Inpaint and Inpaint upload tabs in one). Choosing an
outpainting direction extends the image and paints the new border instead (A1111's "Poor man's outpainting").
"Generate the batch" runs the form over every image of a folder (A1111's Batch tab)."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import gradio as gr
from PIL import Image

from webui.engine.engine import Engine
from webui.engine.folder_batch import DEFAULT_PNG_INFO_FIELDS, PNG_INFO_FIELDS, FolderBatch
from webui.engine.init_image import RESIZE_MODES
from webui.engine.inpaint import FILL, FILLS, INPAINT_AREAS, MASK_MODES, ORIGINAL
from webui.engine.outpaint import DIRECTIONS, METHODS, SCRIPT_TITLE
from webui.engine.outpaint import MAX_BLUR as OUTPAINT_MAX_BLUR
from webui.engine.request import MIN_SIDE, SIDE_MULTIPLE
from webui.engine.soft_inpaint import LABELS as SOFT_LABELS
from webui.engine.soft_inpaint import RANGES as SOFT_RANGES
from webui.engine.soft_inpaint import SLIDER_STEPS as SOFT_STEPS
from webui.engine.soft_inpaint import SoftInpainting
from webui.jobs import JobQueue
from webui.ui.common import PART, Components, RequestFields
from webui.ui.png_info import img2img_updates
from webui.ui.generation import generator
from webui.ui.txt2img import GenerationTab, generation_tab, request_from_form, slider


BATCH_FIELDS = ("img2img_batch_input_dir", "img2img_batch_output_dir", "img2img_batch_inpaint_mask_dir",
                "img2img_batch_use_png_info", "img2img_batch_png_info_dir", "img2img_batch_png_info_props")
SOFT = "soft_inpainting"  # the request field of the Soft inpainting switch and sliders
BRUSH = gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24)  # the mask's strokes: one colour


class InitCanvas(gr.ImageEditor):
    """The init image, to paint on where it is to be repainted: the request's init images (one, for the whole
    batch) and, where anything is painted, the mask (every layer's strokes). ``is_template``: drawn as the stock
    image editor."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        value = super().preprocess(payload)
        if value is None or value["background"] is None:
            return RequestFields(init_images=None)
        return RequestFields(init_images=[value["background"]], mask=painted_mask(value["layers"]))


class MaskUpload(gr.Image):
    """A mask as a picture (A1111's Inpaint upload): white is repainted. Given, it is the mask; else the strokes
    are. ``is_template``: drawn as the stock image box."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        image = super().preprocess(payload)
        return RequestFields() if image is None else RequestFields(mask=image)


def painted_mask(layers: list[Image.Image]) -> Image.Image | None:
    """Where any layer is painted (not transparent), white; None where nothing is."""
    mask = None
    for layer in layers:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda value: 255 if value else 0)
        mask = alpha if mask is None else Image.composite(alpha, mask, alpha)
    return mask if mask is not None and mask.getbbox() else None


def img2img_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue, checkpoint: gr.Dropdown) -> GenerationTab:
    """The img2img tab; its form (request field → input) is what "Send to img2img" fills."""
    extra: Components = {}
    tab = generation_tab(demo, engine, jobs, checkpoint, "img2img", jobs.submit_img2img,
                         lambda form: _image_inputs(form, extra))
    form = tab.form
    extra["resize_by"].input(
        lambda canvas, by: resized_by(canvas.get("init_images"), by, engine.options["max_image_side"]),
        [form["init_images"], extra["resize_by"]], [form["width"], form["height"]], api_visibility="private")
    batch = {name: extra[name] for name in BATCH_FIELDS}

    def submit_batch(values: tuple) -> Future:
        base = request_from_form(form, values[:len(form)])
        folders = dict(zip(BATCH_FIELDS, values[len(form):]))
        job = FolderBatch(folders["img2img_batch_input_dir"], folders["img2img_batch_output_dir"],
                          folders["img2img_batch_inpaint_mask_dir"], bool(folders["img2img_batch_use_png_info"]),
                          folders["img2img_batch_png_info_dir"], tuple(folders["img2img_batch_png_info_props"] or ()))
        return jobs.submit_call("img2img batch", lambda: engine.img2img_folder(base, job))

    extra["batch_generate"].click(generator(jobs, {**form, **batch}, tab.out, submit_batch),
                                  inputs=[*form.values(), *batch.values()], outputs=list(tab.out.values()),
                                  api_name="img2img_batch", show_progress="hidden", concurrency_limit=None)
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


def _image_inputs(form: Components, extra: Components) -> None:
    form["init_images"] = InitCanvas(type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                     label="Image (paint on it to inpaint)", height=420, brush=BRUSH,
                                     eraser=gr.Eraser(default_size=24), layers=False, transforms=(),
                                     elem_id="img2img_image")
    form["resize_mode"] = gr.Radio([(name, i) for i, name in enumerate(RESIZE_MODES)],
                                   value=0, label="Resize mode", elem_id="img2img_resize_mode")
    extra["resize_by"] = gr.Slider(0.05, 4, value=1, step=0.05, label="Resize by (sets width and height)",
                                   elem_id="img2img_resize_by")
    form["denoising_strength"] = slider("denoising_strength", "Denoising strength", 0, 1, 0.75, step=0.01,
                                        tab="img2img")
    with gr.Accordion("Inpainting (where a mask is painted or uploaded)", open=False, elem_id="img2img_inpaint"):
        form["mask"] = MaskUpload(type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                  label="Mask (white is repainted; instead of painting)", height=200,
                                  elem_id="img2img_mask")
        form["mask_blur"] = slider("mask_blur", "Mask blur", 0, 64, 4, tab="img2img")
        form["inpainting_mask_invert"] = gr.Radio([(name, i) for i, name in enumerate(MASK_MODES)], value=0,
                                                  label="Mask mode", elem_id="img2img_mask_mode")
        form["inpainting_fill"] = gr.Radio([(name, i) for i, name in enumerate(FILLS)], value=ORIGINAL,
                                           label="Masked content", elem_id="img2img_inpainting_fill")
        with gr.Row():
            form["inpaint_full_res"] = gr.Radio([(name, i) for i, name in enumerate(INPAINT_AREAS)], value=0,
                                                label="Inpaint area", elem_id="img2img_inpaint_full_res")
            form["inpaint_full_res_padding"] = slider("inpaint_full_res_padding", "Only masked padding, pixels", 0,
                                                      256, 32, step=4, tab="img2img")
        with gr.Accordion("Soft inpainting (keeps the blurred mask's shades: a high mask blur suits it)", open=False,
                          elem_id="soft_inpainting"):
            form[f"{SOFT}{PART}0"] = gr.Checkbox(False, label="Soft inpainting", elem_id="soft_inpainting_enabled")
            for i, (label, (low, high), step, default) in enumerate(zip(
                    SOFT_LABELS, SOFT_RANGES, SOFT_STEPS, SoftInpainting().values()), start=1):
                form[f"{SOFT}{PART}{i}"] = slider(label.lower().replace(" ", "_"), label, low, high, default,
                                                  step=step, tab=SOFT)
    with gr.Accordion("Batch from a folder (folders on the server)", open=False, elem_id="img2img_batch"):
        extra["img2img_batch_input_dir"] = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
        extra["img2img_batch_output_dir"] = gr.Textbox(label="Output directory (empty: the img2img outputs folder)",
                                                       elem_id="img2img_batch_output_dir")
        extra["img2img_batch_inpaint_mask_dir"] = gr.Textbox(
            label="Inpaint batch mask directory (masks named as the images, or one for all; empty: no inpainting)",
            elem_id="img2img_batch_inpaint_mask_dir")
        with gr.Row():
            extra["img2img_batch_use_png_info"] = gr.Checkbox(False, label="Append png info to prompts",
                                                              elem_id="img2img_batch_use_png_info")
            extra["img2img_batch_png_info_dir"] = gr.Textbox(label="PNG info directory (empty: the input directory)",
                                                             elem_id="img2img_batch_png_info_dir")
        extra["img2img_batch_png_info_props"] = gr.CheckboxGroup(
            list(PNG_INFO_FIELDS), value=list(DEFAULT_PNG_INFO_FIELDS), label="Parameters to take from png info",
            elem_id="img2img_batch_png_info_props")
        extra["batch_generate"] = gr.Button("Generate the batch", elem_id="img2img_batch_generate")
    with gr.Accordion("Outpainting (A1111's Poor man's outpainting and Outpainting mk2)", open=False,
                      elem_id="img2img_outpaint"):
        form["outpaint_directions"] = gr.CheckboxGroup(list(DIRECTIONS), value=[],
                                                       label="Outpainting direction (none: off)",
                                                       elem_id="img2img_outpaint_direction")
        form["outpaint_method"] = gr.Radio(list(METHODS), value=SCRIPT_TITLE, label="Method",
                                           elem_id="img2img_outpaint_method")
        with gr.Row():
            form["outpaint_pixels"] = slider("outpaint_pixels", "Pixels to expand", 8, 256, 128, step=8,
                                             tab="img2img")
            form["outpaint_mask_blur"] = slider("outpaint_mask_blur", "Mask blur", 0, OUTPAINT_MAX_BLUR, 4,
                                                tab="img2img")
        form["outpaint_fill"] = gr.Radio([(name, i) for i, name in enumerate(FILLS)], value=FILL,
                                         label="Masked content (poor man's)", elem_id="img2img_outpaint_fill")
        with gr.Row():
            form["outpaint_noise_q"] = slider("outpaint_noise_q", "Fall-off exponent (mk2; lower: more detail)", 0,
                                              4, 1, step=0.01, tab="img2img")
            form["outpaint_color_variation"] = slider("outpaint_color_variation", "Color variation (mk2)", 0, 1,
                                                      0.05, step=0.01, tab="img2img")
