"""What the ingress sends a replica (a part of a job: one image of a batch count, an X/Y/Z cell, a prompt script) and
what comes back. Plain picklable data: these cross process and host boundaries."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from webui.engine.prompt_lines import PromptLines
from webui.engine.prompt_matrix import PromptMatrix
from webui.engine.request import GenerationRequest, GenerationResult
from webui.errors import UserError


@dataclass
class Part:
    id: str  # the job's id and the part's number: the job board's key
    mode: str  # "txt2img" or "img2img"
    request: GenerationRequest
    options: dict[str, Any]  # the ingress's settings for it (the job's overrides and the cell's included)
    script: PromptLines | PromptMatrix | None = None  # the whole script runs on one replica


@dataclass
class PartDone:
    result: GenerationResult
    replica: str  # "pid@host"
    started: float  # time.time() on the replica
    ended: float
    switches: int  # models this replica switched to so far (routing by model keeps it low)


@dataclass
class PartFailed:
    """An error the part raised on the replica, sent back as data: a UserError keeps its field (the API's 422)."""

    message: str
    field: str | None = None
    user_error: bool = True

    def raised(self) -> Exception:
        return UserError(self.message, self.field) if self.user_error else RuntimeError(self.message)


@dataclass
class ProgressReport:
    """A replica's progress on a part, as the ingress's /progress shows it."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    cell_no: int = 0
    cell_count: int = 0
    fraction: float = 0.0
    textinfo: str = ""
    preview: Image.Image | None = field(default=None, repr=False)
