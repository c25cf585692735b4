"""A1111's prompt styles: ``styles.csv`` in the data folder (``--styles-file``), rows of name, prompt and
negative_prompt (A1111's oldest files call the prompt column ``text``). A style's prompt with ``{prompt}`` in it takes
the request's prompt in that place; one without it follows the prompt after a comma. Several styles apply in the order
named. The file is read again whenever it changes; a row without a name is skipped and the log names its line."""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from webui.errors import UserError

log = logging.getLogger(__name__)
COLUMNS = ("name", "prompt", "negative_prompt")
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style: str, prompt: str) -> str:
    """``prompt`` put into ``style``: at its placeholder, else before it, joined by a comma (either may be empty)."""
    if PLACEHOLDER in style:
        return style.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


class PromptStyles:
    """The styles of one CSV file, as the UI and the API list and apply them."""

    def __init__(self, path: Path):
        self.path = path
        self._read: tuple[float, dict[str, PromptStyle]] | None = None  # (the file's mtime, its styles by name)

    def all(self) -> dict[str, PromptStyle]:
        """The file's styles by name, in its order (none where there is no file)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return {}
        if self._read is None or self._read[0] != mtime:
            self._read = mtime, self._parse()
        return dict(self._read[1])

    def _parse(self) -> dict[str, PromptStyle]:
        """The file's styles; where it is no CSV that can be read (a field too long, a file that is no text), those
        before the line at fault, and the log says why."""
        styles = {}
        with self.path.open(newline="", encoding="utf-8-sig", errors="replace") as file:
            rows = csv.DictReader(file)
            try:
                for row in rows:
                    name = (row.get("name") or "").strip()
                    if not name:
                        log.warning("%s line %d has no style name; skipped", self.path.name, rows.line_num)
                        continue
                    styles[name] = PromptStyle(name, row.get("prompt") or row.get("text") or "",
                                               row.get("negative_prompt") or "")
            except csv.Error as e:
                log.warning("%s cannot be read at line %d (%s): fix or remove that line", self.path.name,
                            rows.line_num + 1, e)
        return styles

    def apply(self, prompt: str, negative: str, names: list[str]) -> tuple[str, str, list[str]]:
        """The prompt and negative prompt with the named styles applied in turn; the names there is no style of."""
        styles, missing = self.all(), []
        for name in names:
            style = styles.get(name)
            if style is None:
                missing.append(name)
                continue
            prompt, negative = merge_prompts(style.prompt, prompt), merge_prompts(style.negative_prompt, negative)
        return prompt, negative, missing

    def save(self, style: PromptStyle) -> None:
        """Add ``style`` to the file, or replace the one of its name (A1111's "Save current prompts as a style");
        written to a new file first, so that a failure leaves the old one whole."""
        if not style.name.strip():
            raise UserError("type a name for the style first", field="name")
        styles = self.all() | {style.name: style}
        partial = self.path.with_suffix(".csv.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("w", newline="", encoding="utf-8") as file:
                writer = csv.writer(file)
                writer.writerow(COLUMNS)
                writer.writerows((s.name, s.prompt, s.negative_prompt) for s in styles.values())
            os.replace(partial, self.path)
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({e.strerror}): the styles there are as they were",
                            field="name") from None
        self._read = None
