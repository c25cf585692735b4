"""The Gradio web UI.

It holds no engine logic: it reads and writes the settings store, turns the txt2img form into
a GenerationRequest (in ``request_from_form`` only) and submits it through the job queue, the
same path the API takes.
"""
from __future__ import annotations

import html
import inspect
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from functools import partial
from typing import Any

import gradio as gr
from PIL import Image

from webui.engine.assemble import checkpoint_family
from webui.engine.detect import Family
from webui.engine.engine import Engine
from webui.engine.files import declared_resolution
from webui.engine.flow import FLOW_FAMILIES
from webui.engine.infotext import read_png_infotext, request_fields
from webui.engine.memory import MB
from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest, GenerationResult
from webui.engine.samplers import sampler_names, schedule_type_names
from webui.engine.xyz import Axis, PlotResult, find_axis, plot_from_args
from webui.errors import ModelFileError, UserError
from webui.extensions import Setting, extensions_of, plot_axes
from webui.jobs import JobQueue
from webui.settings import OPTION_CHOICES

POLL_SECONDS = 0.3
VAE_BUILTIN = ["Automatic", "None"]
OPTION_LABELS = {"sd_model_checkpoint": "Stable Diffusion checkpoint", "sd_vae": "SD VAE",
                 "forge_additional_modules": "VAE / Text Encoder", "sd3_shift": "Shift"}
# Forge's storage and swap options, as dropdowns under the model row (choices from the settings store).
CHOICE_LABELS = {"forge_unet_storage_dtype": "Diffusion in Low Bits", "t5_storage_dtype": "T5 storage",
                 "forge_async_loading": "Swap Method", "forge_pin_shared_memory": "Swap Location"}

# Ctrl+Enter (Cmd+Enter on macOS) in either prompt box presses Generate, as in A1111.
CTRL_ENTER_JS = """
() => {
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    if (!event.target.closest("#txt2img_prompt, #txt2img_neg_prompt")) return;
    event.preventDefault();
    document.getElementById("txt2img_generate")?.click();
  });
}
"""


class FieldSlider(gr.Slider):
    """A slider whose out-of-range error names the slider (Gradio's own message does not).

    ``is_template`` makes Gradio draw it with the stock slider.
    """

    is_template = True

    def preprocess(self, payload: float) -> float:
        try:
            return super().preprocess(payload)
        except gr.Error as e:
            raise gr.Error(f"{self.label}: {e.message}") from None


def build_ui(engine: Engine, jobs: JobQueue) -> gr.Blocks:
    with gr.Blocks(title="Stable Diffusion web UI", analytics_enabled=False) as demo:
        checkpoint = _model_row(demo, engine)
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                form = _txt2img_tab(demo, engine, jobs, checkpoint)
            with gr.Tab("X/Y/Z plot", id="xyz"):
                _xyz_tab(engine, jobs, form)
            with gr.Tab("PNG Info", id="png_info"):
                _png_info_tab(form, tabs)
            _extension_tabs(demo, engine)
        demo.load(None, js=CTRL_ENTER_JS)
    return demo


# ---- top row: checkpoint, VAE, GPU weights -------------------------------------------------

def checkpoint_choices(engine: Engine) -> tuple[list[str], str | None]:
    """All checkpoint titles, and the one loaded now (else the one the settings select)."""
    models = engine.models
    titles = [models.title(info) for info in models.checkpoints()]
    if models.current is not None:
        return titles, models.title(models.current.info)
    try:
        return titles, models.title(models.default_checkpoint(engine.options["sd_model_checkpoint"]))
    except UserError:
        return titles, None


def vae_choices(engine: Engine) -> tuple[list[str], str]:
    names = VAE_BUILTIN + [engine.models.vae_name(path) for path in engine.models.vaes()]
    selected = engine.options["sd_vae"]
    return names, selected if selected in names else "Automatic"


def total_memory_mb(engine: Engine) -> tuple[int, str]:
    """Total memory the GPU-weights budget is taken from (the memory manager's view), and what it is."""
    memory = engine.memory.memory
    return memory.total() // MB, memory.describe()


