"""A tool that runs over another tab's request (the X/Y/Z plot, the prompt scripts): the txt2img form's, or the img2img
form's with its image, as a radio picks."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from webui.engine.request import GenerationRequest
from webui.errors import UserError
from webui.ui.common import Components
from webui.ui.forecast import forecast_box
from webui.ui.txt2img import request_from_form


@dataclass(frozen=True)
class RunColumn:
    """A tool's buttons, the radio that picks the tab it runs over, and its forecast."""

    generate: gr.Button
    interrupt: gr.Button
    chooser: gr.Radio
    forecast: gr.HTML


def run_column(prefix: str, img2img_form: Components | None, button: str, chooser_label: str) -> RunColumn:
    """The column beside a tool's inputs (elem_ids ``{prefix}_generate`` …); the radio shows only where there is an
    img2img tab."""
    tabs = ["txt2img", "img2img"] if img2img_form else ["txt2img"]
    with gr.Column(scale=1, min_width=180):
        generate = gr.Button(button, variant="primary", size="lg", elem_id=f"{prefix}_generate")
        interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt")
        chooser = gr.Radio(tabs, value="txt2img", label=chooser_label, elem_id=f"{prefix}_base",
                           visible=len(tabs) > 1)
        gr.Markdown("Prompt, size, sampler and the rest come from that tab (img2img: its image too).")
        return RunColumn(generate, interrupt, chooser, forecast_box(prefix))


def margin_slider(prefix: str) -> gr.Slider:
    """A grid's margin between its images (A1111's "Grid margins (px)")."""
    return gr.Slider(0, 500, value=0, step=2, precision=0, label="Grid margins (px)", elem_id=f"{prefix}_margin_size")


def over_tab(form: Components, img2img_form: Components | None, chooser: gr.Radio, prefix: str
             ) -> tuple[Components, Callable[[tuple], GenerationRequest]]:
    """The inputs a handler takes first (every form's, the img2img form's named ``img2img_<field>`` in the API, then
    ``chooser`` as ``{prefix}_base``), and the request their values make."""
    given = {**form, **{f"img2img_{key}": box for key, box in (img2img_form or {}).items()}, f"{prefix}_base": chooser}

    def request(values: tuple) -> GenerationRequest:
        chosen = values[len(given) - 1]
        fields, start = (form, 0) if chosen == "txt2img" else (img2img_form, len(form))
        request = request_from_form(fields, values[start:start + len(fields)])
        if chosen == "img2img" and not request.init_images:
            raise UserError("a run over img2img needs an init image: put one in the img2img tab", field="init_images")
        return request

    return given, request
