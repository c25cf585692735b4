"""Model families: everything that differs between SD1.x/SD2.x, SDXL, SD3.x and Flux, one module each.

The engine's path is the same for every family — find the checkpoint, assemble its components,
encode the prompts, denoise, decode — and each step asks the model's family what is its own, in
the spirit of Forge's ``backend/diffusion_engine/*`` (one class per family, chosen by what the
state dict looks like) and diffusers' per-family pipelines (each with its own ``encode_prompt``
and loop). The contract is ``protocol.FamilyModel``:

* ``families``: which ``formats.detect.Family`` results it serves (detection stays one pass over
  the tensors; SD1.x and SD2.x differ only in their files, so one class serves both).
* ``activation_per_pixel``: the denoise phase's activation bytes per latent pixel, for the memory
  manager's budget (``memory.activation``); the VAE decode's estimate is the same for all.
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

A flow family also says how it is assembled from files (``loading.assemble``): its transformer's
loaders (single file, GGUF) and diffusers class, whether it needs T5, its diffusers folder names.

``registry.Families`` holds one instance of each and finds the one for a detected family; the
model manager sets ``LoadedModel.kind`` from it and the progress reads preview colours from it,
rather than from a module-level table. ``generate`` asks ``model.kind`` and has no family branch.

Still spread, to move here next: detection from tensors (``formats.detect``, ``weights.gguf_load``),
the UNet families' assembly (``loading.load``: CLIP layers, VAE upcast, SD2's v test) and the LoRA
key tables and family evidence (``lora.keys``). The Flux and SD3.x modules also hold their
transformers' converters and loaders.
"""
