"""The X/Y/Z plot: one generation per combination of up to three axes' values, and a labelled grid of them.

Axes that load models (checkpoint, VAE) run in the outer loop, so each model is loaded once per
plot, not once per cell. Every cell is an ordinary request through the engine — saved with its
own infotext, placed by the memory manager, its LoRA tags applied — and the seed is fixed for the
whole plot unless an axis sets it, so cells differ only by their axis values. Progress counts over
the whole plot; an interrupt stops it after the current cell and returns the grid made so far
(missing cells grey).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from webui.engine.axis_values import format_value, parse_values
from webui.engine.generate import resolve_seed
from webui.engine.grid import combine_grids, draw_grid
from webui.engine.hires import LATENT_MODES
from webui.engine.memory import MB
from webui.engine.memory.trace import MemoryTimeline
from webui.engine.outputs import save_image
from webui.engine.request import GenerationRequest, GenerationResult
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.engine import Engine
    from webui.engine.forecast import Forecast


@dataclass
class Cell:
    """What one cell changes: its request, and options set for its generation only (GPU Weights)."""

    request: GenerationRequest
    options: dict[str, Any] = field(default_factory=dict)
    first_value: Any = None  # the axis' first value, while its value is applied (Prompt S/R searches for it)


@dataclass(frozen=True)
class Axis:
    label: str
    kind: str  # how values are parsed: "int", "float" or "str" (axis_values)
    apply: Callable[[Engine, Cell, Any], None]
    expensive: bool = False  # loads a model: run in the outer loop
    choices: Callable[[Engine], list[str]] | None = None  # the values a UI can offer


def _field(name: str) -> Callable[[Engine, Cell, Any], None]:
    def apply(engine: Engine, cell: Cell, value: Any) -> None:
        setattr(cell.request, name, value)
    return apply


def _sampler(engine: Engine, cell: Cell, value: str) -> None:
    cell.request.sampler_name = engine.canonical_sampler(value, cell.request.scheduler)[0]


def _hires_sampler(engine: Engine, cell: Cell, value: str) -> None:
    cell.request.hr_sampler_name = engine.canonical_sampler(value, cell.request.hr_scheduler)[0]


def _schedule(engine: Engine, cell: Cell, value: str) -> None:
    cell.request.scheduler = engine.canonical_sampler(cell.request.sampler_name, value)[1]


def _prompt_replace(engine: Engine, cell: Cell, value: str) -> None:
    """Prompt S/R: the axis' first value is searched for, each value replaces it (the first, itself)."""
    search = cell.first_value
    if search not in cell.request.prompt and search not in cell.request.negative_prompt:
        raise UserError(f"Prompt S/R: {search!r} (the first value) is not in the prompt or the negative prompt",
                        field="value")
    for name in ("prompt", "negative_prompt"):
        setattr(cell.request, name, getattr(cell.request, name).replace(search, value))


def _checkpoint(engine: Engine, cell: Cell, value: str) -> None:
    cell.request.checkpoint = engine.models.find(value).name


def _vae(engine: Engine, cell: Cell, value: str) -> None:
    engine.models.find_vae(value)
    cell.request.vae = value


def _size(engine: Engine, cell: Cell, value: str) -> None:
    width, sep, height = value.lower().replace(" ", "").partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise UserError(f"a size is WIDTHxHEIGHT, like 768x512; got {value!r}", field="value")
    cell.request.width, cell.request.height = int(width), int(height)


def _gpu_weights(engine: Engine, cell: Cell, value: int) -> None:
    """GPU Weights (MB) as Forge's slider sets it: the device's memory less the inference reserve."""
    total_mb = engine.gpu_total_mb()
    if not 0 < value <= total_mb:
        raise UserError(f"GPU Weights must be between 1 and {total_mb} MB, got {value}", field="value")
    cell.options["forge_inference_memory"] = engine.inference_reserve_mb(value)


