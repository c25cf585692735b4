"""The generation path on a CUDA device (half precision): skipped where there is no CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tests.conftest import make_engine
from webui.engine.request import GenerationRequest
from webui.engine.samplers import make_scheduler

pytestmark = pytest.mark.cuda
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REQ = dict(prompt="a red circle on the left", negative_prompt="blurry", width=64, height=64, steps=8,
           cfg_scale=6.0, sampler_name="DPM++ 2M", scheduler="Karras", seed=77, batch_size=2)


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(i).astype(int) for i in images])


@requires_cuda
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cuda_half_precision_matches_diffusers_and_the_cpu(tmp_path, request, family):
    checkpoint = request.getfixturevalue(f"{family}_file")
    folder = request.getfixturevalue(f"{family}_folder")
    gpu = make_engine(tmp_path / "gpu", checkpoint, extra_args=("--device", "cuda"))
    first = as_array(gpu.txt2img(GenerationRequest(**REQ)).images)
    assert gpu.models.current.unet.dtype == torch.float16 and gpu.models.current.unet.device.type == "cuda"
    assert np.array_equal(first, as_array(gpu.txt2img(GenerationRequest(**REQ)).images)), "same seed, same image"

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True).to("cuda")
    pipe.scheduler = make_scheduler(REQ["sampler_name"], REQ["scheduler"], gpu.models.current.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (77, 78)])
    ref = pipe(prompt=REQ["prompt"], negative_prompt=REQ["negative_prompt"], width=64, height=64,
               num_inference_steps=REQ["steps"], guidance_scale=REQ["cfg_scale"], num_images_per_prompt=2,
               latents=latents.to("cuda", torch.float16)).images
    # Our VAE runs in bf16, the pipeline's in fp16: a few levels of difference at most.
    assert np.abs(first - as_array(ref)).mean() < 2.0

    cpu = make_engine(tmp_path / "cpu", checkpoint)
    on_cpu = as_array(cpu.txt2img(GenerationRequest(**REQ)).images)
    assert np.abs(first - on_cpu).mean() < 3.0, "a seed draws the same picture on the CPU and the GPU"
