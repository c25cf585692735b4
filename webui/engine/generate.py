"""txt2img and img2img: a validated request in, images and infotexts out. The only generation path.

Orchestration only: encode → denoise → decode, each step asking the model's family (``model.kind``,
``webui.engine.families``) for what is its own. Noise is drawn on the CPU per image from seed+i, as
A1111 does, so seeds mean the same on every device. img2img is the same path from init latents: the init
images are VAE-encoded once (a phase of their own), noised to where the denoising strength starts, and the
family denoises the rest of the schedule (``Resolved.steps``). Inpainting is img2img with a mask: the pictures are
prepared by ``inpaint``, the loops keep what the mask keeps (``sampling.steps.InitLatents``), and each image is put
back into the original. Hires. fix adds a second pass to each batch: the first pass's latents upscaled (or its
images through an image upscaler, encoded again), then img2img at the hires size (``Resolved.hires``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from webui.engine import attention, compiled, graphs
from webui.engine.conditioning.prompts import Conditioning
from webui.engine.control.apply import ActiveUnit
from webui.engine.control.flow import encode_control_inputs
from webui.engine.families.base import FlowFamily
from webui.engine.formats.detect import Family
from webui.engine.hires import HiresPass, check_latent_handover, upscale_latents
from webui.engine.hooks import Hooks
from webui.engine.infotext import build_infotext
from webui.engine.inpaint import FILLS, INPAINT_AREAS, LATENT_NOISE, LATENT_NOTHING, MASK_MODES, ORIGINAL, InpaintImages
from webui.engine.loading.load import TEXT_ENCODERS, LoadedModel, vae_scale_factor
from webui.engine.memory import MB
from webui.engine.memory.activation import activation_bytes, encode_activation_bytes
from webui.engine.memory.manager import VAE_TILE, MemoryManager, MemoryPolicy, VaePass, vae_pass
from webui.engine.outputs import png_files
from webui.engine.progress import Progress
from webui.engine.request import MAX_SEED, GenerationRequest, GenerationResult
from webui.engine.sampling.flow import SD3_DEFAULT_SHIFT
from webui.engine.sampling.ksampling import StepCallback
from webui.engine.sampling.noise import Variation, initial_noise
from webui.engine.sampling.samplers import Sampling
from webui.engine.sampling.steps import DenoiseSteps, InitLatents
from webui.engine.weights.fp8 import compute_dtype
from webui.errors import UserError

VERSION = "webui-0.1"
log = logging.getLogger(__name__)
# Saves one image (image, seed, prompt, infotext, its PNG bytes) and returns the file's path.
SaveImage = Callable[[Image.Image, int, str, str, bytes], Path]
T = TypeVar("T")
IMAGE_ENCODE_PHASE = "VAE encode"  # img2img's init images through the VAE, as the memory trace names it


@dataclass
class Resolved:
    """The request with every default filled in from the settings, and what it asks for resolved once (the sampling,
    whether CFG runs), handed down to the family's denoising loop."""

    request: GenerationRequest
    sampling: Sampling  # sampler, schedule type and eta
    seed: int
    subseed: int  # the variation seed (used where subseed_strength is above 0)
    clip_skip: int
    save: bool
    model_hash: str
    vae_name: str | None
    shift: float = SD3_DEFAULT_SHIFT  # SD3.x's flow shift (a setting); Flux's follows the resolution
    prompts: tuple[str, str] | None = None  # prompt and negative prompt without network tags; None: as requested
    extra_params: dict[str, str] = field(default_factory=dict)  # infotext fields from extensions ("Lora hashes")
    init_images: list[Image.Image] | None = None  # img2img's init images as the VAE encodes them; None: txt2img
    inpaint: InpaintImages | None = None  # img2img with a mask: the mask, and how the images go back
    noise_multiplier: float = 1.0  # img2img: its starting noise times this (A1111's initial_noise_multiplier)
    fix_steps: bool = False  # img2img runs exactly the requested steps (A1111's option img2img_fix_steps)
    hires: HiresPass | None = None  # txt2img's hires. fix: its second pass
    second_pass: bool = False  # this job is a hires pass: img2img's steps from latents it is given
    compile: bool = False  # "Compile the denoiser" (``compiled``): its repeated blocks, where it does not stream
    graphs: bool = False  # the denoiser replayed as CUDA graphs where it is resident (``graphs``)
    attention: str = "SDPA"  # the attention backend the denoiser runs (``attention``)
    fp8_matmul: bool = False  # its fp8 layers multiply in fp8 (``weights.fp8.use_fp8_matmul``)
    controls: list[ActiveUnit] = field(default_factory=list)  # ControlNet units (``control``)

    @property
    def cfg(self) -> bool:
        """Whether CFG runs (a scale above 1): the negative prompt is encoded and each step predicts twice."""
        return self.request.cfg_scale > 1.0

    def encoded_prompts(self) -> tuple[str, str]:
        return self.prompts or (self.request.prompt, self.request.negative_prompt)

    @property
    def mode(self) -> str:
        return "txt2img" if self.init_images is None else "img2img"  # inpainting is img2img's (its folder too)

    @property
    def steps(self) -> DenoiseSteps:
        """The steps that run: the request's (txt2img), or img2img's last ones of a schedule, as A1111 counts."""
        req = self.request
        if self.init_images is None and not self.second_pass:
            return DenoiseSteps(req.steps, req.steps)
        return DenoiseSteps.img2img(req.steps, req.denoising_strength, self.fix_steps)

    def active_controls(self) -> list[ActiveUnit]:
        """The ControlNet units that act in this pass (with hires. fix, as each unit's hr_option says)."""
        return [active for active in self.controls if active.unit.acts_in(self.second_pass, self.hires is not None)]

    @property
    def steps_a_batch(self) -> int:
        """The steps each batch runs: its pass's, and the hires pass's."""
        return self.steps.run + (self.hires.job.steps.run if self.hires is not None else 0)