def module_choices(engine: Engine) -> tuple[list[str], list[str]]:
    """Forge's "VAE / Text Encoder" list (files of models/VAE and models/text_encoder) and those chosen."""
    names = [engine.models.module_name(path) for path in engine.models.module_files()]
    return names, [n for n in engine.options["forge_additional_modules"] if n in names]


def family_of(engine: Engine, title: str | None) -> Family | None:
    """The checkpoint's family, read from its header (not loaded); None where that does not tell."""
    try:
        return checkpoint_family(engine.models.find(title)) if title else None
    except (UserError, ModelFileError):
        return None


def _model_row(demo: gr.Blocks, engine: Engine) -> gr.Dropdown:
    total_mb, memory_kind = total_memory_mb(engine)
    titles, title = checkpoint_choices(engine)
    vaes, vae = vae_choices(engine)
    modules, chosen = module_choices(engine)
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(titles, value=title, label=OPTION_LABELS["sd_model_checkpoint"], scale=4,
                                 elem_id="sd_model_checkpoint")
        refresh = gr.Button("🔄", scale=0, min_width=48, elem_id="refresh_checkpoints")
        vae_box = gr.Dropdown(vaes, value=vae, label=OPTION_LABELS["sd_vae"], scale=2, elem_id="sd_vae")
        modules_box = gr.Dropdown(modules, value=chosen, multiselect=True, scale=3, elem_id="forge_additional_modules",
                                  label=OPTION_LABELS["forge_additional_modules"])
        gpu_weights = gr.Slider(
            0, total_mb, step=1, precision=0, scale=3, elem_id="gpu_weights",
            value=gpu_weights_mb(engine, total_mb), label="GPU Weights (MB)",
            info=f"Out of {total_mb} MB of {memory_kind}; the rest stays free for computation.",
        )

    with gr.Row(equal_height=True):
        choices = {key: gr.Dropdown(list(OPTION_CHOICES[key]), value=engine.options[key], label=label, elem_id=key)
                   for key, label in CHOICE_LABELS.items()}

    def model_lists() -> tuple[dict, dict, dict]:
        titles, title = checkpoint_choices(engine)
        vaes, vae = vae_choices(engine)
        modules, chosen = module_choices(engine)
        return (gr.update(choices=titles, value=title), gr.update(choices=vaes, value=vae),
                gr.update(choices=modules, value=chosen))

    def refreshed() -> tuple[dict, dict, dict]:
        engine.models.refresh()
        return model_lists()

    def on_load() -> tuple:
        """Show the settings as they are now: another tab or the API may have changed them."""
        return *model_lists(), gpu_weights_mb(engine, total_mb), *(engine.options[key] for key in choices)

    lists = [checkpoint, vae_box, modules_box]
    demo.load(on_load, outputs=[*lists, gpu_weights, *choices.values()], api_visibility="private")
    for key, box in choices.items():
        box.input(partial(set_option, engine, key), box, api_visibility="private")
    refresh.click(refreshed, outputs=lists, api_visibility="private")
    checkpoint.input(partial(set_option, engine, "sd_model_checkpoint"), checkpoint, api_visibility="private")
    vae_box.input(partial(set_option, engine, "sd_vae"), vae_box, api_visibility="private")
    modules_box.input(partial(set_option, engine, "forge_additional_modules"), modules_box, api_visibility="private")
    gpu_weights.input(partial(set_gpu_weights, engine, total_mb), gpu_weights, api_visibility="private")
    return checkpoint


def gpu_weights_mb(engine: Engine, total_mb: int) -> int:
    """Forge's GPU Weights: the memory left for weights once the inference reserve is taken."""
    return min(max(total_mb - engine.options["forge_inference_memory"], 0), total_mb)


def set_gpu_weights(engine: Engine, total_mb: int, weights_mb: float) -> None:
    set_option(engine, "forge_inference_memory", total_mb - int(weights_mb))


