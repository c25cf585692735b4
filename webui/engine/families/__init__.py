"""Model families: everything that differs between SD1.x/SD2.x, SDXL, SD3.x and Flux, one module each.

The engine's path is the same for every family — find the checkpoint, assemble its components,
encode the prompts, denoise, decode — and each step asks the model's family what is its own, in
the spirit of Forge's ``backend/diffusion_engine/*`` (one class per family, chosen by what the
state dict looks like) and diffusers' per-family pipelines (each with its own ``encode_prompt``
and loop). The contract is ``protocol.FamilyModel``:

* ``family``: the ``formats.detect.Family`` it serves (detection stays one pass over the tensors;
  SD2.x is SD1.x's class with its own text encoder's names and A1111's v-prediction test).
* ``activation_per_pixel`` and ``encode_activation_per_prompt``: the denoise and text-encoding phases'
  activation bytes, for the memory manager's budget of each phase (``memory.activation``); the VAE
  decode's estimate is the same for all.
* ``latent_rgb``: the linear latent → RGB map of the live preview (None: 16-channel latents,
  previewed as their mean).
* ``clip_kinds``: its CLIP text encoders, in order (what assembly from files looks for).
* ``check_size(width, height)``: sizes its denoiser cannot take, refused before anything runs.
* ``encode(model, prompts, clip_skip, device, dtype)``: prompts → ``Conditioning`` (CLIP alone,
  CLIP + T5, ...).
* ``denoise(model, job, seeds, generators, noise, cond, uncond, on_step)``: noise → latents. The
  UNet families share diffusers' eps/v loop (``sampling.unet_loop``) through ``base.UNetFamily``,
  the flow-matching ones the flow loop (``sampling.flow``) through ``base.FlowFamily``; a family
  adds only what it feeds the loop (SDXL's micro-conditioning; a flow shift, and how the
  transformer sees the latents: Flux's packed patches, ``sampling.flow.FlowLayout``).
* ``infotext_fields(model, job)``: the PNG "parameters" fields only it writes.
* Assembly from files: ``latent_channels`` (a VAE file of another width is not its own), ``vae_upcast``
  (its VAE overflows in float16), ``clip_penultimate`` (which CLIP layer it reads); the UNet families'
  ``prediction_type`` (SD2.x's test for files that do not say).
* Its LoRA key table (``lora.layout``): ``lora_text_encoders`` (the text encoders a LoRA may adapt and
  the names trainers give them), ``lora_prefixes`` (what files put before the denoiser's names) and
  ``lora_layers(paths, config)`` (the denoiser's layers under the original checkpoint's names: LDM's
  from ``formats.ldm_keys`` for the UNets, the loaders' key tables for the transformers, where one
  name may cover fused layers or swapped halves). ``lora.keys`` reads files with these tables.

A flow family also says how it is assembled from files (``loading.assemble``): its transformer's
loaders (single file, GGUF) and diffusers class, whether it needs T5, its diffusers folder names.

``registry.Families`` holds one instance of each and finds the one for a detected family; the
model manager sets ``LoadedModel.kind`` from it and the progress reads preview colours from it,
rather than from a module-level table. ``generate`` asks ``model.kind`` and has no family branch.

Kept outside on purpose, because each compares all families at once: detection from tensors
(``formats.detect`` for single files, ``weights.gguf_load`` for GGUF; what checkpoints do not store,
such as a UNet's head count or a VAE's scaling, follows each family's convention there), and which
family a LoRA file is for (``lora.keys``: evidence that fits some families and rules out others).
The Flux and SD3.x modules also hold their transformers' converters and loaders.
"""
