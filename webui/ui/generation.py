"""A Generate button's side of the page: the job submitted through the queue, progress with ETA and a live preview
while it runs, then the gallery, the infotext, the status line and the memory panel."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any

import gradio as gr
from PIL import Image

from webui.engine.engine import Engine
from webui.engine.progress import Progress
from webui.engine.request import GenerationResult
from webui.engine.xyz import PlotResult
from webui.errors import UserError
from webui.jobs import JobQueue
from webui.ui.common import Components, counted, duration, error_html, field_label, status_html
from webui.ui.memory_panel import PLOTS, memory_panel, panel_values

POLL_SECONDS = 0.3


def output_column(prefix: str) -> Components:
    """A Generate handler's outputs, by name (elem_ids ``{prefix}_gallery`` ...)."""
    out = {
        "preview": gr.Image(label="Preview", type="pil", visible=False, interactive=False, height=320,
                            elem_id=f"{prefix}_preview"),
        "gallery": gr.Gallery(label="Output", format="png", columns=4, height=480, object_fit="contain",
                              elem_id=f"{prefix}_gallery"),
        "status": gr.HTML(label="Status", elem_id=f"{prefix}_status"),
        "infotext": gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                               elem_id=f"{prefix}_infotext"),
    }
    out.update((f"memory_{name}", plot) for name, plot in memory_panel(prefix).items())
    out["infotexts"], out["last_seed"], out["selected"] = gr.State([]), gr.State(-1), gr.State(0)
    out["gallery"].select(selected_infotext, inputs=out["infotexts"], outputs=[out["infotext"], out["selected"]],
                          queue=False, api_visibility="private")
    return out


def selected_infotext(texts: list[str], evt: gr.SelectData) -> tuple[str, int]:
    """The picked image's infotext, and which it is (what Send to img2img sends)."""
    return (texts[evt.index] if 0 <= evt.index < len(texts) else ""), evt.index


def generator(jobs: JobQueue, inputs: Components, out: Components, submit: Callable[[tuple], Future]):
    """A Generate handler: submit the values of ``inputs`` (request fields, then any others), report progress and
    previews until done, then the images. The job's result is a GenerationResult, or a PlotResult shown as one."""
    engine = jobs.engine
    labels = {name: box.label for name, box in inputs.items()}

    def run(*values: Any) -> Iterator[dict]:
        yield {out["gallery"]: [], out["infotext"]: "", out["status"]: status_html("Starting…")}
        try:
            future = submit(values)
        except UserError as e:  # refused before it was queued (the queue is full): shown like any refused job
            future = Future()
            future.set_exception(e)
        try:
            while not wait([future], timeout=POLL_SECONDS).done:
                yield {out["status"]: progress_html(jobs.progress, future),
                       out["preview"]: live_preview(engine, jobs, future)}
        finally:  # Gradio stops the handler when its page goes away (a closed tab, a reload): so does the job
            if not future.done():
                jobs.abandon(future)
        yield finished(future, labels, out)

    # Name the parameters after the inputs: API clients call the endpoint with these keywords.
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=box.value)
         for name, box in inputs.items()])
    return run


def live_preview(engine: Engine, jobs: JobQueue, future: Future) -> dict:
    """This job's live preview at output size (its latents are 8x smaller); unchanged while there is none."""
    running = future.running() and engine.options["live_previews_enable"]
    image = jobs.progress.preview() if running else None
    if image is None:
        return gr.skip()
    return gr.update(value=image.resize((image.width * 8, image.height * 8), Image.Resampling.BILINEAR),
                     visible=True)


def finished(future: Future, labels: dict[str, str], out: Components) -> dict:
    hidden_preview = gr.update(value=None, visible=False)
    try:
        result: GenerationResult | PlotResult = future.result()
        made = made_text(result)
        if isinstance(result, PlotResult):
            result = result.as_result()
    except UserError as e:
        message = f"{field_label(e.field, labels)}: {e.message}" if e.field else e.message
        gr.Warning(message)
        return {out["status"]: error_html(message), out["preview"]: hidden_preview}
    except Exception as e:  # the queue survived it; show it and stay usable
        return {out["status"]: error_html(f"Generation failed: {type(e).__name__}: {e}"),
                out["preview"]: hidden_preview}
    plots = [out[f"memory_{name}"] for name in PLOTS]
    return {
        out["gallery"]: [str(path) if path else image for image, path in zip(result.images, result.saved_files())],
        out["infotext"]: result.infotexts[0] if result.infotexts else "",
        out["infotexts"]: result.infotexts,
        out["last_seed"]: result.seed,
        out["selected"]: 0,
        out["status"]: status_html(done_text(result, made)),
        out["preview"]: hidden_preview,
        **dict(zip(plots, panel_values(result.memory_timeline))),
    }


def progress_html(progress: Progress, future: Future) -> str:
    """The progress line of a submitted job: queued, loading, or percent, step, batch, plot cell and ETA (once the
    job has a measured step rate)."""
    if not future.running():
        return status_html("Waiting in the queue…")
    if not progress.active and not progress.cell_count:
        return status_html("Loading the model…")
    percent = progress.fraction * 100
    parts = [f"{percent:.0f}%"]
    if progress.active:  # else between two cells of a plot
        parts.append(f"step {progress.sampling_step}/{progress.sampling_steps}")
        if progress.job_count > 1:
            parts.append(f"batch {progress.job_no + 1}/{progress.job_count}")
    if progress.cell_count:
        parts.append(f"cell {min(progress.cell_no + 1, progress.cell_count)}/{progress.cell_count}")
    if progress.measured:
        parts.append(f"ETA {duration(progress.eta_seconds)}")
    bar = (f'<div style="height:6px;background:var(--neutral-200,#ddd);border-radius:3px;margin-top:4px">'
           f'<div style="width:{percent:.1f}%;height:100%;background:var(--color-accent,#f97316);'
           f'border-radius:3px"></div></div>')
    return status_html(" · ".join(parts)) + bar


def made_text(result: GenerationResult | PlotResult) -> str:
    """What a job made: its images, and a plot's or a prompt matrix's grids besides (the gallery may hold some or none
    of a plot's cells)."""
    if isinstance(result, PlotResult):
        images, grids = result.images_made, len(result.shown_grids)
    else:
        images, grids = len(result.images) - result.grids, result.grids
    return counted(images, "image") + (f" and {counted(grids, 'grid')}" if grids else "")


def done_text(result: GenerationResult, made: str) -> str:
    what = "Interrupted" if result.interrupted else "Done"
    text = f"{what}: {made} in {duration(result.seconds)}, seed {result.seed}."
    text = f"{text} {result.memory.line()}" if result.memory else text
    fast = [f"Fast path: {', '.join(result.fast)}."] if result.fast else []
    return " ".join([text, *fast, *result.notices])
