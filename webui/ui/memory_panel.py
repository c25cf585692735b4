"""The memory panel under a gallery: after each generation, memory over time (GPU, weights on the GPU, RAM), where
each component's weights were (resident or streamed) and where the time went (phases, moving weights)."""
from __future__ import annotations

from bisect import bisect_left

import gradio as gr
import pandas as pd

from webui.engine.memory.trace import MemoryTimeline

PLOTS = ("timeline", "weights", "time")
WHERE_COLORS = {"resident": "#16a34a", "streamed": "#f97316"}


def memory_panel(prefix: str) -> dict[str, gr.components.Component]:
    """The panel's plots (elem_ids ``{prefix}_memory_timeline`` ...), empty until a generation fills them."""
    with gr.Accordion("Memory", open=True, elem_id=f"{prefix}_memory"):
        timeline = gr.LinePlot(x="seconds", y="MB", color="series", title="Memory over time", x_title="seconds",
                               y_title="MB", tooltip=["series", "MB", "seconds", "phase"], height=260,
                               elem_id=f"{prefix}_memory_timeline")
        with gr.Row():
            weights = gr.BarPlot(x="component", y="MB", color="where", color_map=WHERE_COLORS,
                                 title="Weights while they ran", y_title="MB", height=220, x_label_angle=-40,
                                 elem_id=f"{prefix}_memory_weights")
            time = gr.BarPlot(x="part", y="seconds", title="Where the time went", y_title="seconds", height=220,
                              x_label_angle=-40, elem_id=f"{prefix}_memory_time")
    return dict(zip(PLOTS, (timeline, weights, time)))


def panel_values(timeline: MemoryTimeline | None) -> list[dict]:
    """The three plots' updates, in PLOTS order (emptied without a timeline)."""
    if timeline is None:
        return [gr.update(value=None)] * len(PLOTS)
    times = time_frame(timeline)
    return [gr.update(value=timeline_frame(timeline)), gr.update(value=weights_frame(timeline)),
            gr.update(value=times, sort=list(times["part"]))]  # in the order things happened


def timeline_frame(timeline: MemoryTimeline) -> pd.DataFrame:
    """One row per sample and series: GPU memory allocated (on a GPU), weights on the device, this process's RAM."""
    on_gpu = timeline.device.startswith("cuda")
    ends = [p.end for p in timeline.phases]  # in time order: a plot's thousands of phases are searched, not scanned
    rows = []
    for sample in timeline.samples:
        at = bisect_left(ends, sample.seconds)
        phase = timeline.phases[at].name if at < len(ends) and timeline.phases[at].start <= sample.seconds else ""
        series = [("RAM (this process)", sample.ram_mb),
                  ("weights on the GPU" if on_gpu else "weights in use", sample.weights_mb)]
        if sample.device_mb is not None:
            series.insert(0, ("GPU memory allocated", sample.device_mb))
        rows += [{"seconds": round(sample.seconds, 2), "MB": round(mb), "series": name, "phase": phase}
                 for name, mb in series]
    return pd.DataFrame(rows, columns=["seconds", "MB", "series", "phase"])


def weights_frame(timeline: MemoryTimeline) -> pd.DataFrame:
    """Per component, the MB that stayed on the device and those streamed to it layer by layer."""
    rows = [{"component": name, "MB": round(mb), "where": where}
            for name, placement in timeline.placements.items()
            for where, mb in (("resident", placement.resident_mb), ("streamed", placement.streamed_mb))]
    return pd.DataFrame(rows, columns=["component", "MB", "where"])


def time_frame(timeline: MemoryTimeline) -> pd.DataFrame:
    """Seconds per phase, then the seconds spent moving weights (between phases) and streaming them (during)."""
    parts = {**timeline.phase_seconds(), "moving weights": timeline.move_seconds,
             "streaming weights": timeline.stream_seconds}
    return pd.DataFrame([{"part": part, "seconds": round(seconds, 3)} for part, seconds in parts.items()],
                        columns=["part", "seconds"])
