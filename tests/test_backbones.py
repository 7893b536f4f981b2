"""Call adapters and the Denoiser over tiny Diffusers backbones built from configs (CPU, well under 1 s each).

Each family is checked against a direct call of the Diffusers model with the arguments its pipeline uses, so
that the adapter is the only place that knows a backbone's call signature.
"""
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from stepdistill import Cond, Denoiser, NoiseSchedule, cfg
from stepdistill import backbones

B = 2
TXT_LEN, TXT_DIM = 5, 8
NUM_CLASSES = 10  # the null class (CFG) is id 10


def _vp():
    return NoiseSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012))


def _flow():
    return NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))


def _g(seed):
    return torch.Generator().manual_seed(seed)


@dataclass
class Case:
    model: torch.nn.Module
    schedule: NoiseSchedule
    prediction_type: str
    x: torch.Tensor
    t: torch.Tensor
    cond: Cond
    null_class: int | None = None
    null_cond: Cond | None = None
    direct: object = None  # (model, x, t, cond) -> the raw output as the family's pipeline would get it
    conditional: bool = True
    kwargs: dict = field(default_factory=dict)

    def denoiser(self):
        null = self.null_cond
        if null is None and self.cond.encoder_hidden_states is not None:  # an "empty prompt" of zeros
            null = Cond(encoder_hidden_states=torch.zeros_like(self.cond.encoder_hidden_states[:1]))
        return Denoiser(self.model, self.schedule, self.prediction_type, null_cond=null,
                        null_class=self.null_class)


def _unet_small(**kw):
    return dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, **kw)


def _txt(seed=10, batch=B):
    return torch.randn(batch, TXT_LEN, TXT_DIM, generator=_g(seed))