NO_VAE_PASS = VaePass(0, 0)  # a phase the job does not have


@dataclass(frozen=True)
class PhaseEstimates:
    """A job's activation memory per phase (bytes), estimated before it runs: each phase is planned with its own."""

    encode: int
    denoise: int
    decode: VaePass
    encode_image: VaePass = NO_VAE_PASS  # img2img (an inpainting model's txt2img too): the largest init image's
    hires_denoise: int = 0  # hires. fix: its pass's denoise, at the hires size
    hires_encode: VaePass = NO_VAE_PASS  # hires. fix with an image upscaler: an upscaled image through the VAE
    hires_decode: VaePass = NO_VAE_PASS  # hires. fix with an image upscaler: the first pass's batch decoded

    @classmethod
    def of(cls, model: LoadedModel, job: Resolved) -> PhaseEstimates:
        req, rows = job.request, job.request.batch_size * (2 if job.cfg else 1)
        final = job.hires.job.request if job.hires is not None else req
        decode, encode = vae_passes(model.vae), functools.partial(vae_passes(model.vae), encode=True)
        image_upscale = job.hires is not None and not job.hires.latent
        return cls(
            encode=encode_activation_bytes(model.kind.encode_activation_per_prompt, rows),
            denoise=denoise_bytes(model, job),
            decode=decode(final.width, final.height, req.batch_size),
            encode_image=max((encode(*image.size, 1) for image in job.init_images or ()), key=lambda p: p.whole,
                             default=encode(req.width, req.height, 1) if model.kind.is_inpainting(model.denoiser)
                             else NO_VAE_PASS),
            hires_denoise=0 if job.hires is None else denoise_bytes(model, job.hires.job),
            hires_encode=encode(final.width, final.height, 1) if image_upscale else NO_VAE_PASS,
            hires_decode=decode(req.width, req.height, req.batch_size) if image_upscale else NO_VAE_PASS,
        )


def vae_passes(vae: torch.nn.Module) -> Callable[..., VaePass]:
    """``vae_pass`` for this VAE: its compute dtype, its tiles (``use_tiles``)."""
    return functools.partial(vae_pass, dtype=compute_dtype(vae), tile=vae_tile(vae))


def vae_tile(vae: torch.nn.Module) -> int:
    """The tile of a tiled pass, in pixels: ``VAE_TILE``, or the VAE's sample size where smaller (tiny test VAEs)."""
    return min(VAE_TILE, vae.config.sample_size)


def use_tiles(vae: torch.nn.Module, tiled: bool) -> None:
    """Turn the VAE's tiling on (with ``vae_tile``'s tiles, which the memory estimate counts) or off."""
    if not tiled:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    vae.tile_sample_min_size = vae_tile(vae)
    vae.tile_latent_min_size = vae_tile(vae) // vae_scale_factor(vae)


