"""A1111's samplers and schedule types: names, and how each pair runs.

Any sampler takes any schedule type, as in A1111 1.10. A pair runs one of two ways:

* **diffusers** — the sampler's diffusers scheduler, configured for the schedule type, in the
  StableDiffusion(XL)Pipeline loop. Chosen wherever diffusers can express the pair and the eta, so
  those images match the plain diffusers pipeline exactly.
* **sigma space** — otherwise (Euler a with Karras, DPM++ 2S a, Restart, an eta other than 1 …): the
  schedule type's sigma list (``schedules``) and k-diffusion's sampler function (``ksampling``), as
  A1111 runs its k-samplers.

=================  ======================================  ==========================  ==================
Sampler            diffusers scheduler                     sigma-space function        "Automatic" means
=================  ======================================  ==========================  ==================
DPM++ 2M           DPMSolverMultistep("dpmsolver++", 2)    sample_dpmpp_2m             Karras
DPM++ SDE          DPMSolverSDE                            sample_dpmpp_sde            Karras
DPM++ 2M SDE       DPMSolverMultistep("sde-dpmsolver++")   sample_dpmpp_2m_sde         Exponential
DPM++ 2M SDE Heun  the same, solver_type="heun"            the same, solver_type heun  Exponential
DPM++ 2S a         —                                       sample_dpmpp_2s_ancestral   Uniform
Euler a            EulerAncestralDiscrete                  sample_euler_ancestral      Uniform
Euler              EulerDiscrete                           sample_euler                Uniform
LMS                LMSDiscrete                             sample_lms                  Uniform
Heun               HeunDiscrete                            sample_heun                 Uniform
DPM2               KDPM2Discrete                           sample_dpm_2                Karras
DPM2 a             KDPM2AncestralDiscrete                  sample_dpm_2_ancestral      Karras
DPM fast           —                                       sample_dpm_fast             Uniform
DPM adaptive       —                                       sample_dpm_adaptive         Uniform
Restart            —                                       sample_restart              Karras
DDIM               DDIM(leading, steps_offset=1)           —                           its own
DDIM CFG++         —                                       sample_ddim_cfgpp           its own (DDIM)
PLMS               PNDM(skip_prk_steps, leading)           —                           its own
UniPC              UniPCMultistep(order 3, "bh1")          —                           its own
LCM                —                                       sample_lcm                  Uniform
TCD                —                                       sample_tcd                  Uniform
=================  ======================================  ==========================  ==================

DDIM, DDIM CFG++, PLMS and UniPC are A1111's "timestep" samplers: A1111 ignores the schedule type for
them, and so do we (the infotext still says what was asked). The DPM++ 3M SDE extension adds itself.

eta, as in A1111: samplers whose function takes an eta (ancestral and SDE samplers, DPM fast and
adaptive) use the request's eta, else the option ``eta_ancestral`` (1); the timestep samplers with one
(DDIM, DDIM CFG++) the request's, else ``eta_ddim`` (0); TCD (its gamma) the request's, else its own 0.3. The
infotext says "Eta" where it is not the default (1; TCD's 0.3) and "Eta DDIM" where not 0. diffusers' own ancestral and SDE schedulers sample at eta 1 (DDIM takes
any), so another eta runs in sigma space.

Names: lookup ignores case and treats runs of spaces and underscores alike ("euler_a" finds "Euler a");
A1111's aliases work, and old combined names such as "DPM++ 2M Karras" are split into sampler and
schedule type, the suffix winning over the schedule type given. Each engine has its own ``SamplerRegistry``:
A1111's samplers and schedule types, and those its extensions add at run time (``register_sampler``,
``register_schedule_type``).

Seeds: noise comes from the generation's per-image CPU generators (``step_kwargs`` passes them to the
scheduler), SDE noise from Brownian trees seeded with the image seeds; a seed gives the same image on
any device.
"""
from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from webui.engine.sampling import schedules
from webui.engine.sampling.kdiffusion import external, sampling
from webui.engine.sampling.ksampling import KSampler
from webui.engine.sampling.sampler_functions import sample_ddim_cfgpp, sample_lcm, sample_restart, sample_tcd
from webui.errors import UserError

