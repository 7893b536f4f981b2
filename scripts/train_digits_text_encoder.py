"""Build the text-to-image digits teacher's tokenizer and train its text encoder (a tiny ``CLIPTextModel``).

Tokenizer: a ``CLIPTokenizer`` whose vocabulary is learnt from the caption words (byte-pair merges over the words of
every training caption, with CLIP's ``</w>`` end-of-word suffix and its ``<|startoftext|>`` / ``<|endoftext|>``
tokens), so every caption word is one token; ``model_max_length`` fits the longest caption, held-out phrasings
included, with room to spare. Written as ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``, the files
``CLIPTokenizer.from_pretrained`` reads.

Text encoder: trained contrastively with a small image CNN on the captioned training digits (CLIP's symmetric
InfoNCE, Radford et al. 2021, eq. in Fig. 3), where a caption's positives are all images in the batch that it
describes — the asked digit and every word it names — not only its own image, because many captions ("the digit 7")
fit many images. The pooled (end-of-text) output goes through the contrastive head; the teacher's UNet reads the
encoder's ``last_hidden_state``, as Stable Diffusion does, and keeps it frozen. The image CNN is thrown away.

    python scripts/train_digits_text_encoder.py [--steps 1500] [--out stepdistill/assets/digits-t2i]

Writes ``tokenizer/``, ``text_encoder/`` (safetensors) and ``text_encoder/training.json`` (its zero-shot accuracies
on the held-out captions of the test split, measured with the contrastive image CNN).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepdistill.data.captions import ADJECTIVES, DIGIT_NAMES, WORDS, captioned_digits

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation: special tokens, contractions, letter runs, single digits, other symbol runs
WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   projection_dim=64, hidden_act="quick_gelu")


def caption_words(texts) -> Counter:
    import regex

    pattern = regex.compile(WORD_PATTERN, regex.IGNORECASE)
    return Counter(w for t in texts for w in pattern.findall(t.lower()))


def build_tokenizer(texts, out: Path) -> CLIPTokenizer:
    """Byte-pair merges that make every word of ``texts`` a single token; saved to ``out``."""
    words = sorted(caption_words(texts))
    vocab = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []

    def add(token):
        vocab.setdefault(token, len(vocab))

    for word in words:  # every symbol alone and at a word's end, so that any text of these letters tokenizes
        for ch in word:
            add(ch)
            add(ch + "</w>")
    # byte-pair training over the word types: merge the most common adjacent pair (ties: the first in sort order)
    # until every word is one symbol; applying the merges in this order rebuilds each word
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    while any(len(parts) > 1 for parts in split.values()):
        pairs = Counter(pair for parts in split.values() for pair in zip(parts, parts[1:]))
        pair = min(pairs, key=lambda q: (-pairs[q], q))
        merges.append(pair)
        add(pair[0] + pair[1])
        for w, parts in split.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            split[w] = tuple(merged)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    longest = max(len(caption_words([t])) for t in texts) + 2  # + start and end of text
    max_length = 8 * math.ceil((longest + 4) / 8)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                        unk_token=EOS, pad_token=EOS)
    tok.save_pretrained(out)
    tok = CLIPTokenizer.from_pretrained(out)
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"the tokenizer splits {word!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok


class ImageTower(nn.Module):
    """A small CNN from a 32x32 digit to a unit embedding (the contrastive partner; not shipped)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.GroupNorm(8, 16), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.GELU(),
            nn.Flatten(), nn.Linear(64 * 16, dim))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def attribute_codes(records) -> torch.Tensor:
    """(N, 1 + 2 * A) ints per record: its label, each attribute's measured word index, and the index of the word
    its caption asks for (-1 where the caption does not name that attribute)."""
    names = list(WORDS.items())
    return torch.tensor([[r.label] + [words.index(r.words[a]) if r.words[a] else -2 for a, words in names]
                         + [words.index(r.asked[a]) if a in r.asked else -1 for a, words in names] for r in records])


