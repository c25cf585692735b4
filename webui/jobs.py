"""The single generation queue: requests from the UI and the API run one at a time, in order."""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from webui.engine.engine import Engine
from webui.engine.request import GenerationRequest, GenerationResult
from webui.errors import UserError

log = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queue: queue.Queue[tuple[GenerationRequest, Future]] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="generation-queue", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; the future holds its GenerationResult or the error that stopped it."""
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def run(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def interrupt(self) -> None:
        self.engine.progress.interrupt()

    def skip(self) -> None:
        self.engine.progress.skip()

    def _run(self) -> None:
        while True:
            request, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.engine.txt2img(request))
            except Exception as e:  # the worker survives anything a job raises; the caller gets it
                if isinstance(e, UserError):
                    log.error("txt2img refused: %s", e)
                else:
                    log.exception("txt2img failed")
                future.set_exception(e)
