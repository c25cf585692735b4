"""The job API beside A1111's blocking routes (A1111 #3786): ``POST /sdapi/v1/jobs`` queues a txt2img or img2img body
(one with ``init_images``; its script too) and answers its id at once; ``GET /sdapi/v1/jobs/{id}`` tells its state,
its progress and live preview while it runs, and its images and info once done; ``DELETE`` cancels it (taken out
of the queue, or interrupted keeping what was made); ``GET /sdapi/v1/jobs`` lists the history, which
``job_history`` keeps in SQLite in the data folder across restarts. The job runs in the one queue, as a blocking
request would, and its images are kept as PNG files with their infotexts beside the history."""
from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Body, HTTPException

from webui.engine.progress import Progress
from webui.errors import UserError
from webui.job_history import JobHistory, JobRecord
from webui.jobs import JobQueue

Submitted = tuple[Future, str, Callable[[Any], tuple[list[bytes], str]]]  # the job, its kind, its result as PNGs + info
MOST_LISTED = 1000


def job_routes(jobs: JobQueue, history: JobHistory, submit: Callable[[Any], Awaitable[Submitted]],
               progress_report: Callable[[Progress, int, bool], dict]) -> list[tuple]:
    """The routes, as (path, endpoint, method, summary); ``submit(body)`` reads a body and queues its job."""
    live: dict[str, Future] = {}
    cancelled: set[str] = set()
    # A finished job's PNGs are encoded and written here, not on the queue's worker: the next job need not wait
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-results")
    ids: dict[int, str] = {}  # id(future) -> job id, for the queue's start hook

    def started(future: Future) -> None:
        if id(future) in ids:
            history.started(ids[id(future)])

    jobs.on_start.append(started)

    async def create(body: Any = Body(...)) -> dict[str, Any]:
        future, kind, as_pngs = await submit(body)
        job_id = uuid.uuid4().hex
        ids[id(future)] = job_id
        history.add(job_id, kind)
        if future.running() or future.done():  # (it started before it had an id)
            history.started(job_id)
        live[job_id] = future
        future.add_done_callback(lambda done: writer.submit(ended, job_id, done, as_pngs))
        return {"id": job_id, "state": "running" if future.running() else "queued", "queued": jobs.pending}

    def ended(job_id: str, future: Future, as_pngs: Callable[[Any], tuple[list[bytes], str]]) -> None:
        """The job's record once its future is done: its images written as files, or why it has none."""
        try:
            if future.cancelled():
                history.ended(job_id, "cancelled", error="cancelled before it started")
                return
            error = future.exception()
            if error is not None:
                history.ended(job_id, "failed", error=getattr(error, "message", str(error)),
                              field=getattr(error, "field", None))
                return
            pngs, info = as_pngs(future.result())
            folder = history.folder / job_id
            folder.mkdir(exist_ok=True)
            paths = []
            for number, png in enumerate(pngs):
                path = folder / f"{number:05d}.png"
                path.write_bytes(png)
                paths.append(path)
            history.ended(job_id, "cancelled" if job_id in cancelled else "done", info=info, images=paths)
        except Exception as e:  # (nobody waits on the writer: what failed is told in the job)
            history.ended(job_id, "failed", error=f"{type(e).__name__}: {e}")
        finally:
            live.pop(job_id, None)
            ids.pop(id(future), None)

    def record(job_id: str) -> JobRecord:
        found = history.get(job_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return found

    def state(job_id: str, images: bool = True, preview: bool = False) -> dict[str, Any]:
        found = record(job_id)
        answer = found.as_dict()
        future = live.get(job_id)
        if future is not None and not future.done():
            answer["state"] = "running" if future.running() else "queued"
            if future.running():
                answer["progress"] = progress_report(jobs.progress, jobs.pending, preview)
            return answer
        if found.state in ("done", "cancelled") and found.info is not None:
            answer["info"] = found.info
            answer["images"] = [_base64(path) for path in found.images] if images else len(found.images)
        return answer

    def cancel(job_id: str) -> dict[str, Any]:
        record(job_id)
        future = live.get(job_id)
        if future is not None and not future.done():
            cancelled.add(job_id)
            jobs.abandon(future)
        return {"id": job_id, "state": "cancelled" if future is not None else record(job_id).state}

    def listed(limit: int = 50) -> list[dict[str, Any]]:
        if not 1 <= limit <= MOST_LISTED:
            raise UserError(f"must be from 1 to {MOST_LISTED}, got {limit}", field="limit")
        return [state(found.id, images=False) for found in history.recent(limit)]

    return [
        ("/jobs", create, "POST", "Queue a txt2img or img2img body (A1111's; one with init_images is img2img) and "
         "answer its id at once (this app's job API)"),
        ("/jobs", listed, "GET", "The jobs submitted to the job API, newest first, kept across restarts"),
        ("/jobs/{job_id}", state, "GET", "A job's state; its progress and live preview (preview=true) while it "
         "runs; its images and info once done"),
        ("/jobs/{job_id}", cancel, "DELETE", "Cancel a job: out of the queue, or interrupted (what it made is kept)"),
    ]


def _base64(path: Path) -> str | None:
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None
