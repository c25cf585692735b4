"""Any sampler with any schedule type, and eta: the sigma-space path against its references.

References: diffusers' schedulers on the same sigmas, k-diffusion's own functions, the schedule types' published
values and closed forms. The engine tests run every pair on the tiny SD1 checkpoint.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.engine.sampling import samplers
from webui.engine.sampling import schedules
from webui.engine.sampling.kdiffusion import external, sampling
from webui.engine.sampling.ksampling import GuidedDenoiser, sample, seeded_noise
from webui.engine.sampling.sampler_functions import (CFGPP_SCALE, restart_steps, sample_ddim_cfgpp, sample_lcm,
                                                     sample_restart, sample_tcd)
from webui.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning", "ignore:Should have:UserWarning")

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon"}
V_PRED = {**SD15, "prediction_type": "v_prediction"}
SEEDS = [1, 2]
REGISTRY = samplers.SamplerRegistry()
NEVER = lambda *args: False  # noqa: E731  (an on_step that never stops)


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in UNet whose prediction depends on the latents and the timestep."""
    return 0.1 * x + 0.001 * t.view(-1, 1, 1, 1)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise() -> torch.Tensor:
    """The same starting latents every time: the seeds feed only the samplers' own noise."""
    return torch.randn((len(SEEDS), 4, 8, 8), generator=torch.Generator().manual_seed(0))


def model_schedule(config: dict = SD15) -> external.DiscreteSchedule:
    return GuidedDenoiser(fake_unet, config, 1.0, False).model


def ksample(name: str, schedule_type: str = "Automatic", eta: float | None = None, seeds: list[int] = SEEDS,
            config: dict = SD15, steps: int = 6, guided: bool = False) -> torch.Tensor:
    """The sigma-space path, whatever ``native`` says, on the fake UNet."""
    choice = REGISTRY.choose(name, schedule_type, eta)
    denoiser = GuidedDenoiser(fake_unet, config, 7.0, guided)
    return sample(choice.sampler.ksampler, denoiser, lambda model: choice.sigmas(steps, model, False), noise(),
                  seeds, generators(seeds), choice.eta, NEVER)


def diffusers_sample(name: str, schedule_type: str, config: dict = SD15, steps: int = 6) -> torch.Tensor:
    """The same sampling with the diffusers scheduler, the noise drawn from the same generators."""
    scheduler = REGISTRY.make_scheduler(name, schedule_type, config, seed=SEEDS)
    scheduler.set_timesteps(steps)
    x, gens = noise() * scheduler.init_noise_sigma, generators(SEEDS)
    for t in scheduler.timesteps:
        model_output = fake_unet(scheduler.scale_model_input(x, t), t.expand(len(SEEDS)).float())
        x = scheduler.step(model_output, t, x, **samplers.step_kwargs(scheduler, gens)).prev_sample
    return x


K_SAMPLERS = [name for name in REGISTRY.sampler_names() if REGISTRY.find_sampler(name)[0].ksampler is not None]
STOCHASTIC = {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "Euler a", "DPM2 a", "DPM fast",
              "DPM adaptive", "LCM", "TCD"}


@pytest.mark.parametrize("name", K_SAMPLERS)
def test_every_sigma_space_sampler_runs_every_schedule_type_reproducibly(name):
    for schedule_type in REGISTRY.schedule_type_names():
        first = ksample(name, schedule_type)
        assert torch.isfinite(first).all() and first.abs().max() < 1000, schedule_type
        assert torch.equal(first, ksample(name, schedule_type)), schedule_type
    other_noise = ksample(name, seeds=[1, 3])
    if name != "DPM adaptive":  # whose step sizes follow the error over the whole batch (in A1111 too)
        assert torch.equal(ksample(name)[0], other_noise[0]), "an image's noise depends on another of the batch"
    assert torch.equal(ksample(name)[1], other_noise[1]) == (name not in STOCHASTIC)


@pytest.mark.parametrize("config", [SD15, V_PRED], ids=["eps", "v"])
@pytest.mark.parametrize("name, schedule_type", [("Euler", "Karras"), ("Euler", "Uniform"), ("Euler a", "Uniform"),
                                                 ("LMS", "Karras"), ("Heun", "Karras"), ("Euler", "Beta")])
