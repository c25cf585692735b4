"""Progress and its ETA, on a fake clock: what the sampling loop and the X/Y/Z plot report, and what the UI's progress
line and the API's /progress read from it."""
from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from webui.engine.formats.detect import Family
from webui.engine.progress import Progress
from webui.ui.generation import progress_html

LATENTS = torch.zeros(1, 4, 2, 2)


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def running() -> Future:
    future: Future = Future()
    future.set_running_or_notify_cancel()
    return future


def steps(progress: Progress, clock: Clock, numbers: range, seconds: float) -> None:
    """Sampling steps ``numbers`` of the current batch, ``seconds`` apart."""
    for number in numbers:
        clock.now += seconds
        progress.step(number, LATENTS, Family.SD1)


def test_loading_before_the_first_step_is_not_step_time(clock, running):
    """The issue's "ETA 2m 23s at step 1 of a 10 s job": a slow start (loading, prompt, warm-up) is not the rate."""
    progress = Progress(clock=clock)
    progress.begin("txt2img", job_count=1, steps=10)
    steps(progress, clock, range(1, 2), seconds=7.0)
    assert not progress.measured and progress.eta_seconds == 0.0
    assert "ETA" not in progress_html(progress, running), "no rate yet: no ETA rather than a wild one"
    steps(progress, clock, range(2, 3), seconds=0.5)
    assert progress.eta_seconds == pytest.approx(8 * 0.5)
    assert "20% · step 2/10 · ETA 4s" in progress_html(progress, running)
    clock.now += 1.5
    assert progress.eta_seconds == pytest.approx(2.5), "counted down between steps"
    steps(progress, clock, range(3, 11), seconds=0.5)
    assert progress.eta_seconds == 0.0


def test_the_rate_covers_every_batch(clock):
    progress = Progress(clock=clock)
    progress.begin("txt2img", job_count=2, steps=4)
    progress.next_batch(0)
    steps(progress, clock, range(1, 5), seconds=1.0)
    clock.now += 2.0  # decoding the batch, encoding the next: part of the rate from here on
    progress.next_batch(1)
    steps(progress, clock, range(1, 3), seconds=1.0)
    # from the first step (1/8 done) to 6/8 done: 7 s; 2/8 left
    assert progress.eta_seconds == pytest.approx(7.0 / 5 * 2)


def test_a_plot_measures_its_rate_over_its_cells_so_far(clock, running):
    """The ETA does not start over at each cell, and the loading between cells counts (it comes again)."""
    progress = Progress(clock=clock)
    progress.begin_plot(3)
    clock.now += 30.0  # the first cell's model loads
    progress.begin("txt2img", job_count=1, steps=4)
    steps(progress, clock, range(1, 5), seconds=1.0)  # 1/12 … 4/12 of the plot, at 1 s a step
    progress.end()
    progress.next_cell()
    assert progress.job_count == 1, "between two cells the plot still runs: /progress is not idle"
    between = progress_html(progress, running)
    assert "33% · cell 2/3 · ETA" in between and "step" not in between
    clock.now += 2.0  # the next cell's prompt and model
    progress.begin("txt2img", job_count=1, steps=4)
    steps(progress, clock, range(1, 2), seconds=1.0)
    # 6 s from 1/12 to 5/12 done: 18 s for the whole plot, 7/12 of it left
    assert progress.eta_seconds == pytest.approx(18 * 7 / 12)
    assert "42% · step 1/4 · cell 2/3 · ETA 10s" in progress_html(progress, running)
    progress.end()
    progress.next_cell()
    progress.end_plot()
    assert (progress.job_count, progress.fraction, progress.measured) == (0, 0.0, False)


def test_a_job_ends_idle_as_a1111s_state_end_leaves_it(clock):
    """``job_count`` back to 0: API clients (webuiapi's util_wait_for_ready) wait for it."""
    progress = Progress(clock=clock)
    progress.begin("txt2img", job_count=2, steps=5)
    progress.next_batch(1)
    steps(progress, clock, range(1, 4), seconds=1.0)
    progress.end()
    assert (progress.job, progress.job_count, progress.job_no, progress.sampling_step) == ("", 0, 0, 0)
    assert progress.fraction == 0.0 and progress.eta_seconds == 0.0 and not progress.active


def test_the_next_job_starts_without_the_last_ones_eta(clock, running):
    progress = Progress(clock=clock)
    progress.begin("txt2img", job_count=1, steps=10)
    steps(progress, clock, range(1, 11), seconds=0.1)
    progress.end()
    assert progress_html(progress, running).count("Loading the model") == 1, "the next job, loading"
    progress.begin("txt2img", job_count=1, steps=10)
    steps(progress, clock, range(1, 2), seconds=60.0)
    assert not progress.measured and "ETA" not in progress_html(progress, running)
    assert "Waiting in the queue" in progress_html(progress, Future())
