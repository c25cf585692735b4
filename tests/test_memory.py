"""The memory manager against a simulated device budget: deterministic, and streaming changes no pixel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import make_engine
from webui.engine.memory.manager import MB, MemoryManager, SimulatedMemory, VaePass, plan_residency
from webui.engine.memory.stream import IN_FLIGHT, Unit, param_bytes, split_units
from webui.engine.request import GenerationRequest
from webui.errors import UserError

REQ = dict(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=3, cfg_scale=5.0, seed=11,
           sampler_name="Euler a")


def simulated_engine(tmp_path, checkpoint, total_mb: int = 100_000, flags: tuple[str, ...] = ()):
    engine = make_engine(tmp_path, checkpoint, extra_args=flags)
    engine.memory = MemoryManager(torch.device("cpu"), SimulatedMemory(torch.device("cpu"), total_mb),
                                  min_unit_bytes=64 * 1024)
    engine.models.memory = engine.memory
    return engine


def generate(engine) -> np.ndarray:
    result = engine.txt2img(GenerationRequest(**REQ))
    return np.stack([np.asarray(i) for i in result.images]), result.memory


def model_bytes(engine) -> dict[str, int]:
    return {name: c.nbytes for name, c in engine.memory.components.items()}


def set_budget(engine, weights_mb: float) -> None:
    """GPU Weights = weights_mb: the simulated card is that plus the inference reserve (1024 MB, more than
    the activation estimate at 64x64, so GPU Weights is the binding limit)."""
    engine.memory.memory.total_bytes = int((weights_mb + engine.options["forge_inference_memory"]) * MB)


def test_a_module_with_a_call_of_its_own_is_split_to_layers_whose_hooks_fire():
    """diffusers' attention processors (an IP-Adapter's layers) define ``__call__``, which runs no forward hooks:
    the streamer's units are their layers, each called through nn.Module."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    processor = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, num_tokens=(4,))
    units = split_units(nn.ModuleList([processor]), max_bytes=1 << 30)
    assert [type(u.module) for u in units] == [nn.Linear, nn.Linear]
    assert sum(u.nbytes for u in units) == param_bytes(processor)


def test_split_units_cover_every_parameter_once():
    model = nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64)), nn.LayerNorm(64))
    units = split_units(model, max_bytes=70_000)
    covered = [id(p) for u in units for p in u.parameters()]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())
    assert sum(u.nbytes for u in units) == param_bytes(model)
    assert all(u.nbytes <= 70_000 or not list(u.module.children()) for u in units)


def test_plan_spreads_streamed_units_and_keeps_the_budget():
    units = [Unit(str(i), nn.Linear(32, 32), recurse=True) for i in range(40)]
    size = units[0].nbytes
    budget = 20 * size + (IN_FLIGHT + 1) * size  # half the layers resident, plus room for copies in flight
    resident = plan_residency(units, budget)
    assert len(resident) == 20 and sum(u.nbytes for u in resident) <= budget - (IN_FLIGHT + 1) * size
    streamed = [i for i, u in enumerate(units) if u not in resident]
    assert max(b - a for a, b in zip(streamed, streamed[1:])) <= 2, "streamed layers alternate with resident ones"
    assert resident == plan_residency(units, budget), "the same inputs give the same plan"
    assert plan_residency(units, 0) == set() and plan_residency(units, 40 * size) == set(units)


def test_units_streamed_together_stream_whole_and_the_budget_still_holds():
    """A compiled block cut into units (its norms, attention, MLP) streams whole or stays whole: the plan streams
    whole groups in its spread order, and keeps within the budget."""
    units = [Unit(str(i), nn.Linear(32, 32), recurse=True) for i in range(40)]
    size = units[0].nbytes
    blocks = [units[i:i + 4] for i in range(0, 40, 4)]  # ten blocks of four units
    for resident_units in (30, 20, 7):
        budget = resident_units * size + (IN_FLIGHT + 1) * size
        resident = plan_residency(units, budget, blocks)
        assert sum(u.nbytes for u in resident) <= budget - (IN_FLIGHT + 1) * size
        assert all(set(b) <= resident or not set(b) & resident for b in blocks), "no block cut"
        assert len(resident) >= resident_units - 4, "at most one block more streamed than the bytes need"
        split = plan_residency(units, budget)
        assert sum(1 for b in blocks if set(b) <= split) < sum(1 for b in blocks if set(b) <= resident)