def set_option(engine: Engine, key: str, value: Any) -> None:
    """Store an option; the engine applies it at the next generation."""
    if value is None:
        return
    try:
        engine.set_options({key: value})
    except UserError as e:
        gr.Warning(str(e))


# ---- PNG Info --------------------------------------------------------------------------------

def _png_info_tab(form: dict[str, gr.components.Component], tabs: gr.Tabs) -> None:
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


def form_updates(form: dict[str, gr.components.Component], infotext: str) -> list[dict]:
    """An update per form field: the infotext's value where it has one, the field left alone where not."""
    fields = request_fields(infotext) if infotext and not infotext.startswith("(") else {}
    return [gr.update(value=fields[name]) if name in fields else gr.update() for name in form]


# ---- extensions ------------------------------------------------------------------------------

def _extension_tabs(demo: gr.Blocks, engine: Engine) -> None:
    """The tabs extensions added (one whose build() fails says so, and its extension is disabled), then the
    Extensions tab: which extensions run, which failed and why, and their settings."""
    registry = extensions_of(engine)
    for tab in registry.tabs:
        with gr.Tab(tab.title):
            try:
                tab.build()
            except Exception as e:
                registry.fail(tab.owner, f"building its tab {tab.title!r}")
                gr.Markdown(f"⚠ Extension {tab.owner} failed building this tab and is disabled: {e}")
    if not registry.found:
        return
    with gr.Tab("Extensions"):
        table = gr.Markdown(registry.status_markdown(), elem_id="extensions_status")
        boxes = {setting.key: _setting_input(engine, setting) for setting in registry.settings}
    for key, box in boxes.items():
        box.input(partial(set_option, engine, key), box, api_visibility="private")
    demo.load(lambda: {table: registry.status_markdown(), **{box: engine.options[key] for key, box in boxes.items()}},
              outputs=[table, *boxes.values()], api_visibility="private")  # by component: right with no boxes too


def _setting_input(engine: Engine, setting: Setting) -> gr.components.Component:
    """An extension's option as the input its type calls for."""
    value, choices = engine.options[setting.key], engine.options.choices(setting.key)
    if choices is not None or isinstance(value, list):
        return gr.Dropdown(list(choices or ()), value=value, label=setting.label, elem_id=setting.key,
                           multiselect=isinstance(value, list), allow_custom_value=choices is None)
    if isinstance(value, bool):
        return gr.Checkbox(value, label=setting.label, elem_id=setting.key)
    if isinstance(value, (int, float)):
        return gr.Number(value, label=setting.label, elem_id=setting.key, precision=0 if isinstance(value, int) else None)
    return gr.Textbox(value, label=setting.label, elem_id=setting.key)


# ---- txt2img ---------------------------------------------------------------------------------

def request_from_form(form: dict[str, gr.components.Component], values: tuple) -> GenerationRequest:
    """The one mapping from UI fields to a request: the form's keys are GenerationRequest fields."""
    return GenerationRequest(**dict(zip(form, values)))


def _txt2img_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue,
                 checkpoint: gr.Dropdown) -> dict[str, gr.components.Component]:
    """The txt2img tab; its form (request field → input), which the X/Y/Z plot tab takes its base request from."""
    form: dict[str, gr.components.Component] = {}
    generate, interrupt, skip = _prompt_row(form)
    with gr.Row():
        with gr.Column(scale=1):
            random_seed, reuse_seed, shift = _settings_column(form, engine)
        with gr.Column(scale=1):
            out = _output_column("txt2img")
    run = _generator(engine, form, out, lambda values: jobs.submit(request_from_form(form, values)))
    generate.click(run, inputs=list(form.values()), outputs=list(out.values()), api_name="txt2img",
                   show_progress="hidden", concurrency_limit=None)
    interrupt.click(jobs.interrupt, queue=False, api_name="interrupt")
    skip.click(jobs.skip, queue=False, api_name="skip")
    random_seed.click(lambda: -1, outputs=form["seed"], queue=False, api_visibility="private")
    reuse_seed.click(lambda seed: seed, inputs=out["last_seed"], outputs=form["seed"], queue=False,
                     api_visibility="private")
    out["gallery"].select(_selected_infotext, inputs=out["infotexts"], outputs=out["infotext"], queue=False,
                          api_visibility="private")
    demo.load(lambda: engine.options["CLIP_stop_at_last_layers"], outputs=form["clip_skip"],
              api_visibility="private")
    shift.input(partial(set_option, engine, "sd3_shift"), shift, api_visibility="private")
    family_fields = [form["distilled_cfg_scale"], shift, form["clip_skip"], form["cfg_scale"], form["width"],
                     form["height"]]
    checkpoint.change(partial(fields_for_family, engine), checkpoint, family_fields, api_visibility="private")
    demo.load(lambda title: fields_for_family(engine, title, switched=False), checkpoint, family_fields,
              api_visibility="private")
    _network_lists(demo, engine, form["prompt"])
    return form


