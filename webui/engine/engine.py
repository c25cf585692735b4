"""The engine facade: one object the UI, the API and the tests talk to.

It owns the device choice, the model manager, the progress of the running job and the
request path: validate → resolve defaults from the settings → load → generate → save.
"""
from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from webui.engine.attention import FLAG_CHOICES, use_attention
from webui.engine.compiled import use_cache_dir
from webui.engine.conditioning.dynamic import DynamicPrompts, has_syntax
from webui.engine.conditioning.embeddings import EmbeddingLibrary
from webui.engine.conditioning.prompts import embeddings_used
from webui.engine.control.apply import ActiveUnit
from webui.engine.control.detect import Detectors, placed
from webui.engine.control.ip_adapter import IMAGE_ENCODER_ACTIVATION, ClipVisionEncoders, IPAdapter, image_embeddings
from webui.engine.control.models import ControlNets
from webui.engine.control.preprocessors import find_preprocessor
from webui.engine.families.protocol import FamilyFields
from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family
from webui.engine.folder_batch import FolderBatch, run_folder_batch
from webui.engine.forecast import Forecast, Rates, forecast_job
from webui.engine.fast_presets import FastPreset, fast_preset, named_in
from webui.engine.formats.files import (CheckpointInfo, HashCache, checkpoint_title, declared_resolution,
                                        read_safetensors_header, short_hash)
from webui.engine.generate import Resolved, generate, resolve_seed, save_or_notice
from webui.engine.hires import SAME_CHECKPOINT, OtherModel, check_latent_handover, resolve_hires
from webui.engine.hooks import Hooks, Network, extract_networks
from webui.engine.inpaint import init_pictures
from webui.engine.loading.assemble import checkpoint_family
from webui.engine.loading.demo import CONTROLNET_DIR
from webui.engine.loading.load import LoadedModel
from webui.engine.loading.models import STORAGE_DTYPES, Dtypes, ModelManager
from webui.engine.memory import MB
from webui.engine.memory.host_pages import limit_heap_arenas
from webui.engine.memory.manager import DeviceMemory, MemoryManager, MemoryMode, MemoryPolicy, use_expandable_segments
from webui.engine.merge.merger import MergeInputs, MergeRequest, MergeResult, merge_checkpoints
from webui.engine.outputs import png_files, remove_stale_temp_files, save_image
from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest, GenerationResult, combined
from webui.engine.sampling.samplers import SamplerRegistry, Sampling
from webui.engine.sequence import generate_each
from webui.engine.styles import PromptStyles
from webui.engine.upscale.extras import ExtrasRequest, ExtrasResult, run_extras, save_extras
from webui.engine.upscale.found import UpscalerInfo, find_upscalers
from webui.engine.upscale.model import UpscaleSetup
from webui.engine.weights.fp8 import compute_dtype, use_fp8_matmul
from webui.errors import Busy, ModelFileError, UserError
from webui.settings import OUTPUT_FOLDER_OPTIONS, AppConfig

