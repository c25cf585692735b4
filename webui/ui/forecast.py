""""Will it fit?" beside a Generate button: the job's peak VRAM, RAM and time, forecast as the form changes and
after each job (``Engine.forecast``; nothing is loaded for it)."""
from __future__ import annotations

import html
from collections.abc import Callable

import gradio as gr

from webui.errors import Busy, UserError

# The fields a forecast changes with: the job's shape, and the checkpoint (its weights' sizes).
FORECAST_FIELDS = ("steps", "width", "height", "n_iter", "batch_size", "cfg_scale")


def forecast_box(prefix: str) -> gr.HTML:
    return gr.HTML(elem_id=f"{prefix}_forecast", padding=False)


def forecast_html(forecast: Callable[[], object]) -> str | dict:
    """``forecast()``'s summary (a Forecast or a PlotForecast), or why there is none (a model not loaded yet, a field
    out of range); while a job runs the last forecast stays (the job's end forecasts again)."""
    try:
        text = forecast().summary()
    except Busy:
        return gr.skip()
    except UserError as e:
        text = e.message
    return (f'<div class="forecast" style="font-size:0.85em;opacity:0.8">Will it fit? {html.escape(text)}</div>')


def keep_forecast_fresh(box: gr.HTML, update: Callable[..., str], inputs: list[gr.components.Component],
                        triggers: list[gr.components.Component], demo: gr.Blocks, done: gr.events.Dependency) -> None:
    """Forecast again when a trigger changes, when the page loads and when a job is done (its rates measured)."""
    for trigger in triggers:
        trigger.change(update, inputs, box, queue=False, show_progress="hidden", api_visibility="private")
    demo.load(update, inputs, box, queue=False, show_progress="hidden", api_visibility="private")
    done.then(update, inputs, box, queue=False, show_progress="hidden", api_visibility="private")