BUILTIN_AXES = [
    Axis("Nothing", "str", lambda engine, cell, value: None),
    Axis("Seed", "int", _field("seed")),
    Axis("Var. seed", "int", _field("subseed")),
    Axis("Var. strength", "float", _field("subseed_strength")),
    Axis("Steps", "int", _field("steps")),
    Axis("CFG Scale", "float", _field("cfg_scale")),
    Axis("Distilled CFG Scale", "float", _field("distilled_cfg_scale")),
    Axis("Sampler", "str", _sampler, choices=lambda engine: engine.sampler_names()),
    Axis("Schedule type", "str", _schedule, choices=lambda engine: engine.schedule_type_names()),
    Axis("Prompt S/R", "str", _prompt_replace),
    Axis("Checkpoint name", "str", _checkpoint, expensive=True,
         choices=lambda engine: [c.name for c in engine.models.checkpoints()]),
    Axis("VAE", "str", _vae, expensive=True,
         choices=lambda engine: ["Automatic", *(engine.models.vae_name(p) for p in engine.models.vaes())]),
    Axis("Eta", "float", _field("eta")),
    Axis("Denoising", "float", _field("denoising_strength")),
    Axis("Hires steps", "int", _field("hr_second_pass_steps")),
    Axis("Hires sampler", "str", _hires_sampler, choices=lambda engine: engine.sampler_names()),
    Axis("Hires upscaler", "str", _field("hr_upscaler"),
         choices=lambda engine: [*LATENT_MODES, *(info.name for info in engine.upscalers())]),
    Axis("Clip skip", "int", _field("clip_skip")),
    Axis("Size", "str", _size),
    Axis("GPU Weights", "int", _gpu_weights),
]


def extension_axis(label: str, apply: Callable[[GenerationRequest, Any], None],
                   choices: Callable[[], list[str]] | None) -> Axis:
    """An axis an extension registered: text values, set on the request by the extension."""
    return Axis(label, "str", lambda engine, cell, value: apply(cell.request, value),
                choices=None if choices is None else lambda engine: choices())


@dataclass(frozen=True)
class AxisChoice:
    """One axis of a plot as the user gave it: which axis, and its values typed as text or picked from the axis'
    choices."""

    label: str = "Nothing"
    values: str | list[str] = ""


@dataclass(frozen=True)
class PlotOptions:
    """A1111's X/Y/Z options: seeds, how the grid is drawn, and what is shown beside it."""

    draw_legend: bool = True
    no_fixed_seeds: bool = False  # "Keep -1 for seeds": every cell draws its own random seed
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)  # along X, Y, Z: the seed counts up cell by cell
    margin_size: int = 0  # pixels between cells
    include_lone_images: bool = False  # each cell's image after the grid
    include_sub_grids: bool = False  # one grid per Z value after the grid


@dataclass
class PlotResult:
    """The grid, one grid per Z value, then each cell's result in plot order (None where an interrupt stopped the
    plot)."""

    grid: Image.Image
    grid_infotext: str
    grid_path: Path | None
    sub_grids: list[Image.Image]
    cells: list[GenerationResult | None]
    interrupted: bool
    options: PlotOptions
    memory_timeline: MemoryTimeline | None = None  # the whole plot's: every cell, every model switch

    @property
    def shown_grids(self) -> list[Image.Image]:
        """The grids ``as_result`` shows: the plot's, then one per Z value where the options ask for them."""
        sub_grids = self.sub_grids if self.options.include_sub_grids and len(self.sub_grids) > 1 else []
        return [self.grid, *sub_grids]

    @property
    def images_made(self) -> int:
        """The cells' images (a plot's "Done" counts them apart from its grids)."""
        return sum(len(cell.images) for cell in self.cells if cell is not None)

    def as_result(self) -> GenerationResult:
        """The plot in the shape of one generation's result, as A1111 answers it: the grid, then (as the options
        ask) one grid per Z value and each cell's image, with seeds, prompts and infotexts side by side."""
        made = [cell for cell in self.cells if cell is not None and cell.images]
        if not made:
            raise UserError("the plot was interrupted before its first image was made")
        first = made[0]
        parts = [(grid, self.grid_infotext, first) for grid in self.shown_grids]
        if self.options.include_lone_images:
            parts += [(cell.images[0], cell.infotexts[0], cell) for cell in made]
        return dataclasses.replace(
            first, images=[image for image, _, _ in parts], infotexts=[text for _, text, _ in parts],
            seeds=[cell.seed for _, _, cell in parts], prompts=[cell.prompts[0] for _, _, cell in parts],
            negative_prompts=[cell.negative_prompts[0] for _, _, cell in parts],
            paths=[self.grid_path] if self.grid_path else [], interrupted=self.interrupted,
            seconds=sum(cell.seconds for cell in made), memory_timeline=self.memory_timeline,
            grids=len(self.shown_grids),
            notices=list(dict.fromkeys(notice for cell in made for notice in cell.notices)))