def denoise_bytes(model: LoadedModel, job: Resolved) -> int:
    req = job.request
    return activation_bytes(model.kind.activation_per_pixel, req.width, req.height, req.batch_size, job.cfg,
                            compute_dtype(model.denoiser))


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else int(seed)


def generate(model: LoadedModel, memory: MemoryManager, policy: MemoryPolicy, job: Resolved, progress: Progress,
             save_image: SaveImage | None = None,
             hooks: Hooks | None = None) -> GenerationResult:
    """Run all batches of a request (img2img: from its init images, encoded once for them all).
    ``save_image(image, seed, prompt, infotext)`` saves when given.

    An out-of-memory error in a batch is retried once with a smaller resident set and a tiled
    VAE; images already made are kept either way.
    """
    req = job.request
    start = time.perf_counter()
    model.kind.check_size(req.width, req.height)
    estimates = PhaseEstimates.of(model, job)
    memory.begin(policy, estimates.denoise)
    result = GenerationResult(request=req, model_name=model.info.model_name, model_hash=job.model_hash,
                              sampler_name=job.sampling.sampler.name, scheduler=job.sampling.schedule.label,
                              clip_skip=job.clip_skip)
    steps = job.steps_a_batch
    progress.begin(job.mode, req.n_iter, steps)
    bar = tqdm(total=req.n_iter * steps, desc=job.mode, unit="it", leave=False)
    try:
        init = _with_oom_retry(lambda: encode_init(model, memory, job, estimates, result), memory, req)
        if job.inpaint is not None:
            result.notices.extend(job.inpaint.notices)
        for batch_no in range(req.n_iter):
            if progress.interrupted:
                break
            progress.next_batch(batch_no)
            first = batch_no * req.batch_size
            seeds = [job.seed + first + i for i in range(req.batch_size)]
            subseeds = [job.subseed + first + i for i in range(req.batch_size)]
            images = _with_oom_retry(lambda: _sample_batch(model, memory, job, estimates, seeds, subseeds, init,
                                                           progress, bar, result, hooks), memory, req)
            infotexts = [infotext_for(model, job, seed, subseed) for seed, subseed in zip(seeds, subseeds)]
            for image, infotext in zip(images, infotexts):
                image.info["parameters"] = infotext  # kept by whatever writes it as PNG (A1111 does the same)
            saving = save_image is not None and job.save and not progress.interrupted
            pngs = png_files(images, infotexts) if saving else [b""] * len(images)
            for image, seed, subseed, infotext, png in zip(images, seeds, subseeds, infotexts, pngs):
                result.images.append(image)
                result.seeds.append(seed)
                result.subseeds.append(subseed)
                result.prompts.append(req.prompt)
                result.negative_prompts.append(req.negative_prompt)
                result.infotexts.append(infotext)
                if saving:
                    save_or_notice(save_image, image, seed, req.prompt, infotext, png, result)
        result.interrupted = progress.interrupted
    finally:
        bar.close()
        progress.end()
        result.memory = memory.finish()
    ran = (("compiled", result.memory.compiled), ("CUDA graphs", result.memory.graphed),
           (job.attention, job.attention != "SDPA"), ("fp8 matmul", job.fp8_matmul))
    result.fast = tuple(name for name, on in ran if on)
    result.seconds = time.perf_counter() - start
    return result


def save_or_notice(save_image: SaveImage, image: Image.Image, seed: int, prompt: str, infotext: str, png: bytes,
          result: GenerationResult) -> None:
    """Save one image; where the disk refuses (full, read-only), the images are still returned, with a notice naming
    the folder and the reason, once."""
    try:
        result.paths.append(save_image(image, seed, prompt, infotext, png))
    except OSError as e:
        where = f" in {Path(e.filename).parent}" if e.filename else ""
        notice = (f"Images could not be saved{where}: {e.strerror or e}. They are shown here and returned; free some "
                  "space or choose another folder in Settings.")
        if notice not in result.notices:
            log.warning(notice)
            result.notices.append(notice)


