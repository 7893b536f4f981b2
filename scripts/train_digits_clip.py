"""Train ``digits-clip``: a tiny open_clip model, trained contrastively on the captioned digits, for CLIP score.

For evaluation only: it shares nothing with the text-to-image teacher's text encoder (another architecture, the
standard open_clip BPE tokenizer, its own training), as real evaluations score with another CLIP than the
generator's. Written as an open_clip ``local-dir:`` folder (``open_clip_config.json`` + float16
``open_clip_model.safetensors``) that ``stepdistill.metrics.clip_score.load_clip("digits-clip")`` loads offline.

- Images: the 80% train split of the digits at 32x32 (``captioned_digits("train")``), in [0, 1] through
  ``clip_score.preprocess`` (grayscale repeated to RGB, the model's own mean/std: exactly what CLIP score feeds
  it), with light augmentation (shifts of up to one pixel, Gaussian noise of std 0.02).
- Captions: ``--copies`` captions per image from the 15 training phrasings (``TRAIN_TEMPLATES``).
- Loss: symmetric InfoNCE with a learnable logit scale (CLIP's, clamped at 100), with several positives: a
  caption is a positive for every image in the batch it describes (same digit, and every attribute word it names
  matches the image's measured words), since "a handwritten 3" describes every 3 in a batch; identical captions
  in a batch are encoded once.

Figures (:func:`evaluate`) are measured on the 20% eval split with its six held-out phrasings, after reloading the
written folder through ``load_clip``; ``training.json`` records them with the run.

    python scripts/train_digits_clip.py [--steps 500] [--out stepdistill/assets/digits-clip]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stepdistill.data.captions import DIGIT_NAMES, RESOLUTION, WORDS, captioned_digits, render
from stepdistill.metrics.clip_score import ClipModel, load_clip, preprocess

# Mean and std of the train split's pixels in [0, 1] at 32x32 (0.305, 0.323), the same for the 3 channels.
MEAN, STD = (0.305,) * 3, (0.323,) * 3
MODEL_CFG = {
    "embed_dim": 64,
    # 4x4 patches of 8x8 pixels: 64 grayscale values per patch into width 96, so the patch embedding can keep all
    "vision_cfg": {"image_size": RESOLUTION, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32,
                   "mlp_ratio": 4.0},
    # the standard BPE vocabulary (49,408 tokens) at a small width: the token embedding is most of the model
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"size": RESOLUTION, "mode": "RGB", "mean": list(MEAN), "std": list(STD),
                  "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
ATTRS = tuple(WORDS)  # thickness, slant, width
FIELDS = {"thickness": "t", "slant": "s", "width": "w"}  # their adjective fields in caption templates


def word_codes(words_list: list[dict], missing: int) -> torch.Tensor:
    """(N, 3) int64: the index of each attribute's word in :data:`WORDS` (``missing`` where absent or None)."""
    return torch.tensor([[WORDS[a].index(w[a]) if w.get(a) is not None else missing for a in ATTRS]
                         for w in words_list], dtype=torch.int64)


def describes(caption_digits: torch.Tensor, caption_asked: torch.Tensor, image_digits: torch.Tensor,
              image_words: torch.Tensor) -> torch.Tensor:
    """(images, captions) bool: caption j describes image i (same digit; each word it names is the image's).
    ``caption_asked`` uses -1 for attributes a caption does not name."""
    same = image_digits[:, None] == caption_digits[None, :]
    named = caption_asked[None, :, :]
    ok = (named == -1) | (named == image_words[:, None, :])
    return same & ok.all(-1)