def find_axis(axes: list[Axis], wanted: str, field: str = "x_type") -> Axis:
    """An axis by label, in any case."""
    for axis in axes:
        if axis.label.lower() == wanted.strip().lower():
            return axis
    known = ", ".join(a.label for a in axes)
    raise UserError(f"no X/Y/Z axis {wanted!r}; the axes are: {known}", field=field)


# A1111's X/Y/Z script arguments, in its order, with the defaults of its form: the API's ``script_args`` and the
# UI's inputs carry these names.
SCRIPT_ARGS: dict[str, Any] = {
    "x_type": "Seed", "x_values": "", "x_values_dropdown": None, "y_type": "Nothing", "y_values": "",
    "y_values_dropdown": None, "z_type": "Nothing", "z_values": "", "z_values_dropdown": None, "draw_legend": True,
    "include_lone_images": False, "include_sub_grids": False, "no_fixed_seeds": False, "vary_seeds_x": False,
    "vary_seeds_y": False, "vary_seeds_z": False, "margin_size": 0, "csv_mode": False,
}


def plot_from_args(args: dict[str, Any], axes: list[Axis]) -> tuple[list[AxisChoice], PlotOptions]:
    """The axes and options A1111's script arguments (by name; missing ones take the form's defaults) ask for. An
    axis with choices takes the values picked (``*_values_dropdown``) unless ``csv_mode`` or none were picked."""
    args = SCRIPT_ARGS | args
    choices = []
    for name in "xyz":
        axis = find_axis(axes, args[f"{name}_type"], f"{name}_type")
        picked = args[f"{name}_values_dropdown"]
        use_picked = axis.choices is not None and not args["csv_mode"] and picked
        choices.append(AxisChoice(axis.label, [str(v) for v in picked] if use_picked else args[f"{name}_values"]))
    options = PlotOptions(args["draw_legend"], args["no_fixed_seeds"],
                          (args["vary_seeds_x"], args["vary_seeds_y"], args["vary_seeds_z"]), int(args["margin_size"]),
                          args["include_lone_images"], args["include_sub_grids"])
    return choices, options


Index = tuple[int, int, int]
Plan = list[tuple[Axis, list]]  # each axis (X, Y, Z), and its values


@dataclass(frozen=True)
class PlotForecast:
    """Will the plot fit? Each cell's forecast (``webui.engine.forecast``) in plot order; the plot's peak is its
    largest cell's, its time their sum. A prompt script's generations are its cells (``unit`` names them)."""

    cells: list[Forecast]
    unknown: list[str]  # cells that could not be forecast, and why (a checkpoint not loaded yet)
    unit: str = "cell"

    @property
    def seconds(self) -> float | None:
        times = [cell.seconds for cell in self.cells]
        return None if self.unknown or None in times else sum(times)

    def summary(self) -> str:
        count = len(self.cells) + len(self.unknown)
        cells = f"{count} {self.unit}{'s' if count != 1 else ''}"
        if not self.cells:
            return f"{cells}: {self.unknown[0]}"
        peak = max(self.cells, key=lambda cell: (cell.peak_vram, cell.host_bytes))
        text = f"{cells}, the largest: {peak.summary()}"
        seconds = self.seconds
        text += f" · all ~{seconds:.0f} s" if seconds is not None else ""
        return text + (f" · not forecast: {'; '.join(self.unknown)}" if self.unknown else "")

    def as_dict(self) -> dict:
        return {"cells": [cell.as_dict() for cell in self.cells], "not_forecast": self.unknown,
                "peak_vram_mb": max((cell.peak_vram / MB for cell in self.cells), default=None),
                "seconds": self.seconds, "summary": self.summary()}


