"""Will it fit? The forecast of a job against what the job then does (simulated cards: deterministic)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_api import BODY, PLOT, client, xyz_args  # noqa: F401 (client: the API's fixture)
from tests.test_memory import REQ, model_bytes, set_budget, simulated_engine
from webui.engine.forecast import JobShape, Rates
from webui.engine.memory.manager import MB, MemoryManager, SimulatedMemory
from webui.engine.request import GenerationRequest
from webui.errors import UserError


def record_phases(engine) -> list[tuple[tuple[str, ...], int, int]]:
    """What each real ``prepare`` left: (its components, weights on the device, its components' streamed bytes)."""
    memory, seen = engine.memory, []
    real = memory.prepare

    def prepare(names, activation=None, once=False, phase=None):
        real(names, activation, once, phase)
        needed = [c for c in memory.components.values() if c.name in names or c.companion_of in names]
        seen.append((tuple(c.name for c in needed), memory.resident_bytes(), sum(c.streamed_bytes() for c in needed)))

    memory.prepare = prepare
    return seen


def planned(forecast) -> list[tuple[tuple[str, ...], int, int]]:
    return [(plan.components, plan.resident, plan.streamed) for _, plan in forecast.first + forecast.later]


@pytest.mark.parametrize("fraction", [None, 0.6, 0.25])
def test_the_forecast_plans_every_phase_as_the_job_then_runs_it(tmp_path, sd1_file, fraction):
    """Each phase's resident and streamed bytes, first batch and a later one, are the manager's own plan."""
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQ))
    if fraction is not None:  # the denoiser does not fit: a part of it streams, the text encoder leaves or streams
        set_budget(engine, model_bytes(engine)["denoiser"] * fraction / MB)
    request = GenerationRequest(**{**REQ, "prompt": "a blue square", "n_iter": 3})
    forecast = engine.forecast(request)
    seen = record_phases(engine)
    result = engine.txt2img(request)
    # the later batches reuse the first one's conditioning: no text encoding, the same plan each
    assert [name for name, _ in forecast.first] == ["text encoding", "denoising", "decode"]
    assert [name for name, _ in forecast.later] == ["denoising", "decode"]
    assert planned(forecast) == seen[:5] and seen[5:] == seen[3:5]
    moved = sum(forecast.moved_by_phase().values())
    # every byte copied was planned; a streamed VAE's encoder is planned but not called by a decode
    unused = 3 * model_bytes(engine)["vae"] / MB
    assert 0 <= forecast.bus_bytes() / MB - result.memory.moved_mb <= (unused if fraction else 0) + 1e-6
    if fraction is None:
        assert moved == 0 and not any(plan.streamed for _, plan in forecast.first)
    else:
        assert any(plan.streamed for _, plan in forecast.first) and forecast.fits_vram
        assert forecast.peak_vram <= engine.memory.memory.total()


def test_a_forecast_moves_nothing_and_needs_the_model_loaded(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    with pytest.raises(UserError, match="not loaded"):
        engine.forecast(GenerationRequest(**REQ))
    forecast = engine.forecast(GenerationRequest(**REQ), load=True)
    assert engine.memory.resident_bytes() == 0, "loading registers the weights in host memory; nothing placed"
    assert forecast.first[0][1].moved > 0 and forecast.seconds is None, "no rate measured before the first job"
    assert forecast.as_dict()["fits_vram"] and forecast.as_dict()["peak_vram_mb"] > 0


def test_the_prompts_encoded_last_are_not_encoded_again(tmp_path, sd1_file):
    """Nor are the text encoders placed: on a small card they would push the denoiser out for nothing."""
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQ))
    set_budget(engine, model_bytes(engine)["denoiser"] * 1.01 / MB)
    seen = record_phases(engine)
    engine.txt2img(GenerationRequest(**{**REQ, "seed": 12}))
    assert [names for names, _, _ in seen] == [("denoiser",), ("vae",)]
    assert engine.memory.components["text_encoder"].device_bytes() == 0


