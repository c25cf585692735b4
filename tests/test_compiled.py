"""Compile the denoiser (issue 26), on the CPU with inductor: the same images as eager, compiled once for any size,
batch, prompt or seed, eager where the denoiser streams, the setting, the flag, the infotext and the cache folder."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import make_engine
from tests.test_lora import _lora_components, lora_folder, with_extensions
from tests.test_memory import model_bytes, set_budget, simulated_engine
from webui.engine.memory.stream import IN_FLIGHT
from webui.cli import parse_args
from webui.engine.compiled import is_compiled, repeated_blocks
from webui.engine.infotext import parse_infotext
from webui.engine.memory import MB
from webui.engine.request import GenerationRequest
from webui.synthetic.lora_export import random_lora, write_lora
from webui.ui.generation import done_text

REQUEST = dict(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=3, cfg_scale=5.0, seed=11,
               sampler_name="Euler a", batch_size=2, save_images=False)


def images(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=int) for image in result.images])


def compiles() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_images_equal_eager_and_compile_once(tmp_path, sd1_file):
    """Each repeated block is compiled once (dynamic shapes): another size, batch, prompt or seed compiles nothing
    more; the first LoRA compiles the blocks with adapters once, and then no LoRA, rank, weight or none does; the
    images are eager's; the infotext says Compiled and the memory line "compiled"."""
    torch.compiler.reset()
    engine = with_extensions(make_engine(tmp_path, sd1_file))
    eager = engine.txt2img(GenerationRequest(**REQUEST))
    engine.options.update({"compile_denoiser": True})
    first = engine.txt2img(GenerationRequest(**REQUEST))
    blocks = repeated_blocks(engine.models.current.denoiser)
    assert blocks and all(is_compiled(block) for block in blocks)
    assert np.abs(images(first) - images(eager)).max() <= 1
    assert parse_infotext(first.infotexts[0])["Compiled"] == "True" and "Compiled" not in eager.infotexts[0]
    assert first.memory.compiled and ", compiled" in first.memory.line()
    assert eager.fast == () and first.fast == ("compiled",) and "Fast path: compiled." in done_text(first, "2 images")
    graphs = compiles()
    assert graphs > 0
    model = engine.models.current
    for name, rank in (("style", 4), ("other", 8)):
        write_lora(lora_folder(engine) / f"{name}.safetensors",
                   random_lora(dict(_lora_components(model)), model.family, rank=rank, seed=rank), model.family, "kohya")
    for change in (dict(seed=12, prompt="a blue square"), dict(width=96, height=64, batch_size=1)):
        engine.txt2img(GenerationRequest(**{**REQUEST, **change}))
    assert compiles() == graphs, "shapes are dynamic: a new size, batch, prompt or seed compiles nothing"
    engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": "a red circle <lora:style:0.7>"}))
    adapted = compiles()  # the blocks with adapters in their layers: compiled once more
    assert adapted - graphs <= 2, "once for each size of block (the tiny UNet has two), not once for each block"
    for prompt in ("<lora:style:0.3>", "<lora:other:1>", "", "<lora:style:1> <lora:other:0.5>"):
        engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": f"a red circle {prompt}"}))
    assert compiles() == adapted, "another LoRA, rank, weight, two of them or none: nothing compiled again"


@pytest.mark.parametrize("unit_bytes", [256 * 1024, 48 * 1024], ids=["blocks-whole", "blocks-cut"])
def test_where_the_denoiser_streams_its_resident_blocks_run_compiled(tmp_path, sd1_file, caplog, unit_bytes):
    """Half the denoiser streamed: the blocks whose weights stream run eager (the log says how many), those on the
    device compiled; the images are the eager streamed ones. Where the streamer's units cut the blocks (each block
    several units, as Flux's and SD3's full-size blocks), compiled blocks stream whole, so some stay compiled."""
    engine = simulated_engine(tmp_path, sd1_file)
    engine.memory.min_unit_bytes = unit_bytes  # the tiny UNet's blocks are 144-288 kB
    engine.txt2img(GenerationRequest(**REQUEST))
    window = (IN_FLIGHT + 1) * max(u.nbytes for u in engine.memory.components["denoiser"].units)
    set_budget(engine, (model_bytes(engine)["denoiser"] * 0.5 + window) / MB)  # room for half of it resident
    streamed = engine.txt2img(GenerationRequest(**REQUEST))
    engine.options.update({"compile_denoiser": True})
    with caplog.at_level(logging.INFO, logger="webui.engine.generate"):
        result = engine.txt2img(GenerationRequest(**REQUEST))
    blocks = repeated_blocks(engine.models.current.denoiser)
    moving = {id(p) for p in engine.memory.streamed_parameters("denoiser")}
    eager = [b for b in blocks if any(id(p) in moving for p in b.parameters())]
    assert result.memory.streamed_mb > 0 and result.memory.compiled and 0 < len(eager) < len(blocks)
    said = [r.getMessage() for r in caplog.records if "Compile the denoiser" in r.getMessage()]
    assert said == [f"Compile the denoiser: {len(eager)} of {len(blocks)} blocks run eager in this pass, their "
                    "weights stream (the streamer moves them around each call, which compiled code would compile "
                    "again)."]
    assert np.abs(images(result) - images(streamed)).max() <= 1


