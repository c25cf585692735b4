"""The single generation queue: requests from the UI and the API run one at a time, in order."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from webui.engine.engine import Engine
from webui.engine.prompt_lines import PromptLines
from webui.engine.progress import Progress
from webui.engine.prompt_matrix import PromptMatrix
from webui.engine.request import GenerationRequest, GenerationResult
from webui.engine.xyz import AxisChoice, PlotOptions, run_plot
from webui.errors import Busy, UserError
from webui.extensions import plot_axes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overrides:
    """Options one job sets for itself (A1111's ``override_settings``): in force while it runs, then put back, or
    kept once it succeeds when ``restore`` is False (``override_settings_restore_afterwards``)."""

    values: dict[str, Any] = field(default_factory=dict)
    restore: bool = True


@dataclass(frozen=True)
class RunningJob:
    """A job the queue's view shows: its name, its parts made of all (a batch count's images, a plot's cells, where
    they are spread), and where it runs."""

    name: str
    done: int
    parts: int
    where: str


class JobQueue:
    """Jobs (a generation, an X/Y/Z plot, a prompt script) run one at a time on one worker thread, in the order submitted."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queue: queue.Queue[tuple[str, Callable[[], Any], Future]] = queue.Queue()
        self._submitting = threading.Lock()
        self._running: Future | None = None
        self._running_name = ""
        self.on_start: list[Callable[[Future], None]] = []  # told each job's future as it starts (the job API)
        self._worker = threading.Thread(target=self._run, name="generation-queue", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest, overrides: Overrides | None = None) -> Future:
        """Queue a request; the future holds its GenerationResult or the error that stopped it."""
        return self._submit("txt2img", lambda: self.engine.txt2img(request), overrides)

    def submit_img2img(self, request: GenerationRequest, overrides: Overrides | None = None) -> Future:
        """Queue an img2img request (one with init images); the future holds its GenerationResult."""
        return self._submit("img2img", lambda: self.engine.img2img(request), overrides)

    def submit_plot(self, base: GenerationRequest, choices: list[AxisChoice], options: PlotOptions,
                    save_grid: bool | None = None, overrides: Overrides | None = None) -> Future:
        """Queue an X/Y/Z plot over ``base`` (its axes: the built-in ones, then those extensions added); the future
        holds its PlotResult."""
        return self._submit("X/Y/Z plot",
                            lambda: run_plot(self.engine, base, choices, plot_axes(self.engine), options, save_grid),
                            overrides)

    def submit_script(self, base: GenerationRequest, script: PromptLines | PromptMatrix,
                      overrides: Overrides | None = None) -> Future:
        """Queue a prompt script over ``base`` (txt2img, or img2img where it has init images); the future holds its
        GenerationResult."""
        return self._submit(script.title, lambda: script.run(self.engine, base), overrides)

    def submit_call(self, name: str, work: Callable[[], Any], overrides: Overrides | None = None) -> Future:
        """Queue other engine work (loading a model, a forecast), after the jobs before it; the future holds its
        result."""
        return self._submit(name, work, overrides)

    @property
    def pending(self) -> int:
        """Jobs waiting to run; those whose clients went away (cancelled) no longer count."""
        with self._queue.mutex:
            return sum(not future.cancelled() for _name, _work, future in self._queue.queue)

    def overview(self) -> tuple[str, list[RunningJob], int]:
        """For the UI's queue view: where jobs run, the jobs running, how many wait."""
        running = [] if self._running is None else [RunningJob(self._running_name, 0, 1, "this process")]
        return f"one engine, in this process ({self.engine.device})", running, self.pending

    @property
    def progress(self) -> Progress:
        """What the running job has done: /progress and the UI's progress line read it."""
        return self.engine.progress

    def interrupt(self) -> None:
        self.engine.progress.interrupt()

    def abandon(self, future: Future) -> None:
        """The job of a client that went away (an API caller, a closed browser tab): taken out of the queue if it
        waits, interrupted if it runs (A1111 works on for nobody); logged."""
        if future.cancel():
            log.info("A client went away; its job was dropped from the queue.")
        elif self._running is future and not future.done():
            self.interrupt()
            log.info("A client went away; its job was interrupted.")

    def skip(self) -> None:
        self.engine.progress.skip()

    def _submit(self, name: str, work: Callable[[], Any], overrides: Overrides | None = None) -> Future:
        most = self.engine.options.get("max_queued_jobs")
        future: Future = Future()
        with self._submitting:  # the count and the put together: callers on many threads never pass the cap
            if self.pending >= most:
                raise Busy(f"{self.pending} jobs are waiting already (the most is {most}, max_queued_jobs in "
                           "Settings); try again when some have finished")
            self._queue.put((name, work if overrides is None else self._overridden(work, overrides), future))
        return future

    def _overridden(self, work: Callable[[], Any], overrides: Overrides) -> Callable[[], Any]:
        options = self.engine.options

        def run() -> Any:
            with options.overridden(overrides.values):
                result = work()
            if not overrides.restore:
                options.update(overrides.values)
            return result

        return run

    def _run(self) -> None:
        while True:
            name, work, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            timer = self._time_limit(name)
            self._running, self._running_name = future, name
            try:
                run_into(future, name, lambda: timed_out_noted(work(), timer), self.on_start)
            finally:
                self._running = None
                if timer is not None:
                    timer.cancel()

    def _time_limit(self, name: str, interrupt: Callable[[], None] | None = None) -> threading.Timer | None:
        """The option max_job_seconds: a job still running then is interrupted (``interrupt``; what it made is
        kept)."""
        seconds = self.engine.options.get("max_job_seconds")
        if not seconds:
            return None

        def time_up() -> None:
            log.warning("%s ran for %s s (max_job_seconds): interrupted.", name, seconds)
            (interrupt or self.engine.progress.interrupt)()

        timer = threading.Timer(seconds, time_up)
        timer.daemon = True
        timer.start()
        return timer


def run_into(future: Future, name: str, work: Callable[[], Any], on_start: list[Callable[[Future], None]]) -> None:
    """A started job's work, its result or error put in its future (the caller gets either; the queue's worker
    survives anything): ``on_start`` told first; a refusal logged as one, anything else with its traceback."""
    try:
        for started in on_start:
            started(future)
        future.set_result(work())
    except Exception as e:
        if isinstance(e, UserError):
            log.error("%s refused: %s", name, e)
        else:
            log.exception("%s failed", name)
        future.set_exception(e)


def timed_out_noted(result: Any, timer: threading.Timer | None) -> Any:
    """``result``, with a notice where max_job_seconds stopped it."""
    if timer is not None and timer.finished.is_set() and isinstance(result, GenerationResult):
        result.notices.append(f"Stopped after {timer.interval:g} s (max_job_seconds in Settings); the images made by "
                              "then are kept.")
    return result