def multi_positive_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor,
                           logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: each image's target is uniform over the captions that describe it,
    each caption's over the images it describes (CLIP's loss when each has exactly one)."""
    logits = logit_scale.exp() * image_emb @ text_emb.T
    target = positives.float()
    image_loss = -(F.log_softmax(logits, 1) * target / target.sum(1, keepdim=True)).sum(1).mean()
    text_loss = -(F.log_softmax(logits.T, 1) * target.T / target.T.sum(1, keepdim=True)).sum(1).mean()
    return (image_loss + text_loss) / 2


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[-1, 1] images shifted by up to one pixel each way (paper fills in) plus Gaussian noise of std 0.02."""
    n, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    shifted = shifted.gather(3, cols)
    return (shifted + 0.02 * torch.randn(shifted.shape, generator=g)).clamp(-1, 1)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(steps: int, batch: int, lr: float, seed: int, copies: int, log_every: int = 50):
    """The trained ``open_clip.CLIP`` and its training record (float32, in eval mode)."""
    import open_clip

    records = captioned_digits("train", seed=seed, copies=copies)
    images = torch.stack([r.image for r in records])
    digits = torch.tensor([r.label for r in records])
    words = word_codes([r.words for r in records], missing=-2)
    prompts = sorted({r.prompt for r in records})
    prompt_index = {p: i for i, p in enumerate(prompts)}
    record_prompt = torch.tensor([prompt_index[r.prompt] for r in records])
    by_prompt = {r.prompt: r for r in records}
    prompt_digits = torch.tensor([by_prompt[p].label for p in prompts])
    prompt_asked = word_codes([by_prompt[p].asked for p in prompts], missing=-1)

    torch.manual_seed(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])(prompts)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randperm(len(records), generator=g)[:batch]
        x = preprocess((augment(images[idx], g) + 1) / 2, RESOLUTION, MEAN, STD)
        used, inverse = torch.unique(record_prompt[idx], return_inverse=True)
        image_emb = F.normalize(model.encode_image(x), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens[used]), dim=-1)
        positives = describes(prompt_digits[used], prompt_asked[used], digits[idx], words[idx])
        assert positives[torch.arange(len(idx)), inverse].all()  # every image is described by its own caption
        loss = multi_positive_infonce(image_emb, text_emb, positives, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}, logit scale {model.logit_scale.exp().item():.1f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval().requires_grad_(False)
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "caption_copies": copies,
              "train_records": len(records), "train_images": len(records) // copies, "train_captions": len(prompts),
              "train_seconds": round(time.perf_counter() - started, 1),
              "final_loss": round(loss.item(), 4), "logit_scale": round(model.logit_scale.exp().item(), 2)}
    return model, record


def write_folder(model, out: Path) -> Path:
    """Write the open_clip ``local-dir`` folder: config and float16 weights."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG},
                                                          indent=1) + "\n")
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    weights = out / "open_clip_model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # readable by all, like the other files of an installed package
    return weights


@torch.no_grad()
def embed_images(clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings of [0, 1] images, preprocessed as CLIP score does."""
    x = preprocess(images, clip.image_size, clip.mean, clip.std)
    return F.normalize(clip.model.encode_image(x).float(), dim=-1)


@torch.no_grad()
def embed_texts(clip: ClipModel, prompts: list[str]) -> torch.Tensor:
    return F.normalize(clip.model.encode_text(clip.tokenizer(list(prompts))).float(), dim=-1)


def _rounded(x) -> float:
    return round(float(x), 4)


