"""A1111 prompt syntax → text-encoder conditioning for SD1.x, SD2.x and SDXL.

The path a prompt takes:

1. ``parse_prompt_attention`` splits it into runs of (text, weight) and BREAK markers.
2. The runs are tokenised into chunks of at most 75 tokens (BREAK starts a new chunk; a chunk
   that would overflow moves the words after its last comma to the next chunk).
   A textual-inversion embedding's name (``embeddings``) becomes its vectors: as many placeholder tokens, never split
   across chunks, whose token embeddings are the vectors when the chunk is encoded.
3. Each chunk becomes 77 ids (BOS + tokens + EOS + padding) and goes through every text
   encoder; the chosen hidden layer is weighted token by token (A1111's "Original" emphasis).
4. Chunks are concatenated along the token axis, encoders along the feature axis.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import CLIPTokenizer

from webui.engine.conditioning.embeddings import Embedding, EmbeddingTable
from webui.errors import UserError

CHUNK_LENGTH = 75  # prompt tokens per chunk
CHUNK_TOKENS = CHUNK_LENGTH + 2  # a chunk as the encoder sees it: BOS + 75 + EOS
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack", in tokens
ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1
BREAK = ("BREAK", -1.0)  # the run parse_prompt_attention gives for the BREAK keyword, as in A1111

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]?                       # escape; a backslash before anything else vanishes
    | [(\[]                               # opening bracket
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # explicit weight, closing a round bracket
    | [)\]]                               # closing bracket
    | [^\\()\[\]:]+                       # plain text
    | :                                   # a colon that starts no weight
    """,
    re.VERBOSE,
)
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class TextEncoderSlot:
    """One CLIP text encoder of a loaded model."""

    model: torch.nn.Module  # CLIPTextModel or CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    final_layer_norm: bool  # SD1/SD2 True, SDXL False
    min_clip_skip: int  # 1 for SD1/SD2, 2 for SDXL
    pooled: bool  # its pooled output is used: SDXL's bigG, SD3's two CLIPs, Flux's CLIP-L
    embeddings: EmbeddingTable | None = None  # the textual-inversion embeddings it takes (the engine sets them)


@dataclass
class Conditioning:
    embeds: torch.Tensor  # (B, 77*k, D)
    pooled: torch.Tensor | None  # (B, P) for SDXL, SD3 and Flux


# --- parsing -----------------------------------------------------------------------------