def _network_lists(demo: gr.Blocks, engine: Engine, prompt: gr.Textbox) -> None:
    """A list per prompt network that can name its files (LoRA): picking one adds its tag to the prompt."""
    listed = {kind: network for kind, (_owner, network) in engine.hooks.networks.items() if hasattr(network, "names")}
    for kind, network in listed.items():
        with gr.Row(equal_height=True):
            box = gr.Dropdown(network.names(), value=None, label=f"{kind.title()} (adds <{kind}:name:1> to the prompt)",
                              scale=6, elem_id=f"txt2img_{kind}_list")
            refresh = gr.Button("🔄", scale=0, min_width=48, elem_id=f"txt2img_{kind}_refresh")
        box.input(partial(add_network_tag, kind), [prompt, box], [prompt, box], api_visibility="private")
        refresh.click(partial(_refreshed_names, network), outputs=box, api_visibility="private")
        demo.load(lambda network=network: gr.update(choices=network.names()), outputs=box, api_visibility="private")


def add_network_tag(kind: str, prompt: str, name: str | None) -> tuple[str, None]:
    """The prompt with ``<kind:name:1>`` added (once), and the list cleared for the next pick."""
    if not name:
        return prompt, None
    tag = f"<{kind}:{name}:1>"
    return (prompt if tag in prompt else f"{prompt.rstrip()} {tag}".lstrip()), None


def _refreshed_names(network: Any) -> dict:
    network.refresh()
    return gr.update(choices=network.names())


def fields_for_family(engine: Engine, title: str | None, switched: bool = True) -> tuple[dict, ...]:
    """Show the fields the checkpoint's family uses: Distilled CFG for Flux dev, Shift for SD3.x, Clip skip for
    the SD families. Picking a Flux checkpoint sets CFG to 1, as Forge's Flux preset does. A checkpoint that says
    its resolution (the demo model's 128x128) sets width and height to it."""
    family = family_of(engine, title)
    flux = family is Family.FLUX
    cfg = gr.update(value=1.0) if flux and switched else gr.update()
    size = resolution_of(engine, title)
    return (gr.update(visible=flux), gr.update(visible=family is Family.SD3, value=engine.options["sd3_shift"]),
            gr.update(visible=family not in FLOW_FAMILIES), cfg,
            *((gr.update(value=side) for side in size) if size else (gr.update(), gr.update())))


def resolution_of(engine: Engine, title: str | None) -> tuple[int, int] | None:
    try:
        return declared_resolution(engine.models.find(title)) if title else None
    except UserError:
        return None


def _prompt_row(form: dict[str, gr.components.Component]) -> tuple[gr.Button, gr.Button, gr.Button]:
    with gr.Row():
        with gr.Column(scale=6):
            form["prompt"] = gr.Textbox("", label="Prompt", lines=3, elem_id="txt2img_prompt",
                                        placeholder="Prompt (Ctrl+Enter to generate)")
            form["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt",
                                                 placeholder="Negative prompt (Ctrl+Enter to generate)")
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button("Generate", variant="primary", size="lg", elem_id="txt2img_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt")
                skip = gr.Button("Skip", elem_id="txt2img_skip")
    return generate, interrupt, skip


