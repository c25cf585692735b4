"""The row above the tabs: checkpoint, VAE, Forge's "VAE / Text Encoder" modules, GPU Weights, and Forge's storage
and swap options. Each control writes the settings store at once; the next generation uses it."""
from __future__ import annotations

from functools import partial

import gradio as gr

from webui.engine.engine import Engine
from webui.errors import UserError
from webui.settings import OPTION_CHOICES
from webui.ui.common import OPTION_LABELS, REFRESH, set_option

VAE_BUILTIN = ["Automatic", "None"]
# Forge's storage and swap options, as dropdowns under the model row (choices from the settings store).
CHOICE_LABELS = {"forge_unet_storage_dtype": "Diffusion in Low Bits", "t5_storage_dtype": "T5 storage",
                 "forge_async_loading": "Swap Method", "forge_pin_shared_memory": "Swap Location"}


def checkpoint_choices(engine: Engine) -> tuple[list[str], str | None]:
    """All checkpoint titles, and the one the next generation uses (the settings' choice, not the one loaded now:
    a reload or a second tab shows what Generate will use)."""
    models = engine.models
    return [models.title(info) for info in models.checkpoints()], engine.selected_checkpoint_title()


def vae_choices(engine: Engine) -> tuple[list[str], str]:
    names = VAE_BUILTIN + [engine.models.vae_name(path) for path in engine.models.vaes()]
    selected = engine.options["sd_vae"]
    return names, selected if selected in names else "Automatic"


def total_memory_mb(engine: Engine) -> int:
    """The GPU Weights slider's maximum."""
    return engine.gpu_total_mb()


def gpu_weights_info(engine: Engine, total_mb: int) -> str:
    """What the slider does here: on the CPU there is no GPU to keep weights on (Forge shows it all the same)."""
    device = engine.gpu_description()
    if device is None:
        return "No effect while running on the CPU: all weights stay in RAM. The value is kept for runs on a GPU."
    return f"Out of {total_mb} MB of {device}; the rest stays free for computation."


def module_choices(engine: Engine) -> tuple[list[str], list[str]]:
    """Forge's "VAE / Text Encoder" list (files of models/VAE and models/text_encoder) and those chosen."""
    names = [engine.models.module_name(path) for path in engine.models.module_files()]
    return names, [n for n in engine.options["forge_additional_modules"] if n in names]


def model_row(demo: gr.Blocks, engine: Engine) -> gr.Dropdown:
    """The row; returns the checkpoint dropdown (the txt2img tab shows the fields of its family)."""
    total_mb = total_memory_mb(engine)
    titles, title = checkpoint_choices(engine)
    vaes, vae = vae_choices(engine)
    modules, chosen = module_choices(engine)
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(titles, value=title, label=OPTION_LABELS["sd_model_checkpoint"], scale=4,
                                 elem_id="sd_model_checkpoint")
        refresh = gr.Button(REFRESH, scale=0, min_width=48, elem_id="refresh_checkpoints")
        vae_box = gr.Dropdown(vaes, value=vae, label=OPTION_LABELS["sd_vae"], scale=2, elem_id="sd_vae")
        modules_box = gr.Dropdown(modules, value=chosen, multiselect=True, scale=3, elem_id="forge_additional_modules",
                                  label=OPTION_LABELS["forge_additional_modules"])
        gpu_weights = gr.Slider(
            0, total_mb, step=1, precision=0, scale=3, elem_id="gpu_weights",
            value=gpu_weights_mb(engine, total_mb), label="GPU Weights (MB)",
            info=gpu_weights_info(engine, total_mb),
        )

    with gr.Row(equal_height=True):
        choices = {key: gr.Dropdown(list(OPTION_CHOICES[key]), value=engine.options[key], label=label, elem_id=key)
                   for key, label in CHOICE_LABELS.items()}

    def model_lists() -> tuple[dict, dict, dict]:
        titles, title = checkpoint_choices(engine)
        vaes, vae = vae_choices(engine)
        modules, chosen = module_choices(engine)
        return (gr.update(choices=titles, value=title), gr.update(choices=vaes, value=vae),
                gr.update(choices=modules, value=chosen))

    def refreshed() -> tuple[dict, dict, dict]:
        engine.models.refresh()
        return model_lists()

    def on_load() -> tuple:
        """Show the settings as they are now: another tab or the API may have changed them."""
        return *model_lists(), gpu_weights_mb(engine, total_mb), *(engine.options[key] for key in choices)

    lists = [checkpoint, vae_box, modules_box]
    demo.load(on_load, outputs=[*lists, gpu_weights, *choices.values()], api_visibility="private")
    for key, box in choices.items():
        box.input(partial(set_option, engine, key), box, api_visibility="private")
    refresh.click(refreshed, outputs=lists, api_visibility="private")
    checkpoint.input(partial(set_option, engine, "sd_model_checkpoint"), checkpoint, api_visibility="private")
    vae_box.input(partial(set_option, engine, "sd_vae"), vae_box, api_visibility="private")
    modules_box.input(partial(set_option, engine, "forge_additional_modules"), modules_box, api_visibility="private")
    gpu_weights.input(partial(set_gpu_weights, engine, total_mb), gpu_weights, api_visibility="private")
    return checkpoint


def gpu_weights_mb(engine: Engine, total_mb: int) -> int:
    """The slider's value: GPU Weights, within the slider's range (0 … ``total_mb``)."""
    return min(engine.gpu_weights_mb(), total_mb)


def set_gpu_weights(engine: Engine, total_mb: int, weights_mb: float) -> None:
    """The slider's input (within its range, as Gradio checked), stored by the engine; a refusal is a warning."""
    try:
        engine.set_gpu_weights_mb(min(weights_mb, total_mb))
    except UserError as e:
        gr.Warning(str(e))