log = logging.getLogger(__name__)
FORECAST_WAIT_SECONDS = 0.5  # a forecast that need not load waits this long for a running job, then says it runs


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was given but no CUDA device is available", field="--device")
        return torch.device("cuda")
    if choice == "mps" or (choice == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise UserError("--device mps was given but MPS is not available", field="--device")
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtypes(device: torch.device, no_half: bool, no_half_vae: bool) -> Dtypes:
    """Half precision on GPUs (bf16 for VAEs and flow transformers where supported: fp16 overflows there),
    float32 on the CPU."""
    if device.type == "cpu" or no_half:
        return Dtypes(torch.float32, torch.float32, torch.float32)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    half = torch.bfloat16 if bf16 else torch.float16
    return Dtypes(unet=torch.float16, flow=half, vae=torch.float32 if no_half_vae else half)


class CheckpointId(NamedTuple):
    """How A1111 names a checkpoint: its title, and its sha256 and short hash where the file was hashed already
    (hashing is work done at its first load)."""

    title: str
    sha256: str | None
    short_hash: str | None


@dataclass(frozen=True)
class MemoryState:
    """Where the engine's memory stands now, as figures: the API shapes them into A1111's /memory answer."""

    device: str
    policy: dict[str, Any]  # the memory policy of the last generation
    components: dict[str, dict[str, float]]  # per loaded component: MB in all, on the device, streamed
    last_generation: dict[str, Any]
    cuda: tuple[int, int, dict[str, int]] | None  # on CUDA: free and total bytes, torch's allocator counters


class Engine:
    def __init__(self, config: AppConfig, memory: DeviceMemory | None = None):
        """``memory`` replaces the device's real memory figures (tests simulate a small GPU with it)."""
        self.config = config
        self.options = config.options
        args = config.args
        self.device = pick_device(args.device)
        limit_heap_arenas()
        use_cache_dir(config.paths.data_dir)  # the compiled denoiser's kernels, found again after a restart
        if self.device.type == "cuda":
            use_expandable_segments()
        dtypes = pick_dtypes(self.device, args.no_half, args.no_half_vae)
        self.memory = MemoryManager(self.device, memory)
        self.families = Families()  # one registry: the loaded models' families and the previews' colours
        self.progress = Progress(families=self.families)
        hashes = HashCache(config.paths.hash_cache_file, lambda: self.progress.interrupted)
        self.models = ModelManager(
            list(config.paths.checkpoint_dirs), config.paths.builtin_models_dir, config.paths.vae_dir,
            config.paths.text_encoder_dir, config.paths.builtin_modules_dir, hashes, self.memory, dtypes,
            families=self.families,
        )
        self.controlnets = ControlNets(config.paths.controlnet_dir, CONTROLNET_DIR)
        self.styles = PromptStyles(config.paths.styles_file)
        self.embeddings = EmbeddingLibrary(config.paths.embeddings_dir, hashes.sha256)
        self.dynamic_prompts = DynamicPrompts(config.paths.wildcards_dir)
        self.detectors = Detectors(config.paths.controlnet_preprocessor_dir)
        self.clip_vision = ClipVisionEncoders(config.paths.clip_vision_dir)
        self._remove_stale_temp_files()
        self.samplers = SamplerRegistry()  # A1111's samplers and schedule types, and those extensions add
        self.hooks = Hooks(releases=[self.samplers.release])  # what extensions registered (webui.extensions loads them)
        self._announced: Callable[[], object] = lambda: None  # the model model_loaded was last fired for (weakly)
        self._generate_lock = threading.Lock()
        self._forecast_lock = threading.Lock()
        self._rates: dict[tuple, Rates] = {}  # per model (the model manager's identity): measured at its last job
        log.info("Engine ready on %s (%s); %d checkpoint(s) found.", self.device, dtypes.unet,
                 len(self.models.checkpoints()))

    def _remove_stale_temp_files(self) -> None:
        """Half-written images of a process killed while saving: gone at the next start."""
        outdir = self.config.paths.outdir
        removed = remove_stale_temp_files(outdir) if outdir.is_dir() else 0
        if removed:
            log.info("Removed %d half-written image(s) left by a process that was stopped while saving.", removed)

    def checkpoint(self, name: str | None) -> CheckpointInfo:
        """The checkpoint a request names, or the one selected in the settings, or the first found."""
        if name:
            return self.models.find(name)
        return self.models.default_checkpoint(self.options["sd_model_checkpoint"])

    def selected_checkpoint(self) -> tuple[str, str | None] | None:
        """The title and sha256 (where hashed already) of the checkpoint the next generation without a checkpoint of
        its own uses (the settings' one, else the first found), whatever is loaded now; None when there is none."""
        try:
            info = self.checkpoint(None)
        except UserError:
            return None
        return self.checkpoint_id(info)[:2]

    def checkpoint_id(self, info: CheckpointInfo) -> CheckpointId:
        sha = self.models.hashes.cached(info.path)
        return CheckpointId(checkpoint_title(info, sha), sha, short_hash(sha) if sha else None)

    def selected_checkpoint_title(self) -> str | None:
        selected = self.selected_checkpoint()
        return selected[0] if selected else None

    def declared_size(self, checkpoint: str | None) -> tuple[int, int] | None:
        """The (width, height) a checkpoint (else the selected one) says it was trained at, where its file says."""
        try:
            return declared_resolution(self.checkpoint(checkpoint))
        except UserError:
            return None

    def checkpoint_fields(self, title: str | None) -> FamilyFields:
        """The family-specific fields of a checkpoint, read from its header (not loaded); where that does not tell
        (no title, .ckpt files, SD diffusers folders, a file that cannot be read) those of the SD families."""
        try:
            family = checkpoint_family(self.models.find(title)) if title else None
        except (UserError, ModelFileError):
            family = None
        return self.families[family or Family.SD1].form_fields

    def checkpoint_preset(self, title: str | None) -> FastPreset | None:
        """The few-step preset (``fast_presets``) of a checkpoint (else the selected one), from its name and its
        header's; None for another model or one there is none of."""
        try:
            info = self.checkpoint(title)
        except UserError:
            return None
        return fast_preset(info.model_name, *_names_in_header(info.path))

    def network_preset(self, kind: str, name: str) -> FastPreset | None:
        """The few-step preset of a prompt network's file (an LCM LoRA …); None for another file or none there."""
        try:
            path = self._network_file(kind, name)
        except UserError:
            return None
        return fast_preset(Path(name).name, *_names_in_header(path))

    def _network_file(self, kind: str, name: str) -> Path:
        """The file of a prompt network (``<kind:name>``); UserError where there is no such network or file."""
        network = self.browsable_networks().get(kind)
        if network is None or not hasattr(network, "path"):
            raise UserError(f"no {kind} network names its files: is its extension loaded?")
        return network.path(name)

    def _preset_notices(self, request: GenerationRequest, info: CheckpointInfo) -> list[str]:
        """What a request that samples far from its checkpoint's or LoRAs' few-step preset should know."""
        found = [(f"The checkpoint {info.model_name}", self.checkpoint_preset(info.name))]
        found += [(f"The {call.kind} {call.name}", self.network_preset(call.kind, call.name))
                  for call in extract_networks(request.prompt)[1]]
        return [f"{what} is a {preset.kind} model: it draws best with {preset.describe()} (this request: "
                f"{request.sampler_name}, {request.steps} steps, CFG {request.cfg_scale:g})."
                for what, preset in found if preset is not None and preset.far_from(request.steps, request.cfg_scale)]

    def gpu_total_mb(self) -> int:
        """The device memory Forge's GPU Weights is a part of (the slider's maximum)."""
        return self.memory.memory.total() // MB

    def gpu_description(self) -> str | None:
        """The device GPU Weights applies to, in words; None on the CPU, where there is no GPU budget."""
        return self.memory.memory.describe() if self.memory.limited else None

    def gpu_weights_mb(self) -> int:
        """Forge's GPU Weights: the memory left for weights once the inference reserve (the option that stores
        it, as Forge's does) is taken."""
        return max(self.gpu_total_mb() - self.options["forge_inference_memory"], 0)

    def inference_reserve_mb(self, weights_mb: float) -> int:
        """The reserve option's value for GPU Weights of ``weights_mb`` (the one conversion that way)."""
        return self.gpu_total_mb() - int(weights_mb)

    def set_gpu_weights_mb(self, weights_mb: float) -> None:
        self.set_options({"forge_inference_memory": self.inference_reserve_mb(weights_mb)})

    def browsable_networks(self) -> dict[str, Network]:
        """The prompt networks extensions registered that can name their files (the UI's network browsers)."""
        return {kind: network for kind, (_owner, network) in self.hooks.networks.items() if hasattr(network, "names")}

    def memory_state(self) -> MemoryState:
        """The memory manager's figures, and torch's own on CUDA (the real device's, also where tests simulate one)."""
        memory = self.memory
        cuda = None
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            cuda = free, total, torch.cuda.memory_stats(self.device)
        components = {name: {"total_mb": c.nbytes / MB, "device_mb": c.device_bytes() / MB,
                             "streamed_mb": c.streamed_bytes() / MB} for name, c in memory.components.items()}
        return MemoryState(str(self.device), asdict(memory.policy), components, memory.last.as_dict(), cuda)

    def sampler_names(self) -> list[str]:
        return self.samplers.sampler_names()

    def schedule_type_names(self) -> list[str]:
        return self.samplers.schedule_type_names()

    def known_schedule_type(self, name: str) -> bool:
        """Whether a schedule type of that label, id or alias exists (A1111's API samples others as Automatic)."""
        try:
            self.samplers.find_schedule_type(name)
        except UserError:
            return False
        return True

    def canonical_sampler(self, name: str, schedule_type: str | None) -> tuple[str, str]:
        """(sampler, schedule type) as the infotext names them; an older combined name ("DPM++ 2M Karras") split."""
        return self.samplers.resolve(name, schedule_type)

    def api_samplers(self) -> list[dict[str, Any]]:
        return self.samplers.api_samplers()

    def api_schedulers(self) -> list[dict[str, Any]]:
        return self.samplers.api_schedulers()

    def add_network(self, kind: str, network: Network, owner: str) -> None:
        """Hand the prompt tags ``<kind:...>`` to ``network`` (``Hooks.add_network``: the first owner keeps a kind)."""
        self.hooks.add_network(kind, network, owner=owner)

    def load_selected(self) -> None:
        """Load the checkpoint (VAE, modules) the options select, as a generation would (A1111's reload-checkpoint)."""
        with self._generate_lock:
            self.progress.reset()  # a job of its own: an Interrupt of the job before does not stop its hashing
            self._model(self.checkpoint(None), None, None)

    def set_options(self, changes: dict[str, Any]) -> None:
        """Change options (the UI's and the API's one way): checked together, the checkpoint, VAE and module files
        they newly name must exist, then stored; the next job uses them."""
        changed = {k: v for k, v in self.options.checked(changes).items() if self.options.get(k) != v}
        if changed.get("sd_model_checkpoint"):
            self.models.find(changed["sd_model_checkpoint"])
        if "sd_vae" in changed:
            self.models.find_vae(changed["sd_vae"])
        if "forge_additional_modules" in changed:
            self.models.find_modules(changed["forge_additional_modules"])
        self.options.update(changes)

    def _model_choice(self, vae: str | None, modules: list[str] | None) -> tuple:
        """What besides the checkpoint makes the model a generation uses: VAE, storage, modules, T5 (the options'
        where the request does not say)."""
        return (vae if vae is not None else self.options["sd_vae"], self.options["forge_unet_storage_dtype"],
                tuple(modules if modules is not None else self.options["forge_additional_modules"]),
                self.options["sd3_enable_t5"], self.options["t5_storage_dtype"])

    def _model(self, info: CheckpointInfo, vae: str | None, modules: list[str] | None) -> LoadedModel:
        """The model a generation uses, loaded or switched to as the options say; extensions hear of a new one."""
        model = self.models.get(info, *self._model_choice(vae, modules), self.options["sd_checkpoints_limit"])
        if self._announced() is not model:
            self._announced = weakref.ref(model)
            self.hooks.fire("model_loaded", model=model)
        return model

    def txt2img(self, request: GenerationRequest) -> GenerationResult:
        """Validate, load what is needed and generate. Raises UserError for anything the user can fix."""
        if request.init_images is not None:
            raise UserError("txt2img starts from noise: send init images to img2img", field="init_images")
        return self._generate(request)

    def img2img(self, request: GenerationRequest) -> GenerationResult:
        """txt2img's path from the request's init images (``GenerationRequest.init_images``, denoising strength,
        resize mode), outpainted first where the request says so. Raises UserError for anything the user can fix."""
        if not request.init_images:
            raise UserError("img2img needs an init image", field="init_images")
        return self._generate(self._outpainted(request))

    def _outpainted(self, request: GenerationRequest) -> GenerationRequest:
        """An outpainting request as the inpainting of its canvas (``outpaint``); any other as it is."""
        outpaint = request.outpainting() if request.init_images else None
        return request if outpaint is None else outpaint.applied(request, self.options["max_image_side"])

    def img2img_folder(self, base: GenerationRequest, batch: FolderBatch) -> GenerationResult:
        """A1111's img2img Batch tab: ``base`` over every image of a folder on the server (``folder_batch``), one
        result for all; refused under --hide-ui-dir-config."""
        return run_folder_batch(self.img2img, self.progress, base, batch, self.options["max_image_side"],
                                folders_allowed=not self.config.args.hide_ui_dir_config)

    def _styled(self, request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
        """The request with its prompt styles applied (to the hires prompts too, where it has its own), and the style
        names there is none of (A1111 skips them; here the result's notices name them)."""
        if not request.styles:
            return request, []
        prompt, negative, missing = self.styles.apply(request.prompt, request.negative_prompt, request.styles)
        hr_prompt, hr_negative, _ = self.styles.apply(request.hr_prompt, request.hr_negative_prompt, request.styles)
        # an empty hires prompt stays empty: the second pass takes the styled prompt, as A1111's
        return replace(request, prompt=prompt, negative_prompt=negative, styles=None,
                       hr_prompt=request.hr_prompt and hr_prompt,
                       hr_negative_prompt=request.hr_negative_prompt and hr_negative), missing

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        request.validate(self.options.as_dict())  # (a prompt that is no text is named before styles or dynamic
        request, missing = self._styled(request)  # prompts read it; the styled request is checked again)
        if self.options["dp_enabled"] and has_syntax(request.prompt, request.negative_prompt):
            return self._dynamic(request, missing)
        return self._generate_one(request, missing)

    def _dynamic(self, request: GenerationRequest, missing: list[str]) -> GenerationResult:
        """A request with dynamic prompts: each image its own prompts (``conditioning.dynamic``), generated one by
        one with its own seed (the seeds a batch would have had), as one result; progress counts them as a plot's
        cells."""
        seed, subseed = resolve_seed(request.seed), resolve_seed(request.subseed)
        expanded = self.dynamic_prompts.expand(request.prompt, request.negative_prompt,
                                               request.n_iter * request.batch_size, seed,
                                               self.options["dp_combinatorial"])
        templates = {"Template": request.prompt}
        if has_syntax(request.negative_prompt):
            templates["Negative Template"] = request.negative_prompt
        requests = [replace(request, prompt=image.prompt, negative_prompt=image.negative_prompt, seed=seed + i,
                            subseed=subseed + i, n_iter=1, batch_size=1) for i, image in enumerate(expanded)]
        made = generate_each(self.progress, lambda one: self._generate_one(one, missing, templates), requests)
        result = combined(made)
        result.request = request
        if self.options["dp_combinatorial"]:
            result.notices.append(f"Combinatorial dynamic prompts: {len(expanded)} combinations, one image each (the "
                                  "batch count and size are not used).")
        return result

    def _generate_one(self, request: GenerationRequest, missing: list[str],
                      infotext: dict[str, str] | None = None) -> GenerationResult:
        """One request through the generation path; ``infotext``: fields to add to its images' infotexts."""
        self.hooks.fire("before_generation", request=request)
        request.validate(self.options.as_dict())
        info = self.checkpoint(request.checkpoint)
        sampling = self.samplers.choose(request.sampler_name, request.scheduler, request.eta, self.options.as_dict())
        with self._generate_lock, self.memory.tracing() as trace:
            self.progress.reset()
            self.progress.preview_every = self.options["show_progress_every_n_steps"]
            trace.begin_phase("loading")
            model = self._model(info, request.vae, request.modules)
            job = self._job(request, sampling, model, activate=True)
            job.extra_params.update(infotext or {})
            policy = self.memory_policy()
            rates = self._rates.setdefault(self.models.identity, Rates())
            forecast = forecast_job(model, self.memory, policy, job, rates)
            forecast.check_host()
            result = generate(model, self.memory, policy, job, self.progress, self._saver(job.mode), self.hooks)
            result.forecast = forecast
            if not result.interrupted and (job.hires is None or job.hires.other_model is None):
                rates.learn(forecast, result)  # (a hires pass on another checkpoint: not this model's rates)
        if not trace.running:  # its own recording; a plot's cells leave theirs to the plot
            result.memory_timeline = trace.timeline()
        result.notices.extend(f"no prompt style named {name!r} in {self.styles.path.name}: skipped" for name in missing)
        result.notices.extend(self._preset_notices(request, info))
        self.hooks.fire("after_generation", request=request, result=result)
        log.info("%s: %d image(s) %dx%d, %d steps, %s, seed %d, %.2f s on %s with %s [%s]%s",
                 job.mode, len(result.images), request.width, request.height, request.steps, result.sampler_name,
                 result.seed, result.seconds, self.device, info.name, job.model_hash,
                 " (interrupted)" if result.interrupted else "")
        return result

    def _job(self, request: GenerationRequest, sampling: Sampling, model: LoadedModel, activate: bool) -> Resolved:
        """The request resolved against the settings for ``model``; ``activate``: its prompts' networks (LoRAs) are
        put in place (a generation), else only taken out of the prompts (a forecast)."""
        prompt, calls = extract_networks(request.prompt)
        negative, negative_calls = extract_networks(request.negative_prompt)
        extra_params = self.hooks.activate_networks(model, calls + negative_calls) if activate else {}
        extra_params.update(self._use_embeddings(model, [prompt, negative]))
        init_images, inpainting = init_pictures(request, model.vae_scale_factor)
        job = Resolved(
            request=request,
            sampling=sampling,
            seed=resolve_seed(request.seed),
            subseed=resolve_seed(request.subseed),
            clip_skip=request.clip_skip or self.options["CLIP_stop_at_last_layers"],
            save=self.options["samples_save"] if request.save_images is None else request.save_images,
            model_hash=short_hash(self.models.current_sha256),
            vae_name=model.vae_name,
            shift=self.options["sd3_shift"],
            prompts=(prompt, negative),
            extra_params=extra_params,
            init_images=init_images,
            inpaint=inpainting,
            fix_steps=self.options["img2img_fix_steps"],
            compile=self.options["compile_denoiser"] or self.config.args.compile,
            graphs=self.options["cuda_graphs"] and not self.config.args.disable_cuda_graphs,
        )
        if activate:  # (a forecast leaves the denoiser as it is)
            job.controls = self._controls(request, model, init_images, job.seed)
            wanted = FLAG_CHOICES.get(self.config.args.attention) or self.options["attention_backend"]
            job.attention = use_attention(model.denoiser, wanted, self.device)[0]
            fast = self.options["fp8_matrix_mult"] or "fp8_matrix_mult" in (self.config.args.fast or ())
            job.fp8_matmul = use_fp8_matmul(model.denoiser, fast, self.device)
        if init_images is not None:
            multiplier = request.initial_noise_multiplier
            job.noise_multiplier = self.options["initial_noise_multiplier"] if multiplier is None else multiplier
        if request.enable_hr:
            options = self.options.as_dict()
            job.hires = resolve_hires(job, model.kind.size_multiple, self.options["max_image_side"],
                                      lambda sampler, schedule: self.samplers.choose(sampler, schedule, request.eta,
                                                                                     options),
                                      self.upscalers, self._upscale_setup())
            job.hires.other_model = self._hires_model(job, model, calls + negative_calls, activate)
        return job

    def _use_embeddings(self, model: LoadedModel, prompts: list[str]) -> dict[str, str]:
        """Give the model's text encoders the embeddings that fit them (the folder as it is now); the infotext's "TI
        hashes" of those ``prompts`` use."""
        slots = model.text_encoders if model.kind.textual_inversion else []
        for slot, table in zip(slots, self.embeddings.tables(slots)):
            slot.embeddings = table
        used = embeddings_used(prompts, slots[0]) if slots else []
        if not used:
            return {}
        return {"TI hashes": ", ".join(f"{e.name}: {self.embeddings.short_hash(e)}" for e in used)}

    def embeddings_info(self) -> dict[str, dict[str, dict]]:
        """A1111's /sdapi/v1/embeddings for the loaded model: those it takes, and the others with the reason (no
        model loaded: every one skipped, saying so)."""
        model = self.models.current
        slots = model.text_encoders if model is not None and model.kind.textual_inversion else []
        widths = [slot.model.config.hidden_size for slot in slots]
        loaded, skipped = self.embeddings.sort(widths)
        if model is None or not model.kind.textual_inversion:
            why = "no model is loaded yet" if model is None else \
                f"{model.family.value} models take no textual-inversion embeddings"
            skipped = {name: (embedding, why) for name, embedding in loaded.items()} | {
                name: (embedding, why) for name, (embedding, _) in skipped.items()}
            loaded = {}
        return {"loaded": {name: e.describe(widths) for name, e in loaded.items()},
                "skipped": {name: {**(e.describe(widths) if e is not None else {}), "reason": why}
                            for name, (e, why) in skipped.items()}}

    def _controls(self, request: GenerationRequest, model: LoadedModel, init_images: list[Image.Image] | None,
                  seed: int) -> list[ActiveUnit]:
        """The request's ControlNet units, their pictures preprocessed (a unit without one takes the init image),
        their models in place (those of earlier jobs let go)."""
        units = request.controlnet or []
        detected = [self.detectors.control_image(unit, init_images[0] if unit.image is None else unit.image,
                                                 request.width, request.height, self.memory, seed,
                                                 f"controlnet[{index}]")
                    for index, unit in enumerate(units)]
        active = self.controlnets.activate(detected, model.family, model.denoiser, self.memory,
                                           STORAGE_DTYPES[self.options["forge_unet_storage_dtype"]])
        for index, unit in enumerate(active):
            if isinstance(unit.model, IPAdapter):
                encoder = self.clip_vision.for_adapter(unit.model, compute_dtype(model.denoiser),
                                                       f"controlnet[{index}].model")
                with placed(encoder, self.memory, IMAGE_ENCODER_ACTIVATION, "clip_vision") as device:
                    unit.embeds = image_embeddings(encoder, unit.model, unit.image, device)
        return active

    def detect(self, module: str, images: list[Image.Image], resolution: int | None = None,
               a: float | None = None, b: float | None = None) -> list[Image.Image]:
        """``/controlnet/detect`` and the UI's preview: each image through a preprocessor (its default resolution
        and sliders where not given), one job at a time with generations (it may use the device)."""
        preprocessor = find_preprocessor(module, "controlnet_module")
        settings = preprocessor.chosen(resolution, a, b)
        with self._generate_lock:
            self.memory.begin(self.memory_policy(), 0)
            try:
                return [self.detectors.detect(preprocessor, image, *settings, self.memory) for image in images]
            finally:
                self.memory.finish()

    def _hires_model(self, job: Resolved, model: LoadedModel, calls: list, hashed: bool) -> OtherModel | None:
        """hr_checkpoint_name's model for hires. fix's second pass, where it names another checkpoint than
        ``model``'s: loaded with the same VAE and modules choice, both kept in host memory for the job (a limit of
        one model is taken as two; automatic keeps them where half the RAM holds them, else the first is read again
        each batch), the hires prompts' networks applied to it (``calls``, the first prompts', to the
        first model again). ``hashed``: its hash is computed now for the infotext (else only a known one is used)."""
        request = job.request
        if request.hr_checkpoint_name in (None, "", SAME_CHECKPOINT):
            return None
        try:
            info = self.models.find(request.hr_checkpoint_name)
        except UserError as e:
            raise UserError(e.message, field="hr_checkpoint_name") from None
        if info.path == model.info.path:
            return None
        family = checkpoint_family(info)
        if family is not None:  # refused before anything runs (a file that does not say: once it is loaded)
            check_latent_handover(job.hires, model.family, family, info.name)
        if job.controls and family is not model.family:
            raise UserError(f"the ControlNet units are for {model.family.value} and {info.name} is "
                            f"{family.value if family else 'of a family only its loading tells'}: pick a hires "
                            "checkpoint of the same family, or none", field="hr_checkpoint_name")
        limit = self.options["sd_checkpoints_limit"]  # 0 (automatic) keeps both where half the RAM holds them
        choice, keep = self._model_choice(request.vae, request.modules), 0 if limit == 0 else max(2, limit)

        def switch(to: CheckpointInfo, networks: list) -> LoadedModel:
            switched = self.models.get(to, *choice, keep)
            self.hooks.activate_networks(switched, networks)
            return switched

        hashes = self.models.hashes
        sha = hashes.sha256(info.path) if hashed else hashes.cached(info.path)
        first = model.info
        return OtherModel(checkpoint_title(info, sha), lambda: switch(info, job.hires.networks),
                          lambda: switch(first, calls))

    def merge_checkpoints(self, request: MergeRequest) -> MergeResult:
        """The checkpoint merger (``webui.engine.merge``): the request's files found, merged one job at a time with the
        generations, and the results listed at once."""
        request = request.checked()
        paths = []
        for name, field in zip(request.sources, ("primary", "secondary", "tertiary")):
            try:
                paths.append(self.checkpoint(name).path)
            except UserError as e:
                raise UserError(e.message, field=field) from None
        try:
            vae = self.models.find_vae(request.bake_in_vae)
        except UserError as e:
            raise UserError(e.message, field="bake_in_vae") from None
        try:
            loras = [(self._network_file("lora", name), float(weight)) for name, weight in request.loras]
        except UserError as e:
            raise UserError(e.message, field="loras") from None
        paths_config = self.config.paths
        inputs = MergeInputs(paths, vae, loras, paths_config.checkpoint_dirs[0], paths_config.vae_dir,
                             paths_config.text_encoder_dir)
        with self._generate_lock:
            self.progress.reset()  # (an Interrupt given to an earlier job is not this one's)
            result = merge_checkpoints(request, inputs, self.progress)
        self.models.refresh()
        log.info("merged %s (%s, %s) into %s: %d tensors in %.1f s, the largest %.0f MB",
                 ", ".join(p.name for p in paths), request.method, request.precision,
                 ", ".join(p.name for p in result.paths), result.tensors, result.seconds, result.largest_tensor_mb)
        return result

    def forecast(self, request: GenerationRequest, load: bool = False) -> Forecast:
        """Will it fit? The request's peak VRAM, host RAM and time, forecast from the memory manager's plan and the
        rates measured here (``webui.engine.forecast``); nothing is generated or moved. The forecast needs the
        model's weights: ``load`` loads it as a generation would; else a model not loaded now is a UserError."""
        request = self._styled(self._outpainted(request))[0]
        request.validate(self.options.as_dict())
        info = self.checkpoint(request.checkpoint)
        sampling = self.samplers.choose(request.sampler_name, request.scheduler, request.eta, self.options.as_dict())
        with self._forecast_lock:  # one forecast at a time: a form change sends several at once
            return self._forecast(request, info, sampling, load)

    def _forecast(self, request: GenerationRequest, info: CheckpointInfo, sampling: Sampling, load: bool) -> Forecast:
        if not self._generate_lock.acquire(timeout=-1 if load else FORECAST_WAIT_SECONDS):
            raise Busy("a job is running; the forecast can be made when it is done")
        try:
            model = (self._model(info, request.vae, request.modules) if load
                     else self.models.loaded(info, *self._model_choice(request.vae, request.modules)))
            if model is None:
                raise UserError(f"{info.name} is not loaded: a forecast needs the sizes of its weights. Generate once "
                                "or load it first.")
            job = self._job(request, sampling, model, activate=False)
            model.kind.check_size(request.width, request.height)
            return forecast_job(model, self.memory, self.memory_policy(), job, self._rates.get(self.models.identity))
        finally:
            self._generate_lock.release()

    def memory_policy(self) -> MemoryPolicy:
        """Flags and options as the memory manager needs them, read at every generation."""
        args, options = self.config.args, self.options
        mode = (MemoryMode.ALWAYS_GPU if args.always_gpu else MemoryMode.LOWVRAM if args.lowvram
                else MemoryMode.MEDVRAM if args.medvram else MemoryMode.AUTO)
        return MemoryPolicy(
            mode=mode,
            offload_after=args.always_offload_from_vram,
            inference_mb=options["forge_inference_memory"],
            async_copies=options["forge_async_loading"] == "Async",
            pinned=options["forge_pin_shared_memory"] == "Shared",
        )

    def output_folder(self, key: str) -> Path:
        return self.config.paths.output_folder(key, self.options[key], OUTPUT_FOLDER_OPTIONS[key])

    def _saver(self, mode: str):
        outdir = self.output_folder(f"outdir_{mode}_samples")

        def save(image: Image.Image, seed: int, prompt: str, infotext: str, png: bytes) -> Path:
            path = save_image(image, outdir, seed, prompt, infotext, png=png)
            self.hooks.fire("image_saved", path=path, image=image, infotext=infotext)
            return path

        return save

    def save_result(self, result: GenerationResult) -> None:
        """Save the images of a result another engine made (a Ray Serve replica's: the ingress saves) as the
        generation would have here: each where its request (or the option samples_save) says, in the txt2img or
        img2img folder, with the same names and infotexts; a disk that refuses is a notice, as there."""
        request = result.request
        if not (self.options["samples_save"] if request.save_images is None else request.save_images):
            return
        first = result.grids  # (a prompt matrix's grid: its caller saves it)
        images, infotexts = result.images[first:], result.infotexts[first:]
        save = self._saver("img2img" if request.init_images else "txt2img")
        for image, seed, prompt, infotext, png in zip(images, result.seeds[first:], result.prompts[first:],
                                                      infotexts, png_files(images, infotexts)):
            save_or_notice(save, image, seed, prompt, infotext, png, result)

    def upscalers(self) -> list[UpscalerInfo]:
        """A1111's upscaler list: the built-in ones (None, Lanczos, Nearest), then the model files of the upscaler
        folders, read at every call (as the VAE list)."""
        return find_upscalers(self.config.paths.upscaler_dirs)

    def _upscale_setup(self) -> UpscaleSetup:
        """How upscaler models run here (Extras, hires. fix): the memory manager, the policy, the tiling options."""
        return UpscaleSetup(self.memory, self.memory_policy(), self.models.dtypes.unet, self.options["ESRGAN_tile"],
                            self.options["ESRGAN_tile_overlap"], lambda: self.progress.interrupted)

    def extras(self, request: ExtrasRequest, parameters: list[str | None] | None = None) -> ExtrasResult:
        """The Extras tab's job (``upscale.extras``) for one image or a batch, one job at a time with generations (it
        uses the device too); upscaler models are placed by the memory manager. ``parameters``: each image's
        generation parameters, kept in its PNG. Saved to outdir_extras_samples when the request says so."""
        parameters = parameters or [None] * len(request.images)
        setup = self._upscale_setup()
        with self._generate_lock:
            self.progress.reset()
            self.progress.begin("extras", len(request.images), 1)
            try:
                result = run_extras(request, self.upscalers(), setup, self.options["max_image_side"], parameters)
            finally:
                self.progress.end()
        if request.save:
            result.paths = save_extras(result, self.output_folder("outdir_extras_samples"), parameters)
        log.info("extras: %d image(s) with %s%s in %.2f s", len(result.images), request.upscaler_1,
                 f" and {request.upscaler_2}" if request.blends else "", result.seconds)
        return result


def _names_in_header(path: Path) -> tuple[str, ...]:
    """The names a .safetensors file's metadata gives its model (``fast_presets``); none for other files or a header
    that cannot be read (the load names that problem). Read once while the file stays the same: each generation asks
    for its checkpoint's and LoRAs'."""
    if path.suffix != ".safetensors" or not path.is_file():
        return ()
    stat = path.stat()
    return _header_names(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _header_names(path: Path, size: int, mtime_ns: int) -> tuple[str, ...]:
    try:
        return tuple(named_in(read_safetensors_header(path)[1]))
    except ModelFileError:
        return ()