def _slider(name: str, label: str, minimum: float, maximum: float, value: float, step: float = 1) -> FieldSlider:
    """A form slider; whole steps give whole numbers, as the request wants."""
    return FieldSlider(minimum, maximum, value=value, step=step, precision=0 if step == int(step) else None,
                       label=label, elem_id=f"txt2img_{name}")


def _settings_column(form: dict[str, gr.components.Component],
                     engine: Engine) -> tuple[gr.Button, gr.Button, gr.Slider]:
    with gr.Row():
        form["sampler_name"] = gr.Dropdown(sampler_names(), value="DPM++ 2M", label="Sampling method",
                                           elem_id="txt2img_sampling")
        form["scheduler"] = gr.Dropdown(schedule_type_names(), value="Automatic", label="Schedule type",
                                        elem_id="txt2img_scheduler")
    form["steps"] = _slider("steps", "Sampling steps", 1, 150, 20)
    with gr.Row():
        form["width"] = _slider("width", "Width", 64, 2048, 512, step=8)
        form["height"] = _slider("height", "Height", 64, 2048, 512, step=8)
    with gr.Row():
        form["n_iter"] = _slider("batch_count", "Batch count", 1, 100, 1)
        form["batch_size"] = _slider("batch_size", "Batch size", 1, 8, 1)
    with gr.Row():
        form["cfg_scale"] = _slider("cfg_scale", "CFG Scale", 1, 30, 7, step=0.5)
        form["distilled_cfg_scale"] = _slider("distilled_cfg_scale", "Distilled CFG Scale", 0, 30, 3.5, step=0.5)
        shift = gr.Slider(0.5, 10, value=engine.options["sd3_shift"], step=0.1, label=OPTION_LABELS["sd3_shift"],
                          elem_id="sd3_shift", visible=False)
    with gr.Row(equal_height=True):
        form["seed"] = gr.Number(-1, precision=0, label="Seed", scale=4, elem_id="txt2img_seed")
        random_seed = gr.Button("🎲", scale=0, min_width=48, elem_id="txt2img_random_seed")
        reuse_seed = gr.Button("♻️", scale=0, min_width=48, elem_id="txt2img_reuse_seed")
    form["clip_skip"] = _slider("clip_skip", "Clip skip", 1, 12, engine.options["CLIP_stop_at_last_layers"])
    return random_seed, reuse_seed, shift


def _output_column(prefix: str) -> dict[str, gr.components.Component]:
    """A Generate handler's outputs, by name (elem_ids ``{prefix}_gallery`` ...)."""
    return {
        "preview": gr.Image(label="Preview", type="pil", visible=False, interactive=False, height=320,
                            elem_id=f"{prefix}_preview"),
        "gallery": gr.Gallery(label="Output", format="png", columns=4, height=480, elem_id=f"{prefix}_gallery"),
        "status": gr.HTML(label="Status", elem_id=f"{prefix}_status"),
        "infotext": gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                               elem_id=f"{prefix}_infotext"),
        "infotexts": gr.State([]),
        "last_seed": gr.State(-1),
    }


def _selected_infotext(texts: list[str], evt: gr.SelectData) -> str:
    return texts[evt.index] if 0 <= evt.index < len(texts) else ""


def _generator(engine: Engine, inputs: dict[str, gr.components.Component], out: dict[str, gr.components.Component],
               submit: Callable[[tuple], Future]):
    """A Generate handler: submit the values of ``inputs`` (request fields, then any others), report progress and
    previews until done, then the images. The job's result is a GenerationResult, or a PlotResult shown as one."""
    labels = {name: box.label for name, box in inputs.items()}

    def run(*values: Any) -> Iterator[dict]:
        yield {out["gallery"]: [], out["infotext"]: "", out["status"]: _status_html("Starting…")}
        future = submit(values)
        while not wait([future], timeout=POLL_SECONDS).done:
            yield {out["status"]: progress_html(engine.progress, future), out["preview"]: _preview(engine, future)}
        yield _finished(future, labels, out)

    # Name the parameters after the inputs: API clients call the endpoint with these keywords.
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=box.value)
         for name, box in inputs.items()])
    return run


