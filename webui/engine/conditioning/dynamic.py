"""Dynamic prompts and wildcards, by the ``dynamicprompts`` library (sd-dynamic-prompts' own): ``{red|blue}`` variants,
``__name__`` wildcards from the text files of the wildcards folder (``--wildcards-dir``; ``name`` may be a path in it,
``colors/warm``), and the library's other syntax (``{2$$a|b|c}``, ``${var=...}``).

A request whose prompts hold such syntax becomes one prompt pair per image: at random, each image's from its own
seed (so an image is made again from its seed), or every combination once (combinatorial). The infotext keeps the
resolved prompts and, as sd-dynamic-prompts writes them, the templates (``Template``, ``Negative Template``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.wildcards import WildcardManager

from webui.errors import UserError

SYNTAX = re.compile(r"\{|__[\w/\-. ]+__")  # a variant or a wildcard: anything else is left as it is
UNRESOLVED = re.compile(r"__([\w/\-. ]+)__")
MAX_COMBINATIONS = 1000


@dataclass(frozen=True)
class Expanded:
    """One image's prompts."""

    prompt: str
    negative_prompt: str


def has_syntax(*texts: str) -> bool:
    return any(SYNTAX.search(text or "") for text in texts)


class DynamicPrompts:
    def __init__(self, wildcards_dir: Path):
        self.folder = wildcards_dir

    def expand(self, prompt: str, negative: str, count: int, seed: int, combinatorial: bool) -> list[Expanded]:
        """Prompts for ``count`` images from ``seed`` on (at random), or for every combination (at most
        MAX_COMBINATIONS); UserError naming a missing wildcard file, one that refers to itself, or bad syntax."""
        manager = WildcardManager(self.folder)
        try:
            if combinatorial:
                prompts = CombinatorialPromptGenerator(manager).generate(prompt, max_prompts=MAX_COMBINATIONS)
                negatives = self._random(manager, negative, len(prompts), seed)
            else:
                prompts = self._random(manager, prompt, count, seed)
                negatives = self._random(manager, negative, count, seed)
        except RecursionError:
            raise UserError(f"a wildcard in the prompt refers back to itself (a file of {self.folder} names its own "
                            "__wildcard__, or two name each other): it would never end", field="prompt") from None
        except (ValueError, TypeError) as e:  # dynamicprompts' parser (pyparsing) on unbalanced braces and the like
            raise UserError(f"the prompt's dynamic syntax could not be read ({e}): check its {{ }} and __ __",
                            field="prompt") from None
        self._check_resolved(prompts, "prompt")
        self._check_resolved(negatives, "negative_prompt")
        return [Expanded(p, n) for p, n in zip(prompts, negatives)]

    def _random(self, manager: WildcardManager, template: str, count: int, seed: int) -> list[str]:
        if not has_syntax(template):
            return [template] * count
        return RandomPromptGenerator(manager).generate(template, count, seeds=[seed + i for i in range(count)])

    def _check_resolved(self, texts: list[str], field: str) -> None:
        for text in texts:
            missing = UNRESOLVED.search(text)
            if missing:
                raise UserError(f"no wildcard file {missing.group(1)}.txt in {self.folder} (the prompt names "
                                f"__{missing.group(1)}__)", field=field)