def forecast_plot(engine: Engine, base: GenerationRequest, choices: list[AxisChoice], axes: list[Axis],
                  options: PlotOptions = PlotOptions()) -> PlotForecast:
    """Every cell's forecast with the model loaded now (cells of other checkpoints are named, not loaded)."""
    return forecast_each(engine, [(f"cell {'/'.join(str(i + 1) for i in index)}", cell.request, cell.options)
                                  for index, cell in plan_cells(engine, base, choices, axes, options)[2]])


def forecast_each(engine: Engine, cells: list[tuple[str, GenerationRequest, dict[str, Any]]],
                  unit: str = "cell") -> PlotForecast:
    """The forecast of each (name, request, options it sets) with the model loaded now."""
    forecasts, unknown = [], []
    for name, request, options in cells:
        with engine.options.overridden(options):
            try:
                forecasts.append(engine.forecast(request))
            except UserError as e:
                unknown.append(f"{name}: {e.message}")
    return PlotForecast(forecasts, unknown, unit)


def plan_cells(engine: Engine, base: GenerationRequest, choices: list[AxisChoice], axes: list[Axis],
               options: PlotOptions) -> tuple[Plan, list[int], list[tuple[Index, Cell]]]:
    """The plot's axes, its shape and its cells in the order they run; UserError for a bad axis or value."""
    plan = [_parse(find_axis(axes, c.label, f"{name}_type"), c.values, name) for c, name in zip(choices, "xyz")]
    while len(plan) < 3:
        plan.append((axes[0], [""]))
    if not options.no_fixed_seeds:
        base = dataclasses.replace(base, seed=resolve_seed(base.seed), subseed=resolve_seed(base.subseed))
    shape = [len(values) for _, values in plan]
    count, most = math.prod(shape), engine.options["max_plot_cells"]
    if count > most:
        raise UserError(f"the plot has {' x '.join(map(str, shape))} = {count} cells; the most is {most} "
                        "(max_plot_cells in Settings)")
    return plan, shape, [(index, _cell(engine, base, plan, index, _seed_offset(options, index, shape)))
                         for index in _order(plan, shape)]  # every value checked


Cells = dict[tuple[int, int, int], GenerationResult]
# Runs a plot's planned cells (their indices and cells, in order); returns each one's result and whether an
# interrupt stopped the plot. The default runs them in turn on the engine; the Ray Serve queue spreads them.
CellRunner = Callable[[GenerationRequest, list[tuple[tuple[int, int, int], Cell]]], tuple[Cells, bool]]


def run_plot(engine: Engine, base: GenerationRequest, choices: list[AxisChoice], axes: list[Axis],
             options: PlotOptions = PlotOptions(), save_grid: bool | None = None,
             run_cells: CellRunner | None = None) -> PlotResult:
    """Generate every cell of the plot (X, Y, Z = ``choices``; by ``run_cells``), then the grid; UserError before any
    work for a bad axis or value."""
    plan, shape, planned = plan_cells(engine, base, choices, axes, options)
    with engine.memory.tracing() as trace:
        cells, interrupted = (run_cells or (lambda b, p: run_in_turn(engine, b, p)))(base, planned)
    plot = _finish(engine, base, plan, shape, cells, interrupted, options, save_grid)
    plot.memory_timeline = trace.timeline()
    return plot


def run_in_turn(engine: Engine, base: GenerationRequest,
                planned: list[tuple[tuple[int, int, int], Cell]]) -> tuple[Cells, bool]:
    """The cells one after another on ``engine``, each with its options, until an interrupt."""
    generate = engine.txt2img if base.init_images is None else engine.img2img
    cells: Cells = {}
    progress = engine.progress
    progress.begin_plot(len(planned))
    try:
        for index, cell in planned:
            with engine.options.overridden(cell.options):
                result = generate(cell.request)
            cells[index] = result
            progress.next_cell()
            if result.interrupted or progress.interrupted:
                break
    finally:
        interrupted = progress.interrupted
        progress.end_plot()
    return cells, interrupted