def test_when_everything_fits_the_second_generation_moves_nothing(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    _, first = generate(engine)
    total = sum(model_bytes(engine).values()) / MB
    assert first.moved_mb == pytest.approx(total) and first.streamed_mb == 0
    _, second = generate(engine)
    assert second.moved_mb == 0 and second.move_seconds == 0 and second.resident_mb == pytest.approx(total)


@pytest.mark.parametrize("fraction", [0.6, 0.3])
def test_streamed_execution_is_identical_to_resident(tmp_path, sd1_file, fraction):
    reference, _ = generate(simulated_engine(tmp_path / "ref", sd1_file))
    engine = simulated_engine(tmp_path / "stream", sd1_file)
    generate(engine)
    unet = model_bytes(engine)["denoiser"]
    set_budget(engine, unet * fraction / MB)
    images, stats = generate(engine)
    assert np.array_equal(images, reference)
    assert stats.streamed_mb > 0 and stats.resident_mb <= stats.budget_mb
    assert engine.memory.components["denoiser"].streamer is None or engine.memory.components["denoiser"].streamed_bytes() > 0


@pytest.mark.parametrize("flag", ["--lowvram", "--medvram", "--always-gpu"])
def test_flags_change_placement_not_pixels(tmp_path, sd1_file, flag):
    reference, _ = generate(simulated_engine(tmp_path / "ref", sd1_file))
    engine = simulated_engine(tmp_path / "flag", sd1_file, flags=(flag,))
    images, stats = generate(engine)
    assert np.array_equal(images, reference)
    sizes = model_bytes(engine)
    if flag == "--lowvram":
        assert stats.streamed_mb == pytest.approx(max(sizes.values()) / MB), "each phase streams its whole component"
        assert engine.memory.resident_bytes() == 0
    elif flag == "--medvram":
        placed = {n: c.device_bytes() for n, c in engine.memory.components.items()}
        assert placed == {"text_encoder": 0, "denoiser": 0, "vae": sizes["vae"]}, "only the decoding VAE is left"
    else:
        assert engine.memory.resident_bytes() == sum(sizes.values())


def test_text_encoder_leaves_when_the_denoiser_needs_the_room(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    generate(engine)
    sizes = model_bytes(engine)
    set_budget(engine, (sizes["denoiser"] + sizes["vae"]) / MB + 0.01)
    images, stats = generate(engine)
    te = engine.memory.components["text_encoder"]
    assert stats.streamed_mb == 0 and te.device_bytes() == 0 and stats.moved_mb >= sizes["text_encoder"] / MB


def test_text_encoding_and_decoding_stream_beside_the_denoiser_rather_than_evict_it():
    """They run once an image; the denoiser runs at every step and is the largest: evicting it to make a text
    encoder resident brings it back for every image (issue 24: 60.9 GB moved for one SDXL image on a 6 GB card)."""
    from webui.engine.memory.manager import MemoryPolicy

    def layers(n: int) -> nn.Module:
        return nn.Sequential(*(nn.Linear(256, 256) for _ in range(n)))  # units of 257 kB

    manager = MemoryManager(torch.device("cpu"), SimulatedMemory(torch.device("cpu"), total_mb=6), min_unit_bytes=1)
    denoiser, text_encoder = manager.register("denoiser", layers(16)), manager.register("text_encoder", layers(8))
    manager.register("vae", layers(2))
    assert denoiser.nbytes + text_encoder.nbytes > 6 * MB, "the text encoder does not fit beside the denoiser"
    moved = []
    for image in range(3):
        manager.begin(MemoryPolicy(inference_mb=0), activation=0)
        manager.prepare(["text_encoder"], once=True)
        assert 0 < text_encoder.streamed_bytes() < text_encoder.nbytes or image == 0
        manager.prepare(["denoiser"])
        assert denoiser.device_bytes() == denoiser.nbytes
        assert not manager.prepare_vae("vae", activation=VaePass(0, 0))
        moved.append(manager.finish().moved_mb)
    assert max(moved[1:]) < denoiser.nbytes / MB, "the denoiser is never moved again"


def test_a_phase_plan_moves_nothing_and_evicts_by_what_the_phase_calls():
    """``plan_phase`` decides, ``_place`` moves: planning a phase (what an estimate would do) changes no placement."""
    from webui.engine.memory.manager import Component, MemoryMode, plan_phase

    def component(name: str, layers: int) -> Component:
        c = Component(name, nn.Sequential(*(nn.Linear(256, 256) for _ in range(layers))), [])
        c.units = split_units(c.module, 1)
        c.nbytes, c.on_device = sum(u.nbytes for u in c.units), set(c.units)  # all on the device now
        return c

    denoiser, text_encoder, vae = component("denoiser", 16), component("text_encoder", 8), component("vae", 2)
    everything = [denoiser, text_encoder, vae]

    def plan(needed: list[Component], once: bool, budget: int) -> dict[str, tuple[int, bool]]:
        placed = plan_phase(everything, needed, budget, MemoryMode.AUTO, once)
        return {c.name: (sum(u.nbytes for u in keep), stream) for c, keep, stream in placed}

    roomy = plan([text_encoder], True, denoiser.nbytes + text_encoder.nbytes)
    assert set(roomy) == {"text_encoder"} and 0 < roomy["text_encoder"][0] < text_encoder.nbytes, \
        "it streams part of itself beside the others, evicting none"
    tight = plan([text_encoder], True, denoiser.nbytes + text_encoder.nbytes // 2)
    assert tight == {"vae": (0, False), "text_encoder": (0, True)}, "the smallest leaves, the denoiser stays"
    whole = plan([text_encoder], False, denoiser.nbytes + text_encoder.nbytes // 2)
    assert whole["denoiser"] == (0, False), "made whole, the text encoder evicts the largest"
    assert plan([denoiser], False, denoiser.nbytes + text_encoder.nbytes // 2) == {
        "text_encoder": (0, False), "denoiser": (denoiser.nbytes, True)}, "the VAE fits beside it and stays"
    assert all(c.on_device == set(c.units) for c in everything), "planning moved nothing"


def test_always_offload_from_vram_empties_the_device_after_each_generation(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file, flags=("--always-offload-from-vram",))
    generate(engine)
    assert engine.memory.resident_bytes() == 0


def test_out_of_memory_is_retried_then_explained(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    reference, _ = generate(engine)
    unet = engine.models.current.denoiser
    forward, calls = unet.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    unet.forward = flaky
    images, stats = generate(engine)
    assert stats.oom_retries == 1 and np.array_equal(images, reference)

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    unet.forward = always
    with pytest.raises(UserError, match="Out of GPU memory at 64x64, batch 1: .* MB"):
        generate(engine)
    unet.forward = forward
    assert np.array_equal(generate(engine)[0], reference), "the app goes on after an unrecoverable OOM"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_streamed_weight_is_in_place_when_its_module_runs(tmp_path, request, family, monkeypatch):
    """On the CPU a 'device copy' is the host tensor itself; clone it so a module that computes with a
    host tensor (its hooks never fired) is caught, as it would fail on a GPU."""
    from webui.engine.memory import stream

    copy = stream.Streamer._copy
    monkeypatch.setattr(stream.Streamer, "_copy",
                        lambda self, unit, stream=None: ([t.clone() for t in copy(self, unit, stream)[0]], None))
    engine = simulated_engine(tmp_path, request.getfixturevalue(f"{family}_file"), flags=("--lowvram",))
    generate(engine)
    caught = []

    def checked(module, name):
        forward = module.forward

        def run(*args, **kwargs):
            hosts = {t.data_ptr() for c in engine.memory.components.values() if c.streamer
                     for ts in c.streamer._host.values() for t in ts}
            caught.extend(name for p in module.parameters(recurse=False) if p.data_ptr() in hosts)
            return forward(*args, **kwargs)
        return run

    for cname, component in engine.memory.components.items():
        for name, module in component.module.named_modules():
            if not list(module.children()):
                module.forward = checked(module, f"{cname}.{name}")
    images, stats = generate(engine)
    assert stats.streamed_mb > 0 and caught == [], caught[:5]


def test_vae_decode_goes_tiled_when_a_whole_decode_would_not_fit(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    reference, first = generate(engine)
    assert not first.tiled_vae
    engine.options.update({"forge_inference_memory": 0})
    engine.memory.memory.total_bytes = model_bytes(engine)["vae"] + 4 * MB  # less than a whole 64x64 decode needs
    images, stats = generate(engine)
    assert stats.tiled_vae and np.array_equal(images, reference)
    assert "tiled VAE" in stats.line() and "budget" in stats.line()


def test_a_low_bit_layer_unpacking_its_weight_is_counted_against_the_budget():
    """fp8 and GGUF layers make a 16-bit copy of their weight for each call: the largest one must fit in free
    memory beside the activations, so a device that holds their stored bytes and nothing more streams them."""
    from gguf import GGMLQuantizationType as Q

    from webui.engine.memory.manager import MemoryPolicy
    from webui.engine.weights.fp8 import cast_weights_fp8
    from webui.engine.weights.gguf_load import quantize
    from webui.engine.weights.quant import GGUFLinear, QuantTensor

    packed = torch.from_numpy(quantize(np.random.randn(512, 1024).astype(np.float32), Q.Q8_0))
    fp8 = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(64, 64))
    cast_weights_fp8(fp8, min_numel=0)
    modules = {"gguf": nn.Sequential(GGUFLinear(QuantTensor(packed, Q.Q8_0, (512, 1024))), nn.Linear(64, 64)),
               "fp8": fp8, "plain": nn.Sequential(nn.Linear(1024, 2048))}
    expected = {"gguf": 512 * 1024 * 2, "fp8": 2048 * 1024 * 2, "plain": 0}
    for name, module in modules.items():
        stored_mb = param_bytes(module) / MB
        memory = SimulatedMemory(torch.device("cpu"), total_mb=int(stored_mb) + 1)
        manager = MemoryManager(torch.device("cpu"), memory, min_unit_bytes=1)
        component = manager.register(name, module)
        assert component.upcast_bytes == expected[name]
        manager.begin(MemoryPolicy(inference_mb=0), activation=0)
        manager.prepare([name])
        assert (component.streamer is not None) == (name != "plain"), name


def test_a_weight_tied_between_two_modules_is_moved_by_the_later_one():
    from webui.synthetic.builders import build_t5_encoder

    model = build_t5_encoder(seed=1)  # transformers ties shared.weight and encoder.embed_tokens.weight
    assert model.shared is not model.encoder.embed_tokens and model.shared.weight is model.encoder.embed_tokens.weight
    units = split_units(model, 1024)
    assert sum(u.nbytes for u in units) == param_bytes(model)
    assert any(u.module is model.encoder.embed_tokens for u in units)
    assert not any(u.module is model.shared for u in units)


def test_a_companion_gets_room_before_the_component_it_accompanies():
    """A LoRA's adapters are hundreds of tiny units: streaming them costs a hook and a copy each. When the budget
    holds them and part of the model, they stay resident and the model's large units are streamed instead."""
    from webui.engine.memory.manager import MemoryPolicy

    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(8)))  # 8 units of 257 kB
    adapters = nn.ModuleList(nn.Linear(256, 64, bias=False) for _ in range(8))  # 8 units of 64 kB
    memory = SimulatedMemory(torch.device("cpu"), total_mb=2)
    manager = MemoryManager(torch.device("cpu"), memory, min_unit_bytes=1)
    denoiser = manager.register("denoiser", model)
    lora = manager.register("lora:denoiser", adapters, companion_of="denoiser")
    manager.begin(MemoryPolicy(inference_mb=0), activation=0)
    manager.prepare(["denoiser"])
    assert lora.device_bytes() == lora.nbytes and lora.streamer is None, "the adapters are all on the device"
    assert 0 < denoiser.streamed_bytes() < denoiser.nbytes
    window = (IN_FLIGHT + 1) * max(u.nbytes for u in denoiser.units)
    assert manager.resident_bytes() <= 2 * MB - window, "the adapters' room is not the room for copies in flight"


def test_a_smaller_budget_streams_the_same_units_and_a_few_more():
    """Plans are nested: taking a little room (a LoRA's adapters) streams a few more units and moves nothing else,
    so only those few need page-locking."""
    units = [Unit(str(i), nn.Linear(32, 32 + i % 3), recurse=True) for i in range(37)]
    size = units[0].nbytes
    plans = [plan_residency(units, budget * size) for budget in range(60, 0, -1)]
    for larger, smaller in zip(plans, plans[1:]):
        assert smaller <= larger
        if larger != set(units):  # past the first step, which sets room aside for copies in flight
            assert len(larger - smaller) <= 2


def test_a_tiled_vae_pass_runs_the_tiles_its_memory_estimate_counts():
    """diffusers tiles a VAE by its sample size (SDXL's: 1024 px, 5 GB of a float32 decode); the app's tiles are
    ``VAE_TILE`` px at most, and the tiled estimate is one such tile and the output the tiled decode keeps."""
    from webui.engine.formats.detect import Family
    from webui.engine.generate import use_tiles, vae_passes
    from webui.engine.memory.manager import VAE_TILE, vae_decode_bytes
    from webui.synthetic.builders import build_vae16

    vae = build_vae16("tiny", Family.SD3)
    vae.register_to_config(sample_size=1024)
    use_tiles(vae, True)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    assert vae.use_tiling and vae.tile_sample_min_size == VAE_TILE == vae.tile_latent_min_size * factor
    decode = vae_passes(vae)(2048, 2048, 1)
    assert decode.whole == vae_decode_bytes(2048, 2048, 1, torch.float32)
    assert decode.tiled == vae_decode_bytes(VAE_TILE, VAE_TILE, 1, torch.float32) + 2048 * 2048 * 3 * 4 * 3
    use_tiles(vae, False)
    assert not vae.use_tiling
