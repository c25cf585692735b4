"""A browser per prompt network that lists its files (LoRA), and one of the textual-inversion embeddings: cards with
the file's preview image, a search box, and a click that adds ``<kind:name:1>`` (an embedding: its name) to the
prompt and a second one that removes it, as A1111's extra networks do."""
from __future__ import annotations

import functools
import hashlib
import re
from functools import lru_cache
from pathlib import Path
from collections.abc import Callable
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw, ImageFont

from webui.engine.engine import Engine
from webui.engine.fast_presets import FastPreset
from webui.ui.common import REFRESH, Components

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".jpeg", ".webp")  # A1111's names for a card
CARD_SIZE = 192


def browsers(engine: Engine) -> list[tuple[str, str, Any, Callable[[str, str | None], str]]]:
    """(element key, accordion title, what lists the files, how a click changes the prompt) of each browser."""
    networks = [(kind, f"{kind.title()} — click a card to add <{kind}:name:1> to the prompt, again to remove it",
                 network, functools.partial(toggle_network_tag, kind))
                for kind, network in engine.browsable_networks().items()]
    return networks + [("textual_inversion", "Textual Inversion — click a card to add the embedding's name to the "
                        "prompt, again to remove it", engine.embeddings, toggle_word)]


PRESET_FIELDS = ("steps", "cfg_scale", "sampler_name", "scheduler")  # the form fields a few-step preset sets


def preset_updates(values: dict[str, Any]) -> list[dict]:
    """The updates of ``PRESET_FIELDS`` to these values (a few-step preset's fields); the others unchanged."""
    return [gr.update(value=values[name]) if name in values else gr.update() for name in PRESET_FIELDS]


def preset_fields(preset: FastPreset | None) -> dict[str, Any]:
    return preset.fields() if preset is not None else {}


def network_browsers(demo: gr.Blocks, engine: Engine, form: Components, tab: str = "txt2img") -> None:
    """The browsers under a form; a click that adds a few-step LoRA (LCM, Lightning …) sets the form's steps, CFG,
    sampler and schedule type to its preset."""
    prompt = form["prompt"]
    for kind, title, network, toggle in browsers(engine):
        with gr.Accordion(title, open=True, elem_id=f"{tab}_{kind}_browser"):
            with gr.Row(equal_height=True):
                search = gr.Textbox(placeholder="Search by name", show_label=False, scale=6,
                                    elem_id=f"{tab}_{kind}_search")
                refresh = gr.Button(REFRESH, scale=0, min_width=48, elem_id=f"{tab}_{kind}_refresh")
            cards = gr.Gallery(show_label=False, columns=6, fit_columns=False, height=180, allow_preview=False,
                               object_fit="cover", elem_id=f"{tab}_{kind}_cards")
            shown = gr.State([])  # the names of the cards, in gallery order

        def listed(query: str, network: Any = network, refresh: bool = False) -> tuple[list, list[str]]:
            if refresh:
                network.refresh()
            names = matching(network.names(), query)
            return [(card_image(network, name), name) for name in names], names

        def picked(prompt_text: str, names: list[str], evt: gr.SelectData, toggle: Callable = toggle,
                   kind: str = kind) -> list:
            name = names[evt.index] if 0 <= evt.index < len(names) else None
            changed = toggle(prompt_text, name)
            added = name is not None and f"<{kind}:{name}:" in changed and f"<{kind}:{name}:" not in prompt_text
            return [changed, *preset_updates(preset_fields(engine.network_preset(kind, name) if added else None))]

        search.change(listed, search, [cards, shown], api_visibility="private")
        refresh.click(lambda query, listed=listed: listed(query, refresh=True), search, [cards, shown],
                      api_visibility="private")
        demo.load(listed, search, [cards, shown], api_visibility="private")
        cards.select(picked, [prompt, shown], [prompt, *(form[name] for name in PRESET_FIELDS)],
                     api_visibility="private")


def matching(names: list[str], query: str | None) -> list[str]:
    """The names holding every word of the query, in any case (a search box not drawn yet sends None: all)."""
    words = (query or "").lower().split()
    return [name for name in names if all(word in name.lower() for word in words)]


def toggle_network_tag(kind: str, prompt: str, name: str | None) -> str:
    """The prompt with ``<kind:name:1>`` added, or, where it holds that network's tag already (at any weight), with
    the tag removed: a second click takes it back, as in A1111."""
    if not name:
        return prompt
    tag = re.compile(rf"\s*<{re.escape(kind)}:{re.escape(name)}(?::[^>]*)?>")
    if tag.search(prompt):
        return tag.sub("", prompt).lstrip()
    return f"{prompt.rstrip()} <{kind}:{name}:1>".lstrip()


def toggle_word(prompt: str, name: str | None) -> str:
    """The prompt with an embedding's name added, or, where it holds the name as a word already, without it."""
    if not name:
        return prompt
    word = re.compile(rf"\s*(?<![\w-]){re.escape(name)}(?![\w-])")
    if word.search(prompt):
        return word.sub("", prompt, count=1).strip()
    return f"{prompt.rstrip()} {name}".lstrip()


def card_image(network: Any, name: str) -> Image.Image:
    """The file's preview (``name.preview.png`` or ``name.png`` … beside it), else a card drawn with its name."""
    path = network.path(name) if hasattr(network, "path") else None
    preview = find_preview(path) if path is not None else None
    if preview is None:
        return placeholder_card(name)
    try:
        return preview_card(preview, preview.stat().st_mtime)
    except OSError:  # unreadable or not an image: the card says the name instead
        return placeholder_card(name)


PREVIEW_MAX_PIXELS = 4096 * 4096  # a preview is a card's picture; a 0.4 MB PNG of 12000x12000 decodes to 432 MB


@lru_cache(maxsize=512)
def preview_card(path: Path, mtime: float) -> Image.Image:
    """The preview at card size (cached while the file stays the same)."""
    with Image.open(path) as image:
        if image.width * image.height > PREVIEW_MAX_PIXELS:  # its pixels are never decoded: it could be a bomb
            raise OSError(f"{path.name} is {image.width}x{image.height}, too large for a preview")
        image.thumbnail((CARD_SIZE, CARD_SIZE))
        return image.convert("RGB")


def find_preview(path: Path) -> Path | None:
    stem = path.with_suffix("")
    return next((p for p in (stem.with_name(stem.name + s) for s in PREVIEW_SUFFIXES) if p.is_file()), None)


@lru_cache(maxsize=512)
def placeholder_card(name: str) -> Image.Image:
    """A card in a colour of the name's own, with the file's name (without folders) across it."""
    hue = hashlib.sha256(name.encode()).digest()
    card = Image.new("RGB", (CARD_SIZE, CARD_SIZE), (60 + hue[0] % 120, 60 + hue[1] % 120, 60 + hue[2] % 120))
    font = ImageFont.load_default(size=22)
    words = Path(name).name
    lines = [words[i:i + 12] for i in range(0, len(words), 12)][:5]
    draw = ImageDraw.Draw(card)
    for row, line in enumerate(lines):
        draw.text((CARD_SIZE / 2, 40 + 28 * row), line, fill=(255, 255, 255), font=font, anchor="mt")
    return card