def _preview(engine: Engine, future: Future) -> dict:
    """This job's live preview at output size (its latents are 8x smaller); unchanged while there is none."""
    running = future.running() and engine.options["live_previews_enable"]
    image = engine.progress.preview() if running else None
    if image is None:
        return gr.skip()
    return gr.update(value=image.resize((image.width * 8, image.height * 8), Image.Resampling.BILINEAR),
                     visible=True)


def _finished(future: Future, labels: dict[str, str], out: dict[str, gr.components.Component]) -> dict:
    hidden_preview = gr.update(value=None, visible=False)
    try:
        result: GenerationResult | PlotResult = future.result()
        if isinstance(result, PlotResult):
            result = result.as_result()
    except UserError as e:
        message = f"{field_label(e.field, labels)}: {e.message}" if e.field else e.message
        gr.Warning(message)
        return {out["status"]: _error_html(message), out["preview"]: hidden_preview}
    except Exception as e:  # the queue survived it; show it and stay usable
        return {out["status"]: _error_html(f"Generation failed: {type(e).__name__}: {e}"),
                out["preview"]: hidden_preview}
    return {
        out["gallery"]: result.images,
        out["infotext"]: result.infotexts[0] if result.infotexts else "",
        out["infotexts"]: result.infotexts,
        out["last_seed"]: result.seed,
        out["status"]: _status_html(_done_text(result)),
        out["preview"]: hidden_preview,
    }


# ---- X/Y/Z plot ------------------------------------------------------------------------------

VALUES_HINT = "1, 2, 3 · ranges 1-5, 1-10 (+2), 1-10 [5] · quote items holding commas"


def _xyz_tab(engine: Engine, jobs: JobQueue, form: dict[str, gr.components.Component]) -> None:
    """Up to three axes over the txt2img form's request; one generation per cell, then the labelled grid."""
    axes = plot_axes(engine)
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column(scale=3):
            for name, default in zip("xyz", ("Seed", "Nothing", "Nothing")):
                _axis_row(engine, axes, name, default, inputs)
            with gr.Row():
                inputs["draw_legend"] = gr.Checkbox(True, label="Draw legend", elem_id="xyz_draw_legend")
                inputs["include_lone_images"] = gr.Checkbox(True, label="Include Sub Images",
                                                            elem_id="xyz_include_lone_images")
                inputs["include_sub_grids"] = gr.Checkbox(False, label="Include Sub Grids",
                                                          elem_id="xyz_include_sub_grids")
                inputs["no_fixed_seeds"] = gr.Checkbox(False, label="Keep -1 for seeds", elem_id="xyz_no_fixed_seeds")
            with gr.Row():
                for name in "xyz":
                    inputs[f"vary_seeds_{name}"] = gr.Checkbox(False, label=f"Vary seeds for {name.upper()}",
                                                               elem_id=f"xyz_vary_seeds_{name}")
                inputs["margin_size"] = gr.Slider(0, 500, value=0, step=2, precision=0, label="Grid margins (px)",
                                                  elem_id="xyz_margin_size")
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button("Generate plot", variant="primary", size="lg", elem_id="xyz_generate")
            interrupt = gr.Button("Interrupt", elem_id="xyz_interrupt")
            gr.Markdown("Prompt, size, sampler and the rest come from the txt2img tab.")
    out = _output_column("xyz")

    def submit(values: tuple) -> Future:
        """The inputs are named as A1111's script arguments: the API's path from here on."""
        choices, options = plot_from_args(dict(zip(inputs, values[len(form):])), axes)
        return jobs.submit_plot(request_from_form(form, values[:len(form)]), choices, options)

    run = _generator(engine, {**form, **inputs}, out, submit)
    generate.click(run, inputs=[*form.values(), *inputs.values()], outputs=list(out.values()), api_name="xyz_plot",
                   show_progress="hidden", concurrency_limit=None)
    interrupt.click(jobs.interrupt, queue=False, api_visibility="private")
    out["gallery"].select(_selected_infotext, inputs=out["infotexts"], outputs=out["infotext"], queue=False,
                          api_visibility="private")