def evaluate(clip: ClipModel, split: str = "eval", seed: int = 0) -> dict:
    """The figures of ``clip`` on the captioned digits of ``split`` (one caption per image, with ``seed``)."""
    records = captioned_digits(split, seed=seed)
    images = (torch.stack([r.image for r in records]) + 1) / 2
    digits = torch.tensor([r.label for r in records])
    img = embed_images(clip, images)
    out: dict = {"split": split, "images": len(records)}

    # zero-shot digits: the 10 prompts of a training phrasing, then of a held-out one
    for key, template in (("digit_accuracy", "a handwritten {num}"),
                          ("digit_accuracy_held_out_phrasing", "the handwritten digit {name}")):
        text = embed_texts(clip, [template.format(num=d, name=DIGIT_NAMES[d]) for d in range(10)])
        out[key] = _rounded(((img @ text.T).argmax(1) == digits).float().mean())

    # attributes: "a thin / medium / thick three" etc. with the image's own digit; chance 1 / len(words)
    out["attribute_accuracy"], out["attribute_chance"] = {}, {}
    for attr, names in WORDS.items():
        template = "a {%s} {name}" % FIELDS[attr]  # "a thin three", "an upright three", "a wide three"
        prompts = [render(template, d, {attr: w})[0] for d in range(10) for w in names]
        text = embed_texts(clip, prompts).view(10, len(names), -1)
        picked = torch.einsum("ne,nwe->nw", img, text[digits]).argmax(1)
        truth = torch.tensor([names.index(r.words[attr]) for r in records])
        out["attribute_accuracy"][attr] = _rounded((picked == truth).float().mean())
        out["attribute_chance"][attr] = _rounded(1 / len(names))

    # the split's own (held-out) captions, each against its variants with one attribute word swapped
    out["attribute_swap_accuracy"] = {}
    for attr, names in WORDS.items():
        named = [r for r in records if attr in r.asked]
        variants = [render(r.template, r.label, {**r.words, attr: w})[0] for r in named for w in names]
        text = embed_texts(clip, variants).view(len(named), len(names), -1)
        sub = img[[i for i, r in enumerate(records) if attr in r.asked]]
        picked = torch.einsum("ne,nwe->nw", sub, text).argmax(1)
        truth = torch.tensor([names.index(r.words[attr]) for r in named])
        out["attribute_swap_accuracy"][attr] = _rounded((picked == truth).float().mean())

    # retrieval: an image's own caption against every caption of the split that does not describe it
    prompts = [r.prompt for r in records]
    text = embed_texts(clip, prompts)
    sims = img @ text.T
    valid = describes(digits, word_codes([r.asked for r in records], -1), digits,
                      word_codes([r.words for r in records], -2))
    own = sims.diagonal()
    beaten_by = ((sims > own[:, None]) & ~valid).sum(1)
    out["retrieval_top1"] = _rounded((beaten_by == 0).float().mean())
    out["retrieval_top5"] = _rounded((beaten_by < 5).float().mean())
    out["retrieval_candidates_mean"] = round(float((~valid).sum(1).float().mean()) + 1, 1)

    # CLIP score (100 * max(cos, 0)) of each image with its caption and with the next image's (a cyclic shift)
    match = 100 * own.clamp(min=0)
    shuffled = 100 * (img * text.roll(-1, 0)).sum(-1).clamp(min=0)
    out["clip_score_matching"] = _rounded(match.mean())
    out["clip_score_shuffled"] = _rounded(shuffled.mean())
    out["clip_score_gap"] = _rounded(match.mean() - shuffled.mean())
    out["matching_above_shuffled"] = _rounded((match > shuffled).float().mean())
    held = torch.tensor([r.held_out_combination for r in records])
    out["held_out_combinations"] = {"images": int(held.sum()), "clip_score_matching": _rounded(match[held].mean()),
                                    "clip_score_shuffled": _rounded(shuffled[held].mean())}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copies", type=int, default=8, help="captions per training image (phrasing variety)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="stepdistill/assets/digits-clip")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip

    model, record = train(args.steps, args.batch, args.lr, args.seed, args.copies)
    out = Path(args.out)
    weights = write_folder(model, out)
    clip = load_clip(f"local-dir:{out}")  # the figures are those of the written (float16) weights
    params = {"total": sum(p.numel() for p in model.parameters()),
              "image_tower": sum(p.numel() for p in model.visual.parameters()),
              "token_embedding": model.token_embedding.weight.numel()}
    params["text_tower"] = params["total"] - params["image_tower"] - model.logit_scale.numel()
    record = {"model": "digits-clip", "figures": evaluate(clip, "eval"),
              "train_split_digit_accuracy": evaluate(clip, "train")["digit_accuracy"], **record,
              "parameters": params, "weights_dtype": "float16",
              "weights_megabytes": round(weights.stat().st_size / 1e6, 2), "weights_sha256": clip.weights_sha256,
              "threads": args.threads, "torch": torch.__version__, "open_clip": open_clip.__version__,
              "numpy": np.__version__, "script": "scripts/train_digits_clip.py"}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
