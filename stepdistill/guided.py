"""Backbones that take the guidance scale as an input: one network call per step instead of CFG's two.

The guidance scale ``s`` (standard CFG form, ``uncond + s (cond - uncond)``, s = 1 no guidance) reaches a network as
``timestep_cond``, LCM's sinusoidal embedding of ``w = s - 1`` (:func:`stepdistill.backbones.guidance_scale_embedding`:
the vector ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and ``LatentConsistencyModelPipeline`` compute
when ``unet.config.time_cond_proj_dim`` is set, and then skip CFG). The conversion s -> w is made in that one place.

- :class:`GuidedUNet2DModel`: Diffusers' ``UNet2DModel`` (the class-conditional digits UNet) with the guidance
  embedding UNet2DConditionModel has: ``time_embedding.cond_proj``, a linear map of ``timestep_cond``
  (``time_cond_proj_dim`` wide) added to the sinusoidal timestep features before the time MLP, so that it reaches every
  ResNet block with the time and class embeddings. Guidance distillation zero-initialises it (the student starts as
  the teacher). ``ClassConditionalPipeline`` passes ``timestep_cond`` from its ``guidance_scale``, one call per step.
- Guidance adapters (AGD, Jensen et al., cristianpjensen/agd ``agd/models/attention.py``, ``--arch attention``):
  small modules on the outputs of a frozen base's attention layers, conditioned on the guidance scale. Each adapter
  attends from the layer's input tokens (``q``) to condition tokens — the guidance scale (and, with ``use_timestep``,
  the timestep) through an MLP and LayerNorm, plus a sinusoidal position code — and adds ``out_proj(attention)`` to
  the layer's output; ``out_proj`` starts at zero, so the adapted network starts as the base exactly. Targets: the
  cross-attention layers (``attn2``) of a UNet2DConditionModel (as agd), every attention layer of a UNet2DModel, the
  self-attention (``attn1``) of DiT, the cross-attention of PixArt. The base's weights and module names are untouched
  (an adapter is a child ``guidance_adapter`` of its attention module, run by a forward hook), so the adapters save
  as a small file of their own (:func:`save_guidance_adapters`) and load onto the base or any fine-tune of the same
  architecture (:func:`load_guidance_adapters`); a base of another architecture is refused with the reason.
"""
from __future__ import annotations

import fnmatch
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from .backbones import family, guidance_scale_embedding, unwrap

ADAPTER_FILE = "guidance_adapters.safetensors"
ADAPTER_META_KEY = "stepdistill_guidance_adapters"
#: attention modules that get an adapter, per backbone family (fnmatch patterns on the module's name)
ADAPTER_TARGETS = {
    "UNet2DConditionModel": ("*.attn2",),
    "UNet2DModel": ("*attentions.*",),
    "DiTTransformer2DModel": ("*.attn1",),
    "PixArtTransformer2DModel": ("*.attn2",),
}


# ------------------------------------------------------------------------------------------------ the digits UNet
#: stepdistill's own model classes, by the ``_class_name`` their config.json records (built on first use, so that
#: ``import stepdistill`` does not import Diffusers)
MODEL_CLASSES = ("GuidedUNet2DModel",)


def _guided_unet_class():
    from diffusers import UNet2DModel
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.embeddings import TimestepEmbedding

    def init(self, time_cond_proj_dim: int = 256, guidance_range=None, **unet_config):
        UNet2DModel.__init__(self, **unet_config)
        emb = self.time_embedding
        if not isinstance(emb, TimestepEmbedding):
            raise ValueError(f"a guidance embedding needs a TimestepEmbedding time MLP; time_embedding_type="
                             f"{self.config.time_embedding_type!r} has {type(emb).__name__}")
        emb.cond_proj = torch.nn.Linear(time_cond_proj_dim, emb.linear_1.in_features, bias=False)

    # the config keys: UNet2DModel's (read from its signature, so any Diffusers version's) and the embedding's two
    init.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in
           inspect.signature(UNet2DModel.__init__).parameters.items() if name != "self"]
        + [inspect.Parameter("time_cond_proj_dim", inspect.Parameter.KEYWORD_ONLY, default=256),
           inspect.Parameter("guidance_range", inspect.Parameter.KEYWORD_ONLY, default=None)])

    def forward(self, sample, timestep, class_labels=None, timestep_cond=None, return_dict: bool = True):
        if timestep_cond is None:
            raise ValueError("GuidedUNet2DModel takes the guidance scale: pass timestep_cond="
                             "guidance_scale_embedding(s - 1, time_cond_proj_dim) (Cond(guidance=s) in stepdistill)")

        def give(module, args, kwargs):
            return args, {**kwargs, "condition": timestep_cond.to(args[0].dtype)}

        handle = self.time_embedding.register_forward_pre_hook(give, with_kwargs=True)
        try:
            return UNet2DModel.forward(self, sample, timestep, class_labels, return_dict=return_dict)
        finally:
            handle.remove()

    doc = ("``UNet2DModel`` + a guidance embedding: ``unet(x, t, class_labels, timestep_cond=emb)`` with ``emb = "
           "guidance_scale_embedding(s - 1, time_cond_proj_dim)`` added (through ``time_embedding.cond_proj``) to the "
           "timestep features. ``guidance_range``: the scales it was trained for (ClassConditionalPipeline warns "
           "outside them).")
    return type("GuidedUNet2DModel", (UNet2DModel,), {"__init__": register_to_config(init), "forward": forward,
                                                       "__doc__": doc, "__module__": __name__})


