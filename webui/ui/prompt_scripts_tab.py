"""The Prompt scripts tab: A1111's "Prompts from file or textbox" and "Prompt matrix" over the txt2img form's request
(or the img2img form's). Its inputs carry A1111's script argument names, so the API's path is the same from there
on (``webui.engine.prompt_lines``, ``webui.engine.prompt_matrix``)."""
from __future__ import annotations

from concurrent.futures import Future

import gradio as gr

from webui.engine.engine import Engine
from webui.engine.prompt_lines import POSITIONS
from webui.engine.prompt_lines import TITLE as LINES
from webui.engine.prompt_lines import PromptLines
from webui.engine.prompt_matrix import DELIMITERS, PROMPT_TYPES
from webui.engine.prompt_matrix import TITLE as MATRIX
from webui.engine.prompt_matrix import PromptMatrix
from webui.engine.xyz import PlotForecast
from webui.jobs import JobQueue
from webui.ui.common import Components
from webui.ui.forecast import forecast_html, keep_forecast_fresh
from webui.ui.generation import generator, output_column
from webui.ui.over_tab import margin_slider, over_tab, run_column

LINES_HINT = ('One prompt a line, or options: --prompt "a cat" --negative_prompt "blurry" --steps 30 --seed 5 '
              '--sampler_name "Euler a" --width 768 --sd_model other')


def prompt_scripts_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue, form: Components,
                       img2img_form: Components | None = None) -> None:
    """Pick a script, set its arguments, and run it over a tab's request."""
    inputs: Components = {}
    with gr.Row():
        with gr.Column(scale=3):
            inputs["script_name"] = gr.Radio([LINES, MATRIX], value=LINES, label="Script",
                                             elem_id="prompt_scripts_script")
            with gr.Group(visible=True) as lines_group:
                with gr.Row():
                    inputs["checkbox_iterate"] = gr.Checkbox(False, label="Iterate seed every line",
                                                             elem_id="prompt_scripts_checkbox_iterate")
                    inputs["checkbox_iterate_batch"] = gr.Checkbox(False, label="Use same random seed for all lines",
                                                                   elem_id="prompt_scripts_checkbox_iterate_batch")
                    inputs["prompt_position"] = gr.Radio(list(POSITIONS), value="start",
                                                         label="Insert prompts at the",
                                                         elem_id="prompt_scripts_prompt_position")
                inputs["prompt_txt"] = gr.Textbox("", label="List of prompt inputs", lines=7, placeholder=LINES_HINT,
                                                  elem_id="prompt_scripts_prompt_txt")
                upload = gr.File(label="Upload prompt inputs", type="binary", file_types=[".txt"],
                                 elem_id="prompt_scripts_file")
            with gr.Group(visible=False) as matrix_group:
                gr.Markdown("Split the prompt with `|`: the first part is in every image, each other part in half of "
                            "them (`a cat|red|wearing a hat`: 4 images).")
                with gr.Row():
                    inputs["put_at_start"] = gr.Checkbox(False, label="Put variable parts at start of prompt",
                                                         elem_id="prompt_scripts_put_at_start")
                    inputs["different_seeds"] = gr.Checkbox(False, label="Use different seed for each picture",
                                                            elem_id="prompt_scripts_different_seeds")
                with gr.Row():
                    inputs["prompt_type"] = gr.Radio(list(PROMPT_TYPES), value="positive", label="Select prompt",
                                                     elem_id="prompt_scripts_prompt_type")
                    inputs["variations_delimiter"] = gr.Radio(list(DELIMITERS), value="comma",
                                                              label="Select joining char",
                                                              elem_id="prompt_scripts_variations_delimiter")
                    inputs["margin_size"] = margin_slider("prompt_scripts")
        column = run_column("prompt_scripts", img2img_form, "Generate", "Run over the request of the tab")
    out = output_column("prompt_scripts")

    given, base_request = over_tab(form, img2img_form, column.chooser, "prompt_scripts")

    def script(values: tuple) -> PromptLines | PromptMatrix:
        args = dict(zip(inputs, values[len(given):]))
        if args["script_name"] == MATRIX:
            return PromptMatrix(args["put_at_start"], args["different_seeds"], args["prompt_type"],
                                args["variations_delimiter"], int(args["margin_size"]))
        return PromptLines(args["prompt_txt"] or "", args["checkbox_iterate"], args["checkbox_iterate_batch"],
                           args["prompt_position"])

    def submit(values: tuple) -> Future:
        return jobs.submit_script(base_request(values), script(values))

    def forecast_text(*values) -> str:
        def forecast() -> PlotForecast:
            return script(values).forecast(engine, base_request(values))

        return forecast_html(forecast)

    run = generator(jobs, {**given, **inputs}, out, submit)
    done = column.generate.click(run, inputs=[*given.values(), *inputs.values()], outputs=list(out.values()),
                          api_name="prompt_scripts", show_progress="hidden", concurrency_limit=None)
    triggers = [column.chooser, inputs["script_name"], inputs["prompt_txt"], inputs["prompt_type"]]
    keep_forecast_fresh(column.forecast, forecast_text, [*given.values(), *inputs.values()], triggers, demo, done)
    column.interrupt.click(jobs.interrupt, queue=False, api_visibility="private")
    inputs["script_name"].change(lambda name: (gr.update(visible=name == LINES), gr.update(visible=name == MATRIX)),
                                 inputs["script_name"], [lines_group, matrix_group], queue=False,
                                 api_visibility="private")
    upload.upload(prompt_file_text, upload, inputs["prompt_txt"], queue=False, api_visibility="private")


def prompt_file_text(data: bytes | None) -> str | dict:
    """An uploaded prompt file's lines (UTF-8; bytes that are not are dropped, as A1111's), into the text box."""
    if data is None:
        return gr.skip()
    return "\n".join(line.strip() for line in data.decode("utf-8", errors="ignore").splitlines())
