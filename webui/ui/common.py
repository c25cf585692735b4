"""What every tab of the UI shares: storing an option, sliders that name themselves in errors, status lines."""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from webui.engine.engine import Engine
from webui.errors import UserError

OPTION_LABELS = {"sd_model_checkpoint": "Stable Diffusion checkpoint", "sd_vae": "SD VAE",
                 "forge_additional_modules": "VAE / Text Encoder", "sd3_shift": "Shift"}

Components = dict[str, gr.components.Component]


PART = "__"  # a form key "field__i": the i-th of the inputs that give a request field as a list (a Python name:
# the form is the API function's signature)


class RequestFields(dict):
    """What one input gives several request fields (img2img's canvas: the init image and the mask painted on it):
    ``request_from_form`` takes them all, in the form's order."""
# Small buttons' symbols: plain Unicode that common fonts have (DejaVu Sans, Segoe UI Symbol, Apple Symbols), not
# emoji, which show as empty boxes where no emoji font is installed.
REFRESH, RANDOM_SEED, REUSE_SEED, RUN = "↻", "⚄", "♻", "▶"


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


def set_option(engine: Engine, key: str, value: Any) -> None:
    """Store an option; the engine applies it at the next generation."""
    if value is None:
        return
    try:
        engine.set_options({key: value})
    except UserError as e:
        gr.Warning(str(e))


def option_input(engine: Engine, key: str, label: str) -> gr.components.Component:
    """An option of the settings store as the input its type calls for, showing its value now."""
    value, choices = engine.options[key], engine.options.choices(key)
    if choices is not None or isinstance(value, list):
        return gr.Dropdown(list(choices or ()), value=value, label=label, elem_id=key,
                           multiselect=isinstance(value, list), allow_custom_value=choices is None)
    if isinstance(value, bool):
        return gr.Checkbox(value, label=label, elem_id=key)
    if isinstance(value, (int, float)):
        return gr.Number(value, label=label, elem_id=key, precision=0 if isinstance(value, int) else None)
    return gr.Textbox(value, label=label, elem_id=key)


def field_label(field: str, labels: dict[str, str]) -> str:
    """The label the user sees for an input (``labels``: input name → label) or option, with the field's own name."""
    label = labels.get(field) or OPTION_LABELS.get(field)
    return f"{label} ({field})" if label else field


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def counted(number: int, noun: str) -> str:
    """"1 image", "9 images"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def status_html(text: str) -> str:
    return f'<div class="gen-status">{html.escape(text)}</div>'


def error_html(text: str) -> str:
    return f'<div class="gen-error" style="color:#dc2626;font-weight:600">⚠ {html.escape(text)}</div>'
