"""Several requests generated one after another as one job: a dynamic prompt's images, the prompt scripts' lines and
combinations. Progress counts them as a plot's cells, for one ETA over them all (inside an X/Y/Z cell the plot
counts); an interrupt stops after the current one, and what was made is kept."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest, GenerationResult


def generate_each(progress: Progress, generate: Callable[[GenerationRequest], GenerationResult],
                  requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Each request's result, in order, up to the one an interrupt stopped."""
    made: list[GenerationResult] = []
    counted = not progress.cell_count
    if counted:
        progress.begin_plot(len(requests))
    try:
        for request in requests:
            made.append(generate(request))
            if counted:
                progress.next_cell()
            if made[-1].interrupted or progress.interrupted:
                break
    finally:
        if counted:
            progress.end_plot()
    return made
