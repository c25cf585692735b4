"""The single generation queue: requests from the UI and the API run one at a time, in order."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from webui.engine.engine import Engine
from webui.engine.request import GenerationRequest, GenerationResult
from webui.engine.xyz import AxisChoice, PlotOptions, PlotResult, run_plot
from webui.errors import UserError
from webui.extensions import plot_axes

log = logging.getLogger(__name__)


class JobQueue:
    """Jobs (a generation, an X/Y/Z plot) run one at a time on one worker thread, in the order submitted."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queue: queue.Queue[tuple[str, Callable[[], Any], Future]] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="generation-queue", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; the future holds its GenerationResult or the error that stopped it."""
        return self._submit("txt2img", lambda: self.engine.txt2img(request))

    def submit_plot(self, base: GenerationRequest, choices: list[AxisChoice], options: PlotOptions,
                    save_grid: bool | None = None) -> Future:
        """Queue an X/Y/Z plot over ``base`` (its axes: the built-in ones, then those extensions added); the future
        holds its PlotResult."""
        return self._submit("X/Y/Z plot",
                            lambda: run_plot(self.engine, base, choices, plot_axes(self.engine), options, save_grid))

    def run(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    def run_plot(self, base: GenerationRequest, choices: list[AxisChoice], options: PlotOptions,
                 save_grid: bool | None = None) -> PlotResult:
        return self.submit_plot(base, choices, options, save_grid).result()

    def run_call(self, name: str, work: Callable[[], Any]) -> Any:
        """Run other engine work (loading a model) in the queue, after the jobs before it; its result."""
        return self._submit(name, work).result()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def interrupt(self) -> None:
        self.engine.progress.interrupt()

    def skip(self) -> None:
        self.engine.progress.skip()

    def _submit(self, name: str, work: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put((name, work, future))
        return future

    def _run(self) -> None:
        while True:
            name, work, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except Exception as e:  # the worker survives anything a job raises; the caller gets it
                if isinstance(e, UserError):
                    log.error("%s refused: %s", name, e)
                else:
                    log.exception("%s failed", name)
                future.set_exception(e)