def test_the_flag_and_the_cache_folder(tmp_path, sd1_file):
    assert parse_args(["--compile"]).compile and not parse_args([]).compile
    engine = make_engine(tmp_path, sd1_file, extra_args=("--compile",))
    assert not engine.options["compile_denoiser"], "the flag is for the session: the setting is left as it was"
    result = engine.txt2img(GenerationRequest(**{**REQUEST, "batch_size": 1}))
    assert parse_infotext(result.infotexts[0])["Compiled"] == "True"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(os.path.join("cache", "inductor"))


def test_gguf_layers_compile_without_a_break(tmp_path):
    """A Q4_K UNet (the most involved unpacking): its blocks compile whole (no graph break) and compute what they
    computed eager."""
    from gguf import GGMLQuantizationType

    from tests.test_gguf_unet import load, unet_inputs, write_unet
    from webui.engine.compiled import compile_denoiser
    from webui.synthetic.builders import build_synthetic_model
    from webui.synthetic.ldm_export import unet_to_ldm

    torch.compiler.reset()
    unet = build_synthetic_model("sd1", "tiny", seed=1).denoiser.float()
    path = write_unet(tmp_path, "sd1", unet_to_ldm(unet.state_dict(), unet.config), GGMLQuantizationType.Q4_K)
    loaded, _ = load(path, "sd1")
    inputs = unet_inputs(loaded.config)
    with torch.no_grad():
        eager = loaded(**inputs).sample
        assert compile_denoiser(loaded)
        compiled = loaded(**inputs).sample
    assert sum(counters["graph_break"].values()) == 0 and compiles() > 0
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("family,graphs", [("flux", 2), ("sd3", 3)])
def test_flow_transformers_compile_their_joint_and_single_blocks(family, graphs):
    """Flux's blocks (diffusers' list) and SD3's (named here): compiled whole, the eager output; one graph for each
    kind of block (Flux: double and single; SD3.5: joint with a second attention, joint, and the last, which keeps no
    context), though the first block of a kind is given views and other strides than the rest; each traced once (no
    second trace for the layers' float attributes)."""
    from diffusers import FluxTransformer2DModel

    from webui.engine.compiled import compile_denoiser
    from webui.synthetic.builders import build_sd3_transformer, flux_architecture

    torch.compiler.reset()
    counters.clear()
    torch._dynamo.utils.compilation_time_metrics.clear()
    torch.manual_seed(1)
    model = (FluxTransformer2DModel(**flux_architecture("tiny") | {"num_layers": 2, "num_single_layers": 3}).eval()
             if family == "flux" else build_sd3_transformer("tiny", seed=2))
    config, generator = model.config, torch.Generator().manual_seed(0)
    inputs = dict(encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=generator),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator))
    if family == "flux":
        inputs |= dict(hidden_states=torch.randn(1, 16, config.in_channels, generator=generator),
                       timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                       guidance=torch.tensor([3.5]) if config.guidance_embeds else None)
    else:
        inputs |= dict(hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=generator),
                       timestep=torch.tensor([500.0]))
    with torch.no_grad():
        eager = model(**inputs).sample
        assert compile_denoiser(model)
        compiled = model(**inputs).sample
    assert sum(counters["graph_break"].values()) == 0 and torch.allclose(compiled, eager, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert "compile_attempt_1" not in torch._dynamo.utils.compilation_time_metrics, "no trace restarted"


def test_turning_the_setting_off_runs_the_compiled_blocks_eager_again(tmp_path, sd1_file):
    """Blocks compiled for an earlier job are left compiled, but a job without the setting runs them eager (and the
    compiled code comes back when it is on again)."""
    engine = make_engine(tmp_path, sd1_file)
    engine.options.update({"compile_denoiser": True})
    assert engine.txt2img(GenerationRequest(**REQUEST)).memory.compiled
    engine.options.update({"compile_denoiser": False})
    off = engine.txt2img(GenerationRequest(**REQUEST))
    assert not off.memory.compiled and "Compiled" not in off.infotexts[0]
    assert all(is_compiled(block) for block in repeated_blocks(engine.models.current.denoiser))
