"""The Extras tab: one image upscaled by a factor or to a size, by one upscaler or two blended (A1111's tab), through
the job queue. The result is saved to outdir_extras_samples with its PNG info, as A1111's tab saves it."""
from __future__ import annotations

from functools import partial

import gradio as gr
from PIL import Image

from webui.engine.engine import Engine
from webui.engine.upscale.extras import MAX_FACTOR, ExtrasRequest
from webui.engine.upscale.found import NONE
from webui.engine.upscale.request import open_image
from webui.errors import UserError
from webui.jobs import JobQueue
from webui.ui.common import counted, duration, error_html, field_label, status_html
from webui.ui.png_info import SourceImage
from webui.ui.txt2img import GenerationTab

SCALE_BY, SCALE_TO = "Scale by", "Scale to"
# The form's inputs by request field, in the order the handler takes them; their labels name them in errors.
FIELDS = ("image", "resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop",
          "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility")


def extras_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue) -> gr.Image:
    """Source image, resize by or to, upscaler 1 and 2 with the second's visibility, Generate; the result, a status
    line and the "Postprocess" parameters. Its source image is returned: what "Send to extras" fills."""
    names = [info.name for info in engine.upscalers()]
    with gr.Row():
        with gr.Column():
            form = {"image": SourceImage(type="filepath", sources=["upload", "clipboard"], label="Source",
                                         elem_id="extras_image")}
            form["resize_mode"] = gr.Radio([SCALE_BY, SCALE_TO], value=SCALE_BY, type="index", label="Resize",
                                           elem_id="extras_resize_mode")
            form["upscaling_resize"] = gr.Slider(1, MAX_FACTOR, value=2, step=0.05, label="Resize by",
                                                 elem_id="extras_upscaling_resize")
            with gr.Row():
                form["upscaling_resize_w"] = gr.Number(512, precision=0, minimum=1, label="Width",
                                                       elem_id="extras_upscaling_resize_w")
                form["upscaling_resize_h"] = gr.Number(512, precision=0, minimum=1, label="Height",
                                                       elem_id="extras_upscaling_resize_h")
                form["upscaling_crop"] = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop")
            with gr.Row():
                form["upscaler_1"] = gr.Dropdown(names, value=NONE, label="Upscaler 1", elem_id="extras_upscaler_1")
                form["upscaler_2"] = gr.Dropdown(names, value=NONE, label="Upscaler 2", elem_id="extras_upscaler_2")
            form["extras_upscaler_2_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility",
                                                             elem_id="extras_upscaler_2_visibility")
            generate = gr.Button("Generate", variant="primary", elem_id="extras_generate")
        with gr.Column():
            result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="extras_result")
            status = gr.HTML(elem_id="extras_status")
            infotext = gr.Textbox(label="Postprocess parameters", interactive=False, elem_id="extras_infotext")
    labels = {name: box.label for name, box in form.items()}
    generate.click(partial(upscale_form, engine, jobs, labels), inputs=[form[name] for name in FIELDS],
                   outputs=[result, status, infotext], api_name="extras", concurrency_limit=None)
    upscalers = [form["upscaler_1"], form["upscaler_2"]]  # files added since the page was made are listed at a load
    demo.load(lambda: [gr.update(choices=[info.name for info in engine.upscalers()])] * 2, outputs=upscalers,
              api_visibility="private")
    return form["image"]


def send_to_extras(source: GenerationTab, extras_image: gr.Image, tabs: gr.Tabs) -> None:
    """A gallery's Send to extras (A1111's): the picked image (the first before any is picked) becomes the Extras
    tab's source, and that tab shows."""
    def send_picked(gallery: list[tuple[str, str | None]] | None, selected: int) -> tuple:
        if not gallery:
            return gr.update(), gr.update()
        return gr.update(value=gallery[min(selected, len(gallery) - 1)][0]), gr.Tabs(selected="extras")

    source.send_to_extras.click(send_picked, [source.out["gallery"], source.out["selected"]], [extras_image, tabs],
                                api_visibility="private")


def upscale_form(engine: Engine, jobs: JobQueue, labels: dict[str, str], path: str | None, *values: object
                 ) -> tuple[Image.Image | None, str, str]:
    """The form's values as an Extras job in the queue; the image, a status line and its "Postprocess" line, or the
    error naming the input at fault."""
    try:
        if not path:
            raise UserError("drop an image to upscale first", field="image")
        image, parameters = open_image(path, "image", engine.options["max_image_side"])
        fields = dict(zip(FIELDS[1:], values))
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            fields[name] = int(fields[name] or 0)
        request = ExtrasRequest([image], **fields, save=True)
        done = jobs.submit_call("extras", lambda: engine.extras(request, [parameters])).result()
    except UserError as e:
        message = f"{field_label(e.field, labels)}: {e.message}" if e.field else e.message
        return None, error_html(message), ""
    made = done.images[0]
    where = f"; saved as {done.paths[0].name}" if done.paths else ""
    return made, status_html(f"{counted(1, 'image')} {made.width}x{made.height} in {duration(done.seconds)}{where}"), \
        done.infotexts[0]