def test_sigma_space_matches_the_diffusers_scheduler(name, schedule_type, config):
    reference = diffusers_sample(name, schedule_type, config)
    assert torch.allclose(ksample(name, schedule_type, config=config), reference, rtol=1e-4, atol=1e-4)


def test_pairs_diffusers_can_run_stay_with_diffusers():
    assert REGISTRY.choose("Euler a", "Automatic").native and REGISTRY.choose("DPM++ 2M", "Karras").native
    assert REGISTRY.choose("Euler", "Beta").native and REGISTRY.choose("DDIM", "Karras", eta=0.7).native
    assert not REGISTRY.choose("Euler a", "Karras").native, "diffusers' Euler a has no Karras sigmas"
    assert not REGISTRY.choose("Euler a", "Automatic", eta=0.5).native, "diffusers' Euler a samples at eta 1"
    assert not REGISTRY.choose("Euler", "Align Your Steps").native and not REGISTRY.choose("DPM++ 2S a").native


# ---- eta ------------------------------------------------------------------------------------------------------

def test_euler_a_at_eta_0_is_euler():
    assert torch.allclose(ksample("Euler a", "Karras", eta=0.0), ksample("Euler", "Karras"), atol=1e-5)
    assert not torch.allclose(ksample("Euler a", "Karras", eta=0.5), ksample("Euler a", "Karras", eta=1.0))


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2S a", "DPM fast"])
def test_stochastic_samplers_add_no_noise_at_eta_0(name):
    assert torch.equal(ksample(name, eta=0.0, seeds=[1, 2]), ksample(name, eta=0.0, seeds=[3, 4]))
    assert not torch.equal(ksample(name, eta=1.0, seeds=[1, 2]), ksample(name, eta=1.0, seeds=[3, 4]))


@pytest.mark.parametrize(
    "name, eta, options, expected",
    [
        ("Euler a", None, {}, (1.0, {})),
        ("Euler a", 0.5, {}, (0.5, {"Eta": 0.5})),
        ("DPM++ 2M SDE", None, {"eta_ancestral": 0.25}, (0.25, {"Eta": 0.25})),
        ("Euler", 0.5, {}, (None, {})),
        ("DDIM", None, {}, (0.0, {})),
        ("DDIM", None, {"eta_ddim": 0.5}, (0.5, {"Eta DDIM": 0.5})),
        ("DDIM CFG++", 1.0, {}, (1.0, {"Eta DDIM": 1.0})),
        ("PLMS", 0.5, {}, (None, {})),
        ("TCD", None, {"eta_ancestral": 0.25}, (0.3, {})),
        ("TCD", 0.5, {}, (0.5, {"Eta": 0.5})),
    ],
)
def test_eta_from_request_else_option_and_its_infotext(name, eta, options, expected):
    choice = REGISTRY.choose(name, "Automatic", eta, {**samplers.ETA_DEFAULTS, **options})
    extra = {k: v for k, v in choice.infotext().items() if k not in ("Sampler", "Schedule type")}
    assert (choice.eta, extra) == expected


# ---- the samplers written here -------------------------------------------------------------------------------

def recording(denoised: torch.Tensor, calls: list[torch.Tensor]):
    def model(x, sigma, **kwargs):
        calls.append(x.clone())
        return denoised
    return model


