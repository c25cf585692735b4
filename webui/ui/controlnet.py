"""The generation tabs' ControlNet accordion, as Forge's: units (their number a setting, read when the page is built),
each with its switch, control image, preprocessor (its resolution and two sliders relabelled for the one chosen, a
preview of what it detects), model (and a Union model's control type), weight, guidance start and end, control mode
and resize mode. The form gives the unit fields in order as one list (``controlnet__i``), which ``units_from_form``
turns into the request's units; ``pasted_units`` fills them from an infotext."""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui.engine.control.preprocessors import PREPROCESSORS, RESOLUTION, Slider, find_preprocessor
from webui.engine.control.units import (CONTROL_MODES, MAX_WEIGHT, RESIZE_MODES, UNION_TYPES, ControlUnit,
                                        units_from_infotext)
from webui.engine.engine import Engine
from webui.errors import UserError
from webui.jobs import JobQueue
from webui.ui.common import PART, REFRESH, RUN, Components

FIELD = "controlnet"  # the request field the units' inputs give
# in the order the inputs are made (the form gives their values in that order)
UNIT_FIELDS = ("enabled", "pixel_perfect", "image", "module", "processor_res", "threshold_a", "threshold_b", "model",
               "union_control_type", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode")
NO_MODEL = "None"
# A slider the chosen preprocessor does not have: hidden, with room for any preprocessor's value (Gradio checks a
# value against the range the page was built with, whatever the preprocessor chosen since)
UNUSED = Slider("Threshold", -1, -1, max(s.maximum for p in PREPROCESSORS for s in p.sliders))


def controlnet_inputs(form: Components, engine: Engine, jobs: JobQueue, tab: str) -> None:
    """The accordion: one tab a unit. img2img's units without an image take the init image."""
    units = engine.options["control_net_unit_count"]
    with gr.Accordion("ControlNet", open=False, elem_id=f"{tab}_controlnet"):
        with gr.Tabs():
            for unit in range(units):
                with gr.Tab(f"ControlNet Unit {unit}", elem_id=f"{tab}_controlnet_unit_{unit}"):
                    _unit_inputs(form, engine, jobs, tab, unit)


def _unit_inputs(form: Components, engine: Engine, jobs: JobQueue, tab: str, unit: int) -> None:
    def key(name: str) -> str:
        return unit_key(unit, name)

    prefix = f"{tab}_controlnet_{unit}"
    with gr.Row():
        form[key("enabled")] = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}_enabled")
        form[key("pixel_perfect")] = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{prefix}_pixel_perfect")
    hint = "Control image" + (": empty takes the init image" if tab == "img2img" else "")
    with gr.Row():
        image = form[key("image")] = gr.Image(type="pil", label=hint, elem_id=f"{prefix}_image", height=256)
        preview = gr.Image(type="pil", label="Preprocessor Preview", interactive=False, elem_id=f"{prefix}_preview",
                           height=256)
    with gr.Row(equal_height=True):
        module = form[key("module")] = gr.Dropdown([p.label for p in PREPROCESSORS], value="none",
                                                   label="Preprocessor", scale=4, elem_id=f"{prefix}_module")
        run = gr.Button(RUN, scale=0, min_width=48, elem_id=f"{prefix}_preview_button")
    with gr.Row():
        sliders = [gr.Slider(**_slider(s), elem_id=f"{prefix}_{name}")
                   for name, s in (("processor_res", RESOLUTION), ("threshold_a", UNUSED), ("threshold_b", UNUSED))]
    for name, slider in zip(("processor_res", "threshold_a", "threshold_b"), sliders):
        form[key(name)] = slider
    module.change(_sliders_for, inputs=module, outputs=sliders, queue=False, api_visibility="private")
    run.click(lambda picture, *settings: _preview(engine, jobs, picture, *settings), inputs=[image, module, *sliders],
              outputs=preview, api_visibility="private")
    with gr.Row(equal_height=True):
        model = gr.Dropdown([NO_MODEL, *engine.controlnets.names()], value=NO_MODEL, label="Model", scale=4,
                            allow_custom_value=True, elem_id=f"{prefix}_model")  # (a pasted name, maybe not here)
        refresh = gr.Button(REFRESH, scale=0, min_width=48, elem_id=f"{prefix}_refresh")
    form[key("model")] = model
    form[key("union_control_type")] = gr.Dropdown(list(UNION_TYPES), value=UNION_TYPES[0],
                                                  label="Union Control Type (Union ControlNets)",
                                                  elem_id=f"{prefix}_union_control_type")
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


def _slider(slider: Slider, shown: bool = True) -> dict:
    return {"minimum": slider.minimum, "maximum": slider.maximum, "step": slider.step, "value": slider.value,
            "label": slider.label, "visible": shown and slider is not UNUSED}


def _sliders_for(label: str) -> list:
    """The three sliders as the chosen preprocessor has them: its resolution (if any) and its own sliders."""
    preprocessor = find_preprocessor(label, "module")
    own = list(preprocessor.sliders) + [UNUSED] * (2 - len(preprocessor.sliders))
    return [gr.update(**_slider(RESOLUTION, preprocessor.resolution)), *(gr.update(**_slider(s)) for s in own)]


def _preview(engine: Engine, jobs: JobQueue, picture, label: str, resolution: float, a: float, b: float):
    """What the preprocessor makes of the unit's image, detected in the queue (one job at a time)."""
    if picture is None:
        raise gr.Error("Put a control image in the unit first")
    try:
        return jobs.submit_call("detect", lambda: engine.detect(label, [picture], int(resolution), a, b)).result()[0]
    except UserError as e:
        raise gr.Error(e.message) from None


def pasted_units(params: dict[str, str], count: int) -> dict[str, Any]:
    """Send to txt2img/img2img: the form values of the ControlNet units an infotext describes (its settings; the
    images stay as they are), the units it does not describe switched off, as the picture was made without them."""
    described = units_from_infotext(params)
    values = {}
    for index in range(count):
        unit = dict(described[index]) if index < len(described) else {}
        unit["enabled"] = bool(unit)
        if "module" in unit:  # the dropdown shows the preprocessors' labels
            try:
                unit["module"] = find_preprocessor(unit["module"], "module").label
            except UserError:
                del unit["module"]
        values |= {unit_key(index, name): value for name, value in unit.items() if name in UNIT_FIELDS}
    return values


def unit_key(unit: int, name: str) -> str:
    """Unit ``unit``'s input for field ``name`` in the form."""
    return f"{FIELD}{PART}{unit * len(UNIT_FIELDS) + UNIT_FIELDS.index(name)}"


def units_from_form(values: list) -> list[ControlUnit]:
    """The form's unit fields, in order, as units; units switched off are left out."""
    size = len(UNIT_FIELDS)
    units = [dict(zip(UNIT_FIELDS, values[i:i + size])) for i in range(0, len(values), size)]
    return [ControlUnit(**{**unit, "model": unit["model"] or NO_MODEL}) for unit in units if unit["enabled"]]