SchedulerFactory = Callable[..., SchedulerMixin]

# The keys of a model's scheduler config that describe its training noise; the rest (spacing,
# offsets, clipping) is the sampler's and the schedule type's business, as in A1111.
TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
ETA_DEFAULTS = {"eta_ancestral": 1.0, "eta_ddim": 0.0}  # A1111's options, and the eta its infotext leaves out
FLOW_SCHEDULES = ("automatic", "uniform", "simple", "normal")  # all the flow models' one evenly spaced schedule


@dataclass(frozen=True)
class ScheduleType:
    name: str
    label: str
    kwargs: dict[str, Any] | None = None
    """The diffusers scheduler config arguments that give this schedule; None: diffusers has none."""
    sigmas: schedules.SigmaFunction | None = None
    """Its sigma list for the sigma-space samplers; None: only the diffusers schedulers can use it."""
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


@dataclass(frozen=True)
class Sampler:
    name: str
    factory: SchedulerFactory | None = None
    """Its diffusers scheduler, called with diffusers config keyword arguments; None: it has none."""
    aliases: tuple[str, ...] = ()
    default_schedule: str | None = None
    """Schedule type id that "Automatic" means; None: the diffusers scheduler's own, else Uniform."""
    uses_schedule_type: bool = True
    """False for A1111's timestep samplers, which always sample their own way (the default schedule)."""
    flow_factory: SchedulerFactory | None = None
    """The sampler for flow-matching models (Flux, SD3.x), called with ``shift``; None: it has none."""
    ksampler: KSampler | None = None
    """Its sigma-space function; None: it runs only as its diffusers scheduler."""

    @property
    def takes_eta(self) -> bool:
        return self.ksampler.takes_eta if self.ksampler is not None else _factory_takes_eta(self.factory)

    @property
    def eta_option(self) -> str:
        return "eta_ancestral" if self.uses_schedule_type else "eta_ddim"

    def default_eta(self, options: Mapping[str, Any]) -> float:
        """The eta a request without one samples with: the option's, or the sampler's own (TCD's 0.3)."""
        if self.ksampler is not None and self.ksampler.own_eta:
            return self.ksampler.function_eta
        return float(options[self.eta_option])


