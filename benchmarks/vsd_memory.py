"""Memory of the score of the generator's distribution in variational score distillation: a LoRA teacher on the
shared frozen teacher (VSD, SwiftBrush, SNOOPI) against a full trainable copy (DMD2's fake score).

Every backbone is built on PyTorch's meta device (no memory, no download) from its published config, LoRA adapters are
injected there with peft as the trainers do, and the parameters are counted. Bytes assume what the trainers keep: fp32
weights (``model.dtype`` float32; mixed precision autocasts the compute), one fp32 gradient per trainable parameter and
AdamW's two fp32 moments, i.e. 16 bytes per trainable parameter and 4 per frozen one. A full-copy fake score is a
second frozen-size network that is trained (16 bytes per parameter); the LoRA teacher adds only its adapters (16 bytes
per adapter parameter): its base is the teacher's own tensors (``Denoiser.clone(share_weights=True)``), and SwiftBrush
reads the real score from the same network with the adapters disabled. Activations are not counted.

    python benchmarks/vsd_memory.py            # prints a markdown table (benchmarks/vsd.md holds its output)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINED, FROZEN = 16, 4  # bytes per parameter: fp32 weight + fp32 grad + AdamW's two fp32 moments; fp32 weight
GIB = 2 ** 30


def sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sd21():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                use_linear_projection=True)


def pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=64, caption_channels=4096)  # PixArt-XL-2-512x512


def digits_teacher():
    from diffusers import UNet2DModel

    config = json.loads((ROOT / "stepdistill/assets/digits-teacher/unet/config.json").read_text())
    return UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def digits_t2i():
    from diffusers import UNet2DConditionModel

    recipe = yaml.safe_load((ROOT / "configs/teacher_digits_t2i.yaml").read_text())
    return UNet2DConditionModel.from_config(recipe["model"]["backbone_config"])


#: (backbone, builder, LoRA rank, LoRA targets (None: stepdistill's defaults for the family), where they come from)
CASES = [
    ("SD 1.5 UNet", sd15, 64, ["to_q", "to_v"], "snoopi_sd15: SwiftBrush's rank 64 on to_q, to_v"),
    ("SD 2.1 UNet", sd21, 64, ["to_q", "to_v"], "swiftbrush_sd21, snoopi_sd21"),
    ("SD 2.1 UNet", sd21, 64, None, "rank 64 on stepdistill's default UNet modules"),
    ("PixArt-alpha XL-2 (512)", pixart, 64, ["to_q", "to_v"], "snoopi_pixart"),
    ("digits-t2i UNet", digits_t2i, 16, ["to_q", "to_v"], "swiftbrush_digits_t2i, snoopi_digits_t2i"),
    ("digits-teacher UNet", digits_teacher, 16, None, "the digits recipes (default modules)"),
]


def count(builder, rank: int, targets) -> tuple[int, int]:
    """(the backbone's parameters, the LoRA adapters' parameters), built and adapted on the meta device."""
    from peft import LoraConfig, inject_adapter_in_model

    from stepdistill.denoiser import DEFAULT_LORA_TARGETS, _TRANSFORMER_LORA_TARGETS

    with torch.device("meta"):
        model = builder()
        base = sum(p.numel() for p in model.parameters())
        targets = targets or DEFAULT_LORA_TARGETS.get(type(model).__name__, _TRANSFORMER_LORA_TARGETS)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return base, lora


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.3f}" if n_bytes < GIB else f"{n_bytes / GIB:.2f}"


def table() -> str:
    rows = ["| backbone | parameters | LoRA teacher (rank, modules) | adapter parameters | fake score state: full "
            "copy / LoRA (GiB) | whole run state: full copy / LoRA (GiB) | LoRA saves | recipe |",
            "|---|---|---|---|---|---|---|---|"]
    for name, builder, rank, targets, note in CASES:
        base, lora = count(builder, rank, targets)
        full_fake, lora_fake = TRAINED * base, TRAINED * lora
        # the whole run: the frozen teacher + the trained student + the fake score
        run_full = FROZEN * base + TRAINED * base + full_fake
        run_lora = FROZEN * base + TRAINED * base + lora_fake
        modules = ", ".join(targets) if targets else "defaults"
        rows.append(f"| {name} | {base / 1e6:.1f}M | {rank}, {modules} | {lora / 1e6:.2f}M "
                    f"({100 * lora / base:.2f}%) | {gib(full_fake)} / {gib(lora_fake)} | {gib(run_full)} / "
                    f"{gib(run_lora)} | {gib(run_full - run_lora)} GiB ({100 * (1 - run_lora / run_full):.0f}%) | "
                    f"{note} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