@dataclass
class _Run:
    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into runs of (text, weight), as A1111 does.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` multiplies by w, ``\\(`` and
    friends are literal. Brackets left open weight the rest of the prompt, stray closers stay as
    text, and adjacent runs of equal weight are merged. ``BREAK`` gives the run ``BREAK``.
    One deliberate difference: brackets never re-weight a BREAK, so BREAK works inside them too.
    """
    runs: list[_Run] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run.is_break:
                run.weight *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        weight = _number(match.group("weight"))
        if token.startswith("\\"):
            runs.append(_Run(token[1:]))
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            for i, piece in enumerate(_BREAK_KEYWORD.split(token)):
                if i:
                    runs.append(_Run(*BREAK, is_break=True))
                runs.append(_Run(piece))
    for start in open_round:
        scale_from(start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_WEIGHT)
    return _merge_runs(runs) or [("", 1.0)]


def _number(text: str | None) -> float | None:
    """The explicit weight, or None; a malformed one such as ``1..2`` is kept as plain text."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _merge_runs(runs: list[_Run]) -> list[tuple[str, float]]:
    merged: list[_Run] = []
    for run in runs:
        previous = merged[-1] if merged else None
        if previous and not (previous.is_break or run.is_break) and previous.weight == run.weight:
            previous.text += run.text
        else:
            merged.append(run)
    return [(run.text, run.weight) for run in merged]


# --- tokenising into chunks ----------------------------------------------------------------


class _Chunk(NamedTuple):
    tokens: tuple[int, ...]  # at most CHUNK_LENGTH prompt tokens, without BOS/EOS
    weights: tuple[float, ...]
    embedded: tuple[tuple[int, Embedding], ...] = ()  # (position among the tokens, embedding) of each embedding


EMBEDDING_PLACEHOLDER = 0  # the token id under an embedding's vectors (A1111's)


class _ChunkBuilder:
    """Fills 75-token chunks the way A1111 does, counting tokens as its UI counter does."""

    def __init__(self, comma_id: int):
        self.comma_id = comma_id
        self.chunks: list[_Chunk] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.embedded: list[tuple[int, Embedding]] = []
        self.last_comma = -1
        self.token_count = 0

    def add(self, token: int, weight: float) -> None:
        if token == self.comma_id:
            self.last_comma = len(self.tokens)
        elif self._full() and self.last_comma != -1 and len(self.tokens) - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:], [(at - cut, e) for at, e in self.embedded if at >= cut]
            del self.tokens[cut:], self.weights[cut:]
            self.embedded = [(at, e) for at, e in self.embedded if at < cut]
            self.close()
            self.tokens, self.weights, self.embedded = moved
        if self._full():
            self.close()
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, embedding: Embedding, weight: float) -> None:
        """An embedding's vectors, in the current chunk if they fit there, else at the start of the next."""
        if embedding.count > CHUNK_LENGTH:
            raise UserError(f"The embedding {embedding.name!r} has {embedding.count} vectors: a prompt chunk holds "
                            f"{CHUNK_LENGTH}.", field="prompt")
        if len(self.tokens) + embedding.count > CHUNK_LENGTH:
            self.close()
        self.embedded.append((len(self.tokens), embedding))
        self.tokens.extend([EMBEDDING_PLACEHOLDER] * embedding.count)
        self.weights.extend([weight] * embedding.count)

    def close(self, last: bool = False) -> None:
        """End the current chunk; every chunk but the last counts as a full 75 tokens."""
        self.token_count += len(self.tokens) if last else CHUNK_LENGTH
        self.chunks.append(_Chunk(tuple(self.tokens), tuple(self.weights), tuple(self.embedded)))
        self.tokens, self.weights, self.embedded = [], [], []
        self.last_comma = -1

    def finish(self) -> tuple[tuple[_Chunk, ...], int]:
        if self.tokens or not self.chunks:
            self.close(last=True)
        return tuple(self.chunks), self.token_count

    def _full(self) -> bool:
        return len(self.tokens) == CHUNK_LENGTH


PROMPTS_CACHED = 512  # per tokenizer
_chunkers: weakref.WeakKeyDictionary[CLIPTokenizer, Callable[..., tuple]] = weakref.WeakKeyDictionary()


def _prompt_chunks(prompt: str, tokenizer: CLIPTokenizer,
                   embeddings: EmbeddingTable | None = None) -> tuple[tuple[_Chunk, ...], int]:
    """The prompt's chunks and its A1111 token count. Cached, as the UI counter asks on every key — per tokenizer
    and holding it weakly: a diffusers folder brings its own tokenizer, which must leave with its model."""
    chunker = _chunkers.get(tokenizer)
    if chunker is None:
        chunker = functools.lru_cache(PROMPTS_CACHED)(functools.partial(_split_prompt, weakref.ref(tokenizer)))
        _chunkers[tokenizer] = chunker
    return chunker(prompt, embeddings)


def _split_prompt(tokenizer_ref: weakref.ref[CLIPTokenizer], prompt: str,
                  embeddings: EmbeddingTable | None) -> tuple[tuple[_Chunk, ...], int]:
    tokenizer = tokenizer_ref()
    runs = parse_prompt_attention(prompt)
    token_ids = tokenizer([text for text, _ in runs], add_special_tokens=False, verbose=False)["input_ids"]
    builder = _ChunkBuilder(tokenizer.convert_tokens_to_ids(",</w>"))
    for run, ids in zip(runs, token_ids):
        if run == BREAK:
            builder.close()
            continue
        i = 0
        while i < len(ids):
            found = embeddings.match(ids, i) if embeddings is not None else None
            if found is None:
                builder.add(ids[i], run[1])
                i += 1
            else:
                builder.add_embedding(found[1], run[1])
                i += found[0]
    return builder.finish()


def embeddings_used(prompts: list[str], slot: TextEncoderSlot) -> list[Embedding]:
    """The embeddings these prompts use, in order of first use."""
    if slot.embeddings is None:
        return []
    used = {e.name: e for p in prompts for chunk in _prompt_chunks(p, slot.tokenizer, slot.embeddings)[0]
            for _, e in chunk.embedded}
    return list(used.values())


def token_count(prompt: str, tokenizer: CLIPTokenizer, embeddings: EmbeddingTable | None = None) -> tuple[int, int]:
    """(tokens used, limit) for the UI counter, e.g. (80, 150): the limit is a multiple of 75.

    Tokens count as A1111 counts them: chunks before the last one count a full 75. Pass the
    prompt with network tags (``<lora:...>``) already stripped.
    """
    used = _prompt_chunks(prompt, tokenizer, embeddings)[1]
    return used, math.ceil(max(used, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


# --- encoding ------------------------------------------------------------------------------


def _chunk_ids(chunk: _Chunk, tokenizer: CLIPTokenizer) -> list[int]:
    """BOS + tokens + EOS + padding: CLIP-L pads with EOS, OpenCLIP with its pad id (0)."""
    padding = [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(chunk.tokens))
    return [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id, *padding]


def _chunk_weights(chunk: _Chunk) -> list[float]:
    return [1.0, *chunk.weights] + [1.0] * (CHUNK_TOKENS - 1 - len(chunk.weights))


def _layer_to_skip(slot: TextEncoderSlot, clip_skip: int) -> int:
    """A1111's clip skip for this encoder: 1 is the last layer; SDXL never goes above -2."""
    skip = max(clip_skip, slot.min_clip_skip)
    layers = slot.model.config.num_hidden_layers
    if skip > layers:
        raise UserError(f"Clip skip {clip_skip} is too large: the text encoder has {layers} layers.", field="clip_skip")
    return skip


def _hidden_layer(slot: TextEncoderSlot, output, skip: int) -> torch.Tensor:
    if not slot.final_layer_norm:
        return output.hidden_states[-skip]
    if skip == 1:
        return output.last_hidden_state
    # transformers 5 puts final_layer_norm on CLIPTextModel itself; the projection model wraps one
    text_model = getattr(slot.model, "text_model", slot.model)
    return text_model.final_layer_norm(output.hidden_states[-skip])


def emphasise(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token by its weight, then restore the chunk's mean.

    A1111 takes the mean over the whole batch of chunks; we take it per chunk, so that a
    prompt's conditioning does not depend on the other prompts in its batch.
    """
    original = z.float()
    weighted = original * weights[..., None]
    scale = original.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * scale).to(z.dtype)


def _encode_chunks(
    slot: TextEncoderSlot, chunks: list[_Chunk], clip_skip: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 77, D) weighted embeddings of N chunks in one forward pass, and (N, P) pooled ones."""
    skip = _layer_to_skip(slot, clip_skip)
    ids = torch.tensor([_chunk_ids(chunk, slot.tokenizer) for chunk in chunks], device=device)
    weights = [_chunk_weights(chunk) for chunk in chunks]
    with torch.no_grad(), _vectors_in(slot, chunks):
        output = slot.model(input_ids=ids, output_hidden_states=True)
        z = _hidden_layer(slot, output, skip)
        if any(w != 1.0 for row in weights for w in row):  # checked on the host: no device sync
            z = emphasise(z, torch.tensor(weights, device=device))
    if not slot.pooled:
        return z, None
    # With a projection (SDXL's bigG, SD3's CLIPs) the projected pooled output; Flux pools CLIP-L without one.
    return z, output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output


@contextlib.contextmanager
def _vectors_in(slot: TextEncoderSlot, chunks: list[_Chunk]) -> Iterator[None]:
    """While the chunks are encoded: their embeddings' vectors in place of their placeholders' token embeddings."""
    placed = [(row, 1 + at, embedding) for row, chunk in enumerate(chunks) for at, embedding in chunk.embedded]
    if not placed:
        yield
        return

    def substitute(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, at, embedding in placed:
            vectors = embedding.vectors[slot.embeddings.width]
            output[row, at:at + len(vectors)] = vectors.to(output)
        return output

    handle = slot.model.get_input_embeddings().register_forward_hook(substitute)
    try:
        yield
    finally:
        handle.remove()


def _pad_embeds(embeds: torch.Tensor, length: int, empty_chunk: torch.Tensor) -> torch.Tensor:
    """Append copies of the empty prompt's chunk (1, 77, D) until embeds (B, T, D) has length tokens."""
    missing = (length - embeds.shape[1]) // CHUNK_TOKENS
    if missing <= 0:
        return embeds
    filler = empty_chunk.to(embeds).expand(embeds.shape[0], -1, -1).repeat(1, missing, 1)
    return torch.cat([embeds, filler], dim=1)


def _encode_with_slot(
    slot: TextEncoderSlot, prompts: list[str], chunk_count: int, clip_skip: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 77*chunk_count, D) embeddings and (B, P) pooled ones (first chunk) from one encoder.

    Every distinct prompt is encoded once and all chunks go through the encoder together;
    prompts with fewer chunks are padded with the empty prompt's chunk, as A1111 pads a batch.
    """
    distinct = list(dict.fromkeys(prompts))
    chunks = {prompt: _prompt_chunks(prompt, slot.tokenizer, slot.embeddings)[0] for prompt in distinct}
    batch = [chunk for prompt in distinct for chunk in chunks[prompt]]
    if any(len(c) < chunk_count for c in chunks.values()):
        batch.append(_prompt_chunks("", slot.tokenizer)[0][0])
    z, pooled = _encode_chunks(slot, batch, clip_skip, device)

    embeds, first_chunk, start = {}, {}, 0
    for prompt in distinct:
        count = len(chunks[prompt])
        rows = z[start : start + count].reshape(1, count * CHUNK_TOKENS, -1)
        # z[-1:] is the empty chunk whenever padding is needed: it was appended last
        embeds[prompt] = _pad_embeds(rows, chunk_count * CHUNK_TOKENS, z[-1:])
        first_chunk[prompt] = start
        start += count
    stacked = torch.cat([embeds[prompt] for prompt in prompts])
    return stacked, pooled[[first_chunk[prompt] for prompt in prompts]] if pooled is not None else None


def encode_prompts(
    prompts: list[str],
    encoders: list[TextEncoderSlot],
    clip_skip: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Conditioning:
    """Encode a batch of prompts (one per image; they may differ) with A1111's syntax.

    ``encoders`` in the model's order (SDXL: CLIP-L first, bigG second); their outputs are
    concatenated along the feature axis. ``clip_skip`` is A1111's "Clip skip" (1 = last layer).
    Token ids go to ``device`` (default: the first encoder's device), where the result stays;
    ``dtype``, if given, is the dtype of the result. The result has B = len(prompts) and as many
    77-token chunks as the longest prompt needs.
    """
    if not prompts or not encoders:
        raise ValueError("encode_prompts needs at least one prompt and one text encoder")
    if clip_skip < 1:
        raise UserError("Clip skip must be 1 or more.", field="clip_skip")
    device = torch.device(device) if device is not None else next(encoders[0].model.parameters()).device
    chunk_count = max(len(_prompt_chunks(p, slot.tokenizer, slot.embeddings)[0]) for slot in encoders for p in prompts)
    outputs = [_encode_with_slot(slot, prompts, chunk_count, clip_skip, device) for slot in encoders]
    embeds = torch.cat([slot_embeds for slot_embeds, _ in outputs], dim=-1)
    pools = [slot_pooled for _, slot_pooled in outputs if slot_pooled is not None]
    pooled = torch.cat(pools, dim=-1) if pools else None  # SD3 joins CLIP-L's and CLIP-G's
    if dtype is not None:
        embeds = embeds.to(dtype)
        pooled = pooled.to(dtype) if pooled is not None else None
    return Conditioning(embeds, pooled)
