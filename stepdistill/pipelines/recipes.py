"""Sampling recipes: how a student samples once exported — a stock Diffusers scheduler, a step count, a guidance.

=================  ==============================================  =========================================
recipe             scheduler (on the teacher's noise schedule)     typical students
=================  ==============================================  =========================================
``ddim``           DDIMScheduler, the teacher's own spacing        teachers; students on the teacher's grid
``ddim_trailing``  DDIMScheduler, ``timestep_spacing="trailing"``  Hyper-SD, progressive distillation; 1 step
                   (4 steps: 999, 749, 499, 249)                    = x0 at t=999 (SD-Turbo, SwiftBrush)
``lcm``            LCMScheduler, ``original_inference_steps``       LCM, consistency distillation
                   grid (LCM's 50: 4 steps 999, 759, 499, 259)
``lcm_uniform``    LCMScheduler, ``original_inference_steps=K``    DMD2 (4 steps: 999, 749, 499, 249)
``tcd``            TCDScheduler on the ``lcm`` grid, gamma = eta    TCD, LCM and Hyper-SD students
``flow_euler``     FlowMatchEulerDiscreteScheduler, fixed shift     rectified flow, SD3 / Flux students
                   (K >= 2: ``shift_terminal = 1/K``; under
                   ClassConditionalPipeline the uniform sigma grid,
                   under Stable Diffusion UNet pipelines
                   FlowMatchEulerUniformScheduler)
``flow_lcm``       FlowMatchLCMScheduler, same grid as flow_euler   DMD2 on flow models (x0, then fresh noise)
=================  ==============================================  =========================================

``ddim`` is deterministic; ``lcm*`` predict x0 and re-noise with fresh noise between steps (as LCM, DMD2 and
most multi-step generators sample); ``tcd`` is TCD's strategic stochastic sampling (Zheng et al. 2024): from the
x0 and noise predictions a DDIM jump to ``s = floor((1 - gamma) t')``, then fresh noise from ``s`` up to the next
timestep ``t'``, so gamma = 1 is ``lcm`` and gamma = 0 is deterministic (DDIM on the student); gamma is the
recipe's ``eta``, passed as the pipeline call's ``eta`` (a stock pipeline's own default, 0, would make it
deterministic). ``flow_euler`` integrates the velocity; ``flow_lcm`` is the flow-matching
``lcm``: ``x0 = x - sigma u``, then ``(1 - sigma') x0 + sigma' z`` with fresh ``z`` (stock pipelines such as
``StableDiffusion3Pipeline`` draw that ``z`` from torch's global generator, not from their ``generator``).
A recipe may also name the paper's ``timesteps``: they are matched to a stock scheduler config (for example
``[999, 749, 499, 249]`` is ``LCMScheduler(original_inference_steps=4)`` and a one-step ``[399]`` is ``DDIMScheduler(timestep_spacing=
"leading", steps_offset=399)`` — though not under ``StableDiffusionPipeline``, which resets ``steps_offset`` to 1).
When none fits, export fails and names the nearest stock option, or, with ``custom_scheduler=True``, uses
:class:`~stepdistill.pipelines.schedulers.StudentLCMScheduler` (needs stepdistill to load).
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import ConfigError
from ..schedule import NoiseSchedule
from ..solvers import lcm_grid
from .sampling import student_timesteps

SAMPLERS = ("ddim", "lcm", "tcd", "flow_euler", "flow_lcm")
FLOW_SAMPLERS = ("flow_euler", "flow_lcm")
SCHEDULER_CLASS = {"ddim": "DDIMScheduler", "lcm": "LCMScheduler", "tcd": "TCDScheduler",
                   "flow_euler": "FlowMatchEulerDiscreteScheduler", "flow_lcm": "FlowMatchLCMScheduler"}
#: stock UNet text-to-image pipelines: a flow (rectified-flow) UNet runs in them with FlowMatchEulerUniformScheduler
UNET_TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: pipelines whose flow sampling is the uniform Euler grid linspace(1, 1/K, K) at every K (their own, or their
#: scheduler's): flow_euler exports to them without shift_terminal
UNIFORM_GRID_PIPELINES = ("ClassConditionalPipeline", *UNET_TEXT_PIPELINES)
TCD_GAMMA = 0.3  # TCD's default gamma (TCDScheduler.step's eta)
# what every exported VP scheduler fixes: the student's output is used as is (no clipping / thresholding)
_VP_FIXED = {"clip_sample": False, "thresholding": False, "set_alpha_to_one": True}
_NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "prediction_type")


class ExportError(ConfigError):
    """A student, recipe or run that cannot be exported as asked; the message says what to do instead."""


def _uniform_lcm(k: int) -> dict:
    return {"original_inference_steps": k}


def _flow_terminal(k: int) -> dict:
    return {"shift_terminal": 1.0 / k} if k >= 2 else {}


#: name -> (sampler, scheduler-config overrides as a function of the step count, description)
RECIPES: dict[str, tuple[str, object, str]] = {
    "ddim": ("ddim", lambda k: {}, "DDIM (eta 0) on the teacher's own timestep spacing"),
    "ddim_trailing": ("ddim", lambda k: {"timestep_spacing": "trailing"},
                      "DDIM with trailing spacing: K steps from t = T-1 (4 steps: 999, 749, 499, 249)"),
    "lcm": ("lcm", lambda k: {}, "LCMScheduler on its original_inference_steps grid (LCM's 50 by default: 4 steps "
            "are then 999, 759, 499, 259): x0, then fresh noise"),
    "lcm_uniform": ("lcm", _uniform_lcm, "LCMScheduler with original_inference_steps = K: evenly spaced steps, x0 "
                    "then fresh noise (4 steps: 999, 749, 499, 249, as DMD2)"),
    "tcd": ("tcd", lambda k: {}, "TCDScheduler on its original_inference_steps grid (as lcm): a DDIM jump with the "
            "student's x0 and noise to (1 - gamma) t', then fresh noise up to t'; gamma = the call's eta"),
    "flow_euler": ("flow_euler", _flow_terminal, "FlowMatchEulerDiscreteScheduler (Euler on the velocity) with a "
                   "fixed shift; K >= 2 steps end at sigma = 1/K"),
    "flow_lcm": ("flow_lcm", _flow_terminal, "FlowMatchLCMScheduler: x0 = x - sigma u, then fresh noise to the next "
                 "sigma (DMD2's backward simulation on a flow schedule); grid as flow_euler"),
}


@dataclass
class Recipe:
    """How a student samples: ``sampler`` with ``scheduler_config`` on top of the teacher's noise schedule, for
    ``num_inference_steps`` steps, called with ``guidance_scale`` (standard CFG form; 1 = none; for
    guidance-embedded students the value fed to the embedding). ``timesteps``: the paper's timesteps, matched to
    a stock scheduler config at export (an error if none fits, unless ``custom_scheduler``)."""

    name: str = "custom"
    sampler: str = "lcm"
    num_inference_steps: int = 1
    guidance_scale: float | None = None
    timesteps: list[int] | None = None
    scheduler_config: dict = field(default_factory=dict)
    custom_scheduler: bool = False
    description: str = ""
    eta: float | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ExportError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.sampler == "tcd":
            self.eta = TCD_GAMMA if self.eta is None else float(self.eta)
            if not 0 <= self.eta <= 1:
                raise ExportError(f"recipe {self.name!r}: eta is TCD's gamma and must be in [0, 1], not {self.eta}")
        elif self.eta is not None:
            raise ExportError(f"recipe {self.name!r} ({self.sampler}) takes no eta: eta is TCD's gamma (the tcd "
                              "sampler)")
        if self.timesteps is not None:
            self.timesteps = [int(t) for t in self.timesteps]
            if self.num_inference_steps not in (1, len(self.timesteps)) or not self.timesteps:
                raise ExportError(f"recipe {self.name!r}: {len(self.timesteps)} timesteps {self.timesteps} but "
                                  f"num_inference_steps={self.num_inference_steps}")
            self.num_inference_steps = len(self.timesteps)
            if any(b >= a for a, b in zip(self.timesteps, self.timesteps[1:])):
                raise ExportError(f"recipe {self.name!r}: timesteps must decrease, got {self.timesteps}")
        if int(self.num_inference_steps) < 1:
            raise ExportError(f"recipe {self.name!r}: num_inference_steps must be >= 1")
        self.num_inference_steps = int(self.num_inference_steps)
        if self.guidance_scale is not None:
            self.guidance_scale = float(self.guidance_scale)

    @property
    def scheduler_class(self) -> str:
        return SCHEDULER_CLASS[self.sampler]

    def as_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------------------------------ schedulers
    def make_scheduler(self, base, prediction_type: str | None = None, pipeline=None):
        """The scheduler this recipe exports with, built on ``base`` (the teacher's scheduler or its config).

        ``prediction_type``: the student's (epsilon / v_prediction / sample; ``flow`` for flow students).
        ``pipeline``: the pipeline class (or name) that will load it, whose own adjustments are taken into
        account when matching explicit ``timesteps``.
        """
        config = _config_dict(base)
        is_flow = _is_flow(config)
        if self.sampler in FLOW_SAMPLERS:
            if not is_flow:
                raise ExportError(f"recipe {self.name!r} ({self.sampler}) needs a flow-matching student; this one has "
                                  "a VP (DDPM-type) schedule: use ddim, ddim_trailing, lcm, lcm_uniform or tcd")
            if self.timesteps is not None:
                raise ExportError(f"explicit timesteps are not supported for {self.sampler}: shape the grid with "
                                  "scheduler_config (shift, shift_terminal) and check it with student_timesteps")
            import diffusers

            name = _pipeline_name(pipeline)
            cls_name = SCHEDULER_CLASS[self.sampler]
            if name in UNET_TEXT_PIPELINES:  # they need init_noise_sigma and scale_model_input: our Euler scheduler
                if self.sampler != "flow_euler":
                    raise ExportError(f"{name} runs a flow UNet only with the flow_euler recipe (stepdistill's "
                                      f"FlowMatchEulerUniformScheduler), not {self.name!r}")
                cls_name = "FlowMatchEulerUniformScheduler"
            from . import schedulers

            cls = getattr(schedulers, cls_name, None) or getattr(diffusers, cls_name)
            shift = _static_shift(config)
            # pipelines that run the uniform grid at any K themselves need no shift_terminal (which would bend it
            # at step counts other than the trained one)
            preset = (RECIPES[self.name][1](self.num_inference_steps)
                      if self.name in RECIPES and name not in UNIFORM_GRID_PIPELINES else {})
            cfg = {"num_train_timesteps": config.get("num_train_timesteps", 1000), "shift": shift,
                   "use_dynamic_shifting": False, **preset, **self.scheduler_config}
            if cfg.get("use_dynamic_shifting"):
                raise ExportError("exported flow schedulers use a fixed shift (use_dynamic_shifting=False), so "
                                  "that the timesteps do not depend on the image size")
            return cls.from_config(_keep_init_args(cls, cfg))
        if is_flow:
            raise ExportError(f"recipe {self.name!r} ({self.sampler}) needs a VP (DDPM-type) student; this one is a "
                              "flow-matching model: use flow_euler or flow_lcm")
        if prediction_type == "flow":
            raise ExportError("a flow-velocity student needs the flow_euler or flow_lcm recipe")
        vp = {k: config[k] for k in _NOISE_KEYS if k in config}
        if prediction_type is not None:
            vp["prediction_type"] = prediction_type
        preset = RECIPES[self.name][1](self.num_inference_steps) if self.name in RECIPES else {}
        cfg = {**vp, **_VP_FIXED, **preset, **self.scheduler_config}
        if self.timesteps is None:
            return _build(self.scheduler_class, cfg)
        return _match_timesteps(self, cfg, pipeline)

    def timesteps_for(self, base, prediction_type: str | None = None, pipeline=None) -> list[float]:
        """The timesteps a student of this recipe runs (and must be trained at)."""
        scheduler = as_loaded(self.make_scheduler(base, prediction_type, pipeline), pipeline)
        return student_timesteps(scheduler, self.num_inference_steps, pipeline)


def get_recipe(name: str, steps: int = 1, guidance_scale: float | None = None, timesteps=None,
               custom_scheduler: bool = False, eta: float | None = None, **scheduler_config) -> Recipe:
    """A named recipe (see :data:`RECIPES`) for ``steps`` steps (``eta``: TCD's gamma, for ``tcd``)."""
    if name not in RECIPES:
        raise ExportError(f"unknown export recipe {name!r}; available: {', '.join(RECIPES)}")
    sampler, _, description = RECIPES[name]
    return Recipe(name=name, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance_scale,
                  timesteps=list(timesteps) if timesteps is not None else None, scheduler_config=scheduler_config,
                  custom_scheduler=custom_scheduler, description=description, eta=eta)


# ---------------------------------------------------------------------------------------------- helpers
def _config_dict(base) -> dict:
    if base is None:
        raise ExportError("the recipe needs the teacher's scheduler (its noise schedule) as base")
    config = getattr(base, "config", base)
    out = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    out["_class_name"] = dict(config).get("_class_name", type(base).__name__)
    return out


def _is_flow(config: dict) -> bool:
    return "FlowMatch" in str(config.get("_class_name", "")) or ("shift" in config and "beta_schedule" not in config)


def _static_shift(config: dict) -> float:
    return float(NoiseSchedule.from_scheduler(config).shift)


def _keep_init_args(cls, config: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def _build(class_name: str, config: dict):
    import diffusers

    from . import schedulers  # lazy: it imports Diffusers' schedulers

    cls = getattr(schedulers, class_name, None) or getattr(diffusers, class_name)
    return cls.from_config(_keep_init_args(cls, config))


def as_loaded(scheduler, pipeline=None):
    """The scheduler as ``pipeline``'s ``__init__`` leaves it (``StableDiffusionPipeline`` resets ``steps_offset``
    to 1 and ``clip_sample`` to False): a fresh copy passed through the pipeline with every other component None."""
    cls = _pipeline_class(pipeline)
    fresh = type(scheduler).from_config(scheduler.config)
    if cls is None:
        return fresh
    expected, optional = cls._get_signature_keys(cls)
    kwargs = {name: None for name in expected}
    kwargs["scheduler"] = fresh
    if "requires_safety_checker" in optional:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in optional:
        kwargs["add_watermarker"] = False
    try:
        return cls(**kwargs).scheduler
    except Exception:  # a pipeline that cannot be built without its components: assume it leaves it alone
        return fresh


def _pipeline_class(pipeline):
    if pipeline is None:
        return None
    if isinstance(pipeline, type):
        return pipeline
    import diffusers

    from . import class_conditional  # lazy: it imports Diffusers' pipelines

    return getattr(class_conditional, pipeline, None) or getattr(diffusers, pipeline, None)


def _lcm_grid(total: int, original: int, k: int) -> list[int]:
    """LCMScheduler's (and TCDScheduler's) timesteps for k steps with ``original_inference_steps`` (their
    set_timesteps, in numpy): k of the :func:`~stepdistill.solvers.lcm_grid`, from the top."""
    if k > original:
        return []
    origin = np.array(lcm_grid(total, original))[::-1]
    idx = np.floor(np.linspace(0, original, num=k, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def _ddim_grids(total: int, k: int):
    """(config, timesteps) of DDIMScheduler's spacings for k steps (its set_timesteps, in numpy)."""
    ratio = total // k
    yield {"timestep_spacing": "trailing"}, [int(t) for t in np.round(np.arange(total, 0, -total / k)) - 1]
    yield {"timestep_spacing": "linspace"}, [int(t) for t in np.linspace(0, total - 1, k).round()[::-1]]
    lead = (np.arange(0, k) * ratio).round()[::-1]
    for offset in range(0, total - int(lead[0])):
        yield {"timestep_spacing": "leading", "steps_offset": offset}, [int(t) + offset for t in lead]


def _match_timesteps(recipe: Recipe, cfg: dict, pipeline):
    """A stock scheduler config that runs exactly ``recipe.timesteps`` (as loaded by ``pipeline``)."""
    target = recipe.timesteps
    k, total = len(target), int(cfg.get("num_train_timesteps", 1000))
    candidates = []  # (class, config, predicted timesteps)
    if recipe.sampler in ("lcm", "tcd"):  # TCDScheduler picks its timesteps as LCMScheduler does
        for original in range(k, total + 1):
            candidates.append((SCHEDULER_CLASS[recipe.sampler], {"original_inference_steps": original},
                               _lcm_grid(total, original, k)))
    if recipe.sampler == "ddim" or k == 1:  # one step of LCM is one DDIM step (x0), up to LCM's tiny c_skip
        candidates += [("DDIMScheduler", c, ts) for c, ts in _ddim_grids(total, k)]
    tried = []
    for cls_name, extra, predicted in candidates:
        if predicted != target:
            continue
        scheduler = _build(cls_name, {**cfg, **extra})
        got = [int(t) for t in student_timesteps(as_loaded(scheduler, pipeline), k, pipeline)]
        if got == target:
            return scheduler
        tried.append(f"{cls_name}({_fmt(extra)}) -> {got} under {_pipeline_name(pipeline)}")
    if recipe.custom_scheduler and recipe.sampler == "lcm":
        return _build("StudentLCMScheduler", {**cfg, "trained_timesteps": target})
    near = min((c for c in candidates if len(c[2]) == k),
               key=lambda c: max(abs(a - b) for a, b in zip(c[2], target)), default=None)
    hint = (f" The nearest stock option is {near[0]}({_fmt(near[1])}), which runs {near[2]}." if near else "")
    if tried:
        hint += " Matching configs change when the pipeline loads them: " + "; ".join(tried) + "."
    custom = (" Or set custom_scheduler=True to export with stepdistill.pipelines.StudentLCMScheduler, which records "
              "the timesteps in its config (the folder then needs stepdistill and trust_remote_code=True to load)."
              if recipe.sampler == "lcm" else "")
    raise ExportError(f"no stock {SCHEDULER_CLASS[recipe.sampler]} config runs the timesteps {target} with "
                      f"num_inference_steps={k}.{hint} Train the student at the timesteps student_timesteps() gives "
                      f"for a stock recipe (e.g. lcm_uniform or ddim_trailing).{custom}")


def _fmt(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def _pipeline_name(pipeline) -> str:
    if pipeline is None:
        return "no pipeline"
    return pipeline if isinstance(pipeline, str) else pipeline.__name__