def _factory_takes_eta(factory: SchedulerFactory | None) -> bool:
    """Whether a diffusers scheduler's step takes eta (DDIM); the others sample at eta 1, or have none."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return isinstance(factory, type) and "eta" in inspect.signature(factory.step).parameters


_LINSPACE = {"timestep_spacing": "linspace"}
A1111_SCHEDULE_TYPES = (
    ScheduleType("automatic", "Automatic", {}),
    ScheduleType("uniform", "Uniform", _LINSPACE, schedules.uniform, need_inner_model=True),
    ScheduleType("karras", "Karras", {**_LINSPACE, "use_karras_sigmas": True}, schedules.karras, default_rho=7.0),
    ScheduleType("exponential", "Exponential", {**_LINSPACE, "use_exponential_sigmas": True}, schedules.exponential),
    ScheduleType("polyexponential", "Polyexponential", None, schedules.polyexponential, default_rho=1.0),
    ScheduleType("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, schedules.sgm_uniform,
                 aliases=("SGMUniform",), need_inner_model=True),
    ScheduleType("kl_optimal", "KL Optimal", None, schedules.kl_optimal),
    ScheduleType("align_your_steps", "Align Your Steps", None, schedules.align_your_steps),
    ScheduleType("simple", "Simple", None, schedules.simple, need_inner_model=True),
    ScheduleType("normal", "Normal", _LINSPACE, schedules.uniform, need_inner_model=True),
    ScheduleType("ddim", "DDIM", None, schedules.ddim, need_inner_model=True),
    ScheduleType("beta", "Beta", {**_LINSPACE, "use_beta_sigmas": True}, schedules.beta, need_inner_model=True),
)

_DPMPP_2M = functools.partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)
_DPMPP_2M_SDE = functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2)
# A1111's DDIM and PLMS timesteps: range(0, 1000, 1000 // steps) + 1, ending at the first training step's alpha.
_TIMESTEPS = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
_DDIM = functools.partial(DDIMScheduler, clip_sample=False, **_TIMESTEPS)
_PLMS = functools.partial(PNDMScheduler, skip_prk_steps=True, **_TIMESTEPS)
# A1111's UniPC defaults; like A1111 it stops at sigma_min (t = 1/N), where diffusers' "bh1" is
# also finite (with a final sigma of zero its step size is infinite and the result NaN).
_UNIPC = functools.partial(
    UniPCMultistepScheduler,
    solver_order=3,
    solver_type="bh1",
    lower_order_final=True,
    timestep_spacing="linspace",
    final_sigmas_type="sigma_min",
)

# Flow-matching counterparts (Flux, SD3.x): the same solvers on the flow's sigmas, shifted by ``shift``.
_FLOW_DPM = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _flow_euler(shift: float, stochastic: bool = False) -> SchedulerMixin:
    return FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic)


def _flow_solver(factory: SchedulerFactory) -> SchedulerFactory:
    return lambda shift: factory(flow_shift=shift, **_FLOW_DPM)


FLOW_FACTORIES: dict[str, SchedulerFactory] = {
    "Euler": _flow_euler,
    "Euler a": functools.partial(_flow_euler, stochastic=True),
    "Heun": lambda shift: FlowMatchHeunDiscreteScheduler(shift=shift),
    "DPM++ 2M": _flow_solver(_DPMPP_2M),
    "DPM++ 2M SDE": _flow_solver(_DPMPP_2M_SDE),
    "UniPC": _flow_solver(functools.partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh1")),
}

def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "_", name.strip().lower())


class SamplerRegistry:
    """The samplers and schedule types one engine offers: A1111's, then those its extensions add, with which
    extension added each (``owner``), so that a failing extension's go with it (``release``)."""

    def __init__(self) -> None:
        self._samplers: dict[str, Sampler] = {}
        self._schedules: tuple[ScheduleType, ...] = A1111_SCHEDULE_TYPES
        self._owners: dict[tuple[str, str], str] = {}  # ("sampler" | "schedule type", lower-case name) -> extension
        self._register_a1111_samplers()

    @property
    def all_samplers(self) -> tuple[Sampler, ...]:
        return tuple(self._samplers.values())

    @property
    def all_schedule_types(self) -> tuple[ScheduleType, ...]:
        return self._schedules

    def sampler_names(self) -> list[str]:
        return [s.name for s in self._samplers.values()]

    def schedule_type_names(self) -> list[str]:
        return [s.label for s in self._schedules]

    def find_schedule_type(self, name: str | None) -> ScheduleType:
        """The schedule type by label, id or alias; empty means Automatic (as A1111's API)."""
        key = _key(name or "automatic")
        for schedule in self._schedules:
            if key in {_key(n) for n in (schedule.name, schedule.label, *schedule.aliases)}:
                return schedule
        raise UserError(f"unknown schedule type {name!r}; choose one of: {', '.join(self.schedule_type_names())}",
                        "scheduler")

    def register_sampler(
        self,
        name: str,
        factory: SchedulerFactory | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        *,
        default_schedule: str | None = None,
        uses_schedule_type: bool = True,
        flow_factory: SchedulerFactory | None = None,
        ksampler: KSampler | None = None,
        owner: str | None = None,
    ) -> None:
        """Add a sampler, or replace the one of that name.

        ``factory`` is called with diffusers scheduler config keyword arguments (a scheduler class or a
        ``functools.partial`` of one); only the arguments its signature accepts are passed. ``ksampler`` runs
        it in sigma space, with every schedule type and eta; give one or both. ``owner``: the extension adding
        it, which may not replace a sampler it did not add.
        """
        if owner is not None:
            self._claim("sampler", name, owner, self._exists(self.find_sampler, name))
        if factory is None and ksampler is None:
            raise ValueError(f"sampler {name!r} needs a diffusers factory or a sigma-space function")
        if default_schedule is not None:
            default_schedule = self.find_schedule_type(default_schedule).name
        flow_factory = flow_factory or FLOW_FACTORIES.get(name)
        self._samplers[_key(name)] = Sampler(name, factory, tuple(aliases), default_schedule, uses_schedule_type,
                                             flow_factory, ksampler)

    def unregister_sampler(self, name: str) -> None:
        """Remove a sampler; an unknown name is ignored."""
        self._samplers.pop(_key(name), None)

    def register_schedule_type(
        self,
        name: str,
        label: str,
        kwargs: dict[str, Any],
        aliases: tuple[str, ...] | list[str] = (),
        *,
        default_rho: float = -1,
        owner: str | None = None,
    ) -> None:
        """Add a schedule type, or replace the one with that id.

        ``kwargs`` are the diffusers scheduler config arguments it sets, e.g. ``{"timestep_spacing": "leading"}``;
        a sampler whose diffusers scheduler lacks one of them refuses the schedule type. ``owner``: the extension
        adding it, which may not replace a schedule type it did not add.
        """
        if owner is not None:
            exists = self._exists(self.find_schedule_type, name) or self._exists(self.find_schedule_type, label)
            self._claim("schedule type", name, owner, exists)
        schedule = ScheduleType(_key(name), label, dict(kwargs), aliases=tuple(aliases), default_rho=default_rho)
        self._schedules = (*(s for s in self._schedules if s.name != schedule.name), schedule)

    def unregister_schedule_type(self, name: str) -> None:
        """Remove a schedule type by id."""
        self._schedules = tuple(s for s in self._schedules if s.name != _key(name))

    def release(self, owner: str) -> None:
        """Remove the samplers and schedule types an extension added (it failed)."""
        for (kind, name), claimant in list(self._owners.items()):
            if claimant == owner:
                (self.unregister_sampler if kind == "sampler" else self.unregister_schedule_type)(name)
                del self._owners[(kind, name)]

    def _claim(self, kind: str, name: str, owner: str, exists: bool) -> None:
        key = (kind, name.strip().lower())
        if exists and self._owners.get(key) != owner:
            raise ValueError(f"a {kind} named {name!r} already exists")
        self._owners[key] = owner

    @staticmethod
    def _exists(find: Callable[[str], Any], name: str) -> bool:
        try:
            find(name)
            return True
        except UserError:
            return False

    def _register_a1111_samplers(self) -> None:
        add = self.register_sampler
        sde = dict(brownian=True)
        add("DPM++ 2M", _DPMPP_2M, ["k_dpmpp_2m"], default_schedule="karras",
            ksampler=KSampler(sampling.sample_dpmpp_2m))
        add("DPM++ SDE", DPMSolverSDEScheduler, ["k_dpmpp_sde"], default_schedule="karras",
            ksampler=KSampler(sampling.sample_dpmpp_sde, **sde))
        add("DPM++ 2M SDE", _DPMPP_2M_SDE, ["k_dpmpp_2m_sde"], default_schedule="exponential",
            ksampler=KSampler(sampling.sample_dpmpp_2m_sde, **sde))
        add("DPM++ 2M SDE Heun", functools.partial(_DPMPP_2M_SDE, solver_type="heun"), ["k_dpmpp_2m_sde_heun"],
            default_schedule="exponential",
            ksampler=KSampler(functools.partial(sampling.sample_dpmpp_2m_sde, solver_type="heun"), **sde))
        add("DPM++ 2S a", None, ["k_dpmpp_2s_a"], ksampler=KSampler(sampling.sample_dpmpp_2s_ancestral))
        add("Euler a", EulerAncestralDiscreteScheduler, ["k_euler_a", "k_euler_ancestral"], default_schedule="uniform",
            ksampler=KSampler(sampling.sample_euler_ancestral))
        add("Euler", EulerDiscreteScheduler, ["k_euler"], default_schedule="uniform",
            ksampler=KSampler(sampling.sample_euler))
        add("LMS", LMSDiscreteScheduler, ["k_lms"], default_schedule="uniform", ksampler=KSampler(sampling.sample_lms))
        add("Heun", HeunDiscreteScheduler, ["k_heun"], default_schedule="uniform",
            ksampler=KSampler(sampling.sample_heun))
        add("DPM2", KDPM2DiscreteScheduler, ["k_dpm_2"], default_schedule="karras",
            ksampler=KSampler(sampling.sample_dpm_2, discard_penultimate=True))
        add("DPM2 a", KDPM2AncestralDiscreteScheduler, ["k_dpm_2_a"], default_schedule="karras",
            ksampler=KSampler(sampling.sample_dpm_2_ancestral, discard_penultimate=True))
        add("DPM fast", None, ["k_dpm_fast"], ksampler=KSampler(sampling.sample_dpm_fast))
        add("DPM adaptive", None, ["k_dpm_ad"], ksampler=KSampler(sampling.sample_dpm_adaptive))
        add("Restart", None, ["restart"], default_schedule="karras", ksampler=KSampler(sample_restart))
        add("DDIM", _DDIM, ["ddim"], uses_schedule_type=False)
        add("DDIM CFG++", None, ["ddim_cfgpp"], default_schedule="ddim", uses_schedule_type=False,
            ksampler=KSampler(sample_ddim_cfgpp))
        add("PLMS", _PLMS, ["plms"], uses_schedule_type=False)
        add("UniPC", _UNIPC, ["unipc"], uses_schedule_type=False)
        add("LCM", None, ["lcm"], ksampler=KSampler(sample_lcm))
        add("TCD", None, ["tcd"], ksampler=KSampler(sample_tcd, own_eta=True))

    def _lookup_sampler(self, name: str) -> Sampler | None:
        key = _key(name)
        return next((s for s in self._samplers.values() if key in {_key(n) for n in (s.name, *s.aliases)}), None)

    def _split_legacy_name(self, name: str) -> tuple[Sampler, ScheduleType] | None:
        """Split names from before A1111 had schedule types, such as "DPM++ 2M Karras"."""
        key = _key(name)
        for schedule in self._schedules[1:]:
            for suffix in (schedule.label, *schedule.aliases):
                suffix_key = "_" + _key(suffix)
                sampler = self._lookup_sampler(key[: -len(suffix_key)]) if key.endswith(suffix_key) else None
                if sampler is not None:
                    return sampler, schedule
        return None

    def find_sampler(self, sampler_name: str, schedule_type: str | None = "Automatic") -> tuple[Sampler, ScheduleType]:
        """The sampler and the schedule type asked for, legacy combined names split."""
        schedule = self.find_schedule_type(schedule_type)
        sampler = self._lookup_sampler(sampler_name or "")
        if sampler is not None:
            return sampler, schedule
        legacy = self._split_legacy_name(sampler_name or "")
        if legacy is not None:
            return legacy
        raise UserError(f"unknown sampler {sampler_name!r}; choose one of: {', '.join(self.sampler_names())}",
                        "sampler_name")

    def resolve(self, sampler_name: str, schedule_type: str | None = "Automatic") -> tuple[str, str]:
        """Canonical (sampler name, schedule type label) for the infotext, e.g. ("Euler a", "Automatic")."""
        sampler, schedule = self.find_sampler(sampler_name, schedule_type)
        return sampler.name, schedule.label

    def choose(self, sampler_name: str, schedule_type: str | None = "Automatic", eta: float | None = None,
               eta_defaults: Mapping[str, Any] = ETA_DEFAULTS) -> Sampling:
        """The sampling a request asks for; ``eta`` None takes the option (``eta_defaults``: the options store)."""
        sampler, schedule = self.find_sampler(sampler_name, schedule_type)
        if sampler.takes_eta:
            eta = float(eta) if eta is not None else sampler.default_eta(eta_defaults)
        else:
            eta = None
        if sampler.uses_schedule_type and schedule.name != "automatic":
            used = schedule
        else:
            used = self.find_schedule_type(sampler.default_schedule) if sampler.default_schedule else None
        return Sampling(self, sampler, schedule, eta, used, _runs_natively(sampler, eta, used))

    def make_scheduler(self, sampler_name: str, schedule_type: str | None, base_config: dict[str, Any], *,
                       seed: int | list[int] | None = None) -> SchedulerMixin:
        """The diffusers scheduler of a sampler and schedule type (for the plain diffusers pipeline)."""
        return self.choose(sampler_name, schedule_type).scheduler(base_config, seed=seed)

    def api_samplers(self) -> list[dict[str, Any]]:
        """The body of A1111's ``GET /sdapi/v1/samplers``."""
        return [
            {
                "name": s.name,
                "aliases": list(s.aliases),
                "options": {"scheduler": s.default_schedule}
                if s.uses_schedule_type and s.default_schedule not in (None, "uniform") else {},
            }
            for s in self._samplers.values()
        ]

    def api_schedulers(self) -> list[dict[str, Any]]:
        """The body of A1111's ``GET /sdapi/v1/schedulers``."""
        return [
            {
                "name": s.name,
                "label": s.label,
                "aliases": list(s.aliases) or None,
                "default_rho": s.default_rho,
                "need_inner_model": s.need_inner_model,
            }
            for s in self._schedules
        ]


