"""The generation path end to end on the tiny SD1 checkpoint: seeds, batches, infotext, errors."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import make_engine, single_file
from webui.engine.formats import files
from webui.engine.infotext import parse_infotext, read_png_infotext
from webui.engine.request import GenerationRequest
from webui.errors import ModelFileError, UserError
from webui.synthetic.builders import build_synthetic_model
from webui.synthetic.ldm_export import VAE_PREFIX, ldm_state_dict

SMALL = dict(width=64, height=64, steps=3, cfg_scale=5.0)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i).astype(int) for i in images])


def test_same_seed_same_image_and_batches_use_seed_plus_i(engine):
    batch = engine.txt2img(GenerationRequest(prompt="a cat", seed=100, batch_size=2, n_iter=2, **SMALL))
    assert batch.seeds == [100, 101, 102, 103]
    again = engine.txt2img(GenerationRequest(prompt="a cat", seed=100, batch_size=2, n_iter=2, **SMALL))
    assert np.array_equal(pixels(batch.images), pixels(again.images))
    single = engine.txt2img(GenerationRequest(prompt="a cat", seed=103, **SMALL))
    assert np.abs(pixels(single.images)[0] - pixels(batch.images)[3]).max() <= 1
    assert not np.array_equal(pixels(batch.images)[0], pixels(batch.images)[1])


def test_random_seed_is_reported_and_reproduces(engine):
    first = engine.txt2img(GenerationRequest(prompt="a dog", seed=-1, **SMALL))
    assert 0 <= first.seed < 2**32 and f"Seed: {first.seed}," in first.infotexts[0]
    again = engine.txt2img(GenerationRequest(prompt="a dog", seed=first.seed, **SMALL))
    assert np.array_equal(pixels(first.images), pixels(again.images))


def test_saved_png_carries_parseable_infotext(engine, tmp_path):
    result = engine.txt2img(GenerationRequest(prompt="a (red:1.3) circle, blue", negative_prompt="ugly", seed=7,
                                              sampler_name="Euler a", scheduler="Automatic", clip_skip=2, **SMALL))
    (path,) = result.paths
    assert path.is_relative_to(tmp_path / "outputs" / "txt2img-images") and path.name.startswith("00000-7-")
    params = parse_infotext(read_png_infotext(path))
    assert params["Prompt"] == "a (red:1.3) circle, blue" and params["Negative prompt"] == "ugly"
    assert (params["Steps"], params["Sampler"], params["Seed"], params["Size"], params["Clip skip"]) == \
        ("3", "Euler a", "7", "64x64", "2")
    assert params["Model"] == "sd1-1" and len(params["Model hash"]) == 10


@pytest.mark.parametrize("field,value", [("width", 7), ("width", 100000), ("height", 100), ("steps", 0),
                                         ("batch_size", 0), ("cfg_scale", float("nan")), ("seed", -5),
                                         ("sampler_name", "Nope"), ("scheduler", "Nope"), ("prompt", None)])
def test_bad_fields_are_named_and_the_engine_keeps_working(engine, field, value):
    with pytest.raises(UserError) as caught:
        engine.txt2img(GenerationRequest(**{**SMALL, field: value}))
    assert caught.value.field == field
    assert engine.txt2img(GenerationRequest(prompt="fine", seed=1, **SMALL)).images


def test_unknown_checkpoint_is_a_clear_error(engine):
    with pytest.raises(UserError, match="no checkpoint named '../../etc/passwd'"):
        engine.txt2img(GenerationRequest(checkpoint="../../etc/passwd", **SMALL))


def test_broken_checkpoint_is_reported_and_the_good_one_still_works(tmp_path, sd1_file):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(sd1_file.read_bytes()[:5000])
    engine = make_engine(tmp_path / "data", sd1_file, broken)
    with pytest.raises(ModelFileError, match="truncated"):
        engine.txt2img(GenerationRequest(checkpoint="broken.safetensors", **SMALL))
    assert engine.txt2img(GenerationRequest(checkpoint="sd1-1.safetensors", seed=1, **SMALL)).images


def test_long_prompts_and_clip_skip_change_the_image(engine):
    base = pixels(engine.txt2img(GenerationRequest(prompt="a cat", seed=3, **SMALL)).images)
    skipped = pixels(engine.txt2img(GenerationRequest(prompt="a cat", seed=3, clip_skip=2, **SMALL)).images)
    assert not np.array_equal(base, skipped)
    long_prompt = ", ".join(f"word{i}" for i in range(60))
    result = engine.txt2img(GenerationRequest(prompt=long_prompt, negative_prompt="x", seed=3, **SMALL))
    assert result.images[0].size == (64, 64)


def test_vae_from_models_folder_replaces_the_built_in_one(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    other = ldm_state_dict(build_synthetic_model("sd1", "tiny", seed=99))
    vae = {k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in other.items() if k.startswith(VAE_PREFIX)}
    save_file(vae, str(tmp_path / "models" / "VAE" / "other.vae.safetensors"))
    req = dict(prompt="a cat", seed=5, **SMALL)
    own = pixels(engine.txt2img(GenerationRequest(**req)).images)
    result = engine.txt2img(GenerationRequest(vae="other.vae.safetensors", **req))
    assert engine.models.current.vae_name == "other.vae.safetensors"
    decoder = engine.models.current.vae.decoder.conv_out.weight
    assert torch.equal(decoder, vae["decoder.conv_out.weight"].float())
    assert not np.array_equal(own, pixels(result.images)) and "VAE: other.vae.safetensors" in result.infotexts[0]


def interrupt_after(engine, calls: int, action: str) -> None:
    """Press Interrupt or Skip from inside the UNet's n-th call: deterministic, unlike a timer."""
    unet = engine.models.current.denoiser
    forward, count = unet.forward, {"n": 0}

    def counting(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            getattr(engine.progress, action)()
        return forward(*args, **kwargs)

    unet.forward = counting


def test_interrupt_stops_between_steps_and_returns_what_was_made(engine):
    engine.txt2img(GenerationRequest(prompt="warm up", seed=1, **SMALL))
    interrupt_after(engine, 2, "interrupt")
    result = engine.txt2img(GenerationRequest(prompt="a cat", seed=1, n_iter=3, **{**SMALL, "steps": 10}))
    assert result.interrupted and len(result.images) == 1 and result.paths == []
    assert engine.progress.active is False


def test_skip_ends_the_current_batch_and_goes_on(engine):
    engine.txt2img(GenerationRequest(prompt="warm up", seed=1, **SMALL))
    interrupt_after(engine, 2, "skip")
    result = engine.txt2img(GenerationRequest(prompt="a cat", seed=1, n_iter=2, **{**SMALL, "steps": 4}))
    assert not result.interrupted and result.seeds == [1, 2]
    complete = engine.txt2img(GenerationRequest(prompt="a cat", seed=2, **{**SMALL, "steps": 4}))
    assert np.array_equal(pixels(result.images)[1], pixels(complete.images)[0])


def test_sd2_v_prediction_checkpoint_generates(tmp_path):
    engine = make_engine(tmp_path, single_file("sd2", prediction_type="v_prediction"))
    result = engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL))
    assert engine.models.current.prediction_type == "v_prediction" and result.images


