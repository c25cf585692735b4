"""Textual-inversion embeddings: learned vectors used by name in a prompt, as A1111 uses them.

The files in the embeddings folder (``--embeddings-dir``; subfolders too) are read as A1111 and diffusers write them:
A1111's ``.pt`` (``string_to_param``, with the step and the checkpoint it was trained on), ``.safetensors`` with
``emb_params`` (SD1.x/SD2.x) or ``clip_l`` and ``clip_g`` (SDXL's pair), and diffusers' ``.bin`` (``{token:
vectors}``). An embedding's name is its file's name without the suffix.

An embedding fits a model when it has vectors of the width of each of the model's CLIP text encoders (SD1.x 768,
SD2.x 1024, SDXL 768 and 1280); the others are skipped, with the reason. For each text encoder, an
``EmbeddingTable`` finds the names in a prompt's tokens, and the chunker (``prompts``) puts the vectors in their
place: the name's tokens become as many placeholder tokens as the embedding has vectors, whose token embeddings are
replaced by the vectors when the chunk is encoded (diffusers' ``load_textual_inversion`` gives the same conditioning:
tested). Pickled files are read weights-only: one that carries code is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTokenizer

from webui.engine.formats.files import find_files, load_state_dict, load_weights_pickle
from webui.errors import ModelFileError

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(eq=False)
class Embedding:
    name: str
    path: Path
    vectors: dict[int, torch.Tensor]  # (count, width) by the width of the text encoder they are for
    step: int | None = None  # A1111's training step
    checkpoint: str | None = None  # the hash of the checkpoint it was trained on, as A1111 records it
    checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def describe(self, widths: list[int]) -> dict[str, Any]:
        """A1111's entry in /sdapi/v1/embeddings."""
        shape = max((w for w in self.vectors if w in widths), default=max(self.vectors))
        return {"step": self.step, "sd_checkpoint": self.checkpoint, "sd_checkpoint_name": self.checkpoint_name,
                "shape": shape, "vectors": self.count}


def read_embedding(path: Path) -> Embedding:
    """An embedding file in any of the layouts above (ModelFileError naming the file where it is none of them)."""
    meta: dict[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        tensors = load_state_dict(path)
    else:
        data = load_weights_pickle(path)
        if not isinstance(data, dict):
            raise ModelFileError(f"{path.name} is not an embedding: it holds no dictionary of vectors.")
        if isinstance(data.get("string_to_param"), dict):  # A1111's own
            tensors = {"emb_params": next(iter(data["string_to_param"].values()), None)}
            meta = dict(step=data.get("step"), checkpoint=data.get("sd_checkpoint"),
                        checkpoint_name=data.get("sd_checkpoint_name"))
        else:
            tensors = data
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if all(k in tensors for k in SDXL_KEYS):
        chosen = [tensors[k] for k in SDXL_KEYS]
    elif "emb_params" in tensors:
        chosen = [tensors["emb_params"]]
    elif len(tensors) == 1:  # diffusers' {token: vectors}
        chosen = list(tensors.values())
    else:
        raise ModelFileError(f"{path.name} is not an embedding: expected A1111's string_to_param or emb_params, SDXL's "
                             f"clip_l and clip_g, or a single tensor; it has {', '.join(sorted(tensors)) or 'none'}.")
    vectors = {}
    for tensor in chosen:
        if not tensor.is_floating_point() or tensor.dim() not in (1, 2) or tensor.numel() == 0:
            raise ModelFileError(f"{path.name} is not an embedding: its vectors are a {tensor.dtype} tensor of shape "
                                 f"{tuple(tensor.shape)}.")
        tensor = tensor.float().reshape(-1, tensor.shape[-1])
        vectors[tensor.shape[1]] = tensor
    if len(vectors) != len(chosen) or len({t.shape[0] for t in vectors.values()}) != 1:
        raise ModelFileError(f"{path.name}: its clip_l and clip_g vectors do not pair up.")
    step = meta.get("step")
    return Embedding(path.stem, path, vectors, step=int(step) if isinstance(step, int) else None,
                     checkpoint=_text(meta.get("checkpoint")), checkpoint_name=_text(meta.get("checkpoint_name")))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(eq=False)
class EmbeddingTable:
    """The embeddings one text encoder knows, found by their names' tokens (longest first where names share a
    beginning). Hashed by identity: the chunker's cache keys on it, and a new set of embeddings is a new table."""

    by_first: dict[int, list[tuple[tuple[int, ...], Embedding]]] = field(default_factory=dict)
    width: int = 0

    @classmethod
    def of(cls, embeddings: list[Embedding], tokenizer: CLIPTokenizer, width: int) -> EmbeddingTable:
        table = cls(width=width)
        names = tokenizer([e.name for e in embeddings], add_special_tokens=False, verbose=False)["input_ids"]
        for embedding, ids in zip(embeddings, names):
            if ids:
                table.by_first.setdefault(ids[0], []).append((tuple(ids), embedding))
        for candidates in table.by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))
        return table

    def match(self, ids: list[int], start: int) -> tuple[int, Embedding] | None:
        """(tokens of the name, the embedding) where one's name starts at ``ids[start]``."""
        for name_ids, embedding in self.by_first.get(ids[start], ()):
            if tuple(ids[start:start + len(name_ids)]) == name_ids:
                return len(name_ids), embedding
        return None


