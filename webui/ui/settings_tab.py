"""The Settings tab: the options of the settings store that the other tabs do not show, saved in config.json by
"Apply settings" (the API's POST /options writes the same store)."""
from __future__ import annotations

import html

import gradio as gr

from webui.engine.engine import Engine
from webui.errors import UserError
from webui.settings import OPTION_SECTIONS
from webui.ui.common import option_input


def settings_tab(demo: gr.Blocks, engine: Engine) -> None:
    boxes: dict[str, gr.components.Component] = {}
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
        result = gr.HTML(elem_id="settings_result")
    for section, labels in OPTION_SECTIONS.items():
        with gr.Accordion(section, open=True):
            boxes.update((key, option_input(engine, key, label)) for key, label in labels.items())
    apply.click(lambda *values: apply_settings(engine, dict(zip(boxes, values))), list(boxes.values()),
                [result, *boxes.values()], api_visibility="private")
    demo.load(lambda: [engine.options[key] for key in boxes], outputs=list(boxes.values()), api_visibility="private")


def apply_settings(engine: Engine, values: dict) -> list:
    """Store the values, all or none: a wrong one is named, nothing changes and the inputs keep what was typed.
    Returns the message, then each input's value as stored."""
    changed = [key for key, value in values.items() if value != engine.options[key]]
    try:
        engine.set_options({key: values[key] for key in changed})
    except UserError as e:
        labels = {key: label for section in OPTION_SECTIONS.values() for key, label in section.items()}
        message = f"⚠ {labels.get(e.field, e.field or 'Settings')}: {e.message}. Nothing was changed."
        return [_message_html(message), *(gr.skip() for _ in values)]  # as typed, to be corrected
    message = f"{len(changed)} setting(s) changed: {', '.join(changed)}." if changed else "Nothing changed."
    return [_message_html(message), *(engine.options[key] for key in values)]


def _message_html(text: str) -> str:
    return f'<div id="settings_message">{html.escape(text)}</div>'
