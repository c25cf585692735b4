"""One engine as a Ray Serve replica: the app's engine, unchanged, on the GPU Ray gave it (or the CPU). It runs the
parts the ingress sends, one at a time, with the ingress's settings, saving nothing (the ingress saves); Serve routes
a part to a replica already holding its checkpoint (``serve.multiplexed``: the model id is the checkpoint's title)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
from typing import Any

import ray
from ray import serve

from webui.engine.engine import Engine
from webui.errors import UserError
from webui.extensions import load_extensions
from webui.serve.parts import Part, PartDone, PartFailed, ProgressReport
from webui.settings import AppConfig

log = logging.getLogger(__name__)
REPORT_EVERY = 0.25  # seconds between progress posts (and Interrupt/Skip checks) while a part runs
# What Serve counts as held per replica: the checkpoint it used last (on the GPU, where switching costs most; the
# engine's own cache may keep others in RAM, which Serve need not know)
MODELS_PER_REPLICA = 1


class EngineReplica:
    def __init__(self, args: argparse.Namespace, board: Any, threads: int = 0):
        """``threads``: torch's CPU threads (CPU replicas share the machine's cores); 0 leaves torch's choice."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine = Engine(AppConfig.from_args(args))
        load_extensions(self.engine)
        self.board = board
        self.name = f"{os.getpid()}@{socket.gethostname()}"
        self.switches = 0
        self.engine.hooks.on("model_loaded", self._switched, owner="serve")

    def _switched(self, model: Any) -> None:
        self.switches += 1

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def holding(self, model_id: str) -> str:
        """Serve's record of the checkpoints this replica holds (the engine loads them at the part's first use)."""
        return model_id

    async def run(self, part: Part) -> PartDone | PartFailed | None:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.holding(model_id)
        return await asyncio.to_thread(self._run, part)

    def _run(self, part: Part) -> PartDone | PartFailed | None:
        """The part's result; None where the job was interrupted before the part began."""
        if ray.get(self.board.post.remote(part.id, None), timeout=10)[0]:
            return None
        engine, stop = self.engine, threading.Event()
        previews = bool(part.options.get("live_previews_enable", True))
        watcher = threading.Thread(target=self._watch, args=(part.id, stop, previews), daemon=True)
        started = time.time()
        engine.progress.interrupted = engine.progress.skipped = False
        watcher.start()
        try:
            mine = engine.options.as_dict()
            known = {key: value for key, value in part.options.items() if key in mine}
            with engine.options.overridden(known):
                if part.script is not None:
                    result = part.script.run(engine, part.request)
                else:
                    result = (engine.img2img if part.mode == "img2img" else engine.txt2img)(part.request)
        except UserError as e:
            return PartFailed(e.message, e.field)
        except Exception as e:  # the replica serves on; the ingress fails this job with it
            log.exception("part %s failed", part.id)
            return PartFailed(f"{type(e).__name__}: {e}", user_error=False)
        finally:
            stop.set()
            watcher.join()
        return PartDone(result, self.name, started, time.time(), self.switches)

    def _watch(self, part_id: str, stop: threading.Event, previews: bool) -> None:
        """Post the part's progress to the board (its live preview where the settings show them) and obey the
        Interrupt/Skip asked there, until it ends."""
        progress = self.engine.progress
        while not stop.wait(REPORT_EVERY):
            report = ProgressReport(progress.job, progress.job_count, progress.job_no, progress.sampling_step,
                                    progress.sampling_steps, progress.cell_no, progress.cell_count, progress.fraction,
                                    progress.textinfo, progress.preview() if previews and progress.active else None)
            try:
                interrupt, skip = ray.get(self.board.post.remote(part_id, report), timeout=10)
            except Exception as e:  # the board is gone (the ingress stopped): the part finishes on its own
                log.warning("The job board did not answer (%s); progress is not reported.", e)
                return
            if interrupt and not progress.interrupted:
                progress.interrupt()
            if skip and not progress.skipped:
                progress.skip()