def describes(codes: torch.Tensor) -> torch.Tensor:
    """M[j, i] = 1 where caption j (its digit and the words it asks for) describes image i (its label and measured
    words), from :func:`attribute_codes`."""
    a = (codes.shape[1] - 1) // 2
    measured, asked = codes[:, 1:1 + a], codes[:, 1 + a:]
    same_digit = codes[:, None, 0] == codes[None, :, 0]
    fits = ((asked[:, None, :] == -1) | (asked[:, None, :] == measured[None, :, :])).all(-1)
    return (same_digit & fits).float()


def contrastive_loss(image_emb, text_emb, positives, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: the cross-entropy of softmax(scale * T I^T) against the rows of
    ``positives`` normalised to sum 1 (and the same image-to-text with its columns)."""
    logits = logit_scale * text_emb @ image_emb.t()
    t2i = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    i2t = -(positives.t() / positives.t().sum(1, keepdim=True) * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return (t2i + i2t) / 2


def token_ids(tok, prompts) -> torch.Tensor:
    """The ids the pipeline gives the text encoder: padded to ``model_max_length``, as StableDiffusionPipeline does."""
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode_text(model, head, tok, prompts=None, ids=None):
    ids = token_ids(tok, prompts) if ids is None else ids
    return F.normalize(head(model(ids).pooler_output), dim=-1)


@torch.no_grad()
def zero_shot(model, head, tower, tok, records) -> dict:
    """Held-out accuracies: the digit among "a handwritten {d}", and each attribute among its words' adjective
    phrasings ("a thin / medium / thick {name}") of the true digit."""
    images = torch.stack([r.image for r in records])
    image_emb = tower(images)
    digit_emb = encode_text(model, head, tok, [f"a handwritten {d}" for d in range(10)])
    labels = torch.tensor([r.label for r in records])
    out = {"digit": (image_emb @ digit_emb.t()).argmax(1).eq(labels).float().mean().item()}
    for attr, names in WORDS.items():
        hits = []
        for r, emb in zip(records, image_emb):
            if r.words[attr] is None:
                continue
            options = encode_text(model, head, tok, [f"a {ADJECTIVES[w]} {DIGIT_NAMES[r.label]}" for w in names])
            hits.append(names[int((options @ emb).argmax())] == r.words[attr])
        out[attr] = sum(hits) / len(hits)
    captions = encode_text(model, head, tok, [r.prompt for r in records])
    out["caption_retrieval_top1"] = (image_emb @ captions.t()).argmax(1).eq(torch.arange(len(records))).float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="stepdistill/assets/digits-t2i")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    train = [r for seed in range(8) for r in captioned_digits("train", seed)]
    held_out = captioned_digits("eval", 0)
    tok = build_tokenizer([r.prompt for r in train], out / "tokenizer")
    unknown = caption_words([r.prompt for r in held_out]) - caption_words([r.prompt for r in train])
    if unknown:
        raise RuntimeError(f"held-out captions use words no training caption has: {sorted(unknown)}")
    config = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **TEXT_CONFIG)
    model, tower = CLIPTextModel(config), ImageTower(TEXT_CONFIG["projection_dim"])
    head = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*model.parameters(), *tower.parameters(), *head.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    lr = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    codes, train_images = attribute_codes(train), torch.stack([r.image for r in train])
    train_ids = token_ids(tok, [r.prompt for r in train])
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, len(train), (args.batch,), generator=g)
        images = train_images[index]
        positives = describes(codes[index])
        loss = contrastive_loss(tower(images), encode_text(model, head, tok, ids=train_ids[index]), positives,
                                logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    model.eval(), tower.eval()
    accuracy = zero_shot(model, head, tower, tok, held_out)
    print("held-out zero-shot accuracy:", accuracy)
    model.save_pretrained(out / "text_encoder", safe_serialization=True)
    record = {"held_out_zero_shot_accuracy": accuracy, "chance": {"digit": 0.1, "thickness": 1 / 3, "slant": 1 / 3,
                                                                  "width": 0.5},
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "train_captions": len(train),
              "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1),
              "threads": args.threads, "torch": torch.__version__, "model_max_length": tok.model_max_length,
              "vocab_size": len(tok)}
    (out / "text_encoder" / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
