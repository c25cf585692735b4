"""Our generation path against the plain diffusers pipeline on the same weights, seed and sampler.

The single files and the diffusers folders hold the same tiny model (fp16 weights, computed in
fp32 on the CPU); the reference always loads the folder with diffusers' own from_pretrained.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tests.conftest import make_engine
from webui.engine.request import GenerationRequest
from webui.engine.sampling.samplers import SamplerRegistry

PROMPT = "a red circle on the left, blue background"
NEGATIVE = "blurry"


def reference_images(folder: Path, sdxl: bool, sampler: str, schedule: str, seeds: list[int], steps: int,
                     scheduler_config: dict) -> np.ndarray:
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.scheduler = SamplerRegistry().make_scheduler(sampler, schedule, scheduler_config, seed=seeds)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=steps,
               guidance_scale=7.0, num_images_per_prompt=len(seeds), output_type="pil",
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    return np.stack([np.asarray(img) for img in out.images])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["single-file", "diffusers-folder"])
@pytest.mark.parametrize("sampler,schedule", [("Euler a", "Automatic"), ("DPM++ 2M", "Karras")])
def test_same_image_as_diffusers(tmp_path, request, family, layout, sampler, schedule):
    folder = request.getfixturevalue(f"{family}_folder")
    checkpoint = request.getfixturevalue(f"{family}_file") if layout == "single-file" else folder
    engine = make_engine(tmp_path, checkpoint)
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=6, cfg_scale=7.0,
                            sampler_name=sampler, scheduler=schedule, seed=1234, batch_size=2,
                            checkpoint=checkpoint.name, save_images=False)
    ours = np.stack([np.asarray(img) for img in engine.txt2img(req).images])
    model = engine.models.current
    ref = reference_images(folder, family == "sdxl", sampler, schedule, [1234, 1235], 6, model.scheduler_config)
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert ref.std() > 5, "the reference image is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
