"""Textual-inversion embeddings (issue 28): A1111's .pt, emb_params and SDXL's clip_l/clip_g safetensors, diffusers'
.bin; the conditioning diffusers' load_textual_inversion gives on the same file; weights and negative prompts; the
chunking (an embedding never split); TI hashes in the infotext; /sdapi/v1/embeddings; bad files."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from tests.conftest import make_engine
from webui.engine.conditioning.embeddings import EmbeddingTable, read_embedding
from webui.engine.conditioning.prompts import encode_prompts, token_count
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.errors import ModelFileError

REQUEST = dict(prompt="a photo of dusky, blue", negative_prompt="blurry", width=64, height=64, steps=3, cfg_scale=5.0,
               seed=3, sampler_name="Euler", save_images=False)


def vectors(width: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write_embedding(folder, name: str, layout: str, widths=(32,), count: int = 2, seed: int = 0):
    """An embedding file as A1111 ("a1111": .pt, "emb_params", "sdxl": clip_l/clip_g safetensors) or diffusers
    ("diffusers": .bin) write them."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = [vectors(w, count, seed + i) for i, w in enumerate(widths)]
    if layout == "a1111":
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": tensors[0]}, "name": name, "step": 1500,
                    "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, path)
    elif layout == "emb_params":
        save_file({"emb_params": tensors[0].contiguous()}, path := folder / f"{name}.safetensors")
    elif layout == "sdxl":
        save_file({"clip_l": tensors[0].contiguous(), "clip_g": tensors[1].contiguous()},
                  path := folder / f"{name}.safetensors")
    else:
        torch.save({f"<{name}>": tensors[0]}, path := folder / f"{name}.bin")
    return path, tensors


def width(engine, index: int = 0) -> int:
    return engine.models.current.text_encoders[index].model.config.hidden_size


def conditioning(engine, prompts: list[str]):
    model = engine.models.current
    return model.kind.encode(model, prompts, 1, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("layout", ["a1111", "emb_params", "diffusers"])
def test_an_sd1_embedding_conditions_as_diffusers_loads_it(tmp_path, sd1_folder, layout):
    """The same conditioning as diffusers' pipeline after load_textual_inversion of the same file, for each layout;
    the embedding changes the conditioning from the plain word's."""
    engine = make_engine(tmp_path, sd1_folder)
    plain = engine.txt2img(GenerationRequest(**REQUEST))
    path, _ = write_embedding(engine.config.paths.embeddings_dir, "dusky", layout, (width(engine),))
    result = engine.txt2img(GenerationRequest(**REQUEST))
    ours = conditioning(engine, [REQUEST["prompt"]]).embeds
    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder, torch_dtype=torch.float32, local_files_only=True)
    plain_reference = pipe.encode_prompt(REQUEST["prompt"], "cpu", 1, False)[0]
    pipe.load_textual_inversion(str(path), token="dusky")
    reference = pipe.encode_prompt(REQUEST["prompt"], "cpu", 1, False)[0]
    assert ours.shape == reference.shape == (1, 77, width(engine))
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert (reference - plain_reference).abs().max() > 1e-2, "the embedding changes the conditioning"
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))
    hashes = parse_infotext(result.infotexts[0])["TI hashes"]
    assert hashes == f"dusky: {engine.embeddings.short_hash(read_embedding(path))}" and len(hashes) == len("dusky: ") + 12
    assert "TI hashes" not in plain.infotexts[0]


