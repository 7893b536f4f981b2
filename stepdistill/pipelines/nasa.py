"""NASA — Negative-Away Steer Attention (SNOOPI, Nguyen et al. 2024, arXiv 2412.02687, Sec. 5.1, Eqs. 7-9): negative
prompts for one-step students, applied inside their cross-attention layers instead of as CFG on the output.

In every cross-attention layer the image queries attend to the prompt and, with the same projections, to the
negative prompt; the negative's attention output is subtracted:

    Z+ = softmax(Q K+^T / sqrt(d)) V+,   Z- = softmax(Q K-^T / sqrt(d)) V-,   Z_NASA = Z+ - alpha Z-

(``K+ = c+ W_k``, ``V+ = c+ W_v``, ``K- = c- W_k``, ``V- = c- W_v``), then the layer's output projection as usual.
Self-attention layers are left alone. The paper's inference alphas (NASA-I): 0.1 for SD 1.5 students, 0.2 for SD 2.1,
0.5 for PixArt-alpha.

:class:`NASAAttnProcessor` is a Diffusers attention processor: an exported student is a stock pipeline, and NASA is
set on it at inference without ``trust_remote_code`` (the weights are untouched; only the attention processors of
the cross-attention layers change)::

    from diffusers import DiffusionPipeline
    from stepdistill.pipelines import apply_nasa, remove_nasa

    pipe = DiffusionPipeline.from_pretrained("PATH/TO/EXPORT")
    apply_nasa(pipe, "blurry, low quality", alpha=0.1)      # encodes the negative with the pipeline's own encoder
    image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]
    remove_nasa(pipe)                                        # back to plain attention

    # or by hand, with Diffusers' own call (SD-style UNets: the cross-attention layers are the ``attn2``):
    neg = pipe.encode_prompt("blurry", pipe.device, 1, False)[0]
    pipe.unet.set_attn_processor({name: NASAAttnProcessor(neg, 0.1) if ".attn2." in name else proc
                                  for name, proc in pipe.unet.attn_processors.items()})

The negative is given as the pipeline's ``encode_prompt`` returns it; a model that projects its text features before
cross-attention (PixArt's ``caption_projection``) projects the negative the same way (``project``). Training with
NASA (NASA-T) is :mod:`stepdistill.trainers.snoopi`'s.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

PROCESSOR_NOTE = "NASA (Negative-Away Steer Attention)"


def nasa_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, alpha) -> torch.Tensor:
    """``Z_NASA = Z+ - alpha Z-`` (SNOOPI Eq. 9): the attention output for the prompt minus ``alpha`` times the one
    for the negative prompt."""
    return z_pos - alpha * z_neg


def _batch(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``x`` (batch b) for a batch of ``n``: as is, broadcast from one, or repeated (a pipeline's CFG doubles it)."""
    b = x.shape[0]
    if b == n:
        return x
    if b == 1:
        return x.expand(n, *x.shape[1:])
    if n % b == 0:
        return x.repeat(n // b, *([1] * (x.ndim - 1)))
    raise ValueError(f"NASA: the negative {what} has batch {b}, which does not fit the attention batch {n}; give one "
                     "negative, or one per sample")


def _mask_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A 0/1 key mask ``(B, L)`` as the additive bias ``(B, 1, L)`` Diffusers' transformers make of it."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class NASAAttnProcessor:
    """A Diffusers attention processor for cross-attention layers: Negative-Away Steer Attention.

    ``negative``: the negative prompt's text features ``(1 or B, L, D)``, as the pipeline's ``encode_prompt`` gives
    them; ``alpha``: the strength (0: plain attention); ``negative_mask``: its 0/1 token mask ``(1 or B, L)`` for
    masked text encoders (PixArt's T5); ``project``: what the model applies to text features before cross-attention
    (PixArt: its ``caption_projection``; None: nothing). ``base``: the processor used where NASA does not apply —
    self-attention, ``alpha == 0``, no negative (default: Diffusers' ``AttnProcessor2_0``).
    The fields may be changed between calls (training sets a drawn ``alpha`` and per-sample negatives)."""

    def __init__(self, negative: torch.Tensor | None = None, alpha: float = 0.0,
                 negative_mask: torch.Tensor | None = None, project=None, base=None):
        if base is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            base = AttnProcessor2_0()
        self.negative, self.alpha, self.negative_mask, self.project, self.base = (negative, alpha, negative_mask,
                                                                                   project, base)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None or self.negative is None or (not torch.is_tensor(self.alpha)
                                                                      and self.alpha == 0):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        negative = self.negative.to(encoder_hidden_states.device)
        if self.project is not None:
            negative = self.project(negative.to(next(self.project.parameters()).dtype))
        return nasa_attention(attn, hidden_states, encoder_hidden_states, negative.to(encoder_hidden_states.dtype),
                              self.alpha, attention_mask, self.negative_mask, temb)


def nasa_attention(attn, hidden_states, context, negative, alpha, attention_mask=None, negative_mask=None,
                   temb=None) -> torch.Tensor:
    """One cross-attention layer (a Diffusers ``Attention``) with NASA: as Diffusers' ``AttnProcessor2_0`` on
    ``context``, with the attention output replaced by :func:`nasa_combine` of the prompt's and the negative's
    (``softmax(Q K^T * attn.scale) V`` each, the same query and projections)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    head_dim = query.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)

    def attend(text, mask):
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key = attn.to_k(text).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = attn.to_v(text).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, text.shape[1], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                              scale=attn.scale)

    negative = _batch(negative, batch, "prompt")
    neg_bias = None if negative_mask is None else _batch(_mask_bias(negative_mask.to(query.device), query.dtype),
                                                         batch, "mask")
    z = nasa_combine(attend(context, attention_mask), attend(negative, neg_bias), alpha)
    hidden_states = z.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------- setting it
def _model(target):
    """The denoiser of a pipeline (its ``unet`` or ``transformer``), or the model itself."""
    for name in ("unet", "transformer"):
        model = getattr(target, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    return target


def cross_attention_layers(model) -> dict[str, torch.nn.Module]:
    """The cross-attention layers (Diffusers ``Attention`` with ``is_cross_attention``) of a model or pipeline, by
    name; empty for a backbone that is not text-conditioned through cross-attention (class-conditional UNets;
    SD3 / Flux joint attention)."""
    return {name: m for name, m in _model(model).named_modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "processor")}


def text_projection(model):
    """What ``model`` applies to its text features before cross-attention (PixArt's ``caption_projection``, a UNet's
    ``encoder_hid_proj``), or None."""
    model = _model(model)
    for name in ("caption_projection", "encoder_hid_proj"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def set_nasa(model, negative: torch.Tensor | None = None, alpha: float = 0.0,
             negative_mask: torch.Tensor | None = None) -> list[NASAAttnProcessor]:
    """Put a :class:`NASAAttnProcessor` on every cross-attention layer of ``model`` (a UNet2DConditionModel or PixArt
    transformer, or a pipeline holding one), over the processor each layer has; returns them (one per layer). Set
    again, it updates the existing ones. A model without cross-attention: a ValueError."""
    layers = cross_attention_layers(model)
    if not layers:
        raise ValueError(f"NASA steers cross-attention layers, and this {type(_model(model)).__name__} has none (it is "
                         "not text-conditioned through cross-attention); negative prompts through NASA need a "
                         "UNet2DConditionModel (SD 1.5 / 2.1 / XL) or a PixArt transformer")
    project = text_projection(model)
    out = []
    for layer in layers.values():
        proc = layer.processor
        if not isinstance(proc, NASAAttnProcessor):
            proc = NASAAttnProcessor(base=proc)
            layer.set_processor(proc)
        proc.negative, proc.alpha, proc.negative_mask, proc.project = negative, alpha, negative_mask, project
        out.append(proc)
    return out


def remove_nasa(model) -> None:
    """Give every cross-attention layer of ``model`` back the processor it had before :func:`set_nasa`."""
    for layer in cross_attention_layers(model).values():
        if isinstance(layer.processor, NASAAttnProcessor):
            layer.set_processor(layer.processor.base)


def apply_nasa(pipe, negative_prompt: str, alpha: float) -> list[NASAAttnProcessor]:
    """NASA-I on a text-to-image pipeline: encode ``negative_prompt`` with the pipeline's own ``encode_prompt`` and
    :func:`set_nasa` it at ``alpha`` (SNOOPI: 0.1 for SD 1.5 students, 0.2 for SD 2.1, 0.5 for PixArt-alpha).
    Call with ``guidance_scale=1.0``: NASA replaces negative-prompt CFG in one-step students."""
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string, not {type(negative_prompt).__name__}")
    if not cross_attention_layers(pipe):
        set_nasa(pipe)  # the clear error
    params = inspect.signature(pipe.encode_prompt).parameters
    device = getattr(pipe, "_execution_device", None) or pipe.device
    with torch.no_grad():
        if "clean_caption" in params:  # PixArt: (embeds, mask, negative embeds, negative mask)
            embeds, mask = pipe.encode_prompt(negative_prompt, do_classifier_free_guidance=False,
                                              num_images_per_prompt=1, device=device, clean_caption=False)[:2]
        else:  # SD / SDXL: the first output is the prompt's text features
            embeds, mask = pipe.encode_prompt(prompt=negative_prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)[0], None
    return set_nasa(pipe, embeds, float(alpha), mask)
