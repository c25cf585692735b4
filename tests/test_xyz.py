"""The X/Y/Z plot through the engine, and model switching that leaves nothing behind."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import FLUX_GGUF_MODULES, flux_gguf_models, make_engine
from webui.engine.infotext import parse_infotext
from webui.engine.memory.manager import MemoryManager, SimulatedMemory
from webui.engine.request import GenerationRequest
from webui.engine.xyz import BUILTIN_AXES, AxisChoice, PlotOptions, extension_axis, run_plot
from webui.errors import UserError

BASE = dict(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=2, cfg_scale=5.0,
            sampler_name="Euler", seed=5, save_images=False)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_each_cell_is_the_plain_generation_and_the_grid_is_labelled(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    plot = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("Steps", "2-3"), AxisChoice("CFG Scale", "3, 7.5")],
                    BUILTIN_AXES)
    assert len(plot.cells) == 4 and not plot.interrupted
    for cell, (steps, cfg) in zip(plot.cells, [(2, 3), (3, 3), (2, 7.5), (3, 7.5)]):  # X fastest
        params = parse_infotext(cell.infotexts[0])
        assert (params["Steps"], params["CFG scale"], params["Seed"]) == (str(steps), f"{cfg:g}", "5")
        direct = engine.txt2img(GenerationRequest(**{**BASE, "steps": steps, "cfg_scale": cfg}))
        assert np.array_equal(pixels(cell.images[0]), pixels(direct.images[0])), "a cell is the plain generation"
    assert plot.grid.width > 2 * 64 and plot.grid.height > 2 * 64, "two by two cells and their labels"
    assert "X/Y/Z plot: X: Steps = 2, 3; Y: CFG Scale = 3, 7.5" in plot.grid_infotext
    assert plot.grid_path is not None and plot.grid_path.parent.parent.name == "txt2img-grids"


def test_a_random_seed_is_drawn_once_for_the_whole_plot(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    plot = run_plot(engine, GenerationRequest(**{**BASE, "seed": -1}), [AxisChoice("Steps", "1, 2")], BUILTIN_AXES,
                    save_grid=False)
    assert plot.cells[0].seed == plot.cells[1].seed != -1


def test_seeds_vary_along_the_chosen_axes_as_a1111_counts_them(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    choices = [AxisChoice("Steps", "1, 2"), AxisChoice("CFG Scale", "3, 4, 5")]
    plot = run_plot(engine, GenerationRequest(**BASE), choices, BUILTIN_AXES,
                    PlotOptions(vary_seeds=(False, True, False), margin_size=6, draw_legend=False), save_grid=False)
    assert [c.seed for c in plot.cells] == [5, 5, 7, 7, 9, 9], "Y varies: +2 (the width) a row"
    assert plot.grid.size == (2 * 64 + 6, 3 * 64 + 2 * 6), "no labels, 6 px between cells"
    kept = run_plot(engine, GenerationRequest(**{**BASE, "seed": -1}), choices[:1], BUILTIN_AXES,
                    PlotOptions(no_fixed_seeds=True), save_grid=False)
    assert kept.cells[0].seed != kept.cells[1].seed, "Keep -1 for seeds: each cell draws its own"


def test_checkpoints_run_in_the_outer_loop(tmp_path, sd1_file, sdxl_file, monkeypatch):
    engine = make_engine(tmp_path, sd1_file, sdxl_file)
    engine.options.update({"sd_checkpoints_limit": 1})
    loads = []
    load = engine.models._load_new
    monkeypatch.setattr(engine.models, "_load_new", lambda info, *a: loads.append(info.name) or load(info, *a))
    names = ", ".join(c.name for c in engine.models.checkpoints()[:2])
    plot = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("Checkpoint name", names),
                                                        AxisChoice("Seed", "1, 2, 3")], BUILTIN_AXES, save_grid=False)
    assert len(loads) == 2, f"one load per checkpoint, not one per cell: {loads}"
    models = [c.model_name for c in plot.cells]  # X fastest: checkpoint, checkpoint, ...
    assert models[0::2] == [models[0]] * 3 and models[1::2] == [models[1]] * 3 and models[0] != models[1]


def test_interrupt_stops_the_plot_and_returns_what_was_made(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    engine.hooks.on("denoising_step", lambda step, **_: engine.progress.interrupt()
                    if engine.progress.cell_no == 1 else None)
    plot = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("Seed", "1-4")], BUILTIN_AXES, save_grid=False)
    assert plot.interrupted and plot.cells[0] is not None and plot.cells[2:] == [None, None]
    grey = pixels(plot.grid)[plot.grid.height // 2, -5]
    assert tuple(grey[:3]) != (255, 255, 255), "a cell never made is drawn grey"
    assert engine.progress.cell_count == 0
    again = engine.txt2img(GenerationRequest(**BASE))
    assert not again.interrupted, "the next job is not interrupted"


@pytest.mark.parametrize("axis,values,field", [("Steps", "two", "x_values"), ("Checkpoint name", "nope", "x_values"),
                                               ("Size", "64", "x_values"), ("Prompt S/R", "blue, green", "x_values"),
                                               ("Wobble", "1", "x_type")])
def test_bad_axes_are_refused_before_any_work(tmp_path, sd1_file, axis, values, field):
    engine = make_engine(tmp_path, sd1_file)
    with pytest.raises(UserError) as error:
        run_plot(engine, GenerationRequest(**BASE), [AxisChoice(axis, values)], BUILTIN_AXES)
    assert error.value.field == field
    assert engine.models.current is None, "nothing was loaded"


def test_prompt_sr_size_and_an_extension_axis(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    styles = extension_axis("Style", lambda request, value: setattr(request, "prompt", f"{request.prompt}, {value}"),
                            lambda: ["ink", "oil"])
    plot = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("Prompt S/R", "red, blue"),
                                                        AxisChoice("Size", "64x64, 96x64"),
                                                        AxisChoice("Style", "ink")], [*BUILTIN_AXES, styles],
                    save_grid=False)
    prompts = [c.request.prompt for c in plot.cells]
    assert prompts == ["a red circle, ink", "a blue circle, ink"] * 2
    assert [c.images[0].size for c in plot.cells] == [(64, 64), (64, 64), (96, 64), (96, 64)]


def test_gpu_weights_axis_sets_the_budget_for_its_cell_only(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    engine.memory = engine.models.memory = MemoryManager(torch.device("cpu"), SimulatedMemory(torch.device("cpu"), 2048),
                                                         min_unit_bytes=64 * 1024)
    before = engine.options["forge_inference_memory"]
    plot = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("GPU Weights", "1, 1000")], BUILTIN_AXES,
                    save_grid=False)
    small, large = (c.memory for c in plot.cells)
    assert small.streamed_mb > 0 and large.streamed_mb == 0
    assert np.array_equal(pixels(plot.cells[0].images[0]), pixels(plot.cells[1].images[0])), "placement, not pixels"
    assert engine.options["forge_inference_memory"] == before, "the option is back as it was"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_sixty_switches_leave_no_memory_behind(tmp_path, sd1_file, sd1_folder, device):
    """A single file, a diffusers folder and a Flux GGUF (with its clip_l, T5 and ae files) in X/Y/Z plots, 60
    switches with one model kept: the models that left are gone (weak references dead), host memory after the run
    is where it was after the first cycle, and so is the GPU's allocated memory — back to where it started once
    the models are unloaded."""
    flux = flux_gguf_models()
    engine = make_engine(tmp_path, sd1_file, sd1_folder, flux / "Stable-diffusion" / "flux-Q8_0.gguf",
                         extra_args=("--vae-dir", str(flux / "VAE"), "--text-encoder-dir", str(flux / "text_encoder"),
                                     "--device", device))
    engine.options.update({"sd_checkpoints_limit": 1, "forge_additional_modules": FLUX_GGUF_MODULES})
    users = (tmp_path / "models" / "Stable-diffusion").resolve()
    names = [c.name for c in engine.models.checkpoints() if c.path.parent.resolve() == users]
    assert len(names) == 3
    request = GenerationRequest(**{**BASE, "steps": 1, "cfg_scale": 1.0})
    checkpoints = AxisChoice("Checkpoint name", ", ".join(names))
    vram_at_start = _allocated(device)
    run_plot(engine, request, [checkpoints], BUILTIN_AXES, save_grid=False)
    first = weakref.ref(engine.models.current.denoiser)
    gc.collect()
    rss_after_first_cycle, vram_after_first_cycle = psutil.Process().memory_info().rss, _allocated(device)
    loads = 0
    load = engine.models._load_new

    def counted(*args):
        nonlocal loads
        loads += 1
        return load(*args)

    engine.models._load_new = counted
    for _ in range(19):
        plot = run_plot(engine, request, [checkpoints], BUILTIN_AXES, save_grid=False)
        assert [c.model_name for c in plot.cells] == [engine.models.find(n).model_name for n in names]
    assert loads == 57 and len(engine.models.cache) == 1
    gc.collect()
    assert first() is None, "a model that left is gone: nothing keeps a reference to it"
    grown = psutil.Process().memory_info().rss - rss_after_first_cycle
    assert grown <= max(50 * 2**20, 0.05 * rss_after_first_cycle), f"host memory grew by {grown / 2**20:.0f} MB"
    assert abs(_allocated(device) - vram_after_first_cycle) <= 16 * 2**20
    engine.models.unload()
    assert abs(_allocated(device) - vram_at_start) <= 16 * 2**20, "unloading gives the GPU's memory back"


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def test_a_folder_models_own_tokenizer_leaves_with_it(tmp_path, sd1_file, sd1_folder):
    """The prompt cache holds tokenizers weakly: a diffusers folder's tokenizer (~20 MB) must not outlive its model."""
    engine = make_engine(tmp_path, sd1_file, sd1_folder)
    engine.options.update({"sd_checkpoints_limit": 1})
    engine.txt2img(GenerationRequest(**{**BASE, "steps": 1, "checkpoint": sd1_folder.name}))
    tokenizer = weakref.ref(engine.models.current.text_encoders[0].tokenizer)
    engine.txt2img(GenerationRequest(**{**BASE, "steps": 1, "checkpoint": sd1_file.name}))
    gc.collect()
    assert tokenizer() is None


def test_models_kept_in_memory_are_reused_without_loading(tmp_path, sd1_file, sdxl_file, monkeypatch):
    engine = make_engine(tmp_path, sd1_file, sdxl_file)
    engine.options.update({"sd_checkpoints_limit": 2})
    names = ", ".join(c.name for c in engine.models.checkpoints()[:2])
    plot = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("Checkpoint name", names)], BUILTIN_AXES,
                    save_grid=False)
    loads = []
    monkeypatch.setattr(engine.models, "_load_new", lambda *a: loads.append(a))
    again = run_plot(engine, GenerationRequest(**BASE), [AxisChoice("Checkpoint name", names)], BUILTIN_AXES,
                     save_grid=False)
    assert loads == [] and len(engine.models.cache) == 2
    for old, new in zip(plot.cells, again.cells):
        assert np.array_equal(pixels(old.images[0]), pixels(new.images[0])), "a kept model computes the same"
    engine.options.update({"sd_checkpoints_limit": 1})
    engine.txt2img(GenerationRequest(**{**BASE, "checkpoint": engine.models.checkpoints()[0].name}))
    assert len(engine.models.cache) == 1, "a lower limit lets the others go"