def test_an_sdxl_pair_conditions_as_diffusers_loads_it(tmp_path, sdxl_folder):
    """SDXL's clip_l/clip_g file: each half in its text encoder, as diffusers loads them (its documented two calls);
    the pooled output too."""
    engine = make_engine(tmp_path, sdxl_folder)
    engine.txt2img(GenerationRequest(**REQUEST))
    path, (clip_l, clip_g) = write_embedding(engine.config.paths.embeddings_dir, "dusky", "sdxl",
                                             (width(engine, 0), width(engine, 1)))
    engine.txt2img(GenerationRequest(**REQUEST))
    ours = conditioning(engine, [REQUEST["prompt"]])
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.load_textual_inversion(clip_l, token="dusky", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="dusky", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    embeds, _, pooled, _ = pipe.encode_prompt(REQUEST["prompt"], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert torch.allclose(ours.embeds, embeds, atol=1e-5) and torch.allclose(ours.pooled, pooled, atol=1e-5)


def test_weights_the_negative_prompt_and_chunks(tmp_path, sd1_file):
    """A weighted embedding is the weighted vectors (A1111's emphasis, as for words); in the negative prompt too; it
    counts as its vectors in the token counter and moves whole to the next chunk where it does not fit."""
    engine = make_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQUEST))
    write_embedding(engine.config.paths.embeddings_dir, "dusky", "a1111", (width(engine),), count=3)
    result = engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": "a cat", "negative_prompt": "(dusky:1.3)"}))
    assert "dusky" in parse_infotext(result.infotexts[0])["TI hashes"]
    slot = engine.models.current.text_encoders[0]
    assert token_count("a dusky cat", slot.tokenizer, slot.embeddings) == (5, 75)
    words = "cat " * 73
    plain = encode_prompts([words + "dusky"], [slot]).embeds
    assert plain.shape[1] == 2 * 77, "73 words, then 3 vectors that do not fit: a second chunk"
    second = encode_prompts(["dusky"], [slot]).embeds
    assert torch.allclose(plain[:, 77:79], second[:, :2]), "the vectors begin the second chunk (BOS, then them)"
    weighted = encode_prompts(["a (dusky:1.2) cat"], [slot]).embeds
    assert not torch.allclose(weighted, encode_prompts(["a dusky cat"], [slot]).embeds)


def test_embeddings_listed_for_the_loaded_model_and_bad_files_skipped(tmp_path, sd1_file, caplog):
    """/sdapi/v1/embeddings: the fitting ones with A1111's fields; one for another width, a corrupt file and a pickle
    that carries code skipped with the reason; generation goes on and the others work."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue

    engine = make_engine(tmp_path, sd1_file)
    folder = engine.config.paths.embeddings_dir
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    engine.txt2img(GenerationRequest(**REQUEST))
    write_embedding(folder, "dusky", "a1111", (width(engine),))
    write_embedding(folder / "sdxl", "pair", "sdxl", (768, 1280))
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")

    class Hostile:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Hostile()}}, folder / "hostile.pt")
    with caplog.at_level(logging.WARNING):
        listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"] == {"dusky": {"step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model",
                                          "shape": width(engine), "vectors": 2}}
    assert set(listed["skipped"]) == {"pair", "broken", "hostile"}
    assert "768 and 1280 wide" in listed["skipped"]["pair"]["reason"]
    assert "not a plain weights pickle" in listed["skipped"]["hostile"]["reason"]
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    result = engine.txt2img(GenerationRequest(**REQUEST))
    assert "dusky" in parse_infotext(result.infotexts[0])["TI hashes"]


@pytest.mark.parametrize("payload,message", [
    ({"emb_params": torch.zeros(2, 3, 4)}, r"shape \(2, 3, 4\)"),
    ({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, "has a, b"),
    ({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 16)}, "do not pair up"),
])
def test_files_that_are_no_embedding_say_why(tmp_path, payload, message):
    save_file(payload, path := tmp_path / "x.safetensors")
    with pytest.raises(ModelFileError, match=message):
        read_embedding(path)


def test_a_name_is_found_only_as_its_own_tokens():
    """Names sharing a beginning: the longest that matches wins; a name inside another word's tokens is not it."""
    from webui.engine.conditioning.embeddings import Embedding
    from webui.engine.conditioning.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    short, long = (Embedding(n, None, {4: torch.zeros(1, 4)}) for n in ("cat", "cat dog"))
    table = EmbeddingTable.of([short, long], tokenizer, 4)
    ids = tokenizer("a cat dog", add_special_tokens=False)["input_ids"]
    assert table.match(ids, 1) == (2, long) and table.match(ids, 0) is None
