"""The Gradio web UI.

It holds no engine logic: its controls read and write the settings store, its forms become GenerationRequests
(``txt2img.request_from_form``) submitted through the job queue, the same path the API takes. One module per part of
the page: the model row, the txt2img tab (with the LoRA browser and the output column and its memory panel), the
img2img tab (the same with an init image), the X/Y/Z plot, the prompt scripts, the checkpoint merger, PNG Info, Settings and the extensions' tabs.
"""
from __future__ import annotations

import gradio as gr

from webui.engine.engine import Engine
from webui.jobs import JobQueue
from webui.ui.extensions_tab import extension_tabs, extensions_tab
from webui.ui.img2img import img2img_tab, send_to_img2img
from webui.ui.extras_tab import extras_tab, send_to_extras
from webui.ui.merger_tab import merger_tab
from webui.ui.model_row import model_row
from webui.ui.png_info import png_info_tab
from webui.ui.prompt_scripts_tab import prompt_scripts_tab
from webui.ui.queue_tab import queue_tab
from webui.ui.settings_tab import settings_tab
from webui.ui.txt2img import CTRL_ENTER_JS, txt2img_tab
from webui.ui.xyz_tab import xyz_tab


def build_ui(engine: Engine, jobs: JobQueue) -> gr.Blocks:
    # delete_cache: uploads older than a day are removed every hour, and all of them when the server stops
    with gr.Blocks(title="Stable Diffusion web UI", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        if engine.options.problems:  # a corrupt config.json: said where the user looks, not only in the log
            gr.Markdown("\n".join(f"⚠ {problem}" for problem in engine.options.problems), elem_id="startup_problems")
        checkpoint = model_row(demo, engine)
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                txt2img = txt2img_tab(demo, engine, jobs, checkpoint)
            with gr.Tab("img2img", id="img2img"):
                img2img = img2img_tab(demo, engine, jobs, checkpoint)
            with gr.Tab("X/Y/Z plot", id="xyz"):
                xyz_tab(demo, engine, jobs, txt2img.form, img2img.form)
            with gr.Tab("Prompt scripts", id="prompt_scripts"):
                prompt_scripts_tab(demo, engine, jobs, txt2img.form, img2img.form)
            with gr.Tab("Extras", id="extras"):
                extras_image = extras_tab(demo, engine, jobs)
            with gr.Tab("PNG Info", id="png_info"):
                png_info_tab(engine, txt2img.form, tabs, img2img.form, extras_image)
            with gr.Tab("Checkpoint Merger", id="merger"):
                merger_tab(demo, engine, jobs)
            extension_tabs(engine)
            with gr.Tab("Queue", id="queue"):
                queue_tab(jobs)
            with gr.Tab("Settings", id="settings"):
                settings_tab(demo, engine)
            extensions_tab(demo, engine)
        for source in (txt2img, img2img):
            send_to_img2img(engine, source, img2img, tabs)
            send_to_extras(source, extras_image, tabs)
        demo.load(None, js=CTRL_ENTER_JS)
    return demo
