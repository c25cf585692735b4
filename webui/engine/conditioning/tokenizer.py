"""Offline tokenizers: CLIP's, built from the BPE vocabulary that ships with the project, and a tiny
T5-style one for tests.

The vocabulary file is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT). From it we build
the same vocabulary and merges that the hub's CLIP tokenizers hold, so no network is needed.

T5-XXL's real tokenizer is a 32100-piece SentencePiece model, too large to ship; tests of Flux and SD3
pipelines use ``write_t5_tokenizer``'s instead: the same kind of model and the same special ids.
"""
from __future__ import annotations

import functools
import gzip
import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).resolve().parents[2] / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte → printable-character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


@functools.lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer. OpenAI CLIP-L pads with end-of-text; OpenCLIP (SD2, SDXL's bigG) pads with "!"."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


# T5's special tokens, at ids 0, 1 and 2 as in its SentencePiece model.
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
T5_EOS_ID = 1
T5_MAX_LENGTH = 512
# Word pieces of the tiny T5 tokenizer; other words are spelled out of single characters.
TINY_T5_WORDS = (
    "a an the of in on at with and or to by for from is photo picture painting portrait drawing render "
    "cat dog man woman city street forest mountain sky sun river house car flower tree red green blue "
    "white black golden small big old detailed"
).split()
TINY_T5_CHARACTERS = string.ascii_letters + string.digits + ".,:;!?'\"-()"
# Unigram log-probabilities: a known word beats spelling it out, which beats an unknown token.
_WORD_SCORE, _SPACE_SCORE, _CHARACTER_SCORE = -8.0, -2.0, -10.0


def tiny_t5_tokenizer() -> Tokenizer:
    """A T5-style tokenizer of about a hundred pieces: SentencePiece-Unigram over Metaspace ("▁") word
    starts, ``</s>`` appended to every sequence, characters it does not know mapped to ``<unk>``."""
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [("▁", _SPACE_SCORE)]
    vocab += [(f"▁{word}", _WORD_SCORE) for word in TINY_T5_WORDS]
    vocab += [(character, _CHARACTER_SCORE) for character in TINY_T5_CHARACTERS]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in T5_SPECIAL_TOKENS])
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tokenizer.decoder = decoders.Metaspace(**metaspace)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_EOS_ID)]
    )
    return tokenizer


def write_t5_tokenizer(folder: str | Path) -> Path:
    """Write ``tiny_t5_tokenizer`` as a folder that ``transformers.T5TokenizerFast.from_pretrained`` loads
    offline: ``tokenizer.json`` and a ``tokenizer_config.json`` without T5's 100 sentinel tokens
    (``extra_ids``), which would take ids beyond a tiny model's vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_t5_tokenizer().save(str(folder / "tokenizer.json"))
    pad, eos, unk = T5_SPECIAL_TOKENS
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": pad,
        "eos_token": eos,
        "unk_token": unk,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "model_max_length": T5_MAX_LENGTH,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
