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
* ``check_size(width, height)``: sizes its denoiser cannot take, refused before anything runs.
* ``encode(model, prompts, clip_skip, device, dtype)``: prompts → ``Conditioning`` (CLIP alone,
  CLIP + T5, ...).
* ``denoise(model, job, seeds, generators, noise, cond, uncond, on_step)``: noise → latents. The
  UNet families share diffusers' eps/v loop (``sampling.unet_loop``) through ``base.UNetFamily``,
  the flow-matching ones the flow loop (``sampling.flow``) through ``base.FlowFamily``; a family
  adds only what it feeds the loop (SDXL's micro-conditioning, a flow shift).
* ``infotext_fields(model, job)``: the PNG "parameters" fields only it writes.

``registry.Families`` holds one instance of each and finds the one for a detected family; the
engine owns it (given to the model manager and the progress) rather than a module-level table.
``generate`` asks ``model.kind`` (the loaded model's family) and has no family branch.

Still spread, to move here next: detection (``formats.detect``), assembly from files
(``loading.assemble``/``load``), the flow loop's Flux packing (``sampling.flow``) and the LoRA key
tables (``lora.keys``). The Flux and SD3.x modules also hold their transformers' converters.
"""
