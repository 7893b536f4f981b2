"""Call adapters: one small function per Diffusers backbone family.

Each adapter maps ``(model, x_t, t, cond)`` to the backbone's raw output, shaped like ``x_t``. ``t`` is
the backbone timestep (a float tensor of shape [B]); ``cond`` is a :class:`~stepdistill.conditioning.Cond`.
``model`` may be wrapped (DDP/FSDP); the family is read from the unwrapped module.
"""
from __future__ import annotations

import torch

from .conditioning import Cond


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """LCM's sinusoidal embedding of ``w * 1000`` (w is LCM's guidance, w = s - 1 in standard CFG form)."""
    w = w.to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def _require(cond: Cond, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(cond, f) is None]
    if missing:
        raise ValueError(f"{name} needs " + ", ".join(f"Cond({f}=...)" for f in missing))


def _with_source(x: torch.Tensor, cond: Cond) -> torch.Tensor:
    return x if cond.image is None else torch.cat([x, cond.image.to(x.dtype)], dim=1)


def _first_channels(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # DiT/PixArt with learned sigma predict [eps, variance]; keep the prediction.
    return out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else out


def _guidance_input(model, x, cond: Cond) -> dict:
    """``timestep_cond`` for a backbone that takes the guidance scale (``config.time_cond_proj_dim``: LCM-style
    UNets, stepdistill's GuidedUNet2DModel, AGD guidance adapters): LCM's embedding of ``w = s - 1``, as Diffusers'
    pipelines compute it from their ``guidance_scale``."""
    dim = unwrap(model).config.get("time_cond_proj_dim")
    if not dim:
        return {}
    if cond.guidance is None:
        raise ValueError("this backbone takes the guidance scale (time_cond_proj_dim); pass Cond(guidance=scale)")
    return {"timestep_cond": guidance_scale_embedding(cond.guidance - 1, dim, x.dtype)}


def unet2d(model, x, t, cond: Cond):
    return model(_with_source(x, cond), t, class_labels=cond.class_labels, return_dict=False,
                 **_guidance_input(model, x, cond))[0]


def unet2d_condition(model, x, t, cond: Cond):
    config = unwrap(model).config
    blocks = [*config.down_block_types, *config.up_block_types, config.get("mid_block_type") or ""]
    if any("CrossAttn" in b for b in blocks):
        _require(cond, "a cross-attention UNet2DConditionModel", "encoder_hidden_states")
    kwargs = _guidance_input(model, x, cond)
    if config.get("addition_embed_type") == "text_time":
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("an SDXL-style UNet needs Cond(pooled=..., time_ids=...) (added_cond_kwargs)")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return model(_with_source(x, cond), t, encoder_hidden_states=cond.encoder_hidden_states,
                 encoder_attention_mask=cond.encoder_attention_mask, class_labels=cond.class_labels,
                 return_dict=False, **kwargs)[0]


def dit(model, x, t, cond: Cond):
    _require(cond, "DiTTransformer2DModel", "class_labels")
    return _first_channels(model(x, timestep=t, class_labels=cond.class_labels, return_dict=False,
                                 **_guidance_input(model, x, cond))[0], x)


def pixart(model, x, t, cond: Cond):
    _require(cond, "PixArtTransformer2DModel", "encoder_hidden_states")
    added = {"resolution": cond.extra.get("resolution"), "aspect_ratio": cond.extra.get("aspect_ratio")}
    out = model(x, encoder_hidden_states=cond.encoder_hidden_states, timestep=t, added_cond_kwargs=added,
                encoder_attention_mask=cond.encoder_attention_mask, return_dict=False,
                **_guidance_input(model, x, cond))[0]
    return _first_channels(out, x)


def sd3(model, x, t, cond: Cond):
    _require(cond, "SD3Transformer2DModel", "encoder_hidden_states", "pooled")
    return model(hidden_states=x, encoder_hidden_states=cond.encoder_hidden_states,
                 pooled_projections=cond.pooled, timestep=t, return_dict=False)[0]


def flux(model, x, t, cond: Cond):
    """Flux takes 2x2-packed latents, position ids and ``timestep / 1000`` (as FluxPipeline does)."""
    _require(cond, "FluxTransformer2DModel", "encoder_hidden_states", "pooled")
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
    img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
    txt_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = None
    if unwrap(model).config.get("guidance_embeds"):
        if cond.guidance is None:
            raise ValueError("this Flux transformer is guidance-distilled (guidance_embeds); pass Cond(guidance=scale)")
        guidance = cond.guidance.to(x.dtype)
    out = model(hidden_states=packed, encoder_hidden_states=cond.encoder_hidden_states,
                pooled_projections=cond.pooled, timestep=t.to(x.dtype) / 1000, img_ids=img_ids.reshape(-1, 3),
                txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


ADAPTERS = {
    "UNet2DModel": unet2d,
    "UNet2DConditionModel": unet2d_condition,
    "DiTTransformer2DModel": dit,
    "PixArtTransformer2DModel": pixart,
    "SD3Transformer2DModel": sd3,
    "FluxTransformer2DModel": flux,
}


#: stepdistill's own backbone classes and the family whose call adapter, pipelines and LoRA targets they share
FAMILY_OF = {"GuidedUNet2DModel": "UNet2DModel"}


def family(model: torch.nn.Module) -> str:
    name = type(unwrap(model)).__name__
    name = FAMILY_OF.get(name, name)
    if name not in ADAPTERS:
        raise TypeError(f"unsupported backbone {name}; stepdistill supports {sorted(ADAPTERS)}")
    return name


def call_backbone(model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return ADAPTERS[family(model)](model, x, t, cond)


def in_channels(model) -> int:
    """Channels of the noisy input (excluding concatenated source-image channels, which callers add)."""
    if family(model) == "FluxTransformer2DModel":  # config counts the 2x2-packed channels
        return unwrap(model).config.in_channels // 4
    return unwrap(model).config.in_channels


def sample_size(model) -> int | None:
    size = unwrap(model).config.get("sample_size")
    return size[0] if isinstance(size, (list, tuple)) else size


def bottleneck(model) -> torch.nn.Module:
    """The module whose output is the backbone's bottleneck features (for discriminator heads)."""
    inner = unwrap(model)
    if hasattr(inner, "mid_block") and inner.mid_block is not None:
        return inner.mid_block
    blocks = getattr(inner, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return blocks[len(blocks) // 2]
    raise TypeError(f"no bottleneck known for {type(inner).__name__}")
