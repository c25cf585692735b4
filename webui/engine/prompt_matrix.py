"""A1111's "Prompt matrix" script: the prompt (or the negative prompt) split at ``|`` into a base and optional parts,
one image for every combination of the optional parts, and a grid of them labelled with the parts each column and
row has (black) and has not (grey, struck through).

The prompts are A1111's to the character (the base as written, each optional part stripped of spaces and commas,
joined by ", " or " "), so a matrix draws what A1111's draws from the same seed. Combination ``i`` holds optional part
``n`` where bit ``n`` of ``i`` is set; the first half of the parts (rounded up) varies along the columns, the rest
along the rows. Each image is an ordinary generation, saved with its own infotext; the grid is saved as a grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from webui.engine.generate import resolve_seed
from webui.engine.grid import LabelPart, draw_grid
from webui.engine.request import GenerationRequest, GenerationResult, combined
from webui.engine.sequence import generate_each
from webui.engine.xyz import PlotForecast, forecast_each, saved_grid
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.engine import Engine

TITLE = "Prompt matrix"
PROMPT_TYPES = ("positive", "negative")
DELIMITERS = {"comma": ", ", "space": " "}
# The script's arguments in A1111's order (its API's script_args), with its form's defaults.
SCRIPT_ARGS: dict[str, Any] = {"put_at_start": False, "different_seeds": False, "prompt_type": "positive",
                               "variations_delimiter": "comma", "margin_size": 0}


def matrix_prompts(text: str, put_at_start: bool = False, delimiter: str = ", ") -> tuple[list[str], list[str]]:
    """(the optional parts, one prompt per combination) of a prompt with ``|`` between its parts."""
    parts = text.split("|")
    optional = parts[1:]
    prompts = []
    for combination in range(2 ** len(optional)):
        chosen = [part.strip().strip(",") for n, part in enumerate(optional) if combination & (1 << n)]
        prompts.append(delimiter.join([*chosen, parts[0]] if put_at_start else [parts[0], *chosen]))
    return [part.strip() for part in optional], prompts


@dataclass(frozen=True)
class PromptMatrix:
    """The script's arguments (A1111's names in ``SCRIPT_ARGS``), and whether the grid is saved (None: the option
    grid_save)."""

    title: ClassVar[str] = TITLE
    put_at_start: bool = False  # the optional parts before the base ("Put variable parts at start of prompt")
    different_seeds: bool = False  # each combination the next seed ("Use different seed for each picture")
    prompt_type: str = "positive"  # which prompt is split: "positive" or "negative"
    variations_delimiter: str = "comma"  # "comma" or "space"
    margin_size: int = 0  # pixels between the grid's images
    save_grid: bool | None = None

    def requests(self, engine: Engine, base: GenerationRequest) -> tuple[list[GenerationRequest], list[str]]:
        """One request per combination (one image each), and the optional parts; UserError before any work for a
        bad argument or too many combinations."""
        if self.prompt_type not in PROMPT_TYPES:
            raise UserError(f"prompt_type must be one of {', '.join(PROMPT_TYPES)}, got {self.prompt_type!r}",
                            field="script_args")
        if self.variations_delimiter not in DELIMITERS:
            raise UserError(f"variations_delimiter must be one of {', '.join(DELIMITERS)}, got "
                            f"{self.variations_delimiter!r}", field="script_args")
        field = "prompt" if self.prompt_type == "positive" else "negative_prompt"
        text = getattr(base, field)
        if not isinstance(text, str):
            raise UserError("must be text", field=field)
        count, most = 2 ** text.count("|"), engine.options["max_plot_cells"]
        if count > most:
            raise UserError(f"the prompt matrix has {text.count('|')} optional parts, {count} combinations; the most "
                            f"is {most} (max_plot_cells in Settings)", field=field)
        parts, prompts = matrix_prompts(text, self.put_at_start, DELIMITERS[self.variations_delimiter])
        seed, subseed = resolve_seed(base.seed), resolve_seed(base.subseed)
        return [dataclasses.replace(base, **{field: prompt}, seed=seed + (i if self.different_seeds else 0),
                                    subseed=subseed + i, n_iter=1, batch_size=1)
                for i, prompt in enumerate(prompts)], parts

    def forecast(self, engine: Engine, base: GenerationRequest) -> PlotForecast:
        """Each combination's forecast with the model loaded now."""
        requests, _ = self.requests(engine, base)
        return forecast_each(engine, [(f"image {i + 1}", request, {}) for i, request in enumerate(requests)],
                             unit="image")

    def run(self, engine: Engine, base: GenerationRequest) -> GenerationResult:
        """The grid, then every combination's image (txt2img, or img2img where ``base`` has init images)."""
        requests, parts = self.requests(engine, base)
        generate = engine.txt2img if base.init_images is None else engine.img2img
        made = generate_each(engine.progress, generate, requests)
        if not made or not made[0].images:
            raise UserError("the prompt matrix was interrupted before its first image was made")
        notices = [] if base.n_iter * base.batch_size == 1 else [
            f"Prompt matrix: one image for each of its {len(requests)} combinations (the batch count and size are "
            "not used)."]
        result = combined(made, notices)
        grid = self._grid(result, parts)
        infotext = result.infotexts[0]
        grid.info["parameters"] = infotext
        grid_path = saved_grid(engine, base, grid, result.seed, infotext, self.save_grid)
        saved = grid_path is not None and len(result.paths) == len(result.images)

        def first_twice(items: list) -> list:  # the grid's entry is its first image's
            return items[:1] + items

        return dataclasses.replace(
            result, request=base, images=[grid, *result.images], infotexts=first_twice(result.infotexts),
            seeds=first_twice(result.seeds), subseeds=first_twice(result.subseeds),
            prompts=first_twice(result.prompts), negative_prompts=first_twice(result.negative_prompts),
            paths=[grid_path, *result.paths] if saved else [], grids=1)

    def _grid(self, result: GenerationResult, parts: list[str]) -> Image.Image:
        across = (len(parts) + 1) // 2  # the parts that vary along the columns
        columns, rows = 2 ** across, 2 ** (len(parts) - across)
        images = result.images + [None] * (columns * rows - len(result.images))  # an interrupted matrix: grey boxes
        column_labels = [tuple(LabelPart(part, bool(c & (1 << n))) for n, part in enumerate(parts[:across]))
                         for c in range(columns)]
        row_labels = [tuple(LabelPart(part, bool(r & (1 << n))) for n, part in enumerate(parts[across:]))
                      for r in range(rows)]
        cells = [images[r * columns:(r + 1) * columns] for r in range(rows)]
        return draw_grid(cells, row_labels, column_labels, self.margin_size)