def build(name: str) -> Case:
    torch.manual_seed(0)
    t_vp = torch.tensor([30.0, 700.0])
    t_flow = torch.tensor([250.0, 875.0])
    x4 = torch.randn(B, 4, 8, 8, generator=_g(1))
    if name == "unet2d":
        model = UNet2DModel(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, **_unet_small())
        return Case(model, _vp(), "epsilon", torch.randn(B, 3, 8, 8, generator=_g(1)), t_vp, Cond(),
                    direct=lambda m, x, t, c: m(x, t).sample, conditional=False)
    if name == "unet2d_class":
        model = UNet2DModel(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                            num_class_embeds=NUM_CLASSES + 1, **_unet_small())
        return Case(model, _vp(), "epsilon", torch.randn(B, 3, 8, 8, generator=_g(1)), t_vp,
                    Cond(class_labels=torch.tensor([1, 7])), null_class=NUM_CLASSES,
                    direct=lambda m, x, t, c: m(x, t, class_labels=c.class_labels).sample)
    cross = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TXT_DIM,
                 attention_head_dim=2, in_channels=4, out_channels=4)
    if name == "unet_sd15":
        model = UNet2DConditionModel(**cross, **_unet_small())
        null = Cond(encoder_hidden_states=torch.randn(1, TXT_LEN, TXT_DIM, generator=_g(99)))
        return Case(model, _vp(), "epsilon", x4, t_vp, Cond(encoder_hidden_states=_txt()), null_cond=null,
                    direct=lambda m, x, t, c: m(x, t, encoder_hidden_states=c.encoder_hidden_states).sample)
    if name == "unet_sdxl":
        model = UNet2DConditionModel(**cross, addition_embed_type="text_time", addition_time_embed_dim=4,
                                     projection_class_embeddings_input_dim=TXT_DIM + 6 * 4, **_unet_small())
        cond = Cond(encoder_hidden_states=_txt(), pooled=torch.randn(B, TXT_DIM, generator=_g(11)),
                    time_ids=torch.tensor([[8.0, 8, 0, 0, 8, 8]]).repeat(B, 1))
        return Case(model, _vp(), "v_prediction", x4, t_vp, cond,
                    direct=lambda m, x, t, c: m(x, t, encoder_hidden_states=c.encoder_hidden_states,
                                                added_cond_kwargs={"text_embeds": c.pooled,
                                                                   "time_ids": c.time_ids}).sample)
    if name == "unet_lcm":
        from diffusers import LatentConsistencyModelPipeline

        model = UNet2DConditionModel(**cross, time_cond_proj_dim=8, **_unet_small())

        def direct(m, x, t, c):  # as LatentConsistencyModelPipeline: w = guidance_scale - 1
            w = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, c.guidance - 1, embedding_dim=8)
            return m(x, t, encoder_hidden_states=c.encoder_hidden_states, timestep_cond=w).sample

        return Case(model, _vp(), "epsilon", x4, t_vp,
                    Cond(encoder_hidden_states=_txt(), guidance=torch.tensor([2.0, 8.0])), direct=direct)
    if name == "dit":
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
        return Case(model, _vp(), "epsilon", x4, t_vp, Cond(class_labels=torch.tensor([3, 9])),
                    null_class=NUM_CLASSES,
                    direct=lambda m, x, t, c: m(x, timestep=t, class_labels=c.class_labels).sample[:, :4])
    if name == "pixart":
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                         out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                         cross_attention_dim=8, caption_channels=TXT_DIM)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        return Case(model, _vp(), "epsilon", x4, t_vp, Cond(encoder_hidden_states=_txt(), encoder_attention_mask=mask),
                    direct=lambda m, x, t, c: m(x, encoder_hidden_states=c.encoder_hidden_states, timestep=t,
                                                encoder_attention_mask=c.encoder_attention_mask,
                                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}
                                                ).sample[:, :4])
    if name == "sd3":
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=4, num_attention_heads=2, joint_attention_dim=TXT_DIM,
                                      caption_projection_dim=8, pooled_projection_dim=TXT_DIM, pos_embed_max_size=8)
        cond = Cond(encoder_hidden_states=_txt(), pooled=torch.randn(B, TXT_DIM, generator=_g(11)))
        return Case(model, _flow(), "flow", x4, t_flow, cond,
                    direct=lambda m, x, t, c: m(hidden_states=x, encoder_hidden_states=c.encoder_hidden_states,
                                                pooled_projections=c.pooled, timestep=t).sample)
    if name in ("flux", "flux_guided"):
        from diffusers import FluxPipeline

        guided = name == "flux_guided"
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TXT_DIM,
                                       pooled_projection_dim=TXT_DIM, guidance_embeds=guided, axes_dims_rope=(2, 2, 4))

        def direct(m, x, t, c):  # as FluxPipeline: packed latents, image ids, timestep / 1000, raw guidance
            b, ch, h, w = x.shape
            packed = FluxPipeline._pack_latents(x, b, ch, h, w)
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
            out = m(hidden_states=packed, encoder_hidden_states=c.encoder_hidden_states,
                    pooled_projections=c.pooled, timestep=t / 1000, img_ids=ids,
                    txt_ids=torch.zeros(c.encoder_hidden_states.shape[1], 3), guidance=c.guidance).sample
            return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

        cond = Cond(encoder_hidden_states=_txt(), pooled=torch.randn(B, TXT_DIM, generator=_g(11)),
                    guidance=torch.tensor([3.5, 1.0]) if guided else None)
        return Case(model, _flow(), "flow", x4, t_flow, cond, direct=direct)
    raise KeyError(name)


FAMILIES = ["unet2d", "unet2d_class", "unet_sd15", "unet_sdxl", "unet_lcm", "dit", "pixart", "sd3", "flux",
            "flux_guided"]
CONDITIONAL = [f for f in FAMILIES if f != "unet2d"]


@pytest.fixture(params=FAMILIES)
def case(request) -> Case:
    c = build(request.param)
    c.model.eval()  # DiT drops labels at random in train mode
    return c


# ------------------------------------------------------------------------------------------ calls
def test_adapter_matches_direct_pipeline_call(case):
    d = case.denoiser()
    with torch.no_grad():
        raw = d(case.x, case.t, case.cond, output=case.prediction_type)
        ref = case.direct(case.model, case.x, case.t, case.cond)
    assert raw.shape == case.x.shape
    torch.testing.assert_close(raw, ref, rtol=1e-5, atol=1e-6)


