"""The resident denoiser replayed as a CUDA graph (issue 33), on the CPU with a stand-in capture: shape keys, what
lets graphs go (a LoRA change, a model switch, a budget that streams, a phase that needs the room), the LRU, the
fallbacks and their reasons, the setting and the flag. The stand-in replays by calling the denoiser again on the
static buffers, and fails loudly if the denoiser's weights or layers changed since its capture (a stale graph).
CUDA's own replay is tested in test_cuda.py."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from tests.conftest import make_engine
from tests.test_lora import _lora_components, lora_folder, with_extensions
from tests.test_memory import model_bytes, set_budget, simulated_engine
from webui.cli import parse_args
from webui.engine import graphs
from webui.engine.hooks import graph_safe
from webui.engine.memory import MB
from webui.engine.memory.manager import MemoryManager, MemoryPolicy, SimulatedMemory
from webui.engine.request import GenerationRequest
from webui.synthetic.lora_export import random_lora, write_lora

REQUEST = dict(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=4, cfg_scale=5.0, seed=11,
               sampler_name="Euler a", batch_size=2, save_images=False)
POOL = 3 * MB  # what the stand-in says a capture's pool holds


def weights_of(module: nn.Module) -> tuple:
    """What a graph bakes in: each layer's class and its weights' addresses (LoRA adapters included)."""
    adapters = [getattr(m, "_lora", None) for m in module.modules()]
    return (tuple((type(m), tuple(p.data_ptr() for p in m.parameters(recurse=False))) for m in module.modules()),
            tuple(p.data_ptr() for a in adapters if a is not None for p in a.parameters()))


@dataclass
class StandIn:
    """A capture on the CPU: the call run once; a replay runs it again on the static inputs into the static output,
    after checking that the denoiser (``watch``) computes with what it captured."""

    watch: nn.Module | None = None
    captures: int = 0

    def __call__(self, run, device):
        self.captures += 1
        output, baked = run(), weights_of(self.watch) if self.watch is not None else None

        def replay():
            if self.watch is not None and weights_of(self.watch) != baked:
                raise AssertionError("a graph replayed after the denoiser's weights or layers changed")
            for static, fresh in zip(tree_leaves(output), tree_leaves(run())):
                static.copy_(fresh)

        return replay, output, POOL


@pytest.fixture
def capture(monkeypatch):
    stand_in = StandIn()
    monkeypatch.setitem(graphs.CAPTURES, "cpu", stand_in)
    return stand_in


def images(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=int) for image in result.images])


def watched(engine, capture: StandIn) -> graphs.DenoiserGraphs:
    capture.watch = engine.models.current.denoiser
    return graphs.graphs_of(capture.watch, engine.memory.device)


def test_replayed_images_equal_eager_one_capture_for_the_job(tmp_path, sd1_file, capture):
    """One capture (the CFG batch's shape) replayed at every step: the eager images exactly; another prompt or seed
    replays the same graph; another size captures one more; the result and the memory line say so."""
    engine = make_engine(tmp_path, sd1_file)
    engine.options.update({"cuda_graphs": False})
    eager = engine.txt2img(GenerationRequest(**REQUEST))
    engine.options.update({"cuda_graphs": True})
    held = watched(engine, capture)
    first = engine.txt2img(GenerationRequest(**REQUEST))
    assert np.array_equal(images(first), images(eager))
    assert (capture.captures, held.replays) == (1, REQUEST["steps"])
    assert first.fast == ("CUDA graphs",) and eager.fast == ()
    assert first.memory.graphed and ", CUDA graphs " in first.memory.line() and "CUDA graphs" not in eager.memory.line()
    engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": "a blue square", "seed": 5}))
    assert capture.captures == 1
    engine.txt2img(GenerationRequest(**{**REQUEST, "width": 96}))
    assert capture.captures == 2 and len(held.calls) == 2
    assert engine.memory.held == [held] and engine.memory.held_bytes() == held.nbytes >= 2 * POOL


def test_a_lora_added_reweighted_and_removed_recaptures_and_draws_eager(tmp_path, sd1_file, capture):
    """Each LoRA change lets the graphs go and the next image captures again (the stand-in fails on a stale graph);
    every image is the eager one; the same LoRA again captures nothing."""
    engine = with_extensions(make_engine(tmp_path, sd1_file))
    engine.txt2img(GenerationRequest(**REQUEST))
    model = engine.models.current
    write_lora(lora_folder(engine) / "style.safetensors",
               random_lora(dict(_lora_components(model)), model.family, rank=4, seed=4), model.family, "kohya")
    held, before = watched(engine, capture), capture.captures
    expected = []
    for prompt in ("a red circle <lora:style:0.8>", "a red circle <lora:style:0.3>", "a red circle"):
        request = GenerationRequest(**{**REQUEST, "prompt": prompt})
        engine.options.update({"cuda_graphs": False})
        expected.append(images(engine.txt2img(request)))
        engine.options.update({"cuda_graphs": True})
        assert np.array_equal(images(engine.txt2img(request)), expected[-1])
    assert not np.array_equal(expected[0], expected[1]) and not np.array_equal(expected[1], expected[2])
    assert capture.captures == before + 3
    engine.txt2img(GenerationRequest(**{**REQUEST, "seed": 3}))
    assert capture.captures == before + 3 and held.calls


def test_sizes_beyond_the_lru_let_the_oldest_go(tmp_path, sd1_file, capture):
    """An X/Y/Z plot over more sizes than GRAPHS_KEPT: at most that many graphs are held, their bytes counted."""
    from webui.engine.xyz import BUILTIN_AXES, AxisChoice, run_plot

    engine = make_engine(tmp_path, sd1_file)
    sizes = ["64x64", "96x64", "64x96", "96x96"]
    plot = run_plot(engine, GenerationRequest(**{**REQUEST, "batch_size": 1}), [AxisChoice("Size", ", ".join(sizes))],
                    BUILTIN_AXES)
    held = graphs.graphs_of(engine.models.current.denoiser, engine.memory.device)
    assert len(plot.cells) == len(sizes) and capture.captures == len(sizes)
    assert len(held.calls) == graphs.GRAPHS_KEPT and engine.memory.held_bytes() <= graphs.GRAPHS_KEPT * (POOL + MB)


def test_a_model_switch_and_an_unload_let_the_graphs_go(tmp_path, sd1_file, sdxl_file, capture):
    engine = make_engine(tmp_path, sd1_file, sdxl_file)
    engine.txt2img(GenerationRequest(**REQUEST))
    first = graphs.graphs_of(engine.models.current.denoiser, engine.memory.device)
    assert first.calls and engine.memory.held == [first]
    engine.options.update({"sd_model_checkpoint": sdxl_file.name})
    engine.txt2img(GenerationRequest(**REQUEST))
    assert not first.calls, "the first model's denoiser left the device: its graphs with it"
    second = graphs.graphs_of(engine.models.current.denoiser, engine.memory.device)
    assert second.calls and engine.memory.held == [second]
    engine.models.unload()
    assert not second.calls and engine.memory.held == []


def test_a_streamed_denoiser_runs_eager_and_says_why(tmp_path, sd1_file, capture, caplog):
    """Half the denoiser streamed: eager (the graphs of the resident run let go when it moved), one log line with the
    reason; resident again: graphs again."""
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQUEST))
    held = graphs.graphs_of(engine.models.current.denoiser, engine.memory.device)
    assert capture.captures == 1 and held.calls
    set_budget(engine, model_bytes(engine)["denoiser"] * 0.5 / MB)
    with caplog.at_level(logging.INFO, logger="webui.engine.graphs"):
        for _ in range(2):
            result = engine.txt2img(GenerationRequest(**REQUEST))
    assert result.memory.streamed_mb > 0 and not result.memory.graphed and not held.calls
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CUDA graphs: eager")]
    assert len(said) == 1 and "of its weights stream at every step" in said[0]
    set_budget(engine, 100_000)
    assert engine.txt2img(GenerationRequest(**REQUEST)).memory.graphed and capture.captures == 2


def test_an_extension_hook_inside_the_denoiser_runs_eager_unless_graph_safe(tmp_path, sd1_file, capture, caplog):
    engine = make_engine(tmp_path, sd1_file)
    engine.options.update({"cuda_graphs": False})
    engine.txt2img(GenerationRequest(**REQUEST))
    engine.options.update({"cuda_graphs": True})
    layer = engine.models.current.denoiser.down_blocks[0].resnets[0].conv1
    calls = []

    def count(module, args, output):
        calls.append(1)

    handle = layer.register_forward_hook(count)
    with caplog.at_level(logging.INFO, logger="webui.engine.graphs"):
        result = engine.txt2img(GenerationRequest(**REQUEST))
    assert not result.memory.graphed and len(calls) == REQUEST["steps"]
    assert any("a hook on down_blocks.0.resnets.0.conv1" in r.getMessage() and "graph_safe" in r.getMessage()
               for r in caplog.records)
    handle.remove()
    layer.register_forward_hook(graph_safe(count))
    assert engine.txt2img(GenerationRequest(**REQUEST)).memory.graphed


def test_the_setting_and_the_flag(tmp_path, sd1_file, capture):
    assert parse_args(["--disable-cuda-graphs"]).disable_cuda_graphs and not parse_args([]).disable_cuda_graphs
    engine = make_engine(tmp_path, sd1_file, extra_args=("--disable-cuda-graphs",))
    assert engine.options["cuda_graphs"], "the flag is for the session: the setting is left as it was"
    assert not engine.txt2img(GenerationRequest(**REQUEST)).memory.graphed and capture.captures == 0
    engine = make_engine(tmp_path / "2", sd1_file)
    engine.options.update({"cuda_graphs": False})
    assert not engine.txt2img(GenerationRequest(**REQUEST)).memory.graphed and capture.captures == 0


def test_without_a_capture_for_the_device_it_runs_eager(tmp_path, sd1_file, caplog):
    engine = make_engine(tmp_path, sd1_file)
    with caplog.at_level(logging.INFO, logger="webui.engine.graphs"):
        result = engine.txt2img(GenerationRequest(**REQUEST))
        engine.txt2img(GenerationRequest(**REQUEST))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CUDA graphs")]
    assert not result.memory.graphed and said == ["CUDA graphs: eager, the denoiser runs on cpu, not a CUDA GPU."]


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x, scale=1.0, extra=None):
        return {"out": x * self.weight * scale + (0 if extra is None else extra.sum())}


def graphed(module: nn.Module, settings=()):
    held = graphs.DenoiserGraphs(torch.device("cpu"))
    module._compiled_call_impl = lambda *a, **k: held.call(module._call_impl, a, k, settings)
    return held


def test_shape_keys(capture):
    """Values of the same shapes replay; a new shape, dtype, structure, non-tensor argument or setting captures;
    outputs are copies (the next replay does not change them)."""
    module = Doubler()
    held = graphed(module)
    x = torch.ones(2, 3)
    first = module(x)["out"]
    second = module(x * 3)["out"]
    assert torch.equal(first, 2 * x) and torch.equal(second, 6 * x) and capture.captures == 1
    for call in (lambda: module(torch.ones(3, 3)), lambda: module(x.double()), lambda: module(x, extra=x),
                 lambda: module(x, scale=0.5)):
        held.pass_captures = 0
        call()
    assert capture.captures == 5 and len(held.calls) == graphs.GRAPHS_KEPT
    other = graphed(module, settings=("SageAttention",))
    module(x)
    assert capture.captures == 6 and len(other.calls) == 1


def test_inputs_that_change_shape_every_step_stop_capturing(capture):
    module = Doubler()
    held = graphed(module)
    for n in range(1, 6):
        assert torch.equal(module(torch.ones(n))["out"], torch.full((n,), 2.0))
    assert capture.captures == graphs.CAPTURES_A_PASS and held.replays == graphs.CAPTURES_A_PASS


def test_a_capture_that_fails_runs_that_shape_eager(monkeypatch, caplog):
    def refuse(run, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setitem(graphs.CAPTURES, "cpu", refuse)
    module = Doubler()
    held = graphed(module)
    with caplog.at_level(logging.WARNING, logger="webui.engine.graphs"):
        outputs = [module(torch.ones(2))["out"] for _ in range(3)]
    assert all(torch.equal(o, torch.full((2,), 2.0)) for o in outputs) and not held.calls and len(held.failed) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs: capture failed (RuntimeError: operation not permitted when stream is capturing); this shape "
        "runs eager."]


@dataclass
class Pool:
    component: str
    nbytes: int
    released: str = ""

    def release(self, why: str) -> None:
        self.released = why


def test_held_bytes_count_against_the_budget_and_give_way_to_weights():
    """What is held shrinks the weights' budget; a phase whose plan would move weights because of it releases it
    instead; a plan that fits beside it keeps it; moving the component it belongs to releases it."""
    device = torch.device("cpu")
    memory = MemoryManager(device, SimulatedMemory(device, 1000), min_unit_bytes=1)
    memory.begin(MemoryPolicy(inference_mb=100), 0)
    denoiser, vae = nn.Linear(1000, 100, bias=False), nn.Linear(100, 100, bias=False)  # 400 kB, 40 kB
    memory.register("denoiser", denoiser)
    memory.register("vae", vae)
    memory.prepare(["denoiser"])
    budget = memory.weight_budget(0)
    pool = Pool("denoiser", 200 * MB)
    memory.hold(pool)
    assert memory.weight_budget(0) == budget - 200 * MB
    memory.prepare(["vae"], activation=100 * MB, once=True)
    assert not pool.released and memory.held == [pool], "both fit beside it"
    memory.prepare(["vae"], activation=900 * MB, once=True)
    assert pool.released == "room for vae" and memory.held == []
    memory.hold(other := Pool("denoiser", 1))
    memory.unregister("denoiser")
    assert other.released == "denoiser let go"


def test_the_forecast_counts_the_graphs_it_would_keep_and_release(tmp_path, sd1_file, capture):
    """"Will it fit?" plans with the graphs held: beside the text encoders and the decode (not beside the denoiser's
    own activations, which are in their pool); on a card where they would cost weights their place, the plan releases
    them as the job would (the real graphs are left alone)."""
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQUEST))
    held = engine.memory.held_bytes()
    assert held == 1 * POOL + sum(x.nbytes for c in graphs.graphs_of(engine.models.current.denoiser,
                                                                       engine.memory.device).calls.values()
                                   for x in c.inputs)
    request = GenerationRequest(**{**REQUEST, "prompt": "a blue square"})
    plans = dict(engine.forecast(request).first)
    assert plans["text encoding"].held == plans["decode"].held == held
    assert plans["decode"].peak == plans["decode"].resident + plans["decode"].activation + held
    set_budget(engine, model_bytes(engine)["denoiser"] * 0.5 / MB)
    plans = dict(engine.forecast(request).first)
    assert plans["denoising"].held == 0 and engine.memory.held_bytes() == held