def test_time_comes_from_the_rates_measured_at_the_last_job(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    result = engine.txt2img(GenerationRequest(**REQ))
    assert result.forecast is not None and result.forecast.seconds is None
    again = engine.forecast(GenerationRequest(**REQ))  # same prompts: no text encoding; nothing moves or streams
    measured = result.timings["denoise"] + result.timings["decode"]
    assert again.seconds == pytest.approx(measured)
    assert again.phase_seconds() == pytest.approx({"denoise": result.timings["denoise"],
                                                   "decode": result.timings["decode"]}), "named as the job's timings"
    longer = engine.forecast(GenerationRequest(**{**REQ, "steps": REQ["steps"] * 2, "n_iter": 2}))
    assert longer.seconds == pytest.approx(2 * (2 * result.timings["denoise"] + result.timings["decode"]))
    assert "~" in longer.summary() and longer.as_dict()["seconds"] == pytest.approx(longer.seconds)


def test_rates_separate_compute_from_the_copies_a_step_waits_for():
    """Without Async a streamed step costs its compute and its copies; the rates keep only the compute, so a
    forecast with another budget (other streamed bytes) adds its own copies."""
    from webui.engine.forecast import Forecast
    from webui.engine.memory.planning import PhasePlan
    from webui.engine.memory.manager import GenerationStats
    from webui.engine.request import GenerationResult

    shape = JobShape(steps=10, batches=1, batch_size=1, rows=2, latent_pixels=100, pixels=6400, encodes=False)

    def forecast(streamed: int, rates: Rates) -> Forecast:
        plans = [("denoising", PhasePlan(("denoiser",), 0, streamed, 0, 0, 0)), ("decode", PhasePlan(("vae",), 0, 0, 0, 0, 0))]
        return Forecast(shape, plans, [], True, 8 * MB, 8 * MB, 0, 1, async_copies=False, tiled_decode=False,
                        rates=rates)

    rates = Rates(bandwidth=1e9)
    result = GenerationResult(GenerationRequest(), memory=GenerationStats(moved_mb=0.0, move_seconds=0.0),
                              timings={"encode": 0.0, "denoise": 10 * (0.01 + 0.02), "decode": 0.064})
    rates.learn(forecast(streamed=20_000_000, rates=rates), result)  # 20 MB a step at 1 GB/s: 0.02 s of copies
    assert rates.step_seconds_per_pixel == pytest.approx(0.01 / 200)
    assert rates.decode_seconds_per_pixel == pytest.approx(0.064 / 6400)
    rates.encode_seconds_per_prompt = 0.0
    assert forecast(0, dataclasses.replace(rates)).seconds == pytest.approx(10 * 0.01 + 0.064)


def test_a_job_that_cannot_fit_in_host_ram_is_refused_before_it_runs(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQ))
    engine.memory.memory.host_bytes = 4 * MB
    big = GenerationRequest(**{**REQ, "width": 512, "height": 512, "batch_size": 8})
    forecast = engine.forecast(big)
    assert not forecast.fits_host and forecast.host_bytes > 8 * 512 * 512 * 3
    with pytest.raises(UserError, match=r"needs about .* GB of RAM .* are free") as refused:
        engine.txt2img(big)
    assert refused.value.field == "batch_size"
    assert len(engine.txt2img(GenerationRequest(**REQ)).images) == 1, "the engine keeps serving"


def test_on_the_cpu_the_activations_are_host_ram(tmp_path, sd1_file):
    engine = simulated_engine(tmp_path, sd1_file)
    engine.txt2img(GenerationRequest(**REQ))
    on_card = engine.forecast(GenerationRequest(**REQ))
    engine.memory = engine.models.memory = MemoryManager(torch.device("cpu"), SimulatedMemory(torch.device("cpu"), 0))
    engine.memory.limited = False
    for name, module in engine.models.current.components().items():
        engine.memory.register(name, module)
    on_cpu = engine.forecast(GenerationRequest(**REQ))
    assert on_cpu.host_bytes > on_card.host_bytes + on_cpu.first[1][1].activation - 1
    assert on_cpu.peak_vram == 0 and "VRAM" not in on_cpu.summary()


def test_the_estimate_route_forecasts_a_txt2img_body_and_a_plot_without_generating(client, engine):
    reply = client.post("/sdapi/v1/estimate", json={**BODY, "styles": ["mine"]})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["seconds"] is None and data["fits_host_ram"] and data["ignored_fields"] == []
    assert [p["phase"] for p in data["first_batch"]] == ["text encoding", "denoising", "decode"]
    assert not list(engine.config.paths.outdir.rglob("*.png")), "nothing generated"
    client.post("/sdapi/v1/txt2img", json=BODY)
    again = client.post("/sdapi/v1/estimate", json={**BODY, "steps": 6}).json()
    assert again["seconds"] > 0 and "~" in again["summary"]
    plot = client.post("/sdapi/v1/estimate", json={**PLOT, "script_args": xyz_args((4, "2, 4", None))}).json()
    steps2, steps4 = (cell["seconds"] for cell in plot["cells"])
    assert len(plot["cells"]) == 2 and plot["seconds"] == pytest.approx(steps2 + steps4) and steps4 > steps2
    bad = client.post("/sdapi/v1/estimate", json={**BODY, "width": 65})
    assert bad.status_code == 422 and "width" in bad.text