def test_lcm_predicts_then_noises_to_the_next_sigma():
    sigmas, target, calls = torch.tensor([10.0, 2.0, 0.5, 0.0]), torch.full((1, 4, 2, 2), 0.3), []
    draws = iter(torch.randn(3, 1, 4, 2, 2, generator=torch.Generator().manual_seed(0)))
    drawn: list[torch.Tensor] = []
    noise_sampler = lambda s, s_next: drawn.append(next(draws)) or drawn[-1]  # noqa: E731
    out = sample_lcm(recording(target, calls), torch.randn(1, 4, 2, 2), sigmas, noise_sampler=noise_sampler)
    assert torch.equal(out, target)
    assert torch.allclose(calls[1], target + 2.0 * drawn[0]) and torch.allclose(calls[2], target + 0.5 * drawn[1])


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_is_diffusers_tcd_scheduler_on_the_same_timesteps_and_noise(eta, monkeypatch):
    """diffusers' TCDScheduler (the reference) steps in the model's own (variance-preserving) scale; the sigma-space
    TCD on the sigmas of the same timesteps, ending at the first timestep's, draws the same latents, scaled. Both are
    given the same noise, draw by draw."""
    from diffusers import TCDScheduler
    from diffusers.schedulers import scheduling_tcd

    timesteps = [999, 759, 499, 259]
    draws = list(torch.randn(len(timesteps), len(SEEDS), 4, 8, 8, generator=torch.Generator().manual_seed(5)))
    reference = TCDScheduler(**{k: v for k, v in SD15.items() if k != "prediction_type"})
    reference.set_timesteps(timesteps=timesteps)
    given = iter(draws)
    monkeypatch.setattr(scheduling_tcd, "randn_tensor", lambda *args, **kwargs: next(given))
    x = noise()
    for t in reference.timesteps:
        x = reference.step(fake_unet(x, t.expand(len(SEEDS)).float()), t, x, eta=eta).prev_sample
    model = GuidedDenoiser(fake_unet, SD15, 1.0, False)
    sigmas = model.model.t_to_sigma(torch.tensor([*timesteps, 0]))
    ours = iter(draws)
    out = sample_tcd(model, noise() * (1 + sigmas[0] ** 2).sqrt(), sigmas, eta=eta,
                     noise_sampler=lambda sigma, sigma_next: next(ours))
    alpha_0 = reference.alphas_cumprod[0]
    assert torch.allclose(out * alpha_0.sqrt(), x, atol=1e-4), (out * alpha_0.sqrt() - x).abs().max()


def test_restart_below_20_steps_is_k_diffusions_heun():
    model = GuidedDenoiser(fake_unet, SD15, 1.0, False)
    sigmas = schedules.karras(8, model.model, False)
    x = noise() * sigmas[0]
    assert torch.allclose(sample_restart(model, x, sigmas), sampling.sample_heun(model, x, sigmas), atol=1e-5)


@pytest.mark.parametrize("steps, restart, times", [(20, 9, 1), (40, 10, 2)])
def test_restart_goes_back_up_from_about_0_1_to_about_2(steps, restart, times):
    pairs = restart_steps(schedules.karras(steps, model_schedule(), False))
    assert len(pairs) == steps
    jumps = [(before[1].item(), after[0].item()) for before, after in zip(pairs, pairs[1:]) if after[0] > before[1]]
    assert len(jumps) == times
    for low, high in jumps:
        assert 0.05 < low < 0.2 and 1.5 < high < 3


def test_ddim_cfgpp_without_guidance_is_ddim_as_an_ancestral_euler_step():
    model = GuidedDenoiser(fake_unet, SD15, 7.0, False)
    sigmas = schedules.ddim(6, model.model, False)
    x = noise() * sigmas[0]
    assert torch.allclose(sample_ddim_cfgpp(model, x, sigmas), sampling.sample_euler(model, x, sigmas), atol=1e-5)
    assert torch.allclose(sample_ddim_cfgpp(model, x, sigmas, eta=1.0, noise_sampler=seeded_noise(x, generators(SEEDS))),
                          sampling.sample_euler_ancestral(model, x, sigmas, eta=1.0,
                                                          noise_sampler=seeded_noise(x, generators(SEEDS))), atol=1e-5)


def test_ddim_cfgpp_step_takes_guided_clean_latents_and_the_unconditional_direction():
    uncond, cond = torch.full((1, 4, 2, 2), 0.2), torch.full((1, 4, 2, 2), 0.6)
    model = GuidedDenoiser(lambda x, t: x, SD15, 2 * CFGPP_SCALE, True)
    model.model = lambda x, sigma: torch.cat([uncond, cond])  # denoised predictions, unconditional first
    x, sigmas = torch.ones(1, 4, 2, 2), torch.tensor([4.0, 1.0])
    guided = uncond + 2 * (cond - uncond)  # the CFG scale over 12.5
    assert torch.allclose(sample_ddim_cfgpp(model, x, sigmas), guided + (x - uncond) / 4.0 * 1.0)


# ---- schedule types --------------------------------------------------------------------------------------------

