"""Prompt parsing and encoding, checked against A1111's documented results and diffusers' own encoders."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from webui.engine.conditioning.prompts import (
    BREAK,
    Conditioning,
    TextEncoderSlot,
    encode_prompts,
    parse_prompt_attention,
    token_count,
)
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.errors import UserError

T = 77  # tokens per chunk, as the encoder sees it


def _config(**overrides) -> CLIPTextConfig:
    settings = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    return CLIPTextConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def clip_l() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(_config()).eval()


@pytest.fixture(scope="module")
def clip_g() -> CLIPTextModelWithProjection:
    torch.manual_seed(1)
    config = _config(hidden_size=64, intermediate_size=256, projection_dim=32, hidden_act="gelu")
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def sd1(clip_l) -> list[TextEncoderSlot]:
    return [TextEncoderSlot(clip_l, clip_tokenizer(), final_layer_norm=True, min_clip_skip=1, pooled=False)]


@pytest.fixture(scope="module")
def sd2(clip_l) -> list[TextEncoderSlot]:
    """An OpenCLIP-style encoder: pads with id 0 after the end-of-text token."""
    return [TextEncoderSlot(clip_l, clip_tokenizer("!"), final_layer_norm=True, min_clip_skip=1, pooled=False)]


@pytest.fixture(scope="module")
def sdxl(clip_l, clip_g) -> list[TextEncoderSlot]:
    return [
        TextEncoderSlot(clip_l, clip_tokenizer(), final_layer_norm=False, min_clip_skip=2, pooled=False),
        TextEncoderSlot(clip_g, clip_tokenizer("!"), final_layer_norm=False, min_clip_skip=2, pooled=True),
    ]


class _WithTextModel:
    """diffusers' clip_skip path reads ``text_encoder.text_model.final_layer_norm``, which
    transformers 5 no longer has (final_layer_norm sits on CLIPTextModel itself)."""

    def __init__(self, model: CLIPTextModel):
        self.model = self.text_model = model
        self.config, self.dtype = model.config, model.dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _diffusers_sd(slot: TextEncoderSlot, prompt: str, clip_skip: int | None) -> torch.Tensor:
    pipe = SimpleNamespace(text_encoder=_WithTextModel(slot.model), tokenizer=slot.tokenizer, unet=None)
    embeds, _ = StableDiffusionPipeline.encode_prompt(pipe, prompt, "cpu", 1, False, clip_skip=clip_skip)
    return embeds


def _diffusers_sdxl(slots: list[TextEncoderSlot], prompt: str, clip_skip: int | None):
    pipe = SimpleNamespace(
        text_encoder=slots[0].model,
        text_encoder_2=slots[1].model,
        tokenizer=slots[0].tokenizer,
        tokenizer_2=slots[1].tokenizer,
        config=SimpleNamespace(force_zeros_for_empty_prompt=True),
    )
    embeds, _, pooled, _ = StableDiffusionXLPipeline.encode_prompt(
        pipe, prompt, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip
    )
    return embeds, pooled


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a (very beautiful:1.3) [cat]", [("a ", 1.0), ("very beautiful", 1.3), (" ", 1.0), ("cat", 1 / 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("(word:1.5)", [("word", 1.5)]),
        ("(word:0.5)", [("word", 0.5)]),
        ("stray) closers]", [("stray) closers]", 1.0)]),
        ("(word:1..5)", [("word:1..5)", 1.1)]),
        ("<lora:name:1> a cat", [("<lora:name:1> a cat", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
    ],
)
def test_parse_prompt_attention(prompt, expected):
    result = parse_prompt_attention(prompt)
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([weight for _, weight in expected])


def test_token_count():
    tokenizer = clip_tokenizer()
    assert token_count("", tokenizer) == (0, 75)
    assert token_count("a (cat:1.2)", tokenizer) == (2, 75)
    assert token_count("cat " * 100, tokenizer) == (100, 150)
    assert token_count("a BREAK b", tokenizer) == (76, 150)  # A1111 counts a closed chunk as 75


# --- matching diffusers --------------------------------------------------------------------


@pytest.mark.parametrize(("clip_skip", "diffusers_clip_skip"), [(1, None), (2, 1), (3, 2)])
@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_plain_prompt_matches_diffusers(request, model, clip_skip, diffusers_clip_skip):
    slots = request.getfixturevalue(model)
    prompt = "a photo of a cat, sitting on a mat"
    cond = encode_prompts([prompt], slots, clip_skip=clip_skip)
    assert cond.pooled is None
    assert torch.equal(cond.embeds, _diffusers_sd(slots[0], prompt, diffusers_clip_skip))


@pytest.mark.parametrize(("clip_skip", "diffusers_clip_skip"), [(1, None), (2, None), (3, 1)])
def test_sdxl_plain_prompt_matches_diffusers(sdxl, clip_skip, diffusers_clip_skip):
    prompt = "a photo of a cat, sitting on a mat"
    cond = encode_prompts([prompt], sdxl, clip_skip=clip_skip)
    embeds, pooled = _diffusers_sdxl(sdxl, prompt, diffusers_clip_skip)
    assert cond.embeds.shape == (1, T, 32 + 64)
    assert torch.equal(cond.embeds, embeds)
    assert torch.equal(cond.pooled, pooled)


def test_clip_skip_out_of_range(sd1):
    with pytest.raises(UserError):
        encode_prompts(["cat"], sd1, clip_skip=0)
    with pytest.raises(UserError):
        encode_prompts(["cat"], sd1, clip_skip=4)


# --- weights -------------------------------------------------------------------------------


def test_weights_scale_tokens_and_keep_the_mean(sd1):
    plain = encode_prompts(["a cat on a mat"], sd1).embeds[0]
    weighted = encode_prompts(["a (cat:1.5) on [a mat]"], sd1).embeds[0]
    weights = torch.ones(T)
    weights[2] = 1.5  # BOS, a, cat, on, a, mat, EOS, ...
    weights[4:6] = 1 / 1.1
    expected = plain * weights[:, None]
    expected *= plain.mean() / expected.mean()
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())


def test_weights_of_one_change_nothing(sd1):
    plain = encode_prompts(["a cat on a mat"], sd1).embeds
    assert torch.equal(encode_prompts(["a (cat:1.0) on a mat"], sd1).embeds, plain)


def test_sdxl_weights_leave_pooled_alone(sdxl):
    plain = encode_prompts(["a cat on a mat"], sdxl)
    weighted = encode_prompts(["a (cat:1.5) on a mat"], sdxl)
    assert torch.equal(weighted.pooled, plain.pooled)
    assert not torch.equal(weighted.embeds[:, 2], plain.embeds[:, 2])
    # each encoder is emphasised on its own, so both halves keep their own mean
    for part in (slice(0, 32), slice(32, 96)):
        torch.testing.assert_close(weighted.embeds[..., part].mean(), plain.embeds[..., part].mean())


# --- chunks --------------------------------------------------------------------------------


def _chunks_of(cond: Conditioning) -> list[torch.Tensor]:
    return list(cond.embeds.split(T, dim=1))


def test_long_prompt_makes_two_chunks(sd1):
    cond = encode_prompts(["cat " * 100], sd1)
    assert cond.embeds.shape == (1, 2 * T, 32)
    first, second = _chunks_of(cond)
    torch.testing.assert_close(first, encode_prompts(["cat " * 75], sd1).embeds)
    torch.testing.assert_close(second, encode_prompts(["cat " * 25], sd1).embeds)


def test_break_starts_a_new_chunk(sd1):
    first, second = _chunks_of(encode_prompts(["a red cat BREAK a blue dog"], sd1))
    torch.testing.assert_close(first, encode_prompts(["a red cat"], sd1).embeds)
    torch.testing.assert_close(second, encode_prompts(["a blue dog"], sd1).embeds)


def test_overflow_backtracks_to_last_comma(sd1):
    first, second = _chunks_of(encode_prompts(["cat " * 70 + ", " + "dog " * 10], sd1))
    torch.testing.assert_close(first, encode_prompts(["cat " * 70 + ","], sd1).embeds)
    torch.testing.assert_close(second, encode_prompts(["dog " * 10], sd1).embeds)


def test_no_backtrack_when_comma_is_too_far_back(sd1):
    first, second = _chunks_of(encode_prompts(["cat " * 50 + ", " + "dog " * 40], sd1))
    torch.testing.assert_close(first, encode_prompts(["cat " * 50 + ", " + "dog " * 24], sd1).embeds)
    torch.testing.assert_close(second, encode_prompts(["dog " * 16], sd1).embeds)


def test_sdxl_multi_chunk_pooled_comes_from_first_chunk(sdxl):
    cond = encode_prompts(["cat " * 100], sdxl)
    assert cond.embeds.shape == (1, 2 * T, 96)
    torch.testing.assert_close(cond.pooled, encode_prompts(["cat " * 75], sdxl).pooled)


# --- padding and batches -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_negative_encoded_with_a_longer_positive_is_padded_with_the_empty_chunk(request, model):
    slots = request.getfixturevalue(model)
    both = encode_prompts(["cat " * 100, "blurry"], slots)
    negative = encode_prompts(["blurry"], slots)
    empty = encode_prompts([""], slots)
    assert both.embeds.shape == (2, 2 * T, negative.embeds.shape[-1])
    first, second = _chunks_of(Conditioning(both.embeds[1:], None))
    torch.testing.assert_close(first, negative.embeds)
    torch.testing.assert_close(second, empty.embeds)
    if negative.pooled is not None:
        torch.testing.assert_close(both.pooled[1:], negative.pooled)


def test_batch_of_different_prompts(sd1, clip_l):
    batch_sizes = []

    def record(module, args, kwargs, output):
        batch_sizes.append(kwargs["input_ids"].shape[0])

    hook = clip_l.register_forward_hook(record, with_kwargs=True)
    try:
        cond = encode_prompts(["a cat", "cat " * 100, "a cat"], sd1)
    finally:
        hook.remove()
    assert batch_sizes == [4]  # "a cat" once, two chunks of the long prompt, one empty chunk for padding
    assert cond.embeds.shape == (3, 2 * T, 32)
    assert torch.equal(cond.embeds[0], cond.embeds[2])
    torch.testing.assert_close(cond.embeds[:1, :T], encode_prompts(["a cat"], sd1).embeds)
    torch.testing.assert_close(cond.embeds[:1, T:], encode_prompts([""], sd1).embeds)
    torch.testing.assert_close(cond.embeds[1:2], encode_prompts(["cat " * 100], sd1).embeds)


def test_dtype_and_network_tags(sdxl):
    cond = encode_prompts(["<lora:name:1> a cat", "a dog"], sdxl, dtype=torch.float16)
    assert cond.embeds.dtype == cond.pooled.dtype == torch.float16
    assert cond.embeds.shape == (2, T, 96)
    assert cond.pooled.shape == (2, 32)
