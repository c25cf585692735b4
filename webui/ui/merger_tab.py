"""The Checkpoint Merger tab (A1111's): A, B and C, the method and multiplier, precision and format, a VAE and LoRAs
to bake in, and Merge, through the job queue (``Engine.merge_checkpoints``); its status line counts the tensors as they
are written, and the new file is listed in the checkpoint dropdowns at once."""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from concurrent.futures import wait

import gradio as gr

from webui.engine.engine import Engine
from webui.engine.merge.merger import FORMATS, GGUF_TYPES, METHODS, PRECISIONS, MergeRequest, lora_entry
from webui.errors import UserError
from webui.jobs import JobQueue
from webui.ui.common import duration, error_html, field_label, status_html
from webui.ui.model_row import checkpoint_choices, vae_choices

POLL_SECONDS = 0.3
# The form's inputs by MergeRequest field, in the order the handler takes them; their labels name them in errors.
FIELDS = ("primary", "secondary", "tertiary", "method", "multiplier", "precision", "file_format", "gguf_type",
          "custom_name", "bake_in_vae", "loras", "discard_weights", "overwrite")


def merger_tab(demo: gr.Blocks, engine: Engine, jobs: JobQueue) -> None:
    titles, _ = checkpoint_choices(engine)
    form: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column():
            gr.Markdown("A new checkpoint from A, B and C: *Weighted sum* A·(1−M) + B·M, *Add difference* "
                        "A + (B − C)·M, *No interpolation* A alone (to bake a VAE or LoRAs in, or convert). Written a "
                        "tensor at a time, so it takes far less memory than the checkpoints.")
            with gr.Row():
                for name, label in (("primary", "Primary model (A)"), ("secondary", "Secondary model (B)"),
                                    ("tertiary", "Tertiary model (C)")):
                    form[name] = gr.Dropdown(titles, value=None, label=label, elem_id=f"merger_{name}")
            form["method"] = gr.Radio(list(METHODS), value="Weighted sum", label="Interpolation Method",
                                      elem_id="merger_interp_method")
            form["multiplier"] = gr.Slider(0, 1, value=0.3, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                                           elem_id="merger_multiplier")
            with gr.Row():
                form["precision"] = gr.Radio(list(PRECISIONS), value="fp16", label="Precision",
                                             elem_id="merger_precision")
                form["file_format"] = gr.Radio(list(FORMATS), value="safetensors", label="Checkpoint format",
                                               elem_id="merger_checkpoint_format")
                form["gguf_type"] = gr.Dropdown(list(GGUF_TYPES), value="Q8_0", label="GGUF type",
                                                elem_id="merger_gguf_type")
            form["custom_name"] = gr.Textbox("", label="Custom Name (Optional)", elem_id="merger_custom_name")
            with gr.Row():
                form["bake_in_vae"] = gr.Dropdown(vae_choices(engine)[0][1:], value="None",  # (not "Automatic")
                                                  label="Bake in VAE", elem_id="merger_bake_in_vae")
                form["loras"] = gr.Textbox("", label="Bake in LoRAs", placeholder="name:weight, name:weight",
                                           elem_id="merger_loras")
            with gr.Row():
                form["discard_weights"] = gr.Textbox("", label="Discard weights with matching name",
                                                     elem_id="merger_discard_weights")
                form["overwrite"] = gr.Checkbox(False, label="Overwrite a file of that name", elem_id="merger_overwrite")
            merge = gr.Button("Merge", variant="primary", elem_id="merger_merge")
        with gr.Column():
            status = gr.HTML(elem_id="merger_status")
    labels = {name: box.label for name, box in form.items()}

    def run(*values) -> Iterator[str]:
        fields = dict(zip(FIELDS, values))
        try:
            request = merge_request(fields)
            future = jobs.submit_call("merge", lambda: engine.merge_checkpoints(request))
        except UserError as e:
            yield error_html(f"{field_label(e.field, labels)}: {e.message}" if e.field else e.message)
            return
        while not wait([future], timeout=POLL_SECONDS).done:
            progress = engine.progress
            yield status_html(f"Merging: tensor {progress.sampling_step} of {progress.sampling_steps}"
                              if future.running() and progress.sampling_steps else "Waiting in the queue…")
        try:
            result = future.result()
        except UserError as e:
            yield error_html(f"{field_label(e.field, labels)}: {e.message}" if e.field else e.message)
            return
        written = ", ".join(path.name for path in result.paths)
        yield status_html(" ".join([f"Saved {written}: {result.tensors} tensors in {duration(result.seconds)}.",
                                    *result.notices]))

    # Name the parameters after the fields: API clients call the endpoint with these keywords.
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=form[name].value) for name in FIELDS])
    done = merge.click(run, inputs=[form[name] for name in FIELDS], outputs=status, api_name="merge_checkpoints",
                       concurrency_limit=None)
    dropdowns = [form["primary"], form["secondary"], form["tertiary"]]
    done.then(lambda: [gr.update(choices=checkpoint_choices(engine)[0])] * 3, outputs=dropdowns,
              api_visibility="private")
    demo.load(lambda: [gr.update(choices=checkpoint_choices(engine)[0])] * 3, outputs=dropdowns,
              api_visibility="private")


def merge_request(fields: dict) -> MergeRequest:
    """The form's values as a request: empty choices as none, the LoRAs' "name:weight" list read."""
    loras = tuple(lora_entry(entry) for entry in (fields.pop("loras") or "").split(",") if entry.strip())
    chosen = {name: value for name, value in fields.items() if value not in (None, "", "None")}
    if "primary" not in chosen:
        raise UserError("choose the checkpoint to merge (A)", field="primary")
    return MergeRequest(**chosen, loras=loras)
