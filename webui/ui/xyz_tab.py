"""The X/Y/Z plot tab: up to three axes over the txt2img form's request (or the img2img form's: "Plot over"), one
generation per cell, then the labelled grid. Its inputs are named as A1111's script arguments, so the API's path is
the same from there on."""
from __future__ import annotations

from concurrent.futures import Future
from functools import partial

import gradio as gr

from webui.engine.engine import Engine
from webui.engine.request import GenerationRequest
from webui.engine.xyz import Axis, AxisChoice, PlotForecast, PlotOptions, find_axis, forecast_plot, plot_from_args
from webui.extensions import plot_axes
from webui.jobs import JobQueue
from webui.ui.common import Components
from webui.ui.forecast import forecast_html, keep_forecast_fresh
from webui.ui.generation import generator, output_column
from webui.ui.over_tab import margin_slider, over_tab, run_column

VALUES_HINT = "1, 2, 3 · ranges 1-5, 1-10 (+2), 1-10 [5] · quote items holding commas"


def xyz_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue, form: Components,
            img2img_form: Components | None = None) -> None:
    """Up to three axes over the txt2img form's request, or the img2img form's (its image, each cell an img2img);
    one generation per cell, then the labelled grid."""
    axes = plot_axes(engine)
    inputs: Components = {}
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
                inputs["margin_size"] = margin_slider("xyz")
        column = run_column("xyz", img2img_form, "Generate plot", "Plot over the request of the tab")
    out = output_column("xyz")

    # The handlers take every form's values, then the tab chosen, then the plot's own
    given, base_request = over_tab(form, img2img_form, column.chooser, "xyz")

    def plot(values: tuple) -> tuple[GenerationRequest, list[AxisChoice], PlotOptions]:
        return base_request(values), *plot_from_args(dict(zip(inputs, values[len(given):])), axes)

    def submit(values: tuple) -> Future:
        return jobs.submit_plot(*plot(values))

    def forecast_text(*values) -> str:
        def forecast() -> PlotForecast:
            base, choices, options = plot(values)
            return forecast_plot(engine, base, choices, axes, options)

        return forecast_html(forecast)

    run = generator(jobs, {**given, **inputs}, out, submit)
    done = column.generate.click(run, inputs=[*given.values(), *inputs.values()], outputs=list(out.values()),
                          api_name="xyz_plot", show_progress="hidden", concurrency_limit=None)
    triggers = [column.chooser] + [inputs[f"{name}_{part}"] for name in "xyz" for part in ("type", "values", "values_dropdown")]
    keep_forecast_fresh(column.forecast, forecast_text, [*given.values(), *inputs.values()], triggers, demo, done)
    column.interrupt.click(jobs.interrupt, queue=False, api_visibility="private")


def _axis_row(engine: Engine, axes: list[Axis], name: str, default: str,
              inputs: Components) -> None:
    """An axis' type, its values typed (numbers, ranges, prompt replacements) or picked from its choices."""
    axis_name = name.upper()
    with gr.Row(equal_height=True):
        kind = gr.Dropdown([a.label for a in axes], value=default, label=f"{axis_name} type", scale=2,
                           elem_id=f"xyz_{name}_type")
        text = gr.Textbox("", label=f"{axis_name} values", placeholder=VALUES_HINT, scale=5,
                          elem_id=f"xyz_{name}_values")
        picked = gr.Dropdown([], value=[], multiselect=True, label=f"{axis_name} values", visible=False, scale=5,
                             allow_custom_value=True, elem_id=f"xyz_{name}_values_dropdown")  # the plot checks them
        fill = gr.Button("All", scale=0, min_width=48, visible=False, elem_id=f"xyz_{name}_fill")
    inputs[f"{name}_type"], inputs[f"{name}_values"], inputs[f"{name}_values_dropdown"] = kind, text, picked
    kind.change(partial(axis_inputs, engine, axes), kind, [text, picked, fill], api_visibility="private")
    fill.click(partial(axis_choices, engine, axes), kind, picked, api_visibility="private")


def axis_inputs(engine: Engine, axes: list[Axis], label: str) -> tuple[dict, dict, dict]:
    """An axis with choices (samplers, checkpoints …) is picked from a list (All fills in every choice); the others
    are typed."""
    listed = find_axis(axes, label).choices is not None
    return (gr.update(visible=not listed, value=""),
            gr.update(visible=listed, choices=axis_choices(engine, axes, label) if listed else [], value=[]),
            gr.update(visible=listed))


def axis_choices(engine: Engine, axes: list[Axis], label: str) -> list[str]:
    choices = find_axis(axes, label).choices
    return choices(engine) if choices is not None else []
