"""Denoiser: a backbone, its noise schedule and its prediction type, behind one call."""
from __future__ import annotations

import contextlib
import copy
from typing import Literal

import torch

from . import backbones
from .conditioning import Cond
from .schedule import NoiseSchedule, canonical_prediction_type

# Modules that LoRA adapts by default, per backbone family.
DEFAULT_LORA_TARGETS = {
    "UNet2DModel": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"],
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                             "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                             "upsamplers.0.conv", "time_emb_proj"],
}
_TRANSFORMER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class Denoiser(torch.nn.Module):
    """``denoiser(x_t, t, cond) -> x0`` over any supported Diffusers backbone.

    ``output`` selects the parameterization returned (``sample``/x0, ``epsilon``, ``v_prediction``, ``flow``);
    ``guidance_scale`` applies CFG in the standard form ``uncond + s * (cond - uncond)`` (s = 1: none).
    Every path goes through ``forward`` so that a DDP/FSDP-wrapped Denoiser behaves the same.
    """

    def __init__(self, backbone: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 null_cond: Cond | None = None, null_class: int | None = None):
        super().__init__()
        backbones.family(backbone)
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        if self.prediction_type == "flow" and schedule.kind != "flow":
            raise ValueError("a flow-velocity backbone needs a flow-matching schedule")
        self.null_cond = null_cond
        self.null_class = null_class

    # ------------------------------------------------------------------ calls
    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None, *, output: str = "sample",
                guidance_scale=None, return_features: bool = False):
        cond = cond if cond is not None else Cond()
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        feats = []
        hook = None
        if return_features:
            # joint-attention blocks (SD3, Flux) return (encoder_hidden_states, hidden_states): keep the image stream
            hook = backbones.bottleneck(self.backbone).register_forward_hook(
                lambda _m, _i, out: feats.append(out[-1] if isinstance(out, tuple) else out))
        try:
            raw = self._guided_raw(x_t, t, cond, guidance_scale)
        finally:
            if hook is not None:
                hook.remove()
        pred = self.schedule.convert(raw, x_t.float(), t, self.prediction_type, output)
        if return_features:
            return pred, feats[0]
        return pred

    def _guided_raw(self, x_t, t, cond: Cond, guidance_scale) -> torch.Tensor:
        if guidance_scale is None or (not torch.is_tensor(guidance_scale) and guidance_scale == 1):
            return backbones.call_backbone(self.backbone, x_t, t, cond).float()
        c, u = self.cond_uncond(x_t, t, cond, output=self.prediction_type)
        s = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x_t.device)
        s = s.reshape(-1, *([1] * (x_t.ndim - 1))) if s.ndim > 0 else s
        return cfg(c, u, s)

    def cond_uncond(self, x_t: torch.Tensor, t, cond: Cond | None, null: Cond | None = None, *,
                    output: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and the unconditional prediction, ``(cond_pred, uncond_pred)``, from one network call on
        the concatenated batch ``[x_t; x_t]`` with ``[cond; null]`` — CFG's two passes in one (float32).

        ``null``: the unconditional condition, by default ``cond.null_like`` of this denoiser's null condition (the
        null class, or the encoded empty prompt of a text backbone). ``output``: the parameterization returned
        (``sample``: x0; the prediction type: the backbone's own). CFG (:meth:`forward` with ``guidance_scale``)
        combines the two as ``uncond + s (cond - uncond)``; call it directly only on an unwrapped denoiser (a
        frozen teacher): DDP and FSDP see ``forward`` alone."""
        cond = cond if cond is not None else Cond()
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if null is None:
            if self.null_cond is None and cond.encoder_hidden_states is not None:
                raise ValueError("CFG on a text-conditioned backbone needs the encoded empty prompt: build the "
                                 "Denoiser with null_cond=PromptEncoder.null()")
            null = cond.null_like(self.null_cond, null_class=self.null_class)
        x_both, t_both = torch.cat([x_t, x_t]), torch.cat([t, t])
        both = backbones.call_backbone(self.backbone, x_both, t_both, Cond.cat([cond, null])).float()
        both = self.schedule.convert(both, x_both.float(), t_both, self.prediction_type, output)
        return both.chunk(2)

    def x0(self, x_t, t, cond=None, **kw):
        return self(x_t, t, cond, output="sample", **kw)

    def eps(self, x_t, t, cond=None, **kw):
        return self(x_t, t, cond, output="epsilon", **kw)

    def v(self, x_t, t, cond=None, **kw):
        return self(x_t, t, cond, output="v_prediction", **kw)

    def velocity(self, x_t, t, cond=None, **kw):
        return self(x_t, t, cond, output="flow", **kw)

    # ------------------------------------------------------------------ copies and adapters
    @property
    def family(self) -> str:
        return backbones.family(self.backbone)

    def clone(self, trainable: bool = True, share_weights: bool | Literal["base"] = False) -> "Denoiser":
        """A deep copy (e.g. a student or fake score initialised from the teacher).

        ``trainable``: every weight, or only the adapters of a LoRA denoiser. ``share_weights``: the copy's
        modules hold this denoiser's own parameter and buffer tensors (no memory), e.g. as the frozen base of a
        LoRA network (``clone(False, share_weights=True).with_lora(r)``: LoRA on the shared teacher weights);
        ``"base"``: all but the LoRA adapters, which are copied (an EMA target of a LoRA network).
        The copy is in eval mode: distillation never wants a backbone's own training-time behaviour (DiT drops
        class labels in train mode).
        """
        tensors = [*self.named_parameters(), *self.named_buffers()] if share_weights else []
        memo = {id(t): t for name, t in tensors if share_weights is True or "lora_" not in name}
        other = copy.deepcopy(self, memo)
        lora = other.lora_layers()
        for name, p in other.named_parameters():
            p.requires_grad_(trainable and (not lora or "lora_" in name))
        return other.eval()

    def guidance_embedded(self, dim: int, *, share_weights: bool = False, guidance_range=None) -> "Denoiser":
        """A Denoiser that takes the guidance scale as an input (``Cond(guidance=s)``), holding this one's weights and
        starting as it at every scale (the new embedding is zeroed):

        - a backbone that has one (``time_cond_proj_dim``, Flux ``guidance_embeds``): a copy;
        - UNet2DConditionModel: ``time_cond_proj_dim = dim`` (LCM's ``timestep_cond``, the embedding of w = s - 1 that
          StableDiffusion(XL)Pipeline and LatentConsistencyModelPipeline pass from their ``guidance_scale``);
        - UNet2DModel: :class:`~stepdistill.guided.GuidedUNet2DModel` (the same ``cond_proj`` on its time embedding;
          ClassConditionalPipeline passes it), recording ``guidance_range``;
        - FluxTransformer2DModel: ``guidance_embeds=True`` (FluxPipeline passes ``guidance = s``).

        Other backbones (DiT, PixArt, SD3): a ValueError (AGD's guidance adapters work on DiT and PixArt).
        ``share_weights``: this denoiser's own tensors (no copy; LoRA-enhanced distillation's one copy of the base),
        only the new embedding trainable; otherwise a trainable copy."""
        from .guided import GuidedUNet2DModel

        base = backbones.unwrap(self.backbone)
        fam = self.family
        if base.config.get("time_cond_proj_dim") or base.config.get("guidance_embeds"):
            return self.clone(trainable=not share_weights, share_weights=share_weights)
        if fam == "UNet2DConditionModel":
            cls, extra = type(base), {"time_cond_proj_dim": dim}
        elif fam == "UNet2DModel":
            cls, extra = GuidedUNet2DModel, {"time_cond_proj_dim": dim, "guidance_range": guidance_range}
        elif fam == "FluxTransformer2DModel":
            cls, extra = type(base), {"guidance_embeds": True}
        else:
            raise ValueError(f"a {fam} has no guidance-embedding input (UNet2DConditionModel, UNet2DModel and Flux "
                             "have one); distil its guidance with method agd (guidance adapters) instead")
        config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
        backbone = cls.from_config({**config, **extra})
        dtype = next(base.parameters()).dtype
        backbone = backbone.to(dtype) if dtype != torch.float32 else backbone
        own = dict(base.state_dict())
        missing = set(own) - set(backbone.state_dict())
        if missing:
            raise ValueError(f"the guidance-embedded {cls.__name__} lacks the weights {sorted(missing)[:3]}")
        if share_weights:
            for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
                parent, _, attr = name.rpartition(".")
                module = backbone.get_submodule(parent) if parent else backbone
                (module._parameters if attr in module._parameters else module._buffers)[attr] = tensor
        else:
            backbone.load_state_dict(own, strict=False)
        embedder = (backbone.time_text_embed.guidance_embedder.linear_2 if fam == "FluxTransformer2DModel"
                    else backbone.time_embedding.cond_proj)
        new = [p for n, p in backbone.named_parameters() if n not in own]
        with torch.no_grad():
            for p in embedder.parameters():
                p.zero_()
        backbone.requires_grad_(not share_weights)
        for p in new:
            p.requires_grad_(True)
        return Denoiser(backbone, self.schedule, self.prediction_type, null_cond=self.null_cond,
                        null_class=self.null_class).eval()

    def freeze(self) -> "Denoiser":
        self.requires_grad_(False)
        self.eval()
        return self

    def with_lora(self, rank: int, alpha: float | None = None, target_modules=None,
                  dropout: float = 0.0, adapter_name: str = "default") -> "Denoiser":
        """Attach LoRA adapters in place (peft); the base weights are frozen, the adapters trainable."""
        from peft import LoraConfig, inject_adapter_in_model

        model = backbones.unwrap(self.backbone)
        targets = target_modules or DEFAULT_LORA_TARGETS.get(self.family, _TRANSFORMER_LORA_TARGETS)
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            init_lora_weights="gaussian", target_modules=targets)
        model.requires_grad_(False)
        if hasattr(model, "add_adapter"):
            model.add_adapter(config, adapter_name=adapter_name)
        else:  # UNet2DModel has no PeftAdapterMixin
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        if not self.lora_layers():
            raise ValueError(f"LoRA matched no module of {self.family} with target_modules={targets}")
        return self

    def lora_layers(self) -> list[torch.nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.backbone.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the frozen base (e.g. the teacher of a LoRA student) with every adapter switched off."""
        layers = self.lora_layers()
        trainable = {p: p.requires_grad for p in self.parameters()}
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in trainable.items():  # peft flips requires_grad when toggling adapters
                p.requires_grad_(flag)


def cfg(cond_pred: torch.Tensor, uncond_pred: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance in the standard form: ``uncond + s * (cond - uncond)``; s = 1 is no guidance.

    (LCM writes ``cond + w * (cond - uncond)``: w = s - 1.)
    """
    return uncond_pred + scale * (cond_pred - uncond_pred)
