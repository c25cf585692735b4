"""The tabs extensions add, and the Extensions tab."""
from __future__ import annotations

from functools import partial

import gradio as gr

from webui.engine.engine import Engine
from webui.extensions import extensions_of
from webui.ui.common import option_input, set_option


def extension_tabs(engine: Engine) -> None:
    """The tabs extensions added; one whose build() fails says so, and its extension is disabled."""
    registry = extensions_of(engine)
    for tab in registry.tabs:
        with gr.Tab(tab.title):
            try:
                tab.build()
            except Exception as e:
                registry.fail(tab.owner, f"building its tab {tab.title!r}")
                gr.Markdown(f"⚠ Extension {tab.owner} failed building this tab and is disabled: {e}")


def extensions_tab(demo: gr.Blocks, engine: Engine) -> None:
    """Which extensions run, which failed and why, and their settings (when there are any extensions)."""
    registry = extensions_of(engine)
    if not registry.found:
        return
    with gr.Tab("Extensions"):
        table = gr.Markdown(registry.status_markdown(), elem_id="extensions_status")
        boxes = {setting.key: option_input(engine, setting.key, setting.label) for setting in registry.settings}
    for key, box in boxes.items():
        box.input(partial(set_option, engine, key), box, api_visibility="private")
    demo.load(lambda: {table: registry.status_markdown(), **{box: engine.options[key] for key, box in boxes.items()}},
              outputs=[table, *boxes.values()], api_visibility="private")  # by component: right with no boxes too