def _parse(axis: Axis, text: str, name: str) -> tuple[Axis, list]:
    return axis, [""] if axis.label == "Nothing" else parse_values(text, axis.kind, f"{name}_values")


def _order(plan: list[tuple[Axis, list]], shape: list[int]) -> Iterator[tuple[int, int, int]]:
    """Cell indices (x, y, z), Z outermost, then Y, then X — except that model-loading axes go outside the others."""
    nesting = sorted((2, 1, 0), key=lambda i: not plan[i][0].expensive)  # stable: z, y, x among equals
    for combo in itertools.product(*(range(shape[i]) for i in nesting)):
        index = [0, 0, 0]
        for axis_no, value_no in zip(nesting, combo):
            index[axis_no] = value_no
        yield tuple(index)


def _seed_offset(options: PlotOptions, index: tuple[int, int, int], shape: list[int]) -> int:
    """How far a cell's seed is from the plot's, as A1111 counts it: +x, +y·width, +z·width·height for the axes
    whose seeds vary."""
    x, y, z = index
    width, height = shape[0], shape[1]
    return sum(offset for offset, vary in zip((x, y * width, z * width * height), options.vary_seeds) if vary)


def _cell(engine: Engine, base: GenerationRequest, plan: list[tuple[Axis, list]], index: tuple[int, int, int],
          seed_offset: int = 0) -> Cell:
    cell = Cell(dataclasses.replace(base, modules=None if base.modules is None else list(base.modules)))
    for (axis, values), value_no, name in zip(plan, index, "xyz"):
        cell.first_value = values[0]
        try:
            axis.apply(engine, cell, values[value_no])
        except UserError as e:
            raise UserError(f"{axis.label} {format_value(values[value_no])!r}: {e.message}", field=f"{name}_values") \
                from e
    if seed_offset and cell.request.seed != -1:
        cell.request.seed += seed_offset
    return cell


def _finish(engine: Engine, base: GenerationRequest, plan: list[tuple[Axis, list]], shape: list[int],
            cells: Cells, interrupted: bool, options: PlotOptions,
            save_grid: bool | None) -> PlotResult:
    labels = [[_label(axis, value) if options.draw_legend else "" for value in values] for axis, values in plan]
    grids = []
    for z in range(shape[2]):
        rows = [[_first_image(cells.get((x, y, z))) for x in range(shape[0])] for y in range(shape[1])]
        grids.append(draw_grid(rows, labels[1], labels[0], options.margin_size))
    grid = combine_grids(grids, labels[2])
    made = [cells.get((x, y, z)) for z in range(shape[2]) for y in range(shape[1]) for x in range(shape[0])]
    first = next((c for c in made if c is not None and c.infotexts), None)
    summary = "; ".join(f"{name}: {axis.label} = {', '.join(format_value(v) for v in values)}"
                        for name, (axis, values) in zip("XYZ", plan) if axis.label != "Nothing")
    infotext = (first.infotexts[0] + "\n" if first else "") + f"X/Y/Z plot: {summary}"
    for image in (grid, *grids):
        image.info["parameters"] = infotext
    path = saved_grid(engine, base, grid, first.seed, infotext, save_grid) if first is not None else None
    return PlotResult(grid, infotext, path, grids, made, interrupted, options)


def saved_grid(engine: Engine, base: GenerationRequest, grid: Image.Image, seed: int, infotext: str,
               save: bool | None) -> Path | None:
    """A grid saved to the txt2img or img2img grids folder where ``save`` (None: the option grid_save) says."""
    if not (engine.options["grid_save"] if save is None else save):
        return None
    folder = "outdir_txt2img_grids" if base.init_images is None else "outdir_img2img_grids"
    return save_image(grid, engine.output_folder(folder), seed, base.prompt, infotext)


def _label(axis: Axis, value: Any) -> str:
    return "" if axis.label == "Nothing" else f"{axis.label}: {format_value(value)}"


def _first_image(result: GenerationResult | None) -> Image.Image | None:
    return result.images[0] if result is not None and result.images else None