def infotext_for(model: LoadedModel, job: Resolved, seed: int, subseed: int) -> str:
    req = job.request
    varied, resized = req.subseed_strength > 0, req.resize_from
    params = {
        "Steps": req.steps,
        **job.sampling.infotext(),
        "CFG scale": req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Variation seed": subseed if varied else None,
        "Variation seed strength": req.subseed_strength if varied else None,
        "Seed resize from": f"{resized[0]}x{resized[1]}" if resized else None,
        "Model hash": job.model_hash,
        "Model": model.info.model_name,
        "VAE": job.vae_name,
        "Denoising strength": req.denoising_strength if job.init_images is not None or job.hires else None,
        "Noise multiplier": job.noise_multiplier if job.noise_multiplier != 1 else None,
        **(inpaint_params(job) if job.inpaint is not None else {}),
        **(hires_params(job) if job.hires is not None else {}),
        "Clip skip": job.clip_skip if job.clip_skip != 1 else None,
        "Compiled": True if job.compile else None,
        "Attention": job.attention if job.attention != "SDPA" else None,
        "FP8 matmul": True if job.fp8_matmul else None,
        **{f"ControlNet {i}": active.unit.infotext() for i, active in enumerate(job.controls)},
        **family_params(model, job),
        "Version": VERSION,
    }
    return build_infotext(req.prompt, req.negative_prompt, params)


def inpaint_params(job: Resolved) -> dict:
    """A1111's inpainting fields, each where it is not what a paste takes for granted (masked content original, the
    whole picture, inpaint masked)."""
    req, only_masked = job.request, job.inpaint.paste_to is not None
    return {
        "Mask blur": req.mask_blur_x if req.mask_blur_x == req.mask_blur_y else None,
        "Mask mode": MASK_MODES[1] if req.inpainting_mask_invert else None,
        "Masked content": FILLS[req.inpainting_fill] if req.inpainting_fill != ORIGINAL else None,
        "Inpaint area": INPAINT_AREAS[1] if only_masked else None,
        "Masked area padding": req.inpaint_full_res_padding if only_masked else None,
        **(req.soft_inpainting.as_infotext() if req.soft_inpainting is not None else {}),
    }


def hires_params(job: Resolved) -> dict:
    """A1111's hires fields: the factor or the size asked, the steps where set, the upscaler, and the second pass's
    sampler, schedule type, prompts and CFG where they are its own."""
    req, second = job.request, job.hires.job.request
    resized = req.hr_resize_x or req.hr_resize_y
    return {
        "Hires upscale": None if resized else req.hr_scale,
        "Hires resize": f"{req.hr_resize_x}x{req.hr_resize_y}" if resized else None,
        "Hires steps": req.hr_second_pass_steps or None,
        "Hires upscaler": req.hr_upscaler,
        "Hires checkpoint": job.hires.other_model.title if job.hires.other_model is not None else None,
        "Hires sampler": second.sampler_name if second.sampler_name != req.sampler_name else None,
        "Hires schedule type": second.scheduler if second.scheduler != req.scheduler else None,
        "Hires prompt": second.prompt if second.prompt != req.prompt else None,
        "Hires negative prompt": second.negative_prompt if second.negative_prompt != req.negative_prompt else None,
        "Hires CFG Scale": second.cfg_scale if second.cfg_scale != req.cfg_scale else None,
        "Hires Distilled CFG Scale": (second.distilled_cfg_scale
                                      if second.distilled_cfg_scale != req.distilled_cfg_scale else None),
    }


def family_params(model: LoadedModel, job: Resolved) -> dict:
    """Infotext fields only some models have: the family's own (Flux's distilled CFG, SD3's shift), Forge's module
    names, the extensions'."""
    params = model.kind.infotext_fields(model, job)
    params.update((f"Module {i}", Path(name).stem) for i, name in enumerate(model.module_names, start=1))
    params.update(job.extra_params)
    return params


def _with_oom_retry(run: Callable[[], T], memory: MemoryManager, req: GenerationRequest) -> T:
    try:
        return run()
    except torch.OutOfMemoryError as e:
        log.warning("Out of memory while running %s (%s); freeing caches and retrying with half the resident "
                    "weights and a tiled VAE.", memory.phase, str(e).splitlines()[0])
    memory.recover_from_oom()
    try:
        return run()
    except torch.OutOfMemoryError as e:
        memory.recover_from_oom()
        raise UserError(memory.explain_oom(req.width, req.height, req.batch_size)) from e


