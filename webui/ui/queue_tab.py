"""The Queue tab: where jobs run (this process, or the Ray Serve replicas), what runs now and how many wait; it
refreshes itself every second while the page is open."""
from __future__ import annotations

import html

import gradio as gr

from webui.jobs import JobQueue

REFRESH_SECONDS = 1.0


def queue_html(jobs: JobQueue) -> str:
    where, running, waiting = jobs.overview()
    rows = "".join(f"<tr><td>{html.escape(job.name)}</td><td>{job.done} of {job.parts}</td>"
                   f"<td>{html.escape(job.where)}</td></tr>" for job in running)
    table = (f"<table><tr><th>job</th><th>parts made</th><th>where</th></tr>{rows}</table>" if running
             else "<p>Nothing is running.</p>")
    return (f"<div id='queue_view'><p><b>Engines:</b> {html.escape(where)}</p>{table}"
            f"<p><b>Waiting:</b> {waiting}</p></div>")


def queue_tab(jobs: JobQueue) -> None:
    view = gr.HTML(queue_html(jobs))
    gr.Timer(REFRESH_SECONDS).tick(lambda: queue_html(jobs), outputs=view, show_progress="hidden")