def _axis_row(engine: Engine, axes: list[Axis], name: str, default: str,
              inputs: dict[str, gr.components.Component]) -> None:
    """An axis' type, its values typed (numbers, ranges, prompt replacements) or picked from its choices."""
    axis_name = name.upper()
    with gr.Row(equal_height=True):
        kind = gr.Dropdown([a.label for a in axes], value=default, label=f"{axis_name} type", scale=2,
                           elem_id=f"xyz_{name}_type")
        text = gr.Textbox("", label=f"{axis_name} values", placeholder=VALUES_HINT, scale=5,
                          elem_id=f"xyz_{name}_values")
        picked = gr.Dropdown([], value=[], multiselect=True, label=f"{axis_name} values", visible=False, scale=5,
                             allow_custom_value=True, elem_id=f"xyz_{name}_values_dropdown")  # the plot checks them
        fill = gr.Button("📒", scale=0, min_width=48, visible=False, elem_id=f"xyz_{name}_fill")
    inputs[f"{name}_type"], inputs[f"{name}_values"], inputs[f"{name}_values_dropdown"] = kind, text, picked
    kind.change(partial(axis_inputs, engine, axes), kind, [text, picked, fill], api_visibility="private")
    fill.click(partial(axis_choices, engine, axes), kind, picked, api_visibility="private")


def axis_inputs(engine: Engine, axes: list[Axis], label: str) -> tuple[dict, dict, dict]:
    """An axis with choices (samplers, checkpoints …) is picked from a list (📒 fills in every choice); the others
    are typed."""
    listed = find_axis(axes, label).choices is not None
    return (gr.update(visible=not listed, value=""),
            gr.update(visible=listed, choices=axis_choices(engine, axes, label) if listed else [], value=[]),
            gr.update(visible=listed))


def axis_choices(engine: Engine, axes: list[Axis], label: str) -> list[str]:
    choices = find_axis(axes, label).choices
    return choices(engine) if choices is not None else []


def field_label(field: str, labels: dict[str, str]) -> str:
    """The label the user sees for an input (``labels``: input name → label) or option, with the field's own name."""
    label = labels.get(field) or OPTION_LABELS.get(field)
    return f"{label} ({field})" if label else field


def progress_html(progress: Progress, future: Future) -> str:
    """The progress line of a submitted job: queued, loading, or percent, step, batch and ETA."""
    if not future.running():
        return _status_html("Waiting in the queue…")
    if not progress.active:
        return _status_html("Loading the model…")
    percent = progress.fraction * 100
    text = f"{percent:.0f}% · step {progress.sampling_step}/{progress.sampling_steps}"
    if progress.job_count > 1:
        text += f" · batch {progress.job_no + 1}/{progress.job_count}"
    if progress.cell_count:
        text += f" · cell {min(progress.cell_no + 1, progress.cell_count)}/{progress.cell_count}"
    if percent > 0:
        text += f" · ETA {_duration(progress.eta_seconds)}"
    bar = (f'<div style="height:6px;background:var(--neutral-200,#ddd);border-radius:3px;margin-top:4px">'
           f'<div style="width:{percent:.1f}%;height:100%;background:var(--color-accent,#f97316);'
           f'border-radius:3px"></div></div>')
    return _status_html(text) + bar


def _done_text(result: GenerationResult) -> str:
    what = "Interrupted" if result.interrupted else "Done"
    text = f"{what}: {len(result.images)} image(s) in {_duration(result.seconds)}, seed {result.seed}."
    return f"{text} {result.memory.line()}" if result.memory else text


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _status_html(text: str) -> str:
    return f'<div class="gen-status">{html.escape(text)}</div>'


def _error_html(text: str) -> str:
    return f'<div class="gen-error" style="color:#dc2626;font-weight:600">⚠ {html.escape(text)}</div>'