def test_interrupt_pressed_while_the_model_loads_stops_the_job(tmp_path, sd1_file, monkeypatch):
    engine = make_engine(tmp_path, sd1_file)
    load = engine.models.get

    def slow_load(*args, **kwargs):
        model = load(*args, **kwargs)
        engine.progress.interrupt()  # the user presses Interrupt while loading
        return model

    monkeypatch.setattr(engine.models, "get", slow_load)
    result = engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL))
    assert result.interrupted and result.images == []
    monkeypatch.setattr(engine.models, "get", load)
    assert len(engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL)).images) == 1


class PressingInterrupt:
    """sha256 that presses Interrupt when its second chunk comes, from inside the hashing (like interrupt_after)."""

    def __init__(self, progress):
        self.progress, self.chunks, self.hash = progress, 0, hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.chunks += 1
        if self.chunks == 2:
            self.progress.interrupt()
        self.hash.update(chunk)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def test_interrupt_pressed_while_the_checkpoint_is_hashed_stops_the_hashing(tmp_path, sd1_file, monkeypatch):
    """A checkpoint is hashed before it loads; hashing a huge one (or /dev/zero) went on whatever the user pressed."""
    engine = make_engine(tmp_path, sd1_file)
    monkeypatch.setattr(files, "hashlib", SimpleNamespace(sha256=lambda: PressingInterrupt(engine.progress)))
    with pytest.raises(UserError, match="Interrupted while hashing sd1-1.safetensors"):
        engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL))
    monkeypatch.undo()
    engine.load_selected()  # a job of its own: the Interrupt before it is not for it
    result = engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL))
    assert result.model_hash == hashlib.sha256(sd1_file.read_bytes()).hexdigest()[:10] and len(result.images) == 1


def test_sdxl_vae_is_never_float16():
    from webui.engine.families.registry import Families
    from webui.engine.formats.detect import Family
    from webui.engine.loading.load import vae_dtype_for

    families = Families()
    assert vae_dtype_for(families[Family.SDXL], torch.float16) == torch.float32
    assert vae_dtype_for(families[Family.SDXL], torch.bfloat16) == torch.bfloat16
    assert vae_dtype_for(families[Family.SD1], torch.float16) == torch.float16


def test_float16_vae_that_makes_nans_is_kept_in_float32_and_the_batch_decoded_again(engine):
    request = GenerationRequest(prompt="a cat", seed=3, **SMALL)
    engine.txt2img(request)
    vae = engine.models.current.vae
    with torch.no_grad():  # activations of 1e5 and more: fine in float32, inf (then NaN) in float16
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    reference = engine.txt2img(request)
    assert pixels(reference.images).std() > 10 and not reference.notices
    engine.memory.convert("vae", torch.float16)
    retried = engine.txt2img(request)
    assert vae.dtype == torch.float32 and engine.memory.components["vae"].module is vae
    assert np.abs(pixels(retried.images) - pixels(reference.images)).max() <= 1  # float16-rounded weights
    (notice,) = retried.notices
    assert "NaN" in notice and "--no-half-vae" in notice
    assert not engine.txt2img(request).notices, "said once: the VAE stays in float32"


def test_denoiser_that_makes_nans_is_a_clear_error_not_a_black_image(engine):
    engine.txt2img(GenerationRequest(prompt="warm up", seed=1, **SMALL))
    weight = engine.models.current.denoiser.conv_in.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN or infinite values .*float32.* a LoRA or an extension"):
        engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL))
    with torch.no_grad():
        weight.copy_(kept)
    assert engine.txt2img(GenerationRequest(prompt="a cat", seed=1, **SMALL)).images
