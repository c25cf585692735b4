"""A1111 prompt syntax → T5-XXL conditioning for Flux and SD3.x, and finding T5's tokenizer offline.

T5 reads the whole prompt at once (no 75-token chunks, no BREAK): the prompt's runs of (text, weight)
are tokenised one after another, ``</s>`` closes them, and padding fills the sequence up to a multiple
of ``min_length`` tokens (256, as ComfyUI and diffusers' SD3 pipeline pad), so nothing is ever cut
off. Weights scale each token's output with A1111's "Original" emphasis, as for CLIP.

T5's SentencePiece tokenizer cannot be built from anything that ships with the app. It is read from a
folder the user has (see ``find_t5_tokenizer``); never downloaded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, T5TokenizerFast

from webui.engine.conditioning.prompts import BREAK, emphasise, parse_prompt_attention
from webui.errors import UserError

MIN_LENGTH = 256
TOKENIZER_FOLDER = "t5_tokenizer"  # under models/text_encoder
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# Where the tokenizer already lies on disk for users of other UIs or of the hub cache.
HUB_CACHE_REPOS = (("google/t5-v1_1-xxl", ""), ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
                   ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
                   ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"))


@dataclass
class T5Slot:
    model: torch.nn.Module  # T5EncoderModel
    tokenizer: PreTrainedTokenizerBase


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"The T5 tokenizer in {folder} could not be read ({e}). Replace it with the tokenizer "
                        "folder of a T5-XXL (tokenizer.json or spiece.model).", field="forge_additional_modules") from e


def find_t5_tokenizer(folders: list[Path]) -> PreTrainedTokenizerBase:
    """T5's tokenizer from the first of ``folders`` holding one, else from the Hugging Face cache (offline).

    ``folders`` are where the user may keep it: ``models/text_encoder/t5_tokenizer``, a diffusers
    pipeline's ``tokenizer_2``/``tokenizer_3`` folder.
    """
    for folder in folders:
        if _has_tokenizer(folder):
            return _load_tokenizer(folder)
    for repo, subfolder in HUB_CACHE_REPOS:
        try:
            return T5TokenizerFast.from_pretrained(repo, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError):
            continue
    shown = folders[0] if folders else Path("models/text_encoder") / TOKENIZER_FOLDER
    raise UserError(
        f"T5's tokenizer was not found. Put the T5-XXL tokenizer (tokenizer.json or spiece.model) in {shown}: "
        "ComfyUI has it in comfy/text_encoders/t5_tokenizer, Forge in backend/huggingface/google/t5-v1_1-xxl, "
        "and diffusers' Flux/SD3 folders in tokenizer_2/tokenizer_3. Nothing is downloaded.",
        field="forge_additional_modules")


def _ids_and_weights(prompt: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[float]]:
    runs = [run for run in parse_prompt_attention(prompt) if run != BREAK]
    ids: list[int] = []
    weights: list[float] = []
    pieces = tokenizer([text for text, _ in runs], add_special_tokens=False)["input_ids"] if runs else []
    for (_, weight), run_ids in zip(runs, pieces):
        ids += run_ids
        weights += [weight] * len(run_ids)
    return ids + [tokenizer.eos_token_id], weights + [1.0]


def encode_t5(prompts: list[str], slot: T5Slot, device: torch.device, dtype: torch.dtype,
              min_length: int = MIN_LENGTH) -> torch.Tensor:
    """(B, L, D) T5 hidden states; L is a multiple of ``min_length`` that fits the longest prompt."""
    rows = [_ids_and_weights(p, slot.tokenizer) for p in prompts]
    length = -(-max(len(ids) for ids, _ in rows) // min_length) * min_length
    pad = slot.tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (length - len(i)) for i, _ in rows], device=device)
    weights = [w + [1.0] * (length - len(w)) for _, w in rows]
    with torch.no_grad():
        z = slot.model(input_ids=ids).last_hidden_state
        if any(w != 1.0 for row in weights for w in row):
            z = emphasise(z, torch.tensor(weights, device=device))
    return z.to(dtype)