def _accepted(factory: SchedulerFactory) -> Callable[[str], bool]:
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return lambda key: True
    names = {p.name for p in params}
    return names.__contains__


def _diffusers_can(factory: SchedulerFactory, schedule: ScheduleType | None) -> bool:
    accepts = _accepted(factory)
    return schedule is None or (schedule.kwargs is not None and all(accepts(key) for key in schedule.kwargs))


def _runs_natively(sampler: Sampler, eta: float | None, schedule: ScheduleType | None) -> bool:
    """Whether a diffusers scheduler runs the sampler with this schedule type and eta (else: sigma space)."""
    if sampler.factory is None:
        return False
    if sampler.ksampler is None:
        return True
    if eta not in (None, 1.0) and not _factory_takes_eta(sampler.factory):
        return False
    return _diffusers_can(sampler.factory, schedule)


@dataclass(frozen=True)
class Sampling:
    """A request's sampler, schedule type and eta, resolved once (``SamplerRegistry.choose``): what the generation
    and its infotext use, handed down to the loops."""

    registry: SamplerRegistry = field(compare=False, repr=False)
    """Where they were found: the choices an error names, and Uniform for the sigma-space samplers without a default."""
    sampler: Sampler
    schedule: ScheduleType
    """As asked (the infotext's); ``used_schedule`` is the one that shapes the sigmas."""
    eta: float | None
    """The eta it samples with; None where eta plays no part in the sampler."""
    used_schedule: ScheduleType | None
    """The schedule type the sampler runs with; None: its diffusers scheduler's own timesteps."""
    native: bool
    """True where a diffusers scheduler runs the pair and the eta; False: the sigma-space path."""

    def scheduler(self, base_config: dict[str, Any], *, seed: int | list[int] | None = None) -> SchedulerMixin:
        """A new diffusers scheduler for one generation (``native`` pairs).

        ``base_config`` is the model's scheduler config; only its training-noise keys are used.
        ``seed`` seeds samplers that draw their own noise (DPM++ SDE); give a list of seeds for a batch.
        """
        sampler, schedule = self.sampler, self.used_schedule
        if sampler.factory is None:
            raise UserError(f"sampler {sampler.name} has no diffusers scheduler", "sampler_name")
        accepts = _accepted(sampler.factory)
        if not _diffusers_can(sampler.factory, schedule):
            usable = [s.label for s in self.registry.all_schedule_types if _diffusers_can(sampler.factory, s)]
            raise UserError(f"sampler {sampler.name} does not support schedule type {schedule.label}; "
                            f"choose one of: {', '.join(usable)}", "scheduler")
        kwargs = {k: base_config[k] for k in TRAINING_KEYS if base_config.get(k) not in (None, False)}
        unsupported = [k for k in kwargs if not accepts(k)]
        if unsupported:
            raise UserError(f"sampler {sampler.name} cannot use this model's {', '.join(unsupported)}", "sampler_name")
        kwargs.update(schedule.kwargs if schedule is not None else {})
        if seed is not None and accepts("noise_sampler_seed"):
            kwargs["noise_sampler_seed"] = seed
        return sampler.factory(**kwargs)

    def sigmas(self, steps: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
        """The sigma-space path's noise levels for ``steps`` steps over the model's training sigmas."""
        schedule = self.used_schedule or self.registry.find_schedule_type("uniform")
        if schedule.sigmas is None:
            usable = [s.label for s in self.registry.all_schedule_types if s.sigmas is not None]
            raise UserError(f"sampler {self.sampler.name} cannot run schedule type {schedule.label}; "
                            f"choose one of: {', '.join(usable)}", "scheduler")
        discard = self.sampler.ksampler is not None and self.sampler.ksampler.discard_penultimate
        sigmas = schedule.sigmas(steps + discard, model, sdxl)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    def infotext(self) -> dict[str, Any]:
        """A1111's infotext fields: sampler, schedule type, and eta where not A1111's default for the sampler."""
        params: dict[str, Any] = {"Sampler": self.sampler.name, "Schedule type": self.schedule.label}
        timestep = not self.sampler.uses_schedule_type
        if self.eta is not None and self.eta != self.sampler.default_eta(ETA_DEFAULTS):
            params["Eta DDIM" if timestep else "Eta"] = self.eta
        return params


def make_flow_scheduler(sampling: Sampling, shift: float) -> SchedulerMixin:
    """A new scheduler for one generation of a flow-matching model, its sigmas shifted by ``shift``.

    Flow models have one schedule, evenly spaced (Forge's "Simple"): Automatic, Uniform, Simple and Normal
    all mean it; the other schedule types are refused, as is an eta other than the samplers' own 1.
    """
    sampler, schedule = sampling.sampler, sampling.schedule
    if sampler.flow_factory is None:
        usable = [s.name for s in sampling.registry.all_samplers if s.flow_factory is not None]
        raise UserError(f"sampler {sampler.name} does not work with flow-matching models (Flux, SD3.x); "
                        f"choose one of: {', '.join(usable)}", "sampler_name")
    if schedule.name not in FLOW_SCHEDULES:
        usable = [s.label for s in sampling.registry.all_schedule_types if s.name in FLOW_SCHEDULES]
        raise UserError(f"Flux and SD3.x models use their own evenly spaced flow-matching schedule; choose "
                        f"{', '.join(usable)} instead of {schedule.label}", "scheduler")
    if sampling.eta not in (None, 1.0):
        raise UserError(f"{sampler.name} samples Flux and SD3.x models at eta 1 only", "eta")
    return sampler.flow_factory(shift=shift)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | list[torch.Generator] | None,
                eta: float | None = None) -> dict[str, Any]:
    """Extra arguments for ``scheduler.step``: the generator where it draws noise, eta where it takes one (DDIM)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"generator": generator} if generator is not None and "generator" in params else {}
    if eta is not None and "eta" in params:
        kwargs["eta"] = eta
    return kwargs