def test_output_shapes_and_parameterizations_agree(case):
    d = case.denoiser()
    with torch.no_grad():
        outs = {o: d(case.x, case.t, case.cond, output=o) for o in ("sample", "epsilon", "v_prediction", "flow")}
    for name, out in outs.items():
        assert out.shape == case.x.shape, name
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), name
    s = case.schedule
    for name, out in outs.items():
        torch.testing.assert_close(s.convert(outs["sample"], case.x, case.t, "sample", name), out,
                                   rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(d.x0(case.x, case.t, case.cond), outs["sample"])
        torch.testing.assert_close(d.eps(case.x, case.t, case.cond), outs["epsilon"])
        torch.testing.assert_close(d.v(case.x, case.t, case.cond), outs["v_prediction"])
        torch.testing.assert_close(d.velocity(case.x, case.t, case.cond), outs["flow"])
        # a scalar t is broadcast over the batch
        t0 = case.t[0]
        torch.testing.assert_close(d(case.x, t0, case.cond), d(case.x, t0.expand(B), case.cond))


@pytest.mark.parametrize("name", CONDITIONAL)
def test_cfg_standard_form(name):
    c = build(name)
    c.model.eval()
    d = c.denoiser()
    uncond = c.cond.null_like(c.null_cond, null_class=c.null_class)
    with torch.no_grad():
        cp = d(c.x, c.t, c.cond, output="epsilon")
        up = d(c.x, c.t, uncond, output="epsilon")
        assert not torch.allclose(cp, up), "the null condition must change the prediction"
        for s in (3.0, 0.0, 7.5):
            guided = d(c.x, c.t, c.cond, guidance_scale=s, output="epsilon")
            torch.testing.assert_close(guided, up + s * (cp - up), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(guided, cfg(cp, up, s), rtol=1e-4, atol=1e-5)
        # s = 1 is no guidance (and costs one call)
        torch.testing.assert_close(d(c.x, c.t, c.cond, guidance_scale=1, output="epsilon"), cp)
        torch.testing.assert_close(d(c.x, c.t, c.cond, guidance_scale=1.0), d(c.x, c.t, c.cond))
        # per-sample scales; CFG commutes with the (affine) change of parameterization
        s = torch.tensor([1.0, 4.0])
        guided = d(c.x, c.t, c.cond, guidance_scale=s, output="sample")
        cx, ux = d(c.x, c.t, c.cond), d(c.x, c.t, uncond)
        torch.testing.assert_close(guided, ux + s.view(-1, 1, 1, 1) * (cx - ux), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["unet2d_class", "unet_sd15", "sd3"])
def test_cond_uncond_is_one_batched_call_and_what_cfg_combines(name):
    """``Denoiser.cond_uncond``: the conditional and unconditional predictions of one call on the concatenated batch
    (the two separate calls, up to batched arithmetic), in any parameterization; CFG is exactly their combination."""
    c = build(name)
    c.model.eval()
    d = c.denoiser()
    uncond = c.cond.null_like(c.null_cond, null_class=c.null_class)
    calls = []
    hook = d.backbone.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        x0_c, x0_u = d.cond_uncond(c.x, c.t, c.cond)
        assert len(calls) == 1  # one network call
        torch.testing.assert_close(x0_c, d(c.x, c.t, c.cond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x0_u, d(c.x, c.t, uncond), rtol=1e-4, atol=1e-5)
        raw_c, raw_u = d.cond_uncond(c.x, c.t, c.cond, uncond, output=c.prediction_type)  # an explicit null
        ref = backbones.call_backbone(d.backbone, torch.cat([c.x, c.x]), torch.cat([c.t, c.t]),
                                      Cond.cat([c.cond, uncond])).float()
        assert torch.equal(torch.cat([raw_c, raw_u]), ref)
        assert torch.equal(d(c.x, c.t, c.cond, guidance_scale=3.0, output=c.prediction_type), cfg(raw_c, raw_u, 3.0))
        t0 = c.t[0]  # a scalar t holds for every sample
        for a, b in zip(d.cond_uncond(c.x, t0, c.cond), d.cond_uncond(c.x, t0.expand(B), c.cond)):
            assert torch.equal(a, b)
    hook.remove()


def test_null_like_uses_the_null_prompt_and_keeps_sample_fields():
    c = build("unet_sd15")
    u = c.cond.null_like(c.null_cond)
    assert torch.equal(u.encoder_hidden_states, c.null_cond.encoder_hidden_states.expand(B, -1, -1))
    c = build("unet_lcm")
    u = c.cond.null_like()
    assert torch.equal(u.encoder_hidden_states, torch.zeros_like(c.cond.encoder_hidden_states))
    assert torch.equal(u.guidance, c.cond.guidance)
    c = build("unet2d_class")
    assert torch.equal(c.cond.null_like(null_class=NUM_CLASSES).class_labels, torch.full((B,), NUM_CLASSES))
    with pytest.raises(ValueError, match="null class"):
        c.cond.null_like()
    d = Denoiser(c.model, c.schedule, "epsilon")  # no null_class given
    with pytest.raises(ValueError, match="null class"):
        d(c.x, c.t, c.cond, guidance_scale=2.0)


@pytest.mark.parametrize("name", ["unet_lcm", "flux_guided"])
def test_guidance_embedding_changes_output(name):
    c = build(name)
    c.model.eval()
    d = c.denoiser()
    with torch.no_grad():
        lo = d(c.x, c.t, Cond(**{**c.cond.__dict__, "guidance": torch.tensor([1.5, 1.5])}))
        hi = d(c.x, c.t, Cond(**{**c.cond.__dict__, "guidance": torch.tensor([6.0, 6.0])}))
    assert (lo - hi).abs().max() > 1e-4


def test_lcm_guidance_embedding_is_w_equals_s_minus_1():
    from diffusers import LatentConsistencyModelPipeline

    s = torch.tensor([1.0, 2.0, 8.5])
    ours = backbones.guidance_scale_embedding(s - 1, 32)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, s - 1, embedding_dim=32)
    torch.testing.assert_close(ours, ref)
    odd = backbones.guidance_scale_embedding(s, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


@pytest.mark.parametrize("name,drop,match", [
    ("unet_sdxl", "pooled", "pooled"),
    ("unet_sdxl", "time_ids", "time_ids"),
    ("unet_lcm", "guidance", "guidance"),
    ("flux_guided", "guidance", "guidance"),
    ("unet2d_class", "class_labels", "class_labels"),
    ("unet_sd15", "encoder_hidden_states", "encoder_hidden_states"),
    ("dit", "class_labels", "class_labels"),
    ("pixart", "encoder_hidden_states", "encoder_hidden_states"),
    ("sd3", "encoder_hidden_states", "encoder_hidden_states"),
    ("sd3", "pooled", "pooled"),
    ("flux", "encoder_hidden_states", "encoder_hidden_states"),
    ("flux", "pooled", "pooled"),
])
def test_missing_required_cond_is_a_clear_error(name, drop, match):
    c = build(name)
    d = c.denoiser()
    cond = Cond(**{**c.cond.__dict__, drop: None})
    with pytest.raises(ValueError, match=match):
        d(c.x, c.t, cond)


def test_unsupported_module_and_bad_prediction_type():
    with pytest.raises(TypeError, match="unsupported backbone"):
        Denoiser(torch.nn.Conv2d(4, 4, 1), _vp(), "epsilon")
    c = build("unet2d")
    with pytest.raises(ValueError, match="flow-matching schedule"):
        Denoiser(c.model, _vp(), "flow")
    with pytest.raises(ValueError, match="unknown prediction type"):
        Denoiser(c.model, _vp(), "score")


def test_wrapped_backbone_is_unwrapped():
    class Wrapper(torch.nn.Module):  # what DDP / FSDP look like from the outside
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    c = build("unet_lcm")
    c.model.eval()
    plain, wrapped = c.denoiser(), Denoiser(Wrapper(c.model), c.schedule, c.prediction_type)
    assert wrapped.family == "UNet2DConditionModel"
    with torch.no_grad():
        torch.testing.assert_close(wrapped(c.x, c.t, c.cond), plain(c.x, c.t, c.cond))


def test_in_channels_and_sample_size():
    for name in FAMILIES:
        c = build(name)
        assert backbones.in_channels(c.model) == c.x.shape[1], name
        assert backbones.sample_size(c.model) in (8, 128, None), name


# ------------------------------------------------------------------------------------------ features
@pytest.mark.parametrize("name", ["unet2d", "unet_sd15", "dit", "sd3", "flux"])
def test_return_features_gives_bottleneck(name):
    c = build(name)
    c.model.eval()
    d = c.denoiser()
    with torch.no_grad():
        pred, feats = d(c.x, c.t, c.cond, return_features=True)
        torch.testing.assert_close(pred, d(c.x, c.t, c.cond))
    assert isinstance(feats, torch.Tensor) and feats.shape[0] == B
    if name.startswith("unet"):
        assert feats.shape == (B, 16, 4, 4)  # mid block: last block_out_channels at the lowest resolution
    else:
        patch = 1 if name == "flux" else 2
        tokens = (8 // (2 * patch)) ** 2 if name == "flux" else (8 // patch) ** 2
        assert feats.ndim == 3 and feats.shape[1] == tokens, "features must be the image tokens, not the text"
    # the hook is removed after the call
    assert not backbones.bottleneck(c.model)._forward_hooks


# ------------------------------------------------------------------------------------------ clone
def test_clone_is_independent_and_frozen():
    c = build("unet_sd15")
    d = c.denoiser()
    frozen = d.clone(trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    assert all(p.requires_grad for p in d.parameters())  # the original is untouched
    with torch.no_grad():
        before = d(c.x, c.t, c.cond)
        for p in frozen.parameters():
            p.add_(0.1)
        torch.testing.assert_close(d(c.x, c.t, c.cond), before)
        assert not torch.allclose(frozen(c.x, c.t, c.cond), before)
    ptrs = {p.data_ptr() for p in d.parameters()}
    assert not ptrs & {p.data_ptr() for p in frozen.parameters()}
    trainable = frozen.clone(trainable=True)
    assert all(p.requires_grad for p in trainable.parameters()) and not trainable.training
    lora = d.clone(trainable=False).with_lora(rank=2).clone(trainable=True)  # a LoRA copy trains adapters only
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())


# ------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("name", ["unet2d_class", "unet_sd15", "dit", "sd3"])
def test_lora_student_and_disabled_base(name):
    c = build(name)
    c.model.eval()
    d = c.denoiser()
    with torch.no_grad():
        base = d(c.x, c.t, c.cond)
    d.with_lora(rank=4)
    assert d.lora_layers(), "LoRA must wrap some layers"
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    assert any("lora_" in n for n, _ in d.named_parameters())
    with torch.no_grad():  # gaussian init: lora_B = 0, so the student starts as the base
        torch.testing.assert_close(d(c.x, c.t, c.cond), base)
        for n, p in d.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=_g(5)) * 0.5)
        adapted = d(c.x, c.t, c.cond)
    assert (adapted - base).abs().max() > 1e-3
    flags = {n: p.requires_grad for n, p in d.named_parameters()}
    with d.adapters_disabled():
        with torch.no_grad():
            torch.testing.assert_close(d(c.x, c.t, c.cond), base)
    assert {n: p.requires_grad for n, p in d.named_parameters()} == flags
    with torch.no_grad():
        torch.testing.assert_close(d(c.x, c.t, c.cond), adapted)
    # gradients reach only the adapters
    d(c.x, c.t, c.cond).square().mean().backward()
    for n, p in d.named_parameters():
        if "lora_" in n:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_lora_target_errors_and_clone_of_lora():
    c = build("unet2d")
    with pytest.raises(ValueError, match="matched no module|not found"):
        c.denoiser().with_lora(rank=2, target_modules=["no_such_layer"])
    d = build("unet2d").denoiser().with_lora(rank=2)
    frozen = d.clone(trainable=False)
    assert len(frozen.lora_layers()) == len(d.lora_layers())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_text_cfg_without_a_null_prompt_is_an_error():
    c = build("unet_sd15")
    d = Denoiser(c.model, c.schedule, c.prediction_type)
    with pytest.raises(ValueError, match="null_cond=PromptEncoder.null"):
        d(c.x, c.t, c.cond, guidance_scale=2.0)