def test_align_your_steps_is_nvidias_list_and_resamples_log_linearly():
    model = model_schedule()
    listed = schedules.align_your_steps(len(schedules.AYS_SD1), model, False)
    assert listed.tolist() == pytest.approx([*schedules.AYS_SD1, 0.0])
    assert schedules.align_your_steps(11, model, True).tolist() == pytest.approx([*schedules.AYS_SDXL, 0.0])
    doubled = schedules.align_your_steps(21, model, False)[:-1]  # the list's points and the midpoints between them
    assert doubled[::2].tolist() == pytest.approx(schedules.AYS_SD1)
    assert doubled[1::2].tolist() == pytest.approx(np.sqrt(np.array(schedules.AYS_SD1[:-1]) * schedules.AYS_SD1[1:]))
    assert len(schedules.align_your_steps(10, model, False)) == 11


def test_kl_optimal_is_evenly_spaced_in_arctan_sigma():
    model = model_schedule()
    sigmas = schedules.kl_optimal(7, model, False)
    assert sigmas[0].item() == pytest.approx(model.sigma_max.item(), rel=1e-5)
    assert sigmas[-1].item() == pytest.approx(model.sigma_min.item(), rel=1e-5)
    steps = sigmas.atan().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-6)


@pytest.mark.parametrize("name, kwargs", [("karras", {"use_karras_sigmas": True}),
                                          ("exponential", {"use_exponential_sigmas": True}),
                                          ("beta", {"use_beta_sigmas": True}), ("uniform", {})])
def test_schedules_diffusers_also_has_give_its_sigmas(name, kwargs):
    reference = EulerDiscreteScheduler(**SD15, timestep_spacing="linspace", **kwargs)
    reference.set_timesteps(9)
    ours = getattr(schedules, name)(9, model_schedule(), False)
    assert torch.allclose(ours, reference.sigmas.float(), rtol=1e-4)


def test_simple_ddim_normal_and_polyexponential_schedules():
    model = model_schedule()
    trained = model.sigmas
    assert torch.equal(schedules.simple(10, model, False)[:-1], trained[[999 - 100 * i for i in range(10)]])
    assert torch.equal(schedules.ddim(10, model, False)[:-1], trained[[901 - 100 * i for i in range(10)]])
    assert len(schedules.ddim(7, model, False)) == 9  # range(0, 1000, 142) has 8 timesteps, as in A1111
    assert torch.allclose(schedules.polyexponential(8, model, False), schedules.exponential(8, model, False))
    assert REGISTRY.find_schedule_type("Normal").sigmas is schedules.uniform
    assert schedules.sgm_uniform(4, model, False)[-2] > model.sigma_min * 2, "SGM Uniform stops short of sigma_min"


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a"])
def test_dpm2_drops_the_next_to_last_sigma_as_a1111(name):
    choice = REGISTRY.choose(name, "Karras")
    sigmas = choice.sigmas(5, model_schedule(), False)
    full = schedules.karras(6, model_schedule(), False)
    assert len(sigmas) == 6 and torch.equal(sigmas, torch.cat([full[:-2], full[-1:]]))


def test_sigma_space_stops_when_asked():
    choice = REGISTRY.choose("Euler", "Karras")
    seen: list[int] = []
    out = sample(choice.sampler.ksampler, GuidedDenoiser(fake_unet, SD15, 1.0, False),
                 lambda model: choice.sigmas(6, model, False), noise(), SEEDS, generators(SEEDS), None,
                 lambda i, total, latents: seen.append(i) or i == 2)
    assert seen == [0, 1, 2] and torch.isfinite(out).all()


def test_flow_models_take_their_evenly_spaced_schedule_only():
    for label in ("Automatic", "Uniform", "Simple", "Normal"):
        assert samplers.make_flow_scheduler(REGISTRY.choose("Euler", label), 3.0) is not None
    with pytest.raises(UserError) as err:
        samplers.make_flow_scheduler(REGISTRY.choose("Euler", "Karras"), 3.0)
    assert err.value.field == "scheduler" and "Simple" in err.value.message
    with pytest.raises(UserError) as err:
        samplers.make_flow_scheduler(REGISTRY.choose("Euler a", "Automatic", 0.5), 3.0)
    assert err.value.field == "eta"


# ---- the engine, on the tiny SD1 checkpoint ----------------------------------------------------------------------

SMALL = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=5.0, seed=7, save_images=False)


