"""NASA (Negative-Away Steer Attention, SNOOPI Eqs. 7-9) as a Diffusers attention processor: its output against a
hand computation, plain attention where it does not apply, the layers it is set on, and the inference helper on a
stock pipeline."""
from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention

from stepdistill.pipelines import NASAAttnProcessor, apply_nasa, cross_attention_layers, remove_nasa, set_nasa
from stepdistill.pipelines.nasa import nasa_combine
from text_teachers import LATENT, UNET

HEADS, HEAD_DIM, QUERY_DIM, TEXT_DIM = 2, 4, 8, 6


def cross_attention(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=QUERY_DIM, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()


def by_hand(attn, h, context, negative, alpha, neg_keep=None):
    """softmax(Q K^T / sqrt(d)) V per head for the prompt and the negative, Z+ - alpha Z-, then W_o Z + b_o."""
    def heads(x):  # (B, N, H*d) -> (B, H, N, d)
        return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)

    q = heads(h @ attn.to_q.weight.T)

    def attend(c, keep=None):
        k, v = heads(c @ attn.to_k.weight.T), heads(c @ attn.to_v.weight.T)
        scores = q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    z = attend(context) - alpha * attend(negative.expand(h.shape[0], -1, -1), neg_keep)
    z = z.transpose(1, 2).reshape(h.shape[0], -1, HEADS * HEAD_DIM)
    return z @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_nasa_output_is_z_plus_minus_alpha_z_minus_by_hand():
    attn = cross_attention()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, QUERY_DIM, generator=g)
    context, negative = torch.randn(2, 3, TEXT_DIM, generator=g), torch.randn(1, 4, TEXT_DIM, generator=g)
    attn.set_processor(NASAAttnProcessor(negative, alpha=0.3))
    with torch.no_grad():
        out = attn(h, encoder_hidden_states=context)
        torch.testing.assert_close(out, by_hand(attn, h, context, negative, 0.3), rtol=1e-5, atol=1e-6)
        # a masked negative (PixArt's T5 padding): its masked tokens take no attention
        keep = torch.tensor([[True, True, False, False]])
        attn.processor.negative_mask = keep.long()
        torch.testing.assert_close(attn(h, encoder_hidden_states=context),
                                   by_hand(attn, h, context, negative, 0.3, keep.expand(2, -1)), rtol=1e-5, atol=1e-6)
    assert torch.equal(nasa_combine(torch.ones(2), torch.full((2,), 2.0), 0.25), torch.full((2,), 0.5))


def test_alpha_zero_no_negative_and_self_attention_are_plain_attention_bit_for_bit():
    attn = cross_attention()
    h, context, negative = torch.randn(2, 5, QUERY_DIM), torch.randn(2, 3, TEXT_DIM), torch.randn(1, 4, TEXT_DIM)
    with torch.no_grad():
        plain = attn(h, encoder_hidden_states=context)
        for proc in (NASAAttnProcessor(negative, alpha=0.0), NASAAttnProcessor(None, alpha=0.5)):
            attn.set_processor(proc)
            assert torch.equal(attn(h, encoder_hidden_states=context), plain)
        torch.manual_seed(2)
        self_attn = Attention(query_dim=QUERY_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()
        plain_self = self_attn(h)
        self_attn.set_processor(NASAAttnProcessor(torch.randn(1, 4, QUERY_DIM), alpha=0.5))
        assert torch.equal(self_attn(h), plain_self)  # no encoder states: NASA does not apply


def test_set_nasa_puts_it_on_cross_attention_only_and_remove_nasa_restores_the_processors():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=32, **UNET).eval()
    before = dict(unet.attn_processors)
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([500, 900])
    text, negative = torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = unet(x, t, text).sample
        procs = set_nasa(unet, negative, 0.5)
        assert len(procs) == len(cross_attention_layers(unet)) > 0
        assert {n for n, p in unet.attn_processors.items() if isinstance(p, NASAAttnProcessor)} == \
            {n for n in before if ".attn2." in n}
        steered = unet(x, t, text).sample
        assert (steered - plain).abs().max() > 1e-4
        assert set_nasa(unet, negative, 0.0) == procs  # set again: the same processors, updated
        assert torch.equal(unet(x, t, text).sample, plain)
        remove_nasa(unet)
        assert all(type(p) is type(before[n]) for n, p in unet.attn_processors.items())
        assert torch.equal(unet(x, t, text).sample, plain)


def test_a_backbone_without_cross_attention_is_a_clear_error():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       norm_num_groups=8)
    with pytest.raises(ValueError, match="UNet2DModel has none"):
        set_nasa(unet, torch.randn(1, 3, 8), 0.5)


def test_pixart_negative_goes_through_the_caption_projection_with_its_mask():
    torch.manual_seed(3)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=8,
                                     caption_channels=32).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0])
    text, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    negative, neg_mask = torch.randn(1, 6, 32), torch.tensor([[1, 1, 1, 0, 0, 0]])
    added = {"resolution": None, "aspect_ratio": None}

    def run():
        return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs=added).sample

    with torch.no_grad():
        plain = run()
        procs = set_nasa(model, negative, 0.5, neg_mask)
        assert procs[0].project is model.caption_projection and len(procs) == 2
        steered = run()
        neg_changed = negative.clone()
        neg_changed[:, 3:] = 100.0  # masked-out tokens of the negative do not matter
        set_nasa(model, neg_changed, 0.5, neg_mask)
        torch.testing.assert_close(run(), steered, rtol=1e-5, atol=1e-5)
        remove_nasa(model)
        assert torch.equal(run(), plain) and (steered - plain).abs().max() > 1e-4


def test_apply_nasa_on_a_stock_pipeline(assets):
    root, folders = assets
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"])
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))

    def sample():
        return pipe("a cat", num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent").images

    plain = sample()
    procs = apply_nasa(pipe, "a big dog", alpha=0.5)
    negative = pipe.encode_prompt("a big dog", "cpu", 1, False)[0]
    assert all(torch.equal(p.negative, negative) and p.alpha == 0.5 for p in procs)
    steered = sample()
    remove_nasa(pipe)
    assert torch.equal(sample(), plain) and (steered - plain).abs().max() > 1e-5
    with pytest.raises(ValueError, match="must be a string"):
        apply_nasa(pipe, ["a", "b"], 0.5)
