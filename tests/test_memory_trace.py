"""Memory over time (the UI's memory panel): what a generation and a plot record, and the plots' data."""
from __future__ import annotations

import pytest

from tests.conftest import make_engine
from tests.test_memory import REQ, model_bytes, set_budget, simulated_engine
from webui.engine.memory.manager import MB
from webui.engine.memory.trace import MemorySample, thinned
from webui.engine.request import GenerationRequest
from webui.engine.xyz import AxisChoice, PlotOptions, run_plot
from webui.extensions import plot_axes
from webui.ui.memory_panel import panel_values, time_frame, timeline_frame, weights_frame

PHASES = ["loading", "text encoding", "denoising", "VAE decode"]


def test_a_generation_records_its_phases_placements_and_moves(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    result = engine.txt2img(GenerationRequest(**REQ))
    timeline = result.memory_timeline
    assert [p.name for p in timeline.phases] == PHASES
    assert all(a.end <= b.start + 1e-6 for a, b in zip(timeline.phases, timeline.phases[1:])), "one after another"
    times = [s.seconds for s in timeline.samples]
    assert times == sorted(times) and times[-1] <= timeline.phases[-1].end + 0.5
    sizes = {name: nbytes / MB for name, nbytes in model_bytes(engine).items()}
    assert {name: p.resident_mb for name, p in timeline.placements.items()} == pytest.approx(sizes)
    assert all(p.streamed_mb == 0 for p in timeline.placements.values()), "everything fits"
    assert timeline.moved_mb == pytest.approx(result.memory.moved_mb), "the moves the stats count, one by one"
    assert timeline.samples[-1].weights_mb == pytest.approx(sum(sizes.values())), "all resident at the end"
    assert all(s.device_mb is None for s in timeline.samples), "no GPU here: no GPU series"

    again = engine.txt2img(GenerationRequest(**REQ)).memory_timeline
    assert again.moves == [] and again.samples[0].weights_mb == pytest.approx(sum(sizes.values())), \
        "the next generation starts with the weights where they stayed and moves nothing"


def test_a_streamed_denoiser_shows_what_was_streamed(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQ))
    unet = model_bytes(engine)["denoiser"]
    set_budget(engine, unet * 0.5 / MB)
    timeline = engine.txt2img(GenerationRequest(**REQ)).memory_timeline
    denoiser = timeline.placements["denoiser"]
    assert 0 < denoiser.resident_mb < unet / MB * 0.5 and denoiser.streamed_mb > unet / MB * 0.4
    assert denoiser.resident_mb + denoiser.streamed_mb == pytest.approx(unet / MB)
    assert timeline.stream_mb > 0, "units were copied to the device step after step"
    weights = weights_frame(timeline).set_index(["component", "where"])["MB"]
    assert weights["denoiser", "streamed"] == round(denoiser.streamed_mb)


def test_a_plot_is_one_timeline_over_every_cell(tmp_path, sd1_file, sdxl_file):
    engine = make_engine(tmp_path, sd1_file, sdxl_file)
    plot = run_plot(engine, GenerationRequest(**REQ), [AxisChoice("Checkpoint name", f"{sd1_file.stem}, {sdxl_file.stem}"),
                                                       AxisChoice("Seed", "1, 2")],
                    plot_axes(engine), PlotOptions())
    names = [p.name for p in plot.memory_timeline.phases]
    assert names.count("loading") == 4 and names.count("denoising") == 4, "four cells in one recording"
    assert plot.as_result().memory_timeline is plot.memory_timeline
    assert {"denoiser", "vae", "text_encoder", "text_encoder_2"} <= set(plot.memory_timeline.placements)


def test_thinning_keeps_the_peaks():
    samples = [MemorySample(i / 10, None, 0.0, 100.0 + (500 if i == 777 else 0)) for i in range(2000)]
    kept = thinned(samples, 400)
    assert len(kept) <= 400 and max(s.ram_mb for s in kept) == 600.0
    assert thinned(samples[:10], 400) == samples[:10]


def test_the_panel_plots_the_timeline(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    timeline = engine.txt2img(GenerationRequest(**REQ)).memory_timeline
    frame = timeline_frame(timeline)
    assert set(frame["series"]) == {"RAM (this process)", "weights in use"}
    assert len(frame) == 2 * len(timeline.samples) and set(frame["phase"]) <= {*PHASES, ""}
    assert frame[frame["series"] == "RAM (this process)"]["MB"].min() > 0
    times = time_frame(timeline)
    assert list(times["part"]) == [*PHASES, "moving weights", "streaming weights"]
    assert times["seconds"].sum() > 0
    updates = panel_values(timeline)
    assert updates[2]["sort"] == list(times["part"]), "the bars in the order things happened"
    assert all(update["value"] is None for update in panel_values(None))


def test_a_cuda_trace_started_before_cuda_is_first_used_samples_nothing_allocated():
    """The allocator keeps no statistics until CUDA's first use (an engine's first job may start its trace then):
    0 MB allocated, not a failed job."""
    import torch

    from webui.engine.memory.trace import MemoryTrace

    trace = MemoryTrace(torch.device("cuda", 0), weights_bytes=0)
    trace.sample()
    assert torch.cuda.is_initialized() or trace.timeline().samples[-1].device_mb == 0.0
