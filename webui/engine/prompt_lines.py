"""A1111's "Prompts from file or textbox" script: one generation per line of text, each line a prompt or a line of
command-line options (``--prompt "a cat" --steps 30 --sd_model other``) that change the request for that line.

A line's prompt goes before or after the form's prompt (``position``); a line of options that cannot be read (an
option this app does not know, a value of the wrong type, an unknown checkpoint) is refused naming the line before
any image is made — A1111 would take the whole line as a prompt — while a line that does not start with ``--`` is a
prompt, whatever it holds. The seed is the form's for every line, or counts up line by line ("Iterate seed every
line": by the images a line makes), a random one drawn once where either box is ticked.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from webui.engine.generate import resolve_seed
from webui.engine.request import GenerationRequest, GenerationResult, combined
from webui.engine.sequence import generate_each
from webui.engine.xyz import PlotForecast, forecast_each
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.engine import Engine

TITLE = "Prompts from file or textbox"
POSITIONS = ("start", "end")
# The script's arguments in A1111's order (its API's script_args); A1111 before 1.6 had no prompt_position.
SCRIPT_ARGS: dict[str, Any] = {"checkbox_iterate": False, "checkbox_iterate_batch": False, "prompt_position": "start",
                               "prompt_txt": ""}


def _true(text: str) -> bool:
    """A1111's reading of a true/false option: "true" is true, anything else false."""
    return text == "true"


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("must be a number") from None


def _styles(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _default_only(name: str) -> Callable[[str], bool]:
    def read(text: str) -> bool:
        if _true(text):
            raise ValueError(f"this app cannot do {name} yet; leave it out or false")
        return False
    return read


# The options a line may give, as A1111's script knows them: the request field each sets, and how its text is read.
LINE_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "styles": ("styles", _styles),
    "seed": ("seed", _whole), "subseed": ("subseed", _whole), "subseed_strength": ("subseed_strength", _number),
    "seed_resize_from_h": ("seed_resize_from_h", _whole), "seed_resize_from_w": ("seed_resize_from_w", _whole),
    "sampler_name": ("sampler_name", str), "batch_size": ("batch_size", _whole), "n_iter": ("n_iter", _whole),
    "steps": ("steps", _whole), "cfg_scale": ("cfg_scale", _number), "width": ("width", _whole),
    "height": ("height", _whole),
    "sd_model": ("checkpoint", str), "do_not_save_samples": ("save_images", lambda text: not _true(text)),
    "restore_faces": ("", _default_only("restore_faces")), "tiling": ("", _default_only("tiling")),
}
# Options A1111 reads that change nothing here: output folders (this app saves to its own), the displayed prompt, the
# sampler's index (A1111 itself no longer reads it), the grid (the script makes none). Named in the notices.
IGNORED_OPTIONS = ("outpath_samples", "outpath_grids", "prompt_for_display", "sampler_index", "do_not_save_grid")
PROMPT_OPTIONS = ("prompt", "negative_prompt")  # their value runs to the next option, spaces and all


@dataclass(frozen=True)
class PromptLine:
    """One line, read: the fields it sets (a plain line: its prompt), and the options it gave that change nothing."""

    number: int
    fields: dict[str, Any]
    ignored: tuple[str, ...] = ()


def read_line(number: int, line: str) -> PromptLine:
    """A line as A1111 reads it; UserError naming the line where it starts with ``--`` and cannot be read."""
    if not line.startswith("--"):
        return PromptLine(number, {"prompt": line})
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise _refused(number, f"cannot be split into options ({e})") from None
    fields: dict[str, Any] = {}
    ignored: list[str] = []
    at = 0
    while at < len(words):
        word = words[at]
        if not word.startswith("--"):
            raise _refused(number, f"{word!r} is no option: options start with --")
        name = word[2:]
        if at + 1 >= len(words):
            raise _refused(number, f"{word} has no value")
        if name in PROMPT_OPTIONS:
            end = next((i for i in range(at + 2, len(words)) if words[i].startswith("--")), len(words))
            fields[name], at = " ".join(words[at + 1:end]), end
            continue
        value, at = words[at + 1], at + 2
        if name in IGNORED_OPTIONS:
            ignored.append(name)
        elif name in LINE_OPTIONS:
            field, read = LINE_OPTIONS[name]
            try:
                parsed = read(value)
            except ValueError as e:
                raise _refused(number, f"--{name} {value!r}: {e}") from None
            if field:
                fields[field] = parsed
        else:
            raise _refused(number, f"unknown option {word}; the options are "
                                   f"{', '.join('--' + o for o in (*LINE_OPTIONS, *IGNORED_OPTIONS))}")
    return PromptLine(number, fields, tuple(ignored))