@torch.inference_mode()
def _sample_batch(model: LoadedModel, memory: MemoryManager, job: Resolved, estimates: PhaseEstimates,
                  seeds: list[int], subseeds: list[int], init: InitLatents | None, progress: Progress, bar: tqdm,
                  result: GenerationResult, hooks: Hooks | None) -> list[Image.Image]:
    """One batch: its pass (and hires. fix's), then the decode."""
    clock = PhaseClock(memory.device, result.timings)
    report = _StepReport(progress, bar, hooks, model.family, job.steps_a_batch)
    latents = _denoise_pass(model, memory, job, estimates, estimates.denoise, seeds, subseeds, init,
                            report.of_pass(0, job.steps.run), clock, "", result.notices)
    if job.hires is None:
        images = decode(model, memory, latents, result.notices)
        clock.lap("decode")
        return _put_back(job, init, latents, images)
    other = job.hires.other_model
    try:
        second, estimates, latents = _to_hires_size(model, memory, job, estimates, latents, result.notices)
        clock.lap("hires upscale")
        latents = _denoise_pass(second, memory, job.hires.job, estimates, estimates.hires_denoise, seeds, subseeds,
                                _hires_init(second, memory, job.hires.job, estimates, latents, result),
                                report.of_pass(job.steps.run, job.hires.job.steps.run), clock, "hires ", result.notices)
        images = decode(second, memory, latents, result.notices)
        clock.lap("decode")
        return images
    finally:
        if other is not None:
            other.back()


def _put_back(job: Resolved, init: InitLatents | None, latents: torch.Tensor,
              images: list[Image.Image]) -> list[Image.Image]:
    """Inpainting's images put back into the original: its kept part laid over them through the blurred mask, or,
    with soft inpainting, where they changed little from it (judged on the latents)."""
    if job.inpaint is None:
        return images
    shown = [None] * len(images)
    if init.soft is not None and init.latents is not None:
        shown = init.soft.composite_masks(init.latents, latents.float(), init.repaint, images[0].size)
    return [job.inpaint.finish(image, i, mask) for i, (image, mask) in enumerate(zip(images, shown))]


def _denoise_pass(model: LoadedModel, memory: MemoryManager, job: Resolved, estimates: PhaseEstimates, activation: int,
                  seeds: list[int], subseeds: list[int], init: InitLatents | None, report: StepCallback,
                  clock: PhaseClock, prefix: str, notices: list[str]) -> torch.Tensor:
    """A pass's prompts encoded (unless they are the last ones), and its Flux ControlNets' images, then its latents
    denoised from the seeds' noise (img2img, a hires pass: from ``init``) with ``activation`` bytes of room.
    ``prefix`` names its timings; ``notices`` gets what the user should know (a VAE that made NaNs)."""
    req, device = job.request, memory.device
    dtype = compute_dtype(model.denoiser)
    if not encoded_already(model, job):
        prepare_encoders(memory, estimates)
    cond, uncond = _conditioning(model, job, device, dtype)
    units = job.active_controls()
    if units and isinstance(model.kind, FlowFamily):  # Flux and SD3 ControlNets take their images as latents
        encode_control_inputs(units, req.width, req.height, lambda pixels: encode(
            model, memory, pixels, vae_passes(model.vae)(req.width, req.height, 1, encode=True), notices),
                              model.kind.pack, model.vae.config.shift_factor or 0.0, model.vae.config.scaling_factor)
    clock.lap(prefix + "encode")
    memory.stream_whole("denoiser", compiled.repeated_blocks(model.denoiser) if job.compile else [])
    memory.prepare(["denoiser"], activation)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = _initial_noise(model, req, generators, seeds, subseeds).to(device, dtype)
    if init is not None and init.repaint is not None:
        init = masked_content(init, noise, req.inpainting_fill)
    if job.steps.run == 0 and init is not None:  # img2img at strength 0: the init image through the VAE alone
        latents = init.latents
    else:
        streamed = memory.streamed_parameters("denoiser") if job.compile or job.graphs else ()
        with (compiled.running(model.denoiser, job.compile, streamed) as (fast, blocks),
              attention.running(job.attention),
              _graphs(model, memory, job, streamed) as replayed):
            if job.compile and fast < blocks:
                log.info("Compile the denoiser: %d of %d blocks run eager in this pass, their weights stream (the "
                         "streamer moves them around each call, which compiled code would compile again).",
                         blocks - fast, blocks)
            memory.stats.compiled = memory.stats.compiled or fast > 0
            if replayed is not None:
                memory.hold(replayed)  # (their pools count against the budget from now on)
            latents = model.kind.denoise(model, job, seeds, generators, noise, cond, uncond, report, init)
        if replayed is not None and replayed.calls:
            memory.stats.graphed, memory.stats.graphs_mb = True, replayed.nbytes / MB
    if init is not None and init.blends and init.soft is None:
        latents = init.kept(latents, init.latents)  # whatever the sampler left there (an interrupted one)
    clock.lap(prefix + "denoise")
    if not torch.isfinite(latents).all():
        what = f"The denoiser made NaN or infinite values ({model.info.model_name}, {dtype_name(dtype)})."
        if dtype == torch.float32:
            raise UserError(f"{what} Its weights, a LoRA or an extension may be broken: try without the last LoRA "
                            "or extension, or another checkpoint.")
        raise UserError(f"{what} It may overflow in {dtype_name(dtype)}: start with --no-half to compute in float32, "
                        "or try another checkpoint.")
    return latents


