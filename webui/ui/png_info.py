"""The PNG Info tab: an image's generation parameters, and "Send to txt2img" / "Send to img2img" / "Send to
extras"."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from webui.engine.engine import Engine
from webui.engine.infotext import INFOTEXT_FIELDS, parse_infotext, read_png_infotext, request_fields
from webui.errors import UserError
from webui.ui.common import PART, Components
from webui.ui.controlnet import FIELD as CONTROLNET
from webui.ui.controlnet import UNIT_FIELDS, pasted_units

NOT_AN_IMAGE = "(this is not an image: PNG Info reads the parameters of PNG, JPEG and WebP images)"
# The form fields an infotext carries; where it has none of them, the field goes back to its default.
CARRIED = {"prompt", "negative_prompt", "enable_hr", *(name for name, _kind in INFOTEXT_FIELDS.values())}
# Values an infotext means by leaving a key out: the generator writes no "Clip skip" for 1 (as A1111's does), and no
# hires field without hires. fix.
LEFT_OUT = {"clip_skip": 1, "enable_hr": False}


class SourceImage(gr.Image):
    """The upload box. The file itself reaches ``png_parameters``, which reads its text without decoding a pixel
    (Gradio's own preprocessing decodes and converts the whole image: a decompression bomb) and says when it is
    not an image, instead of failing in Gradio with PIL's message and the server's temporary paths.
    ``is_template``: drawn as the stock image box."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return None if payload is None else payload.path


def png_info_tab(engine: Engine, form: Components, tabs: gr.Tabs, img2img_form: Components | None = None,
                 extras_image: gr.Image | None = None) -> None:
    """Drop an image: its parameters (A1111's infotext, from PNG text or EXIF); "Send to txt2img" fills the form
    with them and shows it; "Send to img2img" fills img2img's, the image its init image, as A1111's does; "Send to
    extras" makes the image the Extras tab's source."""
    with gr.Row():
        image = SourceImage(type="filepath", sources=["upload", "clipboard"], label="Source", elem_id="pnginfo_image")
        with gr.Column():
            parameters = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="pnginfo_parameters")
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
            send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_img2img", visible=bool(img2img_form))
            send_extras = gr.Button("Send to extras", elem_id="pnginfo_send_extras", visible=extras_image is not None)
    image.change(png_parameters, image, parameters, api_name="png_info")
    send.click(lambda text: (*form_updates(form, text, engine.canonical_sampler), gr.Tabs(selected="txt2img")),
               parameters, [*form.values(), tabs], api_visibility="private")
    if img2img_form:
        send_img2img.click(lambda path, text: (*img2img_updates(img2img_form, path, text, engine.canonical_sampler),
                                               gr.Tabs(selected="img2img")),
                           [image, parameters], [*img2img_form.values(), tabs], api_visibility="private")
    if extras_image is not None:
        send_extras.click(lambda path: (gr.update(value=path) if path else gr.update(),
                                        gr.Tabs(selected="extras") if path else gr.update()),
                          image, [extras_image, tabs], api_visibility="private")


def png_parameters(path: str | None) -> str:
    if not path:
        return ""
    try:
        return read_png_infotext(path) or "(this image has no generation parameters)"
    except (OSError, ValueError):  # not an image, or a PNG whose chunks are broken
        return NOT_AN_IMAGE


def img2img_updates(form: Components, image: str | None, infotext: str,
                    canonical_sampler: Callable[[str, str | None], tuple[str, str]]) -> list[dict]:
    """Send to img2img (from PNG Info or a gallery): the image file becomes the init image, its infotext fills
    the rest of img2img's form as ``form_updates`` does."""
    updates = form_updates(form, infotext, canonical_sampler)
    updates[list(form).index("init_images")] = gr.update(value=image) if image else gr.update()
    return updates


def form_updates(form: Components, infotext: str,
                 canonical_sampler: Callable[[str, str | None], tuple[str, str]]) -> list[dict]:
    """An update per form field. Those an infotext carries take its values, or their defaults where it has none
    (Clip skip 1); an older infotext's combined sampler ("DPM++ 2M Karras") is split into sampler and schedule
    type by ``canonical_sampler`` (the engine's: its extensions' samplers too); ControlNet units take the settings
    it gives them (``pasted_units``). Those it never carries (batch count and
    size) are left alone, and everything where it is no infotext."""
    if not infotext or infotext.startswith("("):
        return [gr.update() for _ in form]
    defaults = {name: box.value for name, box in form.items() if name in CARRIED}
    fields = {**defaults, **LEFT_OUT, **request_fields(infotext)}
    if "sampler_name" in form:
        try:
            sampler = canonical_sampler(fields["sampler_name"], fields.get("scheduler"))
            fields["sampler_name"], fields["scheduler"] = sampler
        except UserError as e:  # a sampler this app does not have: the form keeps its own
            gr.Warning(f"{e.message}. The sampler and schedule type were left as they are.")
            for name in ("sampler_name", "scheduler"):
                fields.pop(name, None)
    for name in form:
        field, _, index = name.partition(PART)
        if index and isinstance(fields.get(field), list):  # a list field shown in several inputs
            fields[name] = fields[field][int(index)]
    units = sum(1 for name in form if name.startswith(CONTROLNET + PART)) // len(UNIT_FIELDS)
    fields |= pasted_units(parse_infotext(infotext), units)
    return [gr.update(value=fields[name]) if name in fields else gr.update() for name in form]