def image(engine, **fields) -> tuple[np.ndarray, str]:
    result = engine.txt2img(GenerationRequest(**{**SMALL, **fields}))
    return np.asarray(result.images[0]).astype(int), result.infotexts[0]


def test_every_sampler_and_every_schedule_type_make_an_image(engine):
    """Every sampler with Automatic and a schedule type diffusers lacks, every schedule type with a sampler diffusers
    runs and one it cannot (every pair runs in test_every_sigma_space_sampler_runs_every_schedule_type_reproducibly)."""
    pairs = [(name, schedule_type) for name in REGISTRY.sampler_names() for schedule_type in ("Automatic", "KL Optimal")]
    pairs += [(name, schedule_type) for name in ("DPM++ 2M", "Euler a") for schedule_type in REGISTRY.schedule_type_names()]
    for name, schedule_type in pairs:
        pixels, infotext = image(engine, sampler_name=name, scheduler=schedule_type)
        assert pixels.std() > 1, (name, schedule_type)
        params = parse_infotext(infotext)
        assert (params["Sampler"], params["Schedule type"]) == (name, schedule_type)
    for name in ("Euler a", "DPM++ 2M SDE", "Restart"):
        assert np.array_equal(image(engine, sampler_name=name, scheduler="KL Optimal")[0],
                              image(engine, sampler_name=name, scheduler="KL Optimal")[0])


def test_eta_reaches_the_image_and_the_infotext(engine):
    euler, _ = image(engine, sampler_name="Euler", scheduler="Karras")
    quiet, infotext = image(engine, sampler_name="Euler a", scheduler="Karras", eta=0.0)
    assert np.abs(quiet - euler).max() <= 1 and parse_infotext(infotext)["Eta"] == "0"
    noisy, infotext = image(engine, sampler_name="Euler a", scheduler="Karras")
    assert np.abs(noisy - euler).max() > 1 and "Eta" not in parse_infotext(infotext)

    ddim, infotext = image(engine, sampler_name="DDIM")
    assert "Eta DDIM" not in parse_infotext(infotext)
    assert np.array_equal(ddim, image(engine, sampler_name="DDIM", eta=0.0)[0])
    ddim_eta, infotext = image(engine, sampler_name="DDIM", eta=1.0)
    assert not np.array_equal(ddim, ddim_eta) and parse_infotext(infotext)["Eta DDIM"] == "1"


def test_eta_option_is_the_default(engine):
    engine.set_options({"eta_ancestral": 0.0})
    pixels, infotext = image(engine, sampler_name="Euler a", scheduler="Karras")
    assert parse_infotext(infotext)["Eta"] == "0"
    assert np.array_equal(pixels, image(engine, sampler_name="Euler a", scheduler="Karras", eta=0.0)[0])


def test_brownian_noise_drawn_ahead_is_the_noise_drawn_when_asked():
    """Given the schedule, the next step's tree noise is drawn on a worker while the GPU works: the noise of every
    call (neighbouring sigmas, others, a step asked twice) and a whole DPM++ 2M SDE run are what they were without."""
    from webui.engine.sampling.ksampling import CpuBrownianNoise

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = sampling.get_sigmas_karras(10, 0.03, 14.6)

    def tree(cpu_x: torch.Tensor):
        return sampling.BrownianTreeNoiseSampler(cpu_x, sigmas[-2], sigmas[0], seed=[1, 2])

    calls = [(sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 2)]
    calls[4:4] = [(sigmas[3], sigmas[4]), (torch.tensor(5.0), torch.tensor(4.0))]  # asked again; not the schedule's
    plain, ahead = CpuBrownianNoise(tree, x), CpuBrownianNoise(tree, x, sigmas)
    for n, (sigma, sigma_next) in enumerate(calls):
        assert torch.equal(plain(sigma, sigma_next), ahead(sigma, sigma_next))
        assert n > 0 or ahead.ahead is not None, "the next step's noise is being drawn"
    assert ahead._step_of(sigmas[7]) == 7 and ahead._step_of(sigmas[7].clone()) is None

    def denoise(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return latents / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    runs = [sampling.sample_dpmpp_2m_sde(denoise, x * sigmas[0], sigmas, disable=True,
                                         noise_sampler=CpuBrownianNoise(tree, x, given))
            for given in (None, sigmas)]
    assert torch.equal(*runs)
