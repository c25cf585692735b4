"""The ingress's queue over Ray Serve replicas: JobQueue's interface (the UI, the API and the job API use it
unchanged), its generations spread over the replicas.

A job's images are made as parts: each image of a batch count, each cell of an X/Y/Z plot is a part of its own, with
the seed it has in one process, so the images, their infotexts and the grid are byte for byte the single process's;
parts go to free replicas, preferring one that holds the part's checkpoint. A part whose replica dies is made again
on another (the same seed: the same image), and nothing already made is lost. Parts come back here, where the images
are saved as one process saves them. Other engine work (extras, detection, merges, forecasts) runs on this process's
own engine, in the inherited queue's worker."""
from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from webui.engine.conditioning.dynamic import has_syntax
from webui.engine.engine import Engine
from webui.engine.generate import resolve_seed
from webui.engine.prompt_lines import PromptLines
from webui.engine.prompt_matrix import PromptMatrix
from webui.engine.request import GenerationRequest, GenerationResult, combined
from webui.engine.xyz import AxisChoice, Cell, Cells, PlotOptions, run_plot, saved_grid
from webui.errors import Busy, UserError
from webui.extensions import plot_axes
from webui.jobs import JobQueue, Overrides, RunningJob, run_into, timed_out_noted
from webui.serve.parts import Part, PartDone, PartFailed, ProgressReport

log = logging.getLogger(__name__)
TRIES = 3  # a part is made on at most this many replicas (each that died mid-part, then another)
WAITING_THREADS = 32  # a job's parts awaited at once (Serve queues them for the replicas either way)
RETRY_WAIT = 2.0  # seconds before trying again: Serve notices a dead replica and routes around it
NOT_SAVED_THERE = {"samples_save": False, "grid_save": False}  # replicas save nothing: the ingress does
PART_LINE = re.compile(r"(?P<job>job\d+)\.(?P<part>\d+): made on replica (?P<pid>\d+)@\S+ from (?P<start>[\d.]+) to "
                       r"(?P<end>[\d.]+), (?P<switches>\d+) model switch")


@dataclass(frozen=True)
class PartMade:
    """A part as the ingress's log line tells it (tests and benchmarks read where each part ran)."""

    job: str
    part: int
    pid: int
    start: float
    end: float
    switches: int  # model switches on its replica so far


def parts_made(log: str) -> list[PartMade]:
    return [PartMade(m["job"], int(m["part"]), int(m["pid"]), float(m["start"]), float(m["end"]), int(m["switches"]))
            for m in PART_LINE.finditer(log)]


@dataclass
class RemoteJob:
    """A job on the replicas: its parts as they go, for /progress, Interrupt and Skip."""

    id: str
    name: str
    plot: bool = False
    parts: list[str] = field(default_factory=list)
    done: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    notices: list[str] = field(default_factory=list)
    replicas: set[str] = field(default_factory=set)  # where its parts were made