def __getattr__(name: str):
    if name == "GuidedUNet2DModel":
        cls = globals()[name] = _guided_unet_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_class(name: str):
    """stepdistill's own model class of that ``_class_name`` (None for another name)."""
    return __getattr__(name) if name in MODEL_CLASSES else None


# ------------------------------------------------------------------------------------------------ AGD adapters
class GuidanceAdapter(torch.nn.Module):
    """agd's attention adapter: ``delta = out_proj(attn(q_proj(x), k_proj(e), v_proj(e)))`` with condition tokens
    ``e = [LN(MLP(emb_s)); LN(MLP(emb_t))] + pos`` (the timestep token with ``use_timestep``), ``emb`` the
    sinusoidal features of ``w = s - 1`` (and of t), scale ``1/sqrt(hidden_dim)``, ``out_proj`` zero-initialised."""

    def __init__(self, channels: int, hidden_dim: int = 320, embed_dim: int = 256, num_heads: int = 1,
                 mlp_ratio: float = 4.0, use_timestep: bool = False):
        super().__init__()
        if hidden_dim % num_heads or hidden_dim % 2:
            raise ValueError(f"hidden_dim={hidden_dim} must be even and divisible by num_heads={num_heads}")
        self.num_heads, self.hidden_dim = num_heads, hidden_dim
        self.q_proj = torch.nn.Linear(channels, hidden_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.v_proj = torch.nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.out_proj = torch.nn.Linear(hidden_dim, channels)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            torch.nn.init.xavier_uniform_(lin.weight)
        torch.nn.init.zeros_(self.out_proj.weight)
        torch.nn.init.zeros_(self.out_proj.bias)
        self.guidance_encoder = _encoder(embed_dim, hidden_dim, mlp_ratio)
        self.timestep_encoder = _encoder(embed_dim, hidden_dim, mlp_ratio) if use_timestep else None
        self.condition = None  # (guidance features, timestep features or None), set by the backbone's pre-hook

    def forward(self, x: torch.Tensor, guidance_features: torch.Tensor,
                timestep_features: torch.Tensor | None = None) -> torch.Tensor:
        spatial = x.ndim == 4
        tokens_in = x.flatten(2).transpose(1, 2) if spatial else x  # (B, T, C)
        dtype = self.q_proj.weight.dtype
        cond = [self.guidance_encoder(guidance_features.to(dtype))]
        if self.timestep_encoder is not None:
            cond.append(self.timestep_encoder(timestep_features.to(dtype)))
        e = torch.stack(cond, dim=1)
        e = e + _positions(e.shape[1], self.hidden_dim, e.device, e.dtype)
        b, heads = x.shape[0], self.num_heads
        q = self.q_proj(tokens_in.to(dtype)).view(b, -1, heads, self.hidden_dim // heads).transpose(1, 2)
        k = self.k_proj(e).view(b, -1, heads, self.hidden_dim // heads).transpose(1, 2)
        v = self.v_proj(e).view(b, -1, heads, self.hidden_dim // heads).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.hidden_dim))
        out = self.out_proj(att.transpose(1, 2).reshape(b, -1, self.hidden_dim)).to(x.dtype)
        return out.transpose(1, 2).reshape(x.shape) if spatial else out


def _encoder(embed_dim: int, hidden_dim: int, ratio: float) -> torch.nn.Module:
    inner = int(hidden_dim * ratio)
    return torch.nn.Sequential(torch.nn.Linear(embed_dim, inner), torch.nn.ReLU(), torch.nn.Linear(inner, hidden_dim),
                               torch.nn.LayerNorm(hidden_dim))


def _positions(n: int, dim: int, device, dtype) -> torch.Tensor:
    """The transformer sinusoidal position code of ``n`` tokens (agd's PositionalEncoding)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    return torch.cat([torch.sin(pos * div), torch.cos(pos * div)], dim=-1).to(dtype)


def _add_adapter(module, args, kwargs, output):
    """Forward hook of an adapted attention module: its output plus its adapter's (nothing while adapters are off)."""
    adapter = module.guidance_adapter
    if adapter.condition is None:
        return output
    x = args[0] if args else kwargs["hidden_states"]
    delta = adapter(x, *adapter.condition)
    if isinstance(output, tuple):
        return (output[0] + delta, *output[1:])
    return output + delta


def _take_guidance(backbone, args, kwargs):
    """Forward pre-hook of an adapted backbone: take ``timestep_cond`` (the pipelines' embedding of w = s - 1) out of
    the call (the base has no input for it) and hand it to every adapter; without it, the default scale
    (``load_guidance_adapters(..., guidance_scale=s)``, for pipelines that pass none, e.g. DiTPipeline), else the
    adapters are off (the base exactly)."""
    emb = kwargs.pop("timestep_cond", None)
    settings = backbone.guidance_adapter_config
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if emb is None and settings.get("default_guidance_scale") is not None:
        s = torch.full((x.shape[0],), float(settings["default_guidance_scale"]), device=x.device)
        emb = guidance_scale_embedding(s - 1, settings["embed_dim"])
    condition = None
    if emb is not None:
        t_feat = None
        if settings["use_timestep"]:
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            t_feat = guidance_scale_embedding(t / 1000.0, settings["embed_dim"])
        condition = (emb, t_feat)
    for m in backbone.modules():
        if isinstance(m, GuidanceAdapter):
            m.condition = condition
    return args, kwargs


def adapter_targets(backbone, patterns=None) -> dict[str, int]:
    """The attention modules an adapter goes on (name -> input channels), by the family's patterns or ``patterns``."""
    from diffusers.models.attention_processor import Attention

    model = unwrap(backbone)
    fam = family(model)
    if patterns is None:
        if fam not in ADAPTER_TARGETS:
            raise ValueError(f"guidance adapters support {sorted(ADAPTER_TARGETS)}, not {fam}")
        patterns = ADAPTER_TARGETS[fam]
    found = {name: m.to_q.in_features for name, m in model.named_modules()
             if isinstance(m, Attention) and any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    if not found:
        raise ValueError(f"no attention module of this {fam} matches {list(patterns)}: it has none to adapt")
    return found


def install_guidance_adapters(backbone, *, hidden_dim: int = 320, embed_dim: int = 256, num_heads: int = 1,
                              mlp_ratio: float = 4.0, use_timestep: bool = False, targets=None,
                              guidance_range=None, default_guidance_scale: float | None = None) -> dict[str, int]:
    """Put a zero-initialised :class:`GuidanceAdapter` on each target attention module of ``backbone`` (in place; the
    base's weights and names unchanged) and set ``config.time_cond_proj_dim = embed_dim`` so that pipelines pass the
    guidance embedding (one call per step). ``targets``: fnmatch patterns, or a dict name -> channels (exact modules,
    checked). Returns the adapted modules (name -> channels)."""
    model = unwrap(backbone)
    if hasattr(model, "guidance_adapter_config"):
        raise ValueError("this backbone already has guidance adapters")
    if model.config.get("time_cond_proj_dim"):
        raise ValueError("this backbone already takes the guidance scale (time_cond_proj_dim): it needs no adapters")
    if isinstance(targets, dict):
        have = adapter_targets(model, ["*"])
        bad = {n: c for n, c in targets.items() if have.get(n) != c}
        if bad:
            name, channels = next(iter(bad.items()))
            raise ValueError(f"the guidance adapters do not fit this {family(model)}: they were trained on attention "
                             f"module {name!r} with {channels} channels, which it "
                             + ("does not have" if name not in have else f"has with {have[name]}")
                             + f" ({len(bad)} of {len(targets)} modules differ); load them onto the base they were "
                             "trained on, or a fine-tune of the same architecture")
        found = dict(targets)
    else:
        found = adapter_targets(model, targets)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for name, channels in found.items():
        module = model.get_submodule(name)
        module.guidance_adapter = GuidanceAdapter(channels, hidden_dim, embed_dim, num_heads, mlp_ratio,
                                                  use_timestep).to(device=device, dtype=dtype)
        module.register_forward_hook(_add_adapter, with_kwargs=True)
    model.guidance_adapter_config = {
        "family": family(model), "targets": found, "hidden_dim": hidden_dim, "embed_dim": embed_dim,
        "num_heads": num_heads, "mlp_ratio": mlp_ratio, "use_timestep": use_timestep,
        "guidance_range": list(guidance_range) if guidance_range is not None else None,
        "default_guidance_scale": default_guidance_scale}
    model.register_forward_pre_hook(_take_guidance, with_kwargs=True)
    model.register_to_config(time_cond_proj_dim=embed_dim)
    return found


def has_guidance_adapters(backbone) -> bool:
    return hasattr(unwrap(backbone), "guidance_adapter_config")


def adapter_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The adapters' tensors (keys ``<attention module>.guidance_adapter.<...>``)."""
    return {k: v for k, v in unwrap(backbone).state_dict().items() if ".guidance_adapter." in k}


def base_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The base's tensors, under the names a plain model of its class has."""
    return {k: v for k, v in unwrap(backbone).state_dict().items() if ".guidance_adapter." not in k}


def base_config(backbone) -> dict:
    """The base's config (without the guidance embedding width the adapters registered)."""
    model = unwrap(backbone)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    if has_guidance_adapters(model):
        config["time_cond_proj_dim"] = None
        if family(model) != "UNet2DConditionModel":
            config.pop("time_cond_proj_dim")
    return config


def adapter_fraction(backbone) -> dict:
    """Parameter counts: the adapters', the base's, and the adapters as a fraction of the base."""
    adapters = sum(v.numel() for v in adapter_state_dict(backbone).values())
    base = sum(p.numel() for n, p in unwrap(backbone).named_parameters() if ".guidance_adapter." not in n)
    return {"adapter_parameters": adapters, "base_parameters": base, "fraction": adapters / max(base, 1)}


def save_guidance_adapters(backbone, path, **meta) -> Path:
    """Write the adapters of ``backbone`` as one safetensors file (their settings, targets and ``meta`` — e.g. the
    trained guidance range — in its metadata under ``stepdistill_guidance_adapters``)."""
    from safetensors.torch import save_file

    model = unwrap(backbone)
    settings = {**model.guidance_adapter_config, **adapter_fraction(model), **meta}
    path = Path(path)
    path = path / ADAPTER_FILE if path.suffix != ".safetensors" else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(path), metadata={"format": "pt", ADAPTER_META_KEY: json.dumps(settings, sort_keys=True)})
    return path


def read_guidance_adapters(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    path = path / ADAPTER_FILE if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no guidance adapters at {path} (a {ADAPTER_FILE} written by stepdistill's AGD)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if ADAPTER_META_KEY not in meta:
        raise ValueError(f"{path} has no {ADAPTER_META_KEY} metadata: it was not written by save_guidance_adapters")
    return state, json.loads(meta[ADAPTER_META_KEY])


def load_guidance_adapters(target, path, *, guidance_scale: float | None = None):
    """Load AGD guidance adapters onto ``target`` — a pipeline (its ``unet`` or ``transformer``) or a backbone —
    from an export folder or the adapter file; returns ``target``. The base must be the architecture they were trained
    on (the same attention modules and widths: the base itself or a fine-tune of it); anything else is a ValueError
    naming the difference. Afterwards the pipeline's ``guidance_scale`` drives the adapters with one network call per
    step (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``ClassConditionalPipeline``); for pipelines
    that pass no guidance input (``DiTPipeline``: call it with ``guidance_scale=1``) the adapters run at
    ``guidance_scale`` (default: the scale the export recorded)."""
    state, settings = read_guidance_adapters(path)
    backbone = getattr(target, "unet", None) or getattr(target, "transformer", None) or target
    model = unwrap(backbone)
    fam = family(model)
    if fam != settings["family"]:
        raise ValueError(f"these guidance adapters were trained on a {settings['family']}; this pipeline's denoiser is "
                         f"a {fam}: load them onto the base they were trained on (or a fine-tune of it)")
    default = guidance_scale if guidance_scale is not None else settings.get("default_guidance_scale")
    install_guidance_adapters(model, hidden_dim=settings["hidden_dim"], embed_dim=settings["embed_dim"],
                              num_heads=settings["num_heads"], mlp_ratio=settings["mlp_ratio"],
                              use_timestep=settings["use_timestep"], targets=settings["targets"],
                              guidance_range=settings.get("guidance_range"), default_guidance_scale=default)
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        raise ValueError(f"{path}: adapter tensors {sorted(set(state) ^ expected)[:4]} do not match the adapters "
                         "its settings describe")
    model.load_state_dict(state, strict=False)
    return target


def guidance_range_of(backbone) -> list[float] | None:
    """The guidance scales a guidance-embedded backbone was trained for, where it records them."""
    model = unwrap(backbone)
    if has_guidance_adapters(model):
        return model.guidance_adapter_config.get("guidance_range")
    value = model.config.get("guidance_range")
    return list(value) if value is not None else None
