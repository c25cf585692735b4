"""A generation tab's prompt styles, as A1111's: the styles of styles.csv to apply (a request field, applied by the
engine to the prompts of each job), a button that writes them into the prompt boxes instead, and one that saves the
prompt boxes as a style of the name given."""
from __future__ import annotations

from functools import partial

import gradio as gr

from webui.engine.engine import Engine
from webui.engine.styles import PromptStyle
from webui.errors import UserError
from webui.ui.common import Components


def style_inputs(demo: gr.Blocks, engine: Engine, form: Components, tab: str) -> None:
    """``form["styles"]`` and its buttons, under a tab's Generate (``form`` has the prompts already)."""
    # (a name the file no longer has, or one a client sends, reaches the engine, whose notices name it)
    form["styles"] = gr.Dropdown(list(engine.styles.all()), value=[], multiselect=True, label="Styles",
                                 allow_custom_value=True, elem_id=f"{tab}_styles")
    with gr.Row():
        apply = gr.Button("📋 Apply to prompts", size="sm", elem_id=f"{tab}_style_apply")
        save = gr.Button("💾 Save as style", size="sm", elem_id=f"{tab}_style_save")
    name = gr.Textbox("", show_label=False, placeholder="Style name", elem_id=f"{tab}_style_name", max_lines=1)
    prompts = [form["prompt"], form["negative_prompt"]]
    apply.click(partial(apply_styles, engine), [*prompts, form["styles"]], [*prompts, form["styles"]], queue=False,
                api_visibility="private")
    save.click(partial(save_style, engine), [name, *prompts], form["styles"], queue=False, api_visibility="private")
    demo.load(lambda: gr.update(choices=list(engine.styles.all())), outputs=form["styles"], api_visibility="private")


def apply_styles(engine: Engine, prompt: str, negative: str, names: list[str] | None) -> tuple[str, str, list[str]]:
    """The prompt boxes with the selected styles written in, and the selection cleared."""
    prompt, negative, _ = engine.styles.apply(prompt, negative, names or [])
    return prompt, negative, []


def save_style(engine: Engine, name: str, prompt: str, negative: str) -> dict:
    """The prompt boxes saved as the style ``name`` (replacing one of that name); the Styles list read again. A
    style that cannot be saved (no name, a file that cannot be written) says why and changes nothing."""
    try:
        engine.styles.save(PromptStyle(name.strip(), prompt, negative))
    except UserError as e:
        gr.Warning(f"Style not saved: {e.message}")
        return gr.update()
    gr.Info(f"Saved the style {name.strip()!r} in {engine.styles.path.name}")
    return gr.update(choices=list(engine.styles.all()))
