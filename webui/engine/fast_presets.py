"""Presets for few-step models: LCM, TCD, DMD2, Hyper-SD, Lightning and Turbo checkpoints and LoRAs, and Flux schnell.

Such a model draws its picture in 1–8 steps at CFG 1–2 with a sampler of its own; at A1111's 20 steps and CFG 7 it
burns. A file is known by its name or its metadata (ModelSpec's ``modelspec.title``, kohya's ``ss_output_name``),
the way their makers name them ("lcm-lora-sdxl", "sdxl_lightning_4step_lora", "Hyper-SDXL-8steps-CFG-lora",
"sd_xl_turbo_1.0_fp16", "flux1-schnell") and merges are named ("dreamshaperXL_v21TurboDPMSDE": the long words
anywhere, the short ones as words); the step count a name gives is used. The UI sets the fields when such a
checkpoint is picked or such a LoRA's card is clicked; a request that samples far from its preset (an API client's
fields are its own) gets a notice saying what the model wants.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

METADATA_NAMES = ("modelspec.title", "ss_output_name")  # metadata that names the model as its maker did
MOST_STEPS = 16  # a step count read from a name above this is no few-step model's


@dataclass(frozen=True)
class FastPreset:
    kind: str
    steps: int
    cfg_scale: float
    sampler_name: str
    scheduler: str

    def fields(self) -> dict[str, Any]:
        """The request fields it sets."""
        return {"steps": self.steps, "cfg_scale": self.cfg_scale, "sampler_name": self.sampler_name,
                "scheduler": self.scheduler}

    def describe(self) -> str:
        return f"{self.sampler_name}, {self.scheduler}, {self.steps} steps, CFG {self.cfg_scale:g}"

    def far_from(self, steps: int, cfg_scale: float) -> bool:
        """Whether a request samples far enough from the preset to spoil the picture (twice the steps, or a CFG scale
        above 3 where the preset's is 2 or less)."""
        return steps > 2 * self.steps or (cfg_scale > 3 and cfg_scale > 2 * self.cfg_scale)


def _steps(text: str, default: int) -> int:
    match = re.search(r"(?<!\d)(\d{1,2})[-_ ]?steps?(?![a-z])", text)
    return int(match.group(1)) if match and 1 <= int(match.group(1)) <= MOST_STEPS else default


def _word(name: str) -> re.Pattern:
    return re.compile(rf"(?<![a-z0-9]){name}(?![a-z])")


def fast_preset(*names: str) -> FastPreset | None:
    """The preset of a model known by these names (its file's stem, its metadata's), or None for any other model."""
    text = " ".join(names).lower()
    if _word("lcm").search(text):
        return FastPreset("LCM", 6, 1.5, "LCM", "SGM Uniform")
    if _word("tcd").search(text):
        return FastPreset("TCD", 6, 1.0, "TCD", "SGM Uniform")
    if _word("dmd2").search(text):
        return FastPreset("DMD2", 4, 1.0, "LCM", "SGM Uniform")
    if re.search(r"hyper[-_ ]?(sd|flux)", text):  # the "-CFG" LoRAs keep guidance: CFG 5 as their makers say
        return FastPreset("Hyper-SD", _steps(text, 8), 5.0 if _word("cfg").search(text) else 1.0, "Euler",
                          "SGM Uniform")
    if "lightning" in text:
        return FastPreset("Lightning", _steps(text, 4), 1.0, "Euler", "SGM Uniform")
    if "turbo" in text:
        return FastPreset("Turbo", _steps(text, 6), 2.0, "DPM++ SDE", "Karras")
    if "schnell" in text:
        return FastPreset("Flux schnell", _steps(text, 4), 1.0, "Euler", "Simple")
    return None


def named_in(metadata: dict[str, str]) -> list[str]:
    """The names a file's metadata gives the model."""
    return [str(metadata[key]) for key in METADATA_NAMES if metadata.get(key)]
