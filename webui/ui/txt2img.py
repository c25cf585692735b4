"""The txt2img tab: the form (every field of a GenerationRequest), the LoRA browser, and the output column.

``generation_tab`` builds it, and the img2img tab (``webui.ui.img2img``) with its image inputs added;
``request_from_form`` is the one place that turns a form into a request; the X/Y/Z tab builds its base request
with it too.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

import gradio as gr

from webui.engine.engine import Engine
from webui.engine.hires import LATENT_MODES, SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER
from webui.engine.request import MIN_SIDE, SIDE_MULTIPLE, GenerationRequest
from webui.jobs import JobQueue
from webui.ui.common import (OPTION_LABELS, PART, RANDOM_SEED, REUSE_SEED, Components, FieldSlider,
                              RequestFields, set_option)
from webui.ui.controlnet import FIELD as CONTROLNET
from webui.ui.controlnet import controlnet_inputs, units_from_form
from webui.ui.forecast import FORECAST_FIELDS, forecast_box, forecast_html, keep_forecast_fresh
from webui.ui.generation import generator, output_column
from webui.ui.model_row import checkpoint_choices
from webui.ui.network_browser import PRESET_FIELDS, network_browsers, preset_fields, preset_updates
from webui.ui.styles import style_inputs

# Ctrl+Enter (Cmd+Enter on macOS) in either prompt box of a tab presses its Generate, as in A1111.
CTRL_ENTER_JS = """
() => {
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    const box = event.target.closest("#txt2img_prompt, #txt2img_neg_prompt, #img2img_prompt, #img2img_neg_prompt");
    if (!box) return;
    event.preventDefault();
    // after the pending updates of the box's value (a prompt typed or pasted just before still reaches the job)
    const generate = document.getElementById(box.id.split("_")[0] + "_generate");
    setTimeout(() => generate?.click(), 0);
  });
}
"""
# Form sliders whose maximum is an option of the Settings tab's "Limits".
SLIDER_LIMITS = {"steps": "max_steps", "width": "max_image_side", "height": "max_image_side",
                 "batch_size": "max_batch_size", "n_iter": "max_batch_count"}


@dataclass(frozen=True)
class GenerationTab:
    """A generation tab's parts: its form (request field → input), its output column, its Send to img2img and Send
    to extras."""

    form: Components
    out: Components
    send_to_img2img: gr.Button
    send_to_extras: gr.Button


def request_from_form(form: Components, values: tuple) -> GenerationRequest:
    """The one mapping from UI fields to a request: the form's keys are GenerationRequest fields ("field__i": the
    i-th of the inputs that give a list field, as Soft inpainting's switch and settings), and an input that gives
    several (``RequestFields``) gives them all."""
    fields: dict = {}
    for name, value in zip(form, values):
        if PART in name:  # one of several inputs that give a field together, as a list in the form's order
            fields.setdefault(name.split(PART)[0], []).append(value)
        else:
            fields.update(value if isinstance(value, RequestFields) else {name: value})
    if CONTROLNET in fields:
        fields[CONTROLNET] = units_from_form(fields[CONTROLNET])
    return GenerationRequest(**fields)


def txt2img_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue, checkpoint: gr.Dropdown) -> GenerationTab:
    """The txt2img tab, with Hires. fix; its form (request field → input) is what the X/Y/Z plot tab takes its base
    request from."""
    return generation_tab(demo, engine, jobs, checkpoint, "txt2img", jobs.submit,
                          more_settings=lambda form: hires_inputs(form, engine))


def hires_inputs(form: Components, engine: Engine) -> None:
    """A1111's Hires. fix block: on or off, the upscaler (latent modes, then the image upscalers), hires steps (0: the
    same), denoising strength, upscale by or resize to, and the second pass's own sampler, schedule type and
    checkpoint and prompts ("Use same ..." and empty: the first pass's)."""
    _slider = partial(slider, tab="txt2img")
    largest = engine.options["max_image_side"]
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires_fix"):
        form["enable_hr"] = gr.Checkbox(False, label="Hires. fix", elem_id="txt2img_enable_hr")
        with gr.Row():
            form["hr_upscaler"] = gr.Dropdown([*LATENT_MODES, *(info.name for info in engine.upscalers())],
                                              value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler")
            form["hr_second_pass_steps"] = _slider("hires_steps", "Hires steps", 0, engine.options["max_steps"], 0)
            form["denoising_strength"] = _slider("denoising_strength", "Denoising strength", 0, 1, 0.7, step=0.01)
        with gr.Row():
            form["hr_scale"] = _slider("hr_scale", "Upscale by", 1, 4, 2, step=0.05)
            form["hr_resize_x"] = _slider("hr_resize_x", "Resize width to", 0, largest, 0, step=SIDE_MULTIPLE)
            form["hr_resize_y"] = _slider("hr_resize_y", "Resize height to", 0, largest, 0, step=SIDE_MULTIPLE)
        with gr.Row():
            form["hr_sampler_name"] = gr.Dropdown([SAME_SAMPLER, *engine.sampler_names()], value=SAME_SAMPLER,
                                                  label="Hires sampling method", elem_id="txt2img_hr_sampler")
            form["hr_scheduler"] = gr.Dropdown([SAME_SCHEDULER, *engine.schedule_type_names()], value=SAME_SCHEDULER,
                                               label="Hires schedule type", elem_id="txt2img_hr_scheduler")
            form["hr_checkpoint_name"] = gr.Dropdown([SAME_CHECKPOINT, *checkpoint_choices(engine)[0]],
                                                     value=SAME_CHECKPOINT, label="Hires checkpoint",
                                                     elem_id="txt2img_hr_checkpoint")
        form["hr_prompt"] = gr.Textbox("", label="Hires prompt", lines=2, placeholder="(empty: the prompt)",
                                       elem_id="txt2img_hr_prompt")
        form["hr_negative_prompt"] = gr.Textbox("", label="Hires negative prompt", lines=2,
                                                placeholder="(empty: the negative prompt)", elem_id="txt2img_hr_neg_prompt")


def generation_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue, checkpoint: gr.Dropdown, tab: str,
                   submit: Callable[[GenerationRequest], Future],
                   more_inputs: Callable[[Components], None] = lambda form: None,
                   more_settings: Callable[[Components], None] = lambda form: None) -> GenerationTab:
    """A generation tab (elem_ids ``{tab}_...``): prompts, ``more_inputs`` (img2img's image, strength, resize mode),
    the txt2img fields, ``more_settings`` below them (txt2img's Hires. fix) and the LoRA browser, the output column;
    Generate hands ``submit`` the form's request. Its Generate, Interrupt and Skip are the API's ``/{tab}``,
    ``/interrupt`` and ``/skip`` (txt2img's)."""
    form: Components = {}
    generate, interrupt, skip, forecast = _prompt_row(demo, engine, form, tab)
    with gr.Row():
        with gr.Column(scale=1):
            more_inputs(form)
            random_seed, reuse_seed, shift = _settings_column(form, engine, tab)
            more_settings(form)
            controlnet_inputs(form, engine, jobs, tab)
            network_browsers(demo, engine, form, tab)
        with gr.Column(scale=1):
            out = output_column(tab)
            with gr.Row():
                send = gr.Button("Send to img2img", size="sm", elem_id=f"{tab}_send_img2img")
                send_extras = gr.Button("Send to extras", size="sm", elem_id=f"{tab}_send_extras")
    run = generator(jobs, form, out, lambda values: submit(request_from_form(form, values)))
    done = generate.click(run, inputs=list(form.values()), outputs=list(out.values()), api_name=tab,
                          show_progress="hidden", concurrency_limit=None)
    keep_forecast_fresh(forecast, lambda *values: forecast_html(lambda: engine.forecast(request_from_form(form, values))),
                        list(form.values()), [form[name] for name in FORECAST_FIELDS] + [checkpoint], demo, done)
    first = tab == "txt2img"  # one API name each for Interrupt and Skip
    interrupt.click(jobs.interrupt, queue=False, api_name="interrupt" if first else None,
                    api_visibility="public" if first else "private")
    skip.click(jobs.skip, queue=False, api_name="skip" if first else None,
               api_visibility="public" if first else "private")
    random_seed.click(lambda: -1, outputs=form["seed"], queue=False, api_visibility="private")
    reuse_seed.click(lambda seed: seed, inputs=out["last_seed"], outputs=form["seed"], queue=False,
                     api_visibility="private")
    limited = [form[name] for name in SLIDER_LIMITS]
    demo.load(lambda: [engine.options["CLIP_stop_at_last_layers"],
                       *(gr.update(maximum=engine.options[key]) for key in SLIDER_LIMITS.values())],
              outputs=[form["clip_skip"], *limited], api_visibility="private")
    shift.input(partial(set_option, engine, "sd3_shift"), shift, api_visibility="private")
    family_fields = [form["distilled_cfg_scale"], shift, form["clip_skip"], form["width"], form["height"],
                     *(form[name] for name in PRESET_FIELDS)]
    # The user's pick sets the fields (and Flux's CFG); a page load shows those of the checkpoint the settings hold
    # now, read here: the dropdown's value in the page may still be the one it was built with.
    checkpoint.input(partial(fields_for_family, engine), checkpoint, family_fields, api_visibility="private")
    demo.load(partial(fields_on_load, engine), outputs=family_fields, api_visibility="private")
    return GenerationTab(form, out, send, send_extras)


def fields_on_load(engine: Engine) -> tuple[dict, ...]:
    """A page load's fields (and size): those of the checkpoint the model row shows, the one Generate uses next —
    not the one loaded now."""
    return fields_for_family(engine, engine.selected_checkpoint_title(), switched=False)


def fields_for_family(engine: Engine, title: str | None, switched: bool = True) -> tuple[dict, ...]:
    """Show the fields the checkpoint's family uses: Distilled CFG for Flux dev, Shift for SD3.x, Clip skip for
    the SD families. Picking a Flux checkpoint sets CFG to 1, as Forge's Flux preset does. A checkpoint that says
    its resolution (the demo model's 128x128) sets width and height to it; a few-step checkpoint (Turbo, Lightning,
    LCM … ``fast_presets``) sets steps, CFG, sampler and schedule type to its preset, on a pick and on a page load
    (whose form is at its defaults, which such a model burns at)."""
    fields = engine.checkpoint_fields(title)
    size = engine.declared_size(title) if title else None
    preset = preset_fields(engine.checkpoint_preset(title) if title else None)
    if fields.distilled_cfg and switched:
        preset.setdefault("cfg_scale", 1.0)
    return (gr.update(visible=fields.distilled_cfg), gr.update(visible=fields.shift, value=engine.options["sd3_shift"]),
            gr.update(visible=fields.clip_skip),
            *((gr.update(value=side) for side in size) if size else (gr.update(), gr.update())),
            *preset_updates(preset))


def _prompt_row(demo: gr.Blocks, engine: Engine, form: Components, tab: str
                ) -> tuple[gr.Button, gr.Button, gr.Button, gr.HTML]:
    with gr.Row():
        with gr.Column(scale=6):
            form["prompt"] = gr.Textbox("", label="Prompt", lines=3, elem_id=f"{tab}_prompt",
                                        placeholder="Prompt (Ctrl+Enter to generate)")
            form["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, elem_id=f"{tab}_neg_prompt",
                                                 placeholder="Negative prompt (Ctrl+Enter to generate)")
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button("Generate", variant="primary", size="lg", elem_id=f"{tab}_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{tab}_interrupt")
                skip = gr.Button("Skip", elem_id=f"{tab}_skip")
            forecast = forecast_box(tab)
            style_inputs(demo, engine, form, tab)
    return generate, interrupt, skip, forecast


def slider(name: str, label: str, minimum: float, maximum: float, value: float, step: float = 1,
           tab: str = "txt2img") -> FieldSlider:
    """A form slider; whole steps give whole numbers, as the request wants."""
    return FieldSlider(minimum, maximum, value=value, step=step, precision=0 if step == int(step) else None,
                       label=label, elem_id=f"{tab}_{name}")


def _settings_column(form: Components, engine: Engine, tab: str) -> tuple[gr.Button, gr.Button, gr.Slider]:
    _slider = partial(slider, tab=tab)
    with gr.Row():
        form["sampler_name"] = gr.Dropdown(engine.sampler_names(), value="DPM++ 2M", label="Sampling method",
                                           elem_id=f"{tab}_sampling")
        form["scheduler"] = gr.Dropdown(engine.schedule_type_names(), value="Automatic", label="Schedule type",
                                        elem_id=f"{tab}_scheduler")
    form["steps"] = _slider("steps", "Sampling steps", 1, engine.options["max_steps"], 20)
    with gr.Row():
        form["width"] = _slider("width", "Width", MIN_SIDE, engine.options["max_image_side"], 512, step=SIDE_MULTIPLE)
        form["height"] = _slider("height", "Height", MIN_SIDE, engine.options["max_image_side"], 512,
                                 step=SIDE_MULTIPLE)
    with gr.Row():
        form["n_iter"] = _slider("batch_count", "Batch count", 1, engine.options["max_batch_count"], 1)
        form["batch_size"] = _slider("batch_size", "Batch size", 1, engine.options["max_batch_size"], 1)
    with gr.Row():
        form["cfg_scale"] = _slider("cfg_scale", "CFG Scale", 1, 30, 7, step=0.5)
        form["distilled_cfg_scale"] = _slider("distilled_cfg_scale", "Distilled CFG Scale", 0, 30, 3.5, step=0.5)
        shift = gr.Slider(0.5, 10, value=engine.options["sd3_shift"], step=0.1, label=OPTION_LABELS["sd3_shift"],
                          elem_id=f"{tab}_sd3_shift", visible=False)
    with gr.Row(equal_height=True):
        form["seed"] = gr.Number(-1, precision=0, label="Seed", scale=4, elem_id=f"{tab}_seed")
        random_seed = gr.Button(RANDOM_SEED, scale=0, min_width=48, elem_id=f"{tab}_random_seed")
        reuse_seed = gr.Button(REUSE_SEED, scale=0, min_width=48, elem_id=f"{tab}_reuse_seed")
    with gr.Accordion("Variation seed", open=False, elem_id=f"{tab}_seed_extras"):
        with gr.Row():
            form["subseed"] = gr.Number(-1, precision=0, label="Variation seed", elem_id=f"{tab}_subseed")
            form["subseed_strength"] = _slider("subseed_strength", "Variation strength", 0, 1, 0, step=0.01)
        with gr.Row():
            form["seed_resize_from_w"] = _slider("seed_resize_from_w", "Resize seed from width (0: off)", 0,
                                                 engine.options["max_image_side"], 0, step=SIDE_MULTIPLE)
            form["seed_resize_from_h"] = _slider("seed_resize_from_h", "Resize seed from height (0: off)", 0,
                                                 engine.options["max_image_side"], 0, step=SIDE_MULTIPLE)
    form["clip_skip"] = _slider("clip_skip", "Clip skip", 1, 12, engine.options["CLIP_stop_at_last_layers"])
    return random_seed, reuse_seed, shift