def _refused(number: int, message: str) -> UserError:
    return UserError(f"line {number}: {message}", field="script_args")


@dataclass(frozen=True)
class PromptLines:
    """The script's arguments (A1111's names in ``SCRIPT_ARGS``)."""

    title: ClassVar[str] = TITLE
    text: str
    iterate_seed: bool = False  # "Iterate seed every line"
    same_seed: bool = False  # "Use same random seed for all lines"
    position: str = "start"  # "Insert prompts at the" start or end of the form's prompt

    def lines(self) -> list[PromptLine]:
        """The non-empty lines, read (UserError naming the first that cannot be)."""
        if self.position not in POSITIONS:
            raise UserError(f"prompt_position must be one of {', '.join(POSITIONS)}, got {self.position!r}",
                            field="script_args")
        lines = [read_line(number, line.strip()) for number, line in enumerate(self.text.splitlines(), 1)
                 if line.strip()]
        if not lines:
            raise UserError("the list of prompt inputs is empty: put one prompt (or line of options) per line",
                            field="script_args")
        return lines

    def requests(self, engine: Engine, base: GenerationRequest) -> tuple[list[GenerationRequest], list[str]]:
        """Each line's request, checked as its generation will check it, and the notices for options that change
        nothing; UserError naming the line for the first bad one, before any work."""
        lines = self.lines()
        most = engine.options["max_plot_cells"]
        if len(lines) > most:
            raise UserError(f"{len(lines)} lines; the most is {most} (max_plot_cells in Settings)",
                            field="script_args")
        seed = resolve_seed(base.seed) if (self.iterate_seed or self.same_seed) else base.seed
        requests, notices = [], []
        for line in lines:
            request = self._request(engine, base, line, seed)
            requests.append(request)
            notices += [f"line {line.number}: --{name} changes nothing here (ignored)" for name in line.ignored]
            if self.iterate_seed:
                seed += base.batch_size * base.n_iter
        return requests, notices

    def _request(self, engine: Engine, base: GenerationRequest, line: PromptLine, seed: int) -> GenerationRequest:
        fields = dict(line.fields)
        for name in PROMPT_OPTIONS:
            given, form = fields.get(name), getattr(base, name)
            if given and form:
                fields[name] = f"{given} {form}" if self.position == "start" else f"{form} {given}"
        request = replace(base, seed=seed, modules=None if base.modules is None else list(base.modules))
        request = replace(request, **fields)
        try:
            if "sampler_name" in fields:  # an older combined name ("DPM++ 2M Karras") sets the schedule type too
                request.sampler_name, request.scheduler = engine.canonical_sampler(request.sampler_name,
                                                                                  base.scheduler)
            if "checkpoint" in fields:
                engine.checkpoint(request.checkpoint)  # one there is
            request.validate(engine.options.as_dict())
        except UserError as e:
            raise _refused(line.number, f"{e.field}: {e.message}" if e.field else e.message) from None
        return request

    def run(self, engine: Engine, base: GenerationRequest) -> GenerationResult:
        """Every line's images as one result (txt2img, or img2img where ``base`` has init images)."""
        requests, notices = self.requests(engine, base)
        generate = engine.txt2img if base.init_images is None else engine.img2img
        made = generate_each(engine.progress, generate, requests)
        result = combined(made, notices)
        result.request = base
        return result

    def forecast(self, engine: Engine, base: GenerationRequest) -> PlotForecast:
        """Each line's forecast with the model loaded now (lines of other checkpoints are named, not loaded)."""
        requests, _ = self.requests(engine, base)
        return forecast_each(engine, [(f"line {line.number}", request, {})
                                      for line, request in zip(self.lines(), requests)], unit="line")