class ServeQueue(JobQueue):
    def __init__(self, engine: Engine, handle: Any, board: Any, replicas: int):
        super().__init__(engine)
        self.handle, self.board, self.replicas = handle, board, replicas
        self._pool = ThreadPoolExecutor(max_workers=replicas, thread_name_prefix="serve-job")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting = 0
        self._running_jobs: list[RemoteJob] = []  # oldest first
        self._progress = ClusterProgress(self)

    # ---- JobQueue's interface ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, overrides: Overrides | None = None) -> Future:
        return self._remote("txt2img", lambda job: self._generation(job, "txt2img", request, overrides), overrides)

    def submit_img2img(self, request: GenerationRequest, overrides: Overrides | None = None) -> Future:
        return self._remote("img2img", lambda job: self._generation(job, "img2img", request, overrides), overrides)

    def submit_plot(self, base: GenerationRequest, choices: list[AxisChoice], options: PlotOptions,
                    save_grid: bool | None = None, overrides: Overrides | None = None) -> Future:
        def work(job: RemoteJob) -> Any:
            job.plot = True
            run_cells = lambda b, planned: self._cells(job, b, planned, overrides)  # noqa: E731
            return run_plot(self.engine, base, choices, plot_axes(self.engine), options, save_grid, run_cells)

        return self._remote("X/Y/Z plot", work, overrides)

    def submit_script(self, base: GenerationRequest, script: PromptLines | PromptMatrix,
                      overrides: Overrides | None = None) -> Future:
        return self._remote(script.title, lambda job: self._script(job, base, script, overrides), overrides)

    @property
    def pending(self) -> int:
        return super().pending + self._waiting

    def overview(self) -> tuple[str, list[RunningJob], int]:
        where, running, waiting = super().overview()
        with self._lock:
            jobs = list(self._running_jobs)
        running += [RunningJob(job.name, job.done, len(job.parts), ", ".join(sorted(job.replicas)) or "on the replicas")
                    for job in jobs]
        return f"{self.replicas} engine replica(s) on Ray Serve; other work on this process's CPU", running, waiting

    @property
    def progress(self) -> ClusterProgress:
        return self._progress

    def interrupt(self) -> None:
        self._ask(interrupt=True)

    def skip(self) -> None:
        self._ask(skip=True)

    def abandon(self, future: Future) -> None:
        if future.cancel():
            log.info("A client went away; its job was dropped from the queue.")
        elif future.running():
            job = getattr(future, "remote_job", None)
            if job is not None:
                self._ask(interrupt=True, jobs=[job])
                log.info("A client went away; its job was interrupted.")

    # ---- jobs -------------------------------------------------------------------------------------------------

    def _remote(self, name: str, work: Callable[[RemoteJob], Any], overrides: Overrides | None) -> Future:
        """Queue ``work`` (run on a job thread of its own: its parts wait on the replicas, not here); the future
        holds its result. The job's overrides go with its parts (they are not set here, where jobs run side by
        side), and are kept afterwards where they ask to be."""
        most = self.engine.options.get("max_queued_jobs")
        future: Future = Future()
        job = RemoteJob(f"job{next(self._ids)}", name)
        future.remote_job = job  # (abandon finds the job of a future)
        with self._lock:
            if self.pending >= most:
                raise Busy(f"{self.pending} jobs are waiting already (the most is {most}, max_queued_jobs in "
                           "Settings); try again when some have finished")
            self._waiting += 1

        def run() -> None:
            with self._lock:
                self._waiting -= 1
            if not future.set_running_or_notify_cancel():
                return
            job.started = time.monotonic()
            with self._lock:
                self._running_jobs.append(job)
            timer = self._time_limit(name, lambda: self._ask(interrupt=True, jobs=[job]))
            try:
                run_into(future, name, lambda: timed_out_noted(self._kept(work(job), overrides), timer),
                         self.on_start)
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    self._running_jobs.remove(job)
                self._forget(job.parts)

        self._pool.submit(run)
        return future

    def _kept(self, result: Any, overrides: Overrides | None) -> Any:
        """``result``; the job's overrides stored once it succeeded, where they ask (A1111's
        ``override_settings_restore_afterwards: false``)."""
        if overrides is not None and not overrides.restore:
            self.engine.options.update(overrides.values)
        return result

    def _generation(self, job: RemoteJob, mode: str, request: GenerationRequest,
                    overrides: Overrides | None) -> GenerationResult:
        """One request; a batch count spread over the replicas, one part per batch, each with its seeds."""
        options = self._options(overrides)
        if request.n_iter > 1 and not (options["dp_enabled"] and has_syntax(request.prompt, request.negative_prompt)):
            seed, subseed = resolve_seed(request.seed), resolve_seed(request.subseed)
            step = request.batch_size
            requests = [replace(request, seed=seed + i * step, subseed=subseed + i * step, n_iter=1)
                        for i in range(request.n_iter)]
        else:  # (dynamic prompts draw every image's prompt from one seed: one part)
            requests = [request]
        made = self._parts(job, [(mode, one, options) for one in requests])
        results = [m for m in made if m is not None]
        if not results:
            raise UserError("the job was interrupted before its first image was made")
        result = combined(results, job.notices)
        result.request = request
        result.interrupted = result.interrupted or len(results) < len(requests)
        return result

    def _cells(self, job: RemoteJob, base: GenerationRequest, planned: list[tuple[tuple[int, int, int], Cell]],
               overrides: Overrides | None) -> tuple[Cells, bool]:
        """An X/Y/Z plot's cells, spread over the replicas (the plot's ``run_cells``)."""
        mode = "txt2img" if base.init_images is None else "img2img"
        options = self._options(overrides)
        made = self._parts(job, [(mode, cell.request, {**options, **cell.options}) for _, cell in planned])
        cells = {index: result for (index, _), result in zip(planned, made) if result is not None}
        for result in cells.values():
            result.notices.extend(n for n in job.notices if n not in result.notices)
        return cells, job.interrupted or len(cells) < len(planned)

    def _script(self, job: RemoteJob, base: GenerationRequest, script: PromptLines | PromptMatrix,
                overrides: Overrides | None) -> GenerationResult:
        """A prompt script on one replica (its lines run in turn, as in one process); its grid saved here."""
        mode = "txt2img" if base.init_images is None else "img2img"
        there = replace(script, save_grid=False) if isinstance(script, PromptMatrix) else script  # (saved here)
        (result,) = self._parts(job, [(mode, base, self._options(overrides))], there)
        if result is None:
            raise UserError("the job was interrupted before its first image was made")
        if result.grids:
            path = saved_grid(self.engine, base, result.images[0], result.seed, result.infotexts[0],
                              getattr(script, "save_grid", None))
            if path is not None and len(result.paths) == len(result.images) - 1:
                result.paths.insert(0, path)
        return result

    def _options(self, overrides: Overrides | None) -> dict[str, Any]:
        return {**self.engine.options.as_dict(), **(overrides.values if overrides else {})}

    # ---- parts ------------------------------------------------------------------------------------------------

    def _parts(self, job: RemoteJob, parts: list[tuple[str, GenerationRequest, dict[str, Any]]],
               script: PromptLines | PromptMatrix | None = None) -> list[GenerationResult | None]:
        """Each part's result, in order (None where an interrupt came first), the images saved here as they would
        be in one process. All parts are sent at once: Serve queues them for the replicas."""
        sent = []
        for mode, request, options in parts:
            part = Part(f"{job.id}.{len(job.parts)}", mode, replace(request, save_images=False),
                        {**options, **NOT_SAVED_THERE}, script)
            job.parts.append(part.id)
            sent.append((part, request, self._model_id(request, options)))
        with ThreadPoolExecutor(max_workers=min(len(sent), WAITING_THREADS)) as waiting:
            answers = list(waiting.map(lambda s: self._made(job, *s), sent))
        results = []
        for (_, request, _), answer in zip(sent, answers):
            result = None if answer is None else answer.result
            if result is not None:
                result.request = request
                self.engine.save_result(result)
            results.append(result)
        return results

    def _made(self, job: RemoteJob, part: Part, request: GenerationRequest, model_id: str) -> PartDone | None:
        """One part made on a replica; where its replica dies, made again on another."""
        for attempt in range(1, TRIES + 1):
            response = self.handle.options(multiplexed_model_id=model_id).run.remote(part)
            try:
                answer = response.result()
            except (RayActorError, ActorUnavailableError) as e:
                what = (f"A replica stopped while making part {part.id.split('.')[-1]} of this job "
                        f"({type(e).__name__}); it was made again on another replica with the same seed.")
                log.warning("%s (try %d of %d)", what, attempt, TRIES)
                if what not in job.notices:
                    job.notices.append(what)
                if attempt == TRIES:
                    raise RuntimeError(f"part {part.id} failed on {TRIES} replicas; the last one said: {e}") from e
                time.sleep(RETRY_WAIT)
                continue
            if isinstance(answer, PartFailed):
                raise answer.raised()
            if answer is not None:
                job.done += 1
                job.replicas.add(answer.replica)
                log.info("%s %s: made on replica %s from %.3f to %.3f, %d model switch(es) there", job.name,
                         part.id, answer.replica, answer.started, answer.ended, answer.switches)
            return answer
        return None

    def _model_id(self, request: GenerationRequest, options: dict[str, Any]) -> str:
        """The checkpoint a part uses, as Serve's model id (its routing key): the one it names, else the setting."""
        name = request.checkpoint or options.get("sd_model_checkpoint") or None
        try:
            return self.engine.checkpoint(name).name
        except UserError:
            return name or ""  # (the replica says what is wrong with it)

    # ---- Interrupt, Skip, progress --------------------------------------------------------------------------

    def _ask(self, interrupt: bool = False, skip: bool = False, jobs: list[RemoteJob] | None = None) -> None:
        with self._lock:
            jobs = list(self._running_jobs) if jobs is None else jobs
        for job in jobs:
            job.interrupted, job.skipped = job.interrupted or interrupt, skip
        parts = [part for job in jobs for part in job.parts]
        if parts:
            ray.get(self.board.ask.remote(parts, interrupt, skip))

    def _forget(self, parts: list[str]) -> None:
        if parts:
            self.board.forget.remote(parts)

    def running_job(self) -> RemoteJob | None:
        with self._lock:
            return self._running_jobs[0] if self._running_jobs else None

    def reports(self, job: RemoteJob) -> list[ProgressReport]:
        """The latest progress of ``job``'s parts that are running, in part order."""
        posted = ray.get(self.board.read.remote(list(job.parts)), timeout=10)
        return [posted[p] for p in job.parts if p in posted and posted[p].job]