def _graphs(model: LoadedModel, memory: MemoryManager, job: Resolved,
            streamed: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager[graphs.DenoiserGraphs | None]:
    """The pass's CUDA graphs (``graphs.running``), or eager with the reason: not asked for, weights that stream, an
    IP-Adapter unit (its layers in the attention for this job), an extension's hook."""
    if not job.graphs:
        return contextlib.nullcontext()
    reason = graphs.why_not(model.denoiser, memory.device, sum(p.nbytes for p in streamed) / MB,
                            any(active.embeds is not None for active in job.active_controls()))
    return graphs.running(model.denoiser, memory.device, reason, (job.attention, job.compile, job.fp8_matmul))


class _StepReport:
    """A batch's step reports: progress counted over its passes (``steps`` in all), the console bar, the extensions'
    denoising_step hook."""

    def __init__(self, progress: Progress, bar: tqdm, hooks: Hooks | None, family: Family, steps: int):
        self.progress, self.bar, self.hooks, self.family, self.steps = progress, bar, hooks, family, steps

    def of_pass(self, done: int, run: int) -> StepCallback:
        """The step callback of a pass of ``run`` steps after ``done`` others; True stops it (interrupt, skip)."""
        def on_step(i: int, total: int, latents: torch.Tensor) -> bool:
            progress = self.progress
            progress.step(done + round((i + 1) * run / total), latents, self.family)
            self.bar.n = progress.job_no * self.steps + progress.sampling_step
            self.bar.refresh()
            if self.hooks is not None:
                self.hooks.fire("denoising_step", step=i, total=total, latents=latents)
            return progress.interrupted or progress.skipped

        return on_step


def _to_hires_size(model: LoadedModel, memory: MemoryManager, job: Resolved, estimates: PhaseEstimates,
                   latents: torch.Tensor, notices: list[str]) -> tuple[LoadedModel, PhaseEstimates, torch.Tensor]:
    """The first pass at the hires size, and the model (with its estimates) the second pass runs on: the first pass's
    latents upscaled (a latent mode), or its images decoded by the first model, upscaled by the image upscaler and
    encoded by the second (A1111's order with hr_checkpoint_name)."""
    hires = job.hires
    images = None if hires.latent else hires.upscale(decode(model, memory, latents, notices))
    second = hires.other_model.load() if hires.other_model is not None else model
    if second is not model:  # (its family known only now where its file does not say it)
        check_latent_handover(hires, model.family, second.family, second.info.name)
        estimates = PhaseEstimates.of(second, job)
    if images is None:
        return second, estimates, upscale_latents(latents.float(), hires.upscaler, hires.size, model.vae_scale_factor)
    return second, estimates, torch.cat([encode(second, memory, to_pixels(image), estimates.hires_encode, notices)
                                         for image in images])


def _hires_init(model: LoadedModel, memory: MemoryManager, job: Resolved, estimates: PhaseEstimates,
                latents: torch.Tensor, result: GenerationResult) -> InitLatents:
    """Where the hires pass starts: the first pass at the hires size; an inpainting model is also told, as in txt2img,
    that all of a grey picture of that size is masked (A1111's conditioning at its default mask weight)."""
    if not model.kind.is_inpainting(model.denoiser):
        return InitLatents(latents)
    req = job.request
    grey = replace(estimates, encode_image=vae_passes(model.vae)(req.width, req.height, 1, encode=True))
    return replace(encode_init(model, memory, job, grey, result), latents=latents)


class PhaseClock:
    """Adds each phase's wall time (device work included) to ``timings``."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings = device, timings
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def prepare_encoders(memory: MemoryManager, estimates: PhaseEstimates) -> None:
    memory.prepare([name for name in TEXT_ENCODERS if name in memory.components], estimates.encode, once=True)


def encoded_already(model: LoadedModel, job: Resolved) -> bool:
    """Whether the job's conditioning is the one kept from the last prompts encoded (then the text encoders are not
    placed at all: on a small card that leaves the denoiser where it is)."""
    return model.conditioning_cache[0] == _conditioning_key(job, compute_dtype(model.denoiser))


def _conditioning_key(job: Resolved, dtype: torch.dtype) -> tuple:
    req = job.request  # (the embeddings the prompts use, by their files' hashes: a file added or changed encodes anew)
    return req.prompt, req.negative_prompt, job.clip_skip, req.batch_size, job.cfg, dtype, job.extra_params.get(
        "TI hashes")


def _conditioning(model: LoadedModel, job: Resolved, device: torch.device,
                  dtype: torch.dtype) -> tuple[Conditioning, Conditioning | None]:
    """Positive and negative conditioning (no negative without CFG), reused while the prompts (network tags
    included: they may change the text encoders), clip skip and batch stay the same (as A1111 does): a new seed
    for the same prompt costs no text encoding."""
    key = _conditioning_key(job, dtype)
    if model.conditioning_cache[0] == key:
        return model.conditioning_cache[1]
    req = job.request
    n = req.batch_size
    prompt, negative = job.encoded_prompts()
    # One pass for both: the shorter prompt is padded with empty chunks, as A1111 does for CFG.
    prompts = [prompt] * n + ([negative] * n if job.cfg else [])
    both = model.kind.encode(model, prompts, job.clip_skip, device, dtype)
    halves = [Conditioning(both.embeds[part], None if both.pooled is None else both.pooled[part])
              for part in (slice(0, n), slice(n, 2 * n))]
    result = (halves[0], halves[1] if job.cfg else None)
    model.conditioning_cache = (key, result)
    return result


def _initial_noise(model: LoadedModel, req: GenerationRequest, generators: list[torch.Generator], seeds: list[int],
                   subseeds: list[int]) -> torch.Tensor:
    """One latent per seed, at the image size over the VAE's scale factor (which the size must be a multiple of),
    with A1111's variation seed and seed resize (webui.engine.sampling.noise)."""
    factor = model.vae_scale_factor
    for name, side in (("width", req.width), ("height", req.height)):
        if side % factor:
            raise UserError(f"must be a multiple of {factor} for this model's VAE ({model.info.model_name} "
                            f"makes one latent per {factor}x{factor} pixels), got {side}", field=name)
    resized = req.resize_from
    variation = Variation(subseeds, req.subseed_strength,
                          (resized[1] // factor, resized[0] // factor) if resized else None)
    return initial_noise((model.latent_channels, req.height // factor, req.width // factor), generators, seeds,
                         variation)


def masked_content(init: InitLatents, noise: torch.Tensor, fill: int) -> InitLatents:
    """The init latents a batch starts from: "latent noise" puts the batch's noise where the picture is repainted,
    "latent nothing" zeros (A1111's); "fill" and "original" changed the picture itself."""
    if fill == LATENT_NOISE:
        return replace(init, latents=init.kept(noise.float(), init.latents))
    if fill == LATENT_NOTHING:
        return replace(init, latents=init.kept(torch.zeros_like(init.latents), init.latents))
    return init


def decode(model: LoadedModel, memory: MemoryManager, latents: torch.Tensor, notices: list[str]) -> list[Image.Image]:
    """VAE decode to PIL images (tiled when a whole decode would not fit), rounded as diffusers does."""
    pixels = _in_float32_after_nan(model, memory, lambda: _decode_pixels(model.vae, memory, latents), notices)
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


@torch.inference_mode()
def encode_init(model: LoadedModel, memory: MemoryManager, job: Resolved, estimates: PhaseEstimates,
                result: GenerationResult) -> InitLatents | None:
    """img2img's init latents, one row per image of the batch (one init image serves them all), at the request's
    latent size: latent upscale resizes them there (bilinear, as A1111). Inpainting adds the latent mask. An
    inpainting model (9-channel UNets, Flux Fill) gets its extra input: the mask and the latents of the picture with
    the masked part grey; without a mask (txt2img, img2img without one) all of it masked, as A1111 conditions it
    (txt2img: a grey picture). None: txt2img with another model."""
    inpainting_model = model.kind.is_inpainting(model.denoiser)
    if job.init_images is None and not inpainting_model:
        return None
    clock = PhaseClock(memory.device, result.timings)
    req, factor = job.request, model.vae_scale_factor
    size = (req.height // factor, req.width // factor)

    def batch(rows: list[torch.Tensor]) -> torch.Tensor:
        rows = [row if row.shape[-2:] == size else torch.nn.functional.interpolate(row, size=size, mode="bilinear")
                for row in rows]
        return torch.cat(rows).expand(req.batch_size, -1, -1, -1) if len(rows) == 1 else torch.cat(rows)

    if job.init_images is None:
        pictures, init = [torch.zeros(1, 3, req.height, req.width)], InitLatents(None)
    else:
        pictures = [to_pixels(image) for image in job.init_images]
        init = InitLatents(batch([encode(model, memory, p, estimates.encode_image, result.notices) for p in pictures]),
                           noise_multiplier=job.noise_multiplier)
    if job.inpaint is not None:  # soft inpainting keeps the blurred mask's shades
        soft = req.soft_inpainting
        init = replace(init, soft=soft, repaint=job.inpaint.latent_mask(
            *size, rounded=req.mask_round and soft is None).to(memory.device))
    if inpainting_model:
        mask = job.inpaint.pixel_mask() if job.inpaint is not None else torch.ones(1, 1, req.height, req.width)
        init = replace(init, extra=model.kind.inpainting_input(
            model.denoiser, mask, lambda: batch([encode(model, memory, p * (1 - mask), estimates.encode_image,
                                                        result.notices) for p in pictures])))
    clock.lap("encode image")
    return init


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], as the VAE takes a picture."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1


def encode(model: LoadedModel, memory: MemoryManager, pixels: torch.Tensor, activation: VaePass,
           notices: list[str]) -> torch.Tensor:
    """A picture (``to_pixels``) to latents as the denoiser sees them (float32, scaled and shifted by the VAE's
    factors): the mean of the VAE's latent distribution, so that a seed's noise is all the randomness (tiled when a
    whole encode would not fit in ``activation``'s room)."""
    vae = model.vae

    def run() -> torch.Tensor:
        use_tiles(vae, memory.prepare_vae("vae", activation, phase=IMAGE_ENCODE_PHASE))
        return vae.encode(pixels.to(memory.device, compute_dtype(vae))).latent_dist.mode()

    latents = _in_float32_after_nan(model, memory, run, notices).float()
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def _in_float32_after_nan(model: LoadedModel, memory: MemoryManager, run: Callable[[], torch.Tensor],
                          notices: list[str]) -> torch.Tensor:
    """``run()`` of the VAE. A half-precision VAE can overflow into NaNs (black images): then the VAE is kept in
    float32 from now on and run again, as A1111 does; what happened is said in ``notices`` and the log."""
    out = run()
    half = compute_dtype(model.vae)
    if half != torch.float32 and not torch.isfinite(out).all():
        notice = (f"The VAE made NaN values in {dtype_name(half)}; it now runs in float32 (run again). "
                  "Start with --no-half-vae to run the VAE in float32 from the start.")
        log.warning(notice)
        memory.convert("vae", torch.float32)
        out = run()
        notices.append(notice)
    return out


def _decode_pixels(vae: torch.nn.Module, memory: MemoryManager, latents: torch.Tensor) -> torch.Tensor:
    batch, _, h, w = latents.shape
    dtype = compute_dtype(vae)
    factor = vae_scale_factor(vae)
    use_tiles(vae, memory.prepare_vae("vae", vae_passes(vae)(w * factor, h * factor, batch)))
    latents = latents.to(memory.device, dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(latents).sample


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
