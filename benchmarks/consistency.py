"""The consistency table: every consistency method on the shipped digits teacher (FID/KID at 1, 2 and 4 NFE), and
adversarial consistency distillation on the digits super-resolution teacher (PSNR/SSIM/FID and latency against
the teacher), in the distribution-matching table's format.

Each row runs its digits recipe (configs/<method>_digits*.yaml) with the overrides listed, is exported and scored
like everything else (digits-CNN FID/KID, N = 2000, the bench's noise and labels; super-resolution: N = 1797,
sample i is digit i's 8x8 source, PSNR/SSIM against digit i). Wall time and peak memory come from each run's
``train_summary.json`` (one process, CPU: peak RSS).

    python benchmarks/consistency.py [--out benchmarks/results/consistency] [--only a,b] [--warm-start QS_OUT]

The super-resolution rows need the SR teacher: ``stepdistill train-teacher configs/teacher_digits_sr.yaml``.
Runs resume (rerun the same command); results.json and table.md are rewritten from every finished run. With
``--only``, the rows not asked for whose run folders are gone (measured earlier, on another checkout) keep their
entries from the existing results.json, as does the super-resolution table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distribution_matching import evaluate, markdown, sh, warm_start

from stepdistill import quickstart

NFE = [1, 2, 4]
COARSE_GRID = ["objective.num_ddim_timesteps=10", "objective.solver_substeps=5"]  # configs/lcm_digits_1step.yaml
COMMON = ["train.sample_every=0", "train.progress=false", "train.threads=1"]  # two runs share the 2 cores
SCOTT_ETA05 = ["objective.solver_eta=0.5", "objective.adv_weight=0"]  # scott_digits.yaml before it took eta 0.2 + adv
TSCD_GRID40 = ["objective.num_ddim_timesteps=40", "objective.solver_substeps=1",
               "objective.student_steps=4"]  # tscd_digits.yaml before it took the 8-point grid
SR_TEACHER = "runs/teacher_digits_sr"


def rows(warm: str) -> list[dict]:
    return [
        {"name": "lcm", "config": "configs/lcm_digits.yaml", "args": ["train.max_steps=600"],
         "note": "LCM from the teacher's weights: DDIM solver, skip 20, pseudo-Huber, EMA target 0.95, lr 1e-4"},
        {"name": "lcm_adv", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=600", "objective.adv_weight=0.1"],
         "note": "lcm with the adversarial term (PatchGAN on the student's outputs against real digits, weight 0.1)"},
        {"name": "lcm_1600", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=1600", "train.checkpoint_every=500"],
         "note": "lcm for 1600 steps (resumed from lcm's step 600: wall time of the last 1000 steps)"},
        {"name": "lcm_skip100", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "train.checkpoint_every=300"],
         "note": "LCM on a 10-point grid (skip 100), the teacher's DDIM in 5 sub-steps per skip; 1200 steps "
                 "(= configs/lcm_digits_1step.yaml with objective.adv_weight=0)"},
        {"name": "lcm_skip100_adv", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "objective.adv_weight=0.1", "train.checkpoint_every=300"],
         "note": "lcm_skip100 with the adversarial term (PatchGAN on the student's outputs against real digits, "
                 "weight 0.1): configs/lcm_digits_1step.yaml at half its steps"},
        {"name": "lcm_skip100_adv_2400", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=2400", *COARSE_GRID, "objective.adv_weight=0.1", "train.checkpoint_every=400"],
         "note": "lcm_skip100_adv for 2400 steps = configs/lcm_digits_1step.yaml (resumed from its step 1200: wall "
                 "time of the last 1200 steps)"},
        {"name": "lcm_skip100_adv_3600", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=3600", *COARSE_GRID, "objective.adv_weight=0.1", "train.checkpoint_every=400"],
         "note": "lcm_skip100_adv for 3600 steps (resumed from lcm_skip100_adv_2400's step 2400: wall time of the "
                 "last 1200 steps)"},
        {"name": "lcm_from_warm_start", "config": "configs/lcm_digits.yaml",
         "args": ["train.max_steps=300", f"objective.student_init={warm}", "optim.student.lr=2e-5"],
         "note": "LCM from the quickstart's regression student (1-step FID 0.177), lr 2e-5"},
        {"name": "lcm_lora", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=300", "optim.student.lr=1e-3", "objective.target_ema=0"],
         "note": "LCM-LoRA as published: rank 64 on the frozen teacher, no target network, lr 1e-3; 300 steps"},
        {"name": "lcm_lora_lr1e-4", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=300", "optim.student.lr=1e-4", "objective.target_ema=0"],
         "note": "LCM-LoRA as published at lr 1e-4"},
        {"name": "lcm_lora_target_ema", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=300", "optim.student.lr=1e-4", "objective.target_ema=0.95"],
         "note": "the digits recipe: LCM-LoRA at lr 1e-4 with an EMA target of the adapters (0.95), as full LCM has"},
        {"name": "lcm_lora_recipe", "config": "configs/lcm_lora_digits.yaml", "args": [],
         "note": "the digits recipe as shipped: 600 steps"},
        {"name": "lcm_lora_skip100", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "train.checkpoint_every=300"],
         "note": "the digits LCM-LoRA recipe on lcm_skip100's 10-point grid (5 teacher sub-steps per skip)"},
        {"name": "lcm_lora_skip100_adv", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "objective.adv_weight=0.1", "train.checkpoint_every=300"],
         "note": "lcm_lora_skip100 with the adversarial term (weight 0.1): configs/lcm_lora_digits_1step.yaml before "
                 "its lr 1e-3, adapted modules and EMA "
                 "(trained with train.threads=2 while nothing else ran: its wall time is not comparable with the "
                 "rows that shared the cores)"},
        {"name": "lcm_lora_skip100_2000", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=2000", *COARSE_GRID, "train.checkpoint_every=400"],
         "note": "lcm_lora_skip100 for 2000 steps (resumed from its step 1200: wall time of the last 800 steps)"},
        {"name": "lcm_lora_skip100_3000", "config": "configs/lcm_lora_digits.yaml",
         "args": ["train.max_steps=3000", *COARSE_GRID, "train.checkpoint_every=500"],
         "note": "lcm_lora_skip100 for 3000 steps (resumed from lcm_lora_skip100_2000's step 2000: wall time of the "
                 "last 1000 steps)"},
        {"name": "scott", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=200", "objective.num_ddim_timesteps=50", "objective.solver_substeps=2",
                  *SCOTT_ETA05],
         "note": "SCott: stochastic DDIM teacher (eta 0.5, 2 sub-steps), otherwise as lcm; 200 steps"},
        {"name": "scott_skip100", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, *SCOTT_ETA05, "train.checkpoint_every=300"],
         "note": "SCott on lcm_skip100's 10-point grid: stochastic DDIM (eta 0.5) in 5 sub-steps per skip; 1200 steps"},
        {"name": "scott_skip100_eta0.2", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "objective.solver_eta=0.2", "objective.adv_weight=0",
                  "train.checkpoint_every=300"],
         "note": "scott_skip100 with a weaker noise strength, eta 0.2"},
        {"name": "scott_skip100_eta0.2_adv", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "objective.solver_eta=0.2", "objective.adv_weight=0.1",
                  "train.checkpoint_every=300"],
         "note": "scott_skip100_eta0.2 with SCott's adversarial term (PatchGAN on the student's outputs, weight 0.1)"},
        {"name": "scott_skip100_eta0.1_adv", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=1200", *COARSE_GRID, "objective.solver_eta=0.1", "objective.adv_weight=0.1",
                  "train.checkpoint_every=300"],
         "note": "scott_skip100_eta0.2_adv with eta 0.1: configs/scott_digits.yaml at half its steps (trained with "
                 "train.threads=2 while nothing else ran: its wall time is not comparable with the rows that shared "
                 "the cores)"},
        {"name": "scott_skip100_eta0.1_adv_2400", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=2400", *COARSE_GRID, "objective.solver_eta=0.1", "objective.adv_weight=0.1",
                  "train.checkpoint_every=400"],
         "note": "scott_skip100_eta0.1_adv for 2400 steps = configs/scott_digits.yaml (resumed from its step 1200: "
                 "wall time of the last 1200 steps)"},
        {"name": "scott_skip100_eta0.2_adv_2000", "config": "configs/scott_digits.yaml",
         "args": ["train.max_steps=2000", *COARSE_GRID, "objective.solver_eta=0.2", "objective.adv_weight=0.1",
                  "train.checkpoint_every=400"],
         "note": "scott_skip100_eta0.2_adv for 2000 steps (resumed from its step 1200: wall time of the last 800 "
                 "steps)"},
        {"name": "tscd", "config": "configs/tscd_digits.yaml", "args": ["train.max_steps=400", *TSCD_GRID40],
         "note": "Hyper-SD TSCD: segments 8/4/2/1 (100 steps each), 40-step grid, DDIM-trailing export"},
        {"name": "tscd_1600", "config": "configs/tscd_digits.yaml",
         "args": ["train.max_steps=1600", *TSCD_GRID40, "train.checkpoint_every=400", "train.keep_checkpoints=4"],
         "note": "TSCD on a 40-point grid: 400 steps per stage", "stages": {4: 800, 2: 1200}},
        {"name": "tscd_skip125", "config": "configs/tscd_digits.yaml",
         "args": ["train.max_steps=1600", "objective.num_ddim_timesteps=8", "objective.solver_substeps=5",
                  "train.checkpoint_every=400", "train.keep_checkpoints=4"],
         "note": "tscd_1600 on an 8-point grid (skip 125), the teacher's DDIM in 5 sub-steps per skip "
                 "= configs/tscd_digits.yaml",
         "stages": {4: 800, 2: 1200}},
        # the two iCT rows were measured before the recipe took dropout 0.3 and its closing lr decay
        {"name": "ict", "config": "configs/ict_digits.yaml",
         "args": ["train.max_steps=600", "train.batch_size=64", "train.checkpoint_every=300",
                  "objective.dropout=0", "optim.model.lr_schedule=constant"],
         "note": "iCT from scratch (no teacher): Karras grid, curriculum 10 -> 1280, lognormal indices"},
        {"name": "ict_5000", "config": "configs/ict_digits.yaml",
         "args": ["train.max_steps=5000", "train.batch_size=64", "train.checkpoint_every=1000",
                  "objective.dropout=0", "optim.model.lr_schedule=constant"],
         "note": "iCT for 5000 steps (the curriculum spread over them)"},
    ]


def sr_rows() -> list[dict]:
    base = ["train.max_steps=300"]
    return [
        {"name": "acd_sr", "config": "configs/acd_digits_sr.yaml", "args": base,
         "note": "adversarial CD: + conditional PatchGAN, weight 0.1"},
        {"name": "cd_sr", "config": "configs/acd_digits_sr.yaml", "args": base + ["method=lcm",
                                                                                  "objective.adv_weight=0"],
         "note": "consistency distillation of the SR teacher, no adversarial term"},
    ]


def train(row: dict, out: Path, log: Path) -> Path:
    run_dir = out / "runs" / row["name"]
    if not (run_dir / "train_summary.json").is_file():
        print(f"[{row['name']}] training", flush=True)
        sh(["stepdistill", "train", row["config"], f"output_dir={run_dir}", *row["args"], *COMMON], log)
    return run_dir


def entry(row: dict, run_dir: Path, results: list[dict]) -> dict:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"name": row["name"], "note": row["note"], "method": summary["method"], "steps": summary["steps"],
            "wall_seconds": summary["wall_seconds"], "seconds_per_step": summary["seconds_per_step"],
            "peak_cpu_rss_mb": summary["peak_cpu_rss_mb"], "trainable_parameters": summary["trainable_parameters"],
            "config": str(run_dir / "config.yaml"), "results": results}


def stage_entries(row: dict, run_dir: Path, n: int, log: Path) -> list[dict]:
    """Hyper-SD ships one model per step count: TSCD's checkpoint at the end of the stage with k segments is the
    k-step model, exported with ``--checkpoint`` (its card then gives k steps) and scored like the rest. Its wall
    time is the run's s/step times the stage's last step."""
    entries = []
    for k, step in row.get("stages", {}).items():
        stage_dir = run_dir / f"stage_k{k}"
        out = stage_dir / "eval" / "results.json"
        if not out.is_file():
            checkpoint = run_dir / "checkpoints" / f"step_{step:07d}"
            sh(["stepdistill", "export", str(run_dir), "--checkpoint", str(checkpoint), "--out",
                str(stage_dir / "pipeline"), "--overwrite"], log)
            sh(["stepdistill", "eval", str(stage_dir / "pipeline"), "--nfe", ",".join(map(str, NFE)), "--n", str(n),
                "--out", str(out), "--no-progress"], log)
        base = entry(row, run_dir, json.loads(out.read_text())["models"][0]["results"])
        entries.append({**base, "name": f"{row['name']} k={k} stage (step {step})", "steps": step,
                        "wall_seconds": base["seconds_per_step"] * step})
    return entries


def super_resolution(out: Path, log: Path, wanted) -> dict | None:
    """The SR teacher (DDIM at 1..32 steps) and its students, with PSNR / SSIM / FID / latency."""
    import torch

    from stepdistill.metrics.nfe import ReconstructionScores
    from stepdistill.metrics.samplers import super_resolution_pairs

    teacher_run = Path(SR_TEACHER)
    if not (teacher_run / "final").is_dir():
        print(f"no SR teacher in {teacher_run}: skipping the super-resolution table", flush=True)
        return None
    teacher_pipe = out / "sr_teacher" / "pipeline"
    teacher_eval = out / "sr_teacher" / "eval" / "results.json"
    if not teacher_eval.is_file():
        sh(["stepdistill", "export", str(teacher_run), "--out", str(teacher_pipe), "--overwrite"], log)
        sh(["stepdistill", "eval", str(teacher_pipe), "--kind", "teacher", "--nfe", "1,2,4,8,16,32", "--n", "1797",
            "--out", str(teacher_eval), "--no-progress"], log)
    rows_out = []
    for row in sr_rows():
        done = (out / "runs" / row["name"] / "train_summary.json").is_file()
        if wanted and not wanted & {"sr", row["name"]} and not done:
            continue
        run_dir = train(row, out, log)
        print(f"[{row['name']}] evaluating", flush=True)
        rows_out.append(entry(row, run_dir, evaluate(run_dir, NFE, 1797, log)["models"][0]["results"]))
    sources, targets = super_resolution_pairs(16, 8)
    baselines = {}
    for mode in ("nearest", "bilinear", "bicubic"):
        small = torch.nn.functional.interpolate(sources, size=(8, 8), mode="area")  # the 8x8 source itself
        up = torch.nn.functional.interpolate(small, size=(16, 16), mode=mode, **({} if mode == "nearest" else
                                                                                   {"align_corners": False}))
        scores = ReconstructionScores()
        scores.add((up + 1) / 2, targets)
        baselines[mode] = scores.result()
    teacher = json.loads(teacher_eval.read_text())["models"][0]["results"]
    return {"teacher": teacher, "rows": rows_out, "interpolation": baselines}


def sr_markdown(doc: dict) -> str:
    lines = ["| model | NFE | PSNR (dB) | SSIM | FID | KID | latency (ms/img) | speed-up vs teacher DDIM-32 | "
             "train steps | wall time | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = next(r for r in doc["teacher"] if r["nfe"] == 32)["seconds_per_image"]

    def line(name, r, steps="-", wall="-", rss="-"):
        return (f"| {name} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['fid']:.4f} | "
                f"{r['kid_mean'] * 1e3:.2f}e-3 | {r['seconds_per_image'] * 1e3:.3f} | "
                f"{ref / r['seconds_per_image']:.0f}x | {steps} | {wall} | {rss} |")

    for r in doc["teacher"]:
        lines.append(line("SR teacher (DDIM)", r))
    for row in doc["rows"]:
        for r in row["results"]:
            lines.append(line(row["name"], r, row["steps"], f"{row['wall_seconds'] / 60:.1f} min",
                              f"{row['peak_cpu_rss_mb'] / 1024:.2f} GiB"))
    interp = ", ".join(f"{k} {v['psnr']:.2f} dB / {v['ssim']:.4f}" for k, v in doc["interpolation"].items())
    return "\n".join(lines) + (f"\n\nInterpolating the 8x8 source (PSNR / SSIM): {interp}. The 16x16 digits are "
                               "themselves bilinear upsamplings of scikit-learn's 8x8 images, so interpolation is a "
                               "strong baseline here; FID is what interpolation does not win.\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/consistency")
    ap.add_argument("--only", default=None, help="comma-separated row names (sr: only the super-resolution table)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warm-start", default=None, help="a finished `stepdistill quickstart --out DIR` folder")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    wanted = set(args.only.split(",")) if args.only else None
    warm, _, _ = warm_start(out, log, Path(args.warm_start) if args.warm_start else None)
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    results = []
    for row in rows(str(warm)):
        run_dir = out / "runs" / row["name"]
        if wanted and row["name"] not in wanted and not (run_dir / "train_summary.json").is_file():
            # a row run earlier whose run folder is gone (another machine): keep its measured entries
            results += [r for r in previous.get("rows", []) if r["name"].split(" k=")[0] == row["name"]]
            continue
        train(row, out, log)
        print(f"[{row['name']}] evaluating", flush=True)
        results.append(entry(row, run_dir, evaluate(run_dir, NFE, args.n, log)["models"][0]["results"]))
        results += stage_entries(row, run_dir, args.n, log)
    teacher = json.loads(quickstart.TEACHER_RESULTS.read_text())
    dm = Path("benchmarks/results/distribution_matching/results.json")
    dmd2 = [r for r in json.loads(dm.read_text())["rows"] if r["name"] == "dmd2_no_gan"] if dm.is_file() else []
    doc = {"protocol": f"digits-CNN FID/KID, N = {args.n}, the bench's noise and labels (benchmarks/nfe_vs_fid.md)",
           "common_overrides": COMMON, "teacher": teacher["models"][0]["results"],
           "rows": results + [{**r, "name": "dmd2_no_gan (distribution matching)"} for r in dmd2]}
    sr = super_resolution(out, log, wanted) if not wanted or "sr" in wanted or wanted & {"cd_sr", "acd_sr"} else None
    sr = sr or previous.get("super_resolution")
    text = markdown(doc) if results else ""
    if sr is not None:
        doc["super_resolution"] = sr
        text += "\n## Super-resolution 8x8 -> 16x16 (N = 1797)\n\n" + sr_markdown(sr)
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