def test_the_estimate_route_forecasts_an_img2img_body_and_its_outpainting(client, engine):
    """A body with init_images is read as img2img: the VAE encode is a phase of its plan; an outpainting one is
    planned at its canvas's size (larger than the same body without the script)."""
    from tests.test_img2img import b64, init_picture

    body = {**BODY, "init_images": [b64(init_picture())], "denoising_strength": 0.5}
    plain = client.post("/sdapi/v1/estimate", json=body)
    assert plain.status_code == 200, plain.text
    assert [p["phase"] for p in plain.json()["first_batch"]][0] == "image encoding"
    outpainted = client.post("/sdapi/v1/estimate", json={**body, "script_name": "Poor man's outpainting",
                                                          "script_args": [64, 4, 0, ["left", "right"]]}).json()
    encode = [next(p for p in reply["first_batch"] if p["phase"] == "image encoding")["activation_mb"]
              for reply in (plain.json(), outpainted)]
    assert encode[1] > encode[0], "the canvas is larger than the image"
    assert "width" in outpainted["ignored_fields"]
    assert not list(engine.config.paths.outdir.rglob("*.png")), "nothing generated"
    bad = client.post("/sdapi/v1/estimate", json={**body, "denoising_strength": 2})
    assert bad.status_code == 422 and bad.json()["field"] == "denoising_strength"


@pytest.mark.parametrize("swap_location", ["Shared", "CPU"])
def test_a_plan_counts_the_copies_evictions_make_on_a_gpu(swap_location):
    """On a GPU an evicted unit points back at its host tensors (no copy), except at its first eviction with
    Swap Location "Shared", which page-locks them: counted once, then free. Planned only: nothing is moved."""
    from torch import nn

    from webui.engine.memory.manager import MemoryPolicy
    from webui.engine.memory.planning import PlanningManager

    gpu = torch.device("cuda")
    real = MemoryManager(gpu, SimulatedMemory(gpu, 64), min_unit_bytes=1)
    real.register("a", nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)))  # 8 MB
    real.register("b", nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024)))  # 16 MB
    plan = PlanningManager(real, MemoryPolicy(pinned=swap_location == "Shared", inference_mb=0), 0)
    plan.memory.capacity = 20 * MB  # not both at once
    for names in (["a"], ["b"], ["a"], ["b"]):
        plan.prepare(names)
    moved = [round(phase.moved / MB) for phase in plan.phases]
    assert moved == ([8, 16 + 8, 8 + 16, 16] if swap_location == "Shared" else [8, 16, 8, 16])


def test_page_locking_is_not_taken_for_the_bus_bandwidth():
    """A component's first eviction into page-locked memory waits for the system to lock its pages: once, not a
    rate. The bandwidth the next forecast uses is the copies' own."""
    from webui.engine.forecast import Forecast
    from webui.engine.memory.manager import GenerationStats
    from webui.engine.memory.planning import PhasePlan
    from webui.engine.request import GenerationResult

    shape = JobShape(steps=1, batches=1, batch_size=1, rows=1, latent_pixels=1, pixels=1, encodes=False)
    plans = [("denoising", PhasePlan(("denoiser",), 0, 0, 0, 0, 0)), ("decode", PhasePlan(("vae",), 0, 0, 0, 0, 0))]
    forecast = Forecast(shape, plans, [], True, 8 * MB, 8 * MB, 0, 1, async_copies=True, tiled_decode=False)
    rates = Rates()
    stats = GenerationStats(moved_mb=1000.0, move_seconds=1.5, page_lock_seconds=1.0)
    rates.learn(forecast, GenerationResult(GenerationRequest(), memory=stats,
                                           timings={"encode": 0.0, "denoise": 1.0, "decode": 0.1}))
    assert rates.bandwidth == pytest.approx(1000 * MB / 0.5)
