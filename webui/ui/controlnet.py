"""The generation tabs' ControlNet accordion, as Forge's: units (their number a setting, read when the page is built),
each with its switch, control image, model, weight, guidance start and end, control mode and resize mode. The form
gives the unit fields in order as one list (``controlnet__i``), which ``units_from_form`` turns into the request's
units."""
from __future__ import annotations

import gradio as gr

from webui.engine.control.units import CONTROL_MODES, MAX_WEIGHT, RESIZE_MODES, ControlUnit
from webui.engine.engine import Engine
from webui.ui.common import PART, REFRESH, Components

FIELD = "controlnet"  # the request field the units' inputs give
UNIT_FIELDS = ("enabled", "image", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode")
NO_MODEL = "None"


def controlnet_inputs(form: Components, engine: Engine, tab: str) -> None:
    """The accordion: one tab a unit. img2img's units without an image take the init image."""
    units = engine.options["control_net_unit_count"]
    with gr.Accordion("ControlNet", open=False, elem_id=f"{tab}_controlnet"):
        with gr.Tabs():
            for unit in range(units):
                with gr.Tab(f"ControlNet Unit {unit}", elem_id=f"{tab}_controlnet_unit_{unit}"):
                    _unit_inputs(form, engine, tab, unit)


def _unit_inputs(form: Components, engine: Engine, tab: str, unit: int) -> None:
    def key(name: str) -> str:
        return f"{FIELD}{PART}{unit * len(UNIT_FIELDS) + UNIT_FIELDS.index(name)}"

    prefix = f"{tab}_controlnet_{unit}"
    form[key("enabled")] = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}_enabled")
    hint = "Control image, preprocessed (an edge map, a pose…)" + (": empty takes the init image" if tab == "img2img"
                                                                     else "")
    form[key("image")] = gr.Image(type="pil", label=hint, elem_id=f"{prefix}_image", height=256)
    with gr.Row(equal_height=True):
        model = gr.Dropdown([NO_MODEL, *engine.controlnets.names()], value=NO_MODEL, label="Model", scale=4,
                            elem_id=f"{prefix}_model")
        refresh = gr.Button(REFRESH, scale=0, min_width=48, elem_id=f"{prefix}_refresh")
    form[key("model")] = model
    refresh.click(lambda: gr.update(choices=[NO_MODEL, *engine.controlnets.names()]), outputs=model,
                  queue=False, api_visibility="private")
    with gr.Row():
        form[key("weight")] = gr.Slider(0, MAX_WEIGHT, value=1.0, step=0.05, label="Control Weight",
                                        elem_id=f"{prefix}_weight")
        form[key("guidance_start")] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting Control Step",
                                                elem_id=f"{prefix}_start")
        form[key("guidance_end")] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending Control Step",
                                              elem_id=f"{prefix}_end")
    form[key("control_mode")] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode",
                                         elem_id=f"{prefix}_control_mode")
    form[key("resize_mode")] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[1], label="Resize Mode",
                                        elem_id=f"{prefix}_resize_mode")


def units_from_form(values: list) -> list[ControlUnit]:
    """The form's unit fields, in order, as units; units switched off are left out."""
    size = len(UNIT_FIELDS)
    units = [dict(zip(UNIT_FIELDS, values[i:i + size])) for i in range(0, len(values), size)]
    return [ControlUnit(**{**unit, "model": unit["model"] or NO_MODEL}) for unit in units if unit["enabled"]]
