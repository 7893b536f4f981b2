"""``stepdistill quickstart``: the shipped digits teacher -> a 1-step DMD2 student -> an exported pipeline ->
the NFE-versus-FID benchmark, on a laptop CPU in minutes. ``--t2i`` distils the shipped text-to-image teacher
(``digits-t2i``, a StableDiffusionPipeline) by stages 1, 2 and 4 (CFG-3 pairs, regression: see ``T2I_REGRESSION``),
its student exported as a stock StableDiffusionPipeline and benchmarked on the held-out captions with CLIP score,
prompt accuracy and diversity besides FID.

Stages (each resumes if the command is run again with the same ``--out``):

1. ``pairs``: teacher (noise, image) pairs from DPM-Solver++(2M) in 12 steps (``stepdistill make-pairs``; on this
   teacher DPM-Solver++ at 12 steps reaches the FID of DDIM at 32, at 0.4x the cost);
2. ``regression``: a warm start, the student regressing the pairs (Luhman & Luhman 2021; DMD's regression term);
3. ``dmd2``: DMD2 from that student — distribution matching against the teacher with the two time-scale rule
   (fake score every step; here the generator too), without the GAN term (see ``DMD2`` below for why);
4. ``pipeline``: the student exported as a Diffusers pipeline (1 step);
5. the benchmark: the teacher at NFE 1..64 and the student at 1, same N, noise and labels (``stepdistill bench``).

Why the warm start: on this teacher, DMD2 from the teacher's weights alone (its SD recipe) improved a 1-step
student slowly (FID 9.2 -> 7.7 in 500 steps), where a few hundred regression steps on teacher pairs land it near
the teacher's 8-step quality, from where DMD2 sharpens it (see benchmarks/distribution_matching.md).
Each stage's run folder keeps its full config.yaml, so every stage can be rerun by hand with ``stepdistill train``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

TEACHER = "digits-teacher"
TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)
PAIRS = {"n": 4096, "nfe": 12, "solver": "dpmpp_2m"}
COMMON = {
    "model": {"source": TEACHER},
    "train": {"batch_size": 64, "ema_decay": 0.99, "checkpoint_every": 100, "log_every": 25, "sample_every": 0},
}
REGRESSION = {
    "method": "regression",
    "data": {"dataset": "pairs", "resolution": 16, "channels": 1},  # data.path: the pairs folder
    "train": {"max_steps": 300},
    "optim": {"generator": {"lr": 2e-4, "betas": [0.9, 0.999]}},
    "objective": {"student_steps": 1, "regression_distance": "pseudo_huber", "huber_c": 0.03},
}
DMD2 = {
    "method": "dmd2",
    "data": {"dataset": "digits", "resolution": 16, "channels": 1},
    "train": {"max_steps": 150},
    "optim": {"generator": {"lr": 2e-5, "betas": [0.0, 0.999], "every": 1},
              "critic": {"lr": 2e-4, "betas": [0.0, 0.999]}},
    # the GAN term (DMD2's gan_weight_gen 3e-3 / gan_weight_disc 1e-2 on real digits) is left out: from this warm
    # start it scored worse in 150 steps and costs 40% more per step (benchmarks/distribution_matching.md)
    "objective": {"student_steps": 1},  # generator_init: stage 1's run
}
TEACHER_RESULTS = Path(__file__).parent / "assets" / "digits-teacher" / "nfe_vs_fid.json"

# --t2i: the same first stages on the text-to-image teacher's 8x8x4 latents, its CFG-3 samples regressed, so that
# the student draws what the guided teacher draws in one call. DMD2 after the warm start (as above, with the CFG-3
# teacher as real score) made it worse here: FID 1.41 -> 3.37 in 150 steps at the same prompt accuracy (0.77), so
# the text-to-image quickstart stops after the regression stage (benchmarks/results/quickstart-t2i/).
T2I_TEACHER = "digits-t2i"
T2I_GUIDANCE = 3.0  # the teacher's CFG scale (standard form) in its pairs
T2I_TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)
T2I_PAIRS = {"n": 2048, "nfe": 8, "solver": "dpmpp_2m", "prompts": "digits-captions:train"}
T2I_COMMON = {
    "model": {"source": T2I_TEACHER},
    "train": {"batch_size": 64, "ema_decay": 0.99, "checkpoint_every": 100, "log_every": 25, "sample_every": 0},
}
T2I_REGRESSION = {
    "method": "regression",
    "data": {"dataset": "pairs", "resolution": 8, "channels": 4},
    "train": {"max_steps": 300},
    "optim": {"generator": {"lr": 2e-4, "betas": [0.9, 0.999]}},
    "objective": {"student_steps": 1, "regression_distance": "pseudo_huber", "huber_c": 0.03},
}
T2I_TEACHER_RESULTS = Path(__file__).parent / "assets" / "digits-t2i" / "nfe_vs_fid.json"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_configs(out: Path, t2i: bool = False) -> dict[str, dict]:
    """The raw run configs of the training stages (regression, then DMD2; text-to-image: regression only), with
    their output folders under ``out``."""
    common, first = (T2I_COMMON, T2I_REGRESSION) if t2i else (COMMON, REGRESSION)
    stages = {"regression": _merge(_merge(common, first), {"output_dir": str(out / "regression"),
                                                           "data": {"path": str(out / "pairs")}})}
    if not t2i:
        stages["dmd2"] = _merge(_merge(COMMON, DMD2), {"output_dir": str(out / "dmd2"),
                                                       "objective": {"generator_init": str(out / "regression")}})
    return stages


def run_quickstart(out: str | Path = "quickstart", n_eval: int = 2000, recompute_teacher: bool = False,
                   progress: bool = True, t2i: bool = False) -> dict:
    """Run every stage into ``out``; returns (and writes to ``out/quickstart.json``) the timings and the figures.
    ``t2i``: distil the text-to-image teacher (``digits-t2i``) instead of the class-conditional one."""
    # imported here, not at the top: `stepdistill --help` builds this command's parser without loading them
    from .metrics.commands import _summary
    from .metrics.nfe import BenchSettings, run_benchmark
    from .metrics.samplers import load_eval_model
    from .metrics.text_alignment import DEFAULT_CLIP, DEFAULT_PROMPTS, load_eval_prompts, resolve_clip
    from .pairs import make_pairs
    from .runs import export_run
    from .trainers import build_trainer, resolve

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    teacher_source, pairs, teacher_nfe, shipped = ((T2I_TEACHER, T2I_PAIRS, T2I_TEACHER_NFE, T2I_TEACHER_RESULTS)
                                                   if t2i else (TEACHER, PAIRS, TEACHER_NFE, TEACHER_RESULTS))
    guidance = T2I_GUIDANCE if t2i else 1.0

    def stage(name: str, text: str):
        print(f"[quickstart] {name}: {text}", flush=True)
        seconds[name] = time.perf_counter()

    def done(name: str):
        seconds[name] = round(time.perf_counter() - seconds[name], 1)

    stage("pairs", f"{pairs['n']} teacher pairs ({pairs['solver']}, {pairs['nfe']} steps) -> {out / 'pairs'}")
    make_pairs(teacher_source, out / "pairs", pairs["n"], nfe=pairs["nfe"], solver=pairs["solver"],
               guidance_scale=guidance, prompts=pairs.get("prompts"), progress=progress)
    done("pairs")
    for name, raw in stage_configs(out, t2i).items():
        stage(name, f"{raw['train']['max_steps']} steps of {raw['method']} -> {raw['output_dir']}")
        run = resolve(raw)
        run.train.progress = progress
        build_trainer(run).train(resume="latest")
        done(name)
    stage("export", f"1-step pipeline -> {out / 'pipeline'}")
    pipeline = export_run(out / name, out / "pipeline", overwrite=True)  # the last stage's student
    done("export")

    stage("benchmark", f"teacher at NFE {','.join(map(str, teacher_nfe))} and the student, N = {n_eval}")
    prompts = load_eval_prompts(DEFAULT_PROMPTS) if t2i else None
    teacher = load_eval_model(teacher_source, "teacher", guidance=guidance if t2i else None, prompts=prompts)
    student = load_eval_model(str(pipeline), "student", name=f"quickstart{'-t2i' if t2i else ''}-student",
                              prompts=prompts)
    reuse = None if recompute_teacher or not shipped.is_file() else json.loads(shipped.read_text())
    settings = BenchSettings(n=n_eval, progress=progress)
    results = run_benchmark([(teacher, list(teacher_nfe)), (student, student.default_nfe)], settings,
                            out / "results.json", log=print if progress else (lambda *a: None), reuse=reuse,
                            clip=resolve_clip(DEFAULT_CLIP) if t2i else None)
    done("benchmark")
    seconds["total"] = round(time.perf_counter() - started, 1)
    summary = _figures(results, seconds, n_eval)
    (out / "quickstart.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(_summary(results))
    best = f"{summary['teacher_best_fid']:.4g} at NFE {summary['teacher_best_nfe']}"
    print(f"{summary['student_nfe']}-step student FID {summary['student_fid']:.4g} = "
          f"{summary['ratio_to_teacher_best']:.2f}x the teacher's best ({best})"
          + (" [teacher rows reused from the shipped benchmark of these exact weights]"
             if summary["teacher_results_reused"] else ""))
    if "student_prompt_accuracy" in summary:
        print(f"prompt accuracy {summary['student_prompt_accuracy']:.3f} = {summary['prompt_accuracy_ratio']:.2f}x "
              f"the teacher's at NFE {summary['teacher_best_nfe']} ({summary['teacher_prompt_accuracy']:.3f})")
    print(f"wall time {seconds['total'] / 60:.1f} min: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total"))
    print(f"pipeline: {pipeline}\nresults:  {out / 'results.json'}\nplot:     {out / 'nfe_vs_fid.png'}\n"
          f"samples:  {out / 'samples'}/\nload it:  see {pipeline / 'README.md'}")
    return summary


def _figures(results: dict, seconds: dict, n_eval: int) -> dict:
    """The quickstart's figures: the student against the teacher's best FID (and, for text, the prompt accuracy
    against the teacher's at that NFE)."""
    teacher_rows = results["models"][0]["results"]
    best = min(teacher_rows, key=lambda r: r["fid"])
    student = results["models"][1]["results"][0]
    summary = {"student_nfe": student["nfe"], "student_fid": student["fid"], "teacher_best_fid": best["fid"],
               "teacher_best_nfe": best["nfe"], "ratio_to_teacher_best": student["fid"] / best["fid"],
               "seconds": seconds, "teacher_results_reused": any(r.get("reused") for r in teacher_rows), "n": n_eval}
    if student.get("prompt_accuracy") is not None and best.get("prompt_accuracy"):
        summary.update(student_prompt_accuracy=student["prompt_accuracy"],
                       teacher_prompt_accuracy=best["prompt_accuracy"],
                       prompt_accuracy_ratio=student["prompt_accuracy"] / best["prompt_accuracy"],
                       student_clip_score=student.get("clip_score"), teacher_clip_score=best.get("clip_score"),
                       student_diversity=student.get("diversity"), teacher_diversity=best.get("diversity"))
    return summary


def add_cli(sub) -> None:
    p = sub.add_parser("quickstart", help="distil the shipped digits teacher into a 1-step generator, export it "
                                          "and benchmark NFE vs FID (a few minutes on a laptop CPU)")
    p.add_argument("--out", default="quickstart", help="output folder (default ./quickstart); rerun to resume")
    p.add_argument("--n", type=int, default=2000, help="samples per FID point (default 2000)")
    p.add_argument("--recompute-teacher", action="store_true",
                   help="measure the teacher's curve again instead of reusing the shipped measurement of its weights")
    p.add_argument("--t2i", action="store_true",
                   help="distil the shipped text-to-image teacher (digits-t2i) instead, a stock StableDiffusionPipeline "
                        "student scored with CLIP score, prompt accuracy and diversity too")
    p.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    run_quickstart(args.out, args.n, args.recompute_teacher, not args.no_progress, args.t2i)
    return 0
