"""How much a digits FID moves with the noise seed, and which 4-step timesteps suit a consistency student.

One exported student is scored with the bench's protocol (digits-CNN FID, N = 2,000) at several noise seeds, with
its scheduler's own 1-, 2- and 4-step timesteps and with other 4-step schedules (``stepdistill eval --timesteps``),
next to the teacher's best point (DDIM, 64 steps) at the same seeds. Consistency models choose their intermediate
timesteps by FID (Song et al. 2023 search them); the table gives the mean and standard deviation over the seeds, so
a schedule is judged by more than one draw.

    stepdistill train configs/lcm_digits_1step.yaml && stepdistill export runs/lcm_digits_1step --out runs/lcm1
    python benchmarks/consistency_sampling.py runs/lcm1 [--seeds 0,1,2,3] [--schedules 999,899,799,699] [--out DIR]

``--schedules none`` scores only the pipeline's own 1, 2 and 4 steps (for a scheduler that takes no custom
timesteps, such as a TSCD student's DDIMScheduler). ``--etas 0,0.3`` also scores a TCD export's 4 steps (its own
timesteps and each schedule) at those gammas (``stepdistill eval --eta``):

    stepdistill export runs/lcm_digits_1step --out runs/lcm1_tcd objective.sampler=tcd
    python benchmarks/consistency_sampling.py runs/lcm1_tcd --etas 0,0.3,0.6,1

``--out`` defaults to benchmarks/results/consistency_sampling; results.json and table.md go to a folder named after
the pipeline's (runs/lcm1 -> lcm1/). Finished evaluations are reused (rerun the same command).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from distribution_matching import sh

# 4-step schedules on the 10-point grid (99, 199, ..., 999) of lcm_digits_1step; LCMScheduler's own is 999/799/499/299
SCHEDULES = ["999,899,799,699", "999,899,799,599", "999,899,799,499"]
TEACHER = "digits-teacher"  # its best point, DDIM at 64 steps: the goals' denominator, at the same seeds


def score(pipeline: Path | str, seed: int, nfe: str, timesteps: str | None, out: Path, log: Path,
          eta: str | None = None) -> list[dict]:
    name = f"seed{seed}_" + (f"ts{timesteps.replace(',', '_')}" if timesteps else f"nfe{nfe.replace(',', '_')}")
    name += f"_eta{eta}" if eta is not None else ""
    folder = "teacher" if pipeline == TEACHER else Path(pipeline).resolve().name
    path = out / "evals" / folder / name / "results.json"
    if not path.is_file():
        cmd = ["stepdistill", "eval", str(pipeline), "--seed", str(seed), "--n", "2000", "--out", str(path),
               "--metrics", "fid,kid", "--no-progress", "--threads", "2"]
        cmd += ["--eta", eta] if eta is not None else []
        sh(cmd + (["--timesteps", timesteps] if timesteps else ["--nfe", nfe]), log)
    return json.loads(path.read_text())["models"][0]["results"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipeline", type=Path, help="an exported consistency student")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--schedules", default=";".join(SCHEDULES),
                   help="timesteps to score (4 of them, or any number), separated by ';' (default: %(default)s); "
                        "'none' for none")
    p.add_argument("--etas", default="", help="a TCD export's gammas to score at 4 steps, e.g. 0,0.3,0.6")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/consistency_sampling"))
    args = p.parse_args()
    etas = [e.strip() for e in args.etas.split(",") if e.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    schedules = [] if args.schedules == "none" else [ts.strip() for ts in args.schedules.split(";") if ts.strip()]
    report = args.out / args.pipeline.resolve().name  # results.json and table.md of this pipeline
    report.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    config = json.loads((args.pipeline / "scheduler" / "scheduler_config.json").read_text())
    scheduler = config["_class_name"]
    fids: dict[str, list[float]] = {}
    for seed in seeds:
        (r,) = score(TEACHER, seed, "64", None, args.out, log)
        fids.setdefault("teacher DDIM, 64", []).append(r["fid"])
        for r in score(args.pipeline, seed, "1,2,4", None, args.out, log):
            fids.setdefault(f"{r['nfe']} ({scheduler})", []).append(r["fid"])
        for ts in schedules:
            (r,) = score(args.pipeline, seed, "4", ts, args.out, log)
            fids.setdefault(f"{len(ts.split(','))} ({ts.replace(',', ', ')})", []).append(r["fid"])
        for eta in etas:
            (r,) = score(args.pipeline, seed, "4", None, args.out, log, eta)
            fids.setdefault(f"4 ({scheduler}, gamma {eta})", []).append(r["fid"])
            for ts in schedules:
                (r,) = score(args.pipeline, seed, "4", ts, args.out, log, eta)
                fids.setdefault(f"{len(ts.split(','))} ({ts.replace(',', ', ')}, gamma {eta})", []).append(r["fid"])
        print(f"seed {seed} done", flush=True)
    teacher = statistics.mean(fids["teacher DDIM, 64"])
    rows = [{"steps": k, "fid": v, "mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
             "mean_over_teacher": statistics.mean(v) / teacher} for k, v in fids.items()]
    (report / "results.json").write_text(json.dumps({"pipeline": str(args.pipeline), "seeds": seeds, "n": 2000,
                                                       "rows": rows}, indent=1) + "\n")
    lines = ["| steps (timesteps) | FID mean | FID sd | mean / teacher's | " + " | ".join(f"seed {s}" for s in seeds)
             + " |", "|---|---|---|---|" + "---|" * len(seeds)]
    lines += [f"| {r['steps']} | {r['mean']:.4f} | {r['sd']:.4f} | {r['mean_over_teacher']:.2f}x | "
              + " | ".join(f"{f:.4f}" for f in r["fid"]) + " |" for r in rows]
    (report / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