class ClusterProgress:
    """/progress and the UI's progress line over the replicas: the oldest running job, as Progress shows one job
    (a batch count's parts are its batches, a plot's its cells; the step and preview are its first running part's)."""

    REFRESH = 0.2  # seconds a reading of the job board is reused

    def __init__(self, queue: ServeQueue):
        self.queue = queue
        self._read_at, self._job, self._reports = 0.0, None, []
        self._lock = threading.Lock()

    def _state(self) -> tuple[RemoteJob | None, list[ProgressReport]]:
        with self._lock:
            if time.monotonic() - self._read_at > self.REFRESH:
                self._job = self.queue.running_job()
                self._reports = self.queue.reports(self._job) if self._job is not None else []
                self._read_at = time.monotonic()
            return self._job, self._reports

    def _first(self) -> ProgressReport:
        reports = self._state()[1]
        return reports[0] if reports else ProgressReport()

    @property
    def active(self) -> bool:
        return bool(self._state()[1])

    @property
    def fraction(self) -> float:
        job, reports = self._state()
        if job is None or not job.parts:
            return 0.0
        return min(1.0, (job.done + sum(r.fraction for r in reports)) / len(job.parts))

    @property
    def measured(self) -> bool:
        return self.fraction > 0

    @property
    def eta_seconds(self) -> float:
        job, fraction = self._state()[0], self.fraction
        if job is None or fraction <= 0:
            return 0.0
        return (time.monotonic() - job.started) * (1 - fraction) / fraction

    @property
    def interrupted(self) -> bool:
        job = self._state()[0]
        return job is not None and job.interrupted

    @property
    def skipped(self) -> bool:
        job = self._state()[0]
        return job is not None and job.skipped

    @property
    def job(self) -> str:
        return self._first().job

    @property
    def job_count(self) -> int:
        job = self._state()[0]
        if job is not None and not job.plot and len(job.parts) > 1:
            return len(job.parts)
        return self._first().job_count

    @property
    def job_no(self) -> int:
        job = self._state()[0]
        if job is not None and not job.plot and len(job.parts) > 1:
            return min(job.done, len(job.parts) - 1)
        return self._first().job_no

    @property
    def cell_count(self) -> int:
        job = self._state()[0]
        return len(job.parts) if job is not None and job.plot else self._first().cell_count

    @property
    def cell_no(self) -> int:
        job = self._state()[0]
        return job.done if job is not None and job.plot else self._first().cell_no

    @property
    def sampling_step(self) -> int:
        return self._first().sampling_step

    @property
    def sampling_steps(self) -> int:
        return self._first().sampling_steps

    @property
    def textinfo(self) -> str:
        return self._first().textinfo

    def preview(self):
        return self._first().preview