class EmbeddingLibrary:
    """The embeddings folder: each file read once (again when it changes), and the embeddings that fit a model."""

    def __init__(self, folder: Path, sha256):
        self.folder = folder
        self.sha256 = sha256
        self._read: dict[Path, tuple[tuple[int, int], Embedding | str]] = {}
        self._tables: dict[tuple, list[EmbeddingTable | None]] = {}

    def files(self) -> dict[str, Embedding | str]:
        """Every embedding by name, or why its file could not be read (the first of a name wins, as in A1111)."""
        found: dict[str, Embedding | str] = {}
        read: dict[Path, tuple[tuple[int, int], Embedding | str]] = {}
        for path in find_files(self.folder, EMBEDDING_SUFFIXES) if self.folder.is_dir() else []:
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            known = self._read.get(path)
            if known is None or known[0] != key:
                try:
                    known = (key, read_embedding(path))
                except ModelFileError as e:
                    log.warning("Embedding %s skipped: %s", path.name, e.message)
                    known = (key, e.message)
            read[path] = known
            found.setdefault(path.stem, known[1])
        self._read = read
        return found

    def names(self) -> list[str]:
        """The embeddings' names, sorted (the UI's browser)."""
        return sorted(name for name, e in self.files().items() if not isinstance(e, str))

    def path(self, name: str) -> Path:
        return self.files()[name].path

    def refresh(self) -> None:
        """The folder is read at every use: nothing to do."""

    def sort(self, widths: list[int]) -> tuple[dict[str, Embedding], dict[str, tuple[Embedding | None, str]]]:
        """(the embeddings that fit text encoders of these widths, the others — None where the file could not be
        read — with the reason)."""
        loaded, skipped = {}, {}
        for name, embedding in self.files().items():
            if isinstance(embedding, str):
                skipped[name] = (None, embedding)
            elif not widths:
                skipped[name] = (embedding, "this model has no CLIP text encoder to take it")
            elif all(w in embedding.vectors for w in widths):
                loaded[name] = embedding
            else:
                skipped[name] = (embedding, f"its vectors are {' and '.join(map(str, sorted(embedding.vectors)))} "
                                            f"wide, for another model family: this model's text encoders are "
                                            f"{' and '.join(map(str, widths))} wide")
        return loaded, skipped

    def tables(self, slots: list) -> list[EmbeddingTable | None]:
        """An EmbeddingTable for each text encoder slot (None where no embedding fits), kept while nothing changes."""
        widths = [slot.model.config.hidden_size for slot in slots]
        loaded = self.sort(widths)[0]
        key = (tuple(id(slot.tokenizer) for slot in slots), tuple(widths), tuple(map(id, loaded.values())))
        if key not in self._tables:
            self._tables = {key: [EmbeddingTable.of(list(loaded.values()), slot.tokenizer, width) if loaded else None
                                  for slot, width in zip(slots, widths)]}
        return self._tables[key]

    def short_hash(self, embedding: Embedding) -> str:
        """A1111's hash in the infotext's "TI hashes": the file's sha256, 12 hex digits."""
        return self.sha256(embedding.path)[:12]
