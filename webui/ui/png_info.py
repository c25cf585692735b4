"""The PNG Info tab: an image's generation parameters, and "Send to txt2img"."""
from __future__ import annotations

import gradio as gr

from webui.engine.infotext import read_png_infotext, request_fields
from webui.ui.common import Components


def png_info_tab(form: Components, tabs: gr.Tabs) -> None:
    """Drop an image: its parameters (A1111's infotext, from PNG text or EXIF); "Send to txt2img" fills the form
    with them and shows it."""
    with gr.Row():
        image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Source", elem_id="pnginfo_image")
        with gr.Column():
            parameters = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="pnginfo_parameters")
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
    image.change(png_parameters, image, parameters, api_name="png_info")
    send.click(lambda text: (*form_updates(form, text), gr.Tabs(selected="txt2img")), parameters,
               [*form.values(), tabs], api_visibility="private")


def png_parameters(path: str | None) -> str:
    if not path:
        return ""
    try:
        return read_png_infotext(path) or "(this image has no generation parameters)"
    except OSError as e:
        return f"(not an image this app can read: {e})"


def form_updates(form: Components, infotext: str) -> list[dict]:
    """An update per form field: the infotext's value where it has one, the field left alone where not."""
    fields = request_fields(infotext) if infotext and not infotext.startswith("(") else {}
    return [gr.update(value=fields[name]) if name in fields else gr.update() for name in form]
