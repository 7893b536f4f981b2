"""The distribution-matching table: every method on the shipped digits teacher, from the same warm start.

Each method runs its digits recipe (configs/<method>_digits_*.yaml) with the same overrides — the quickstart's
regression warm start as the initial generator (``objective.generator_init``), the generator updated every step,
lr 2e-5 (generator) / 2e-4 (critic), 150 steps, batch 64 — then is exported and scored like everything else
(digits-CNN FID/KID, N = 2000, the bench's noise and labels). Two more rows start from the teacher's weights:
DMD2 with full copies and DMD2 with LoRA generator and fake score on the shared frozen teacher (the memory
comparison). Wall time and peak memory come from each run's ``train_summary.json`` (one process, CPU: peak RSS).

    python benchmarks/distribution_matching.py [--out benchmarks/results/distribution_matching] [--only a,b]
                                               [--warm-start QUICKSTART_OUT]

Runs resume (rerun the same command); results.json and table.md are rewritten from every finished run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from stepdistill import quickstart

STEPS = 150
SHARED = ["optim.generator.every=1", "optim.generator.lr=2e-5", "optim.critic.lr=2e-4",
          f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.sample_every=0", "train.progress=false"]
NO_GAN = ["objective.gan_weight_gen=0", "objective.gan_weight_disc=0"]


def rows(warm: str, pairs: str) -> list[dict]:
    init = [f"objective.generator_init={warm}"]
    return [
        {"name": "dmd2", "config": "configs/dmd2_digits_1step.yaml", "args": init + SHARED,
         "note": "DMD2 with the GAN term on real digits (generator 3e-3, discriminator 1e-2)"},
        {"name": "dmd2_no_gan", "config": "configs/dmd2_digits_1step.yaml", "args": init + SHARED + NO_GAN,
         "note": "DMD2 without the GAN term (the quickstart's stage 2)"},
        {"name": "dmd", "config": "configs/dmd2_digits_1step.yaml",
         "args": ["method=dmd", "data.dataset=pairs", f"data.path={pairs}", "objective.regression_weight=1.0"]
         + init + SHARED + NO_GAN, "note": "DMD: DM + regression (pseudo-Huber) on the same pairs"},
        *({"name": f"f_distill_{d}", "config": "configs/f_distill_digits_1step.yaml",
           "args": init + SHARED + [f"objective.divergence={d}"], "note": f"f-distill, {d} weighting"}
          for d in ("rkl", "kl", "js")),
        {"name": "decoupled_dmd", "config": "configs/decoupled_dmd_digits_1step.yaml", "args": init + SHARED,
         "note": "decoupled DMD (CA guidance 1.5 + DM terms)"},
        {"name": "decoupled_dmd_ca0.25", "config": "configs/decoupled_dmd_digits_1step.yaml",
         "args": init + SHARED + ["objective.ca_weight=0.25"], "note": "decoupled DMD, CA weight 0.25"},
        {"name": "decoupled_dmd_cfg1.2", "config": "configs/decoupled_dmd_digits_1step.yaml",
         "args": init + SHARED + ["objective.ca_weight=0.25", "objective.real_guidance_scale=1.2"],
         "note": "decoupled DMD, CFG 1.2, CA weight 0.25"},
        {"name": "dmd2_cfg1.5", "config": "configs/dmd2_digits_1step.yaml",
         "args": init + SHARED + ["objective.real_guidance_scale=1.5"],
         "note": "DMD2 with the teacher's CFG 1.5 in the coupled form (decoupled DMD's baseline)"},
        {"name": "msd", "config": "configs/msd_digits_1step.yaml", "args": init + SHARED,
         "note": "MSD, 2 students (classes 0-4, 5-9), each from the warm start"},
        {"name": "msd_no_gan", "config": "configs/msd_digits_1step.yaml", "args": init + SHARED + NO_GAN,
         "note": "MSD without the GAN term"},
        {"name": "disback_record", "config": "configs/disback_digits_record.yaml",
         "args": init + ["train.max_steps=100", "objective.record_every=25", "train.progress=false"],
         "note": "DisBack stage 1 (records 4 path points)", "eval": False},
        {"name": "disback", "config": "configs/disback_digits_1step.yaml",
         "args": init + SHARED + ["objective.path={out}/runs/disback_record", "objective.interval=25"],
         "note": "DisBack stage 2: path in reverse (25 steps each), then the teacher"},
        {"name": "dmd2_4step", "config": "configs/dmd2_digits_4step.yaml", "args": init + SHARED, "nfe": [4],
         "note": "DMD2 4-step (backward simulation), from the 1-step warm start"},
        {"name": "dmd2_from_teacher", "config": "configs/dmd2_digits_1step.yaml", "args": SHARED,
         "note": "DMD2 from the teacher's weights (full copies), no warm start"},
        {"name": "dmd2_lora_from_teacher", "config": "configs/dmd2_digits_1step.yaml",
         "args": SHARED + ["objective.generator_lora_rank=32", "objective.fake_score_lora_rank=32",
                           "optim.generator.lr=2e-4", "optim.critic.lr=1e-3"],
         "note": "DMD2 with LoRA (rank 32) generator and fake score on the shared frozen teacher"},
    ]


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def evaluate(run_dir: Path, nfe: list[int], n: int, log: Path) -> dict:
    out = run_dir / "eval" / "results.json"
    if not out.is_file():
        sh(["stepdistill", "export", str(run_dir), "--out", str(run_dir / "pipeline"), "--overwrite"], log)
        sh(["stepdistill", "eval", str(run_dir / "pipeline"), "--nfe", ",".join(map(str, nfe)), "--n", str(n),
            "--out", str(out), "--no-progress"], log)
    return json.loads(out.read_text())


def warm_start(out: Path, log: Path, runs: Path | None = None) -> tuple[Path, Path, dict]:
    """The quickstart's stages 1 and 2 (pairs, regression), under out/runs (or an existing quickstart folder)."""
    from stepdistill.trainers import resolve
    from stepdistill.pairs import make_pairs
    from stepdistill.trainers import build_trainer

    if runs is not None:
        return runs / "regression", runs / "pairs", {}
    runs = out / "runs"
    cfg = quickstart.stage_configs(runs)["regression"]
    t0 = time.perf_counter()
    p = quickstart.PAIRS
    make_pairs(quickstart.TEACHER, runs / "pairs", p["n"], nfe=p["nfe"], solver=p["solver"], progress=False)
    pairs_seconds = time.perf_counter() - t0
    run = resolve(cfg)
    run.train.progress = False
    build_trainer(run).train(resume="latest")
    return runs / "regression", runs / "pairs", {"pairs_seconds": round(pairs_seconds, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/distribution_matching")
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warm-start", default=None, help="a finished `stepdistill quickstart --out DIR` folder: use its "
                    "pairs/ and regression/ instead of making them again")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    warm, pairs, warm_info = warm_start(out, log, Path(args.warm_start) if args.warm_start else None)
    table = [{"name": "regression (warm start)", "note": f"{quickstart.PAIRS['n']} {quickstart.PAIRS['solver']}-"
              f"{quickstart.PAIRS['nfe']} pairs, {quickstart.REGRESSION['train']['max_steps']} steps",
              "run": warm, "nfe": [1], **warm_info}]
    wanted = set(args.only.split(",")) if args.only else None
    for row in rows(str(warm), str(pairs)):
        run_dir = out / "runs" / row["name"]
        if wanted and row["name"] not in wanted and not (run_dir / "train_summary.json").is_file():
            continue
        if not (run_dir / "train_summary.json").is_file():
            cmd = ["stepdistill", "train", row["config"], f"output_dir={run_dir}",
                   *[a.format(out=out) for a in row["args"]]]
            print(f"[{row['name']}] training", flush=True)
            sh(cmd, log)
        table.append({**row, "run": run_dir, "nfe": row.get("nfe", [1])})
    results = []
    for row in table:
        summary = json.loads((row["run"] / "train_summary.json").read_text())
        entry = {"name": row["name"], "note": row["note"], "method": summary["method"],
                 "steps": summary["steps"], "wall_seconds": summary["wall_seconds"],
                 "seconds_per_step": summary["seconds_per_step"], "peak_cpu_rss_mb": summary["peak_cpu_rss_mb"],
                 "trainable_parameters": summary["trainable_parameters"], "config": str(row["run"] / "config.yaml")}
        if row.get("eval", True):
            print(f"[{row['name']}] evaluating", flush=True)
            ev = evaluate(row["run"], row["nfe"], args.n, log)
            entry["results"] = ev["models"][0]["results"]
        results.append(entry)
    teacher = json.loads(quickstart.TEACHER_RESULTS.read_text())
    doc = {"protocol": "digits-CNN FID/KID, N = %d, the bench's noise and labels (see benchmarks/nfe_vs_fid.md)" % args.n,
           "steps": STEPS, "shared_overrides": SHARED, "teacher": teacher["models"][0]["results"], "rows": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "table.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    best = min(r["fid"] for r in doc["teacher"])
    # the frozen teacher is as large as the warm start's generator (the first row trains exactly one such network)
    teacher_params = sum(doc["rows"][0]["trainable_parameters"].values())
    lines = ["| run | NFE | FID | KID | FID / teacher best | train steps | wall time | s/step | peak RSS | "
             "trainable params | model state |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        params = sum(row["trainable_parameters"].values())
        # fp32 weights of the teacher and of every trainable tensor (LoRA bases are the teacher's own tensors),
        # plus a gradient and two AdamW moments per trainable parameter
        state_gib = (4 * (teacher_params + params) + 12 * params) / 2**30
        for r in row.get("results", [{"nfe": "-", "fid": None}]):
            fid = f"{r['fid']:.4f}" if r["fid"] is not None else "-"
            kid = f"{r['kid_mean'] * 1e3:.2f}e-3" if r.get("kid_mean") is not None else "-"
            ratio = f"{r['fid'] / best:.2f}x" if r["fid"] is not None else "-"
            lines.append(f"| {row['name']} | {r['nfe']} | {fid} | {kid} | {ratio} | {row['steps']} | "
                         f"{row['wall_seconds'] / 60:.1f} min | {row['seconds_per_step']:.2f} | "
                         f"{row['peak_cpu_rss_mb'] / 1024:.2f} GiB | {params / 1e6:.2f}M | {state_gib:.3f} GiB |")
    teacher = ", ".join(f"{r['nfe']}: {r['fid']:.3f}" for r in doc["teacher"])
    return "\n".join(lines) + f"\n\nTeacher (DDIM) FID by NFE — {teacher}; best {best:.4f}.\n"


if __name__ == "__main__":
    sys.exit(main())
