"""The ``stepdistill eval`` and ``stepdistill bench`` subcommands (parsers and their calls).

Imports stay light at module level (the parser is built for every ``stepdistill`` command)."""
from __future__ import annotations

import argparse
from pathlib import Path

METRICS = ("fid", "kid", "prc", "isc")  # as stepdistill.metrics.fid.METRICS
DEFAULT_TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)  # as stepdistill.metrics.nfe.DEFAULT_TEACHER_NFE


def _error(message: str) -> Exception:
    from ..data import DataError

    return DataError(message)


def parse_nfe(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise _error(f"NFE must be comma-separated integers like 1,2,4, not {text!r}") from None
    if not values or min(values) < 1:
        raise _error(f"NFE must be positive integers like 1,2,4, not {text!r}")
    return values


def parse_timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise _error(f"--timesteps must be comma-separated integers like 999,899,799,499, not {text!r}") from None
    if not values or min(values) < 0 or any(b >= a for a, b in zip(values, values[1:])):
        raise _error(f"--timesteps must be non-negative and decreasing, like 999,899,799,499, not {text!r}")
    return values


def _metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise _error(f"unknown metrics {bad}; choose from {','.join(METRICS)}")
    return names


def _common(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument("--n", type=int, default=n_default, help=f"generated samples per NFE (default {n_default})")
    p.add_argument("--features", default="digits",
                   help="digits (the shipped digits CNN) or inception:PATH (FID Inception weights file)")
    p.add_argument("--reference", default="digits",
                   help="reference images: digits (all 1,797), digits:train, digits:test or folder:PATH")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i uses stepdistill.data.sample_seed(seed, i))")
    p.add_argument("--batch-size", type=int, default=250, help="generation and feature batch (latency is per "
                   "image at this batch size)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (standard form, 1 = none); default: 1 for teachers, the saved one for students")
    p.add_argument("--metrics", default=",".join(METRICS), help="any of fid,kid,prc,isc")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the smaller set's size")
    p.add_argument("--floor-splits", type=int, default=10,
                   help="random halves of the reference for the real-vs-real floor (0: skip it)")
    p.add_argument("--prompts", default=None,
                   help="text-to-image pipelines: a .txt (one prompt per line) or .jsonl prompt file, or "
                        "digits-captions:eval (the default: the captioned digits' held-out prompts); sample i gets "
                        "prompt i %% P")
    p.add_argument("--clip", default=None, metavar="SPEC",
                   help="CLIP score of text-to-image pipelines: digits-clip (the shipped one, the default), "
                        "local-dir:DIR (open_clip_config.json + weights), an open_clip architecture (name or .json) "
                        "with --clip-weights FILE, or none")
    p.add_argument("--clip-weights", default=None, metavar="FILE", help="weights file for --clip ARCH")
    p.add_argument("--clip-scale", type=float, default=100.0,
                   help="CLIP score = scale * max(cos, 0) (default 100; 1 gives the cosine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own); on a busy shared CPU 1 thread can be much faster")
    p.add_argument("--cache-dir", default=None, help="reference-feature cache (default ~/.cache/stepdistill/fid)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python code in an evaluated pipeline folder to run (stepdistill's own exports need no "
                        "such code but its one-line import shims); a folder never grants this itself")


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="FID/KID/precision-recall/IS and latency of one model at one or more NFE")
    p.add_argument("source", metavar="PIPELINE_OR_RUN",
                   help="pipeline folder (model_index.json), teacher or run folder, or digits-teacher")
    p.add_argument("--nfe", default=None, help="comma-separated NFE, e.g. 1,2,4 (default: the model's own steps)")
    p.add_argument("--kind", choices=("teacher", "student"), default=None,
                   help="teacher: sample with DDIM at each NFE; default: student for pipelines, else teacher")
    p.add_argument("--timesteps", default=None,
                   help="a student's timesteps for its len(timesteps)-step point, e.g. 999,899,799,499 (passed to a "
                        "pipeline that takes timesteps=; default: the export's)")
    p.add_argument("--eta", type=float, default=None,
                   help="the pipeline call's eta: a TCD student's gamma in [0, 1] (default: the export's)")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None, help="results JSON (default eval_<name>/results.json); details.json, "
                   "nfe_vs_fid.png and samples/ go next to it")
    _common(p, 2000)

    p = sub.add_parser("bench", help="a teacher at several NFE and students at theirs: results.json + nfe_vs_fid.png")
    p.add_argument("--teacher", default="digits-teacher", help="teacher source, or 'none' (default digits-teacher)")
    p.add_argument("--teacher-nfe", default=",".join(map(str, DEFAULT_TEACHER_NFE)))
    p.add_argument("--student", action="append", default=[], metavar="PATH[@NFE,...]",
                   help="an exported student pipeline folder, at its saved steps or at @1,2,4; repeatable")
    p.add_argument("--out-dir", default="bench", help="where results.json, nfe_vs_fid.png and samples/ go")
    p.add_argument("--reuse", default=None, metavar="RESULTS_JSON",
                   help="an earlier results.json: a model measured there with the same weights, sampler and "
                        "protocol is not generated again (its rows are marked reused)")
    _common(p, 2000)


def _settings(args):
    from .nfe import BenchSettings

    if args.n < 2:
        raise _error("--n must be at least 2")
    if args.batch_size < 1:
        raise _error("--batch-size must be at least 1")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise _error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    return BenchSettings(n=args.n, seed=args.seed, batch_size=args.batch_size, features=args.features,
                         reference=args.reference, metrics=_metrics(args.metrics), kid_subsets=args.kid_subsets,
                         kid_subset_size=args.kid_subset_size, floor_splits=args.floor_splits,
                         cache_dir=args.cache_dir, device=args.device,
                         progress=not args.no_progress, clip_scale=args.clip_scale)


def _prompts(args):
    """The --prompts (read and checked now, before any model loads), or None."""
    if not args.prompts:
        return None
    from .text_alignment import load_eval_prompts

    return load_eval_prompts(args.prompts)


def _load(args, source, kind, name, guidance, prompts):
    """``load_eval_model``; a text-to-image pipeline without --prompts gets digits-captions:eval, said on stdout."""
    from .samplers import load_eval_model
    from .text_alignment import DEFAULT_PROMPTS

    model = load_eval_model(source, kind, name, args.device, guidance, prompts, args.trust_remote_code,
                            default_prompts=DEFAULT_PROMPTS)
    if model.prompts_defaulted:
        print(f"{model.name} is a text-to-image pipeline and no --prompts was given: evaluating it on "
              f"{DEFAULT_PROMPTS} ({len(model.prompts)} held-out captions of the digits' test split; sample i gets "
              "prompt i % P)", flush=True)
    return model


def _clip(args, models):
    """The CLIP model for the text-to-image models (None without any, or with --clip none), loaded and checked
    against their prompts before any sampling."""
    from .text_alignment import DEFAULT_CLIP, check_clip_prompts, resolve_clip

    text = [m for m in models if m.prompts]
    if not text:
        if args.clip not in (None, "none") or args.clip_weights:
            names = ", ".join(f"{m.name} ({type(m.pipe).__name__})" for m in models)
            raise _error(f"--clip scores text-to-image pipelines against their prompts, but {names} take(s) no "
                         "prompts (class-conditional or image-conditioned): drop --clip/--clip-weights")
        return None
    if args.clip_weights and args.clip is None:
        raise _error("--clip-weights FILE needs --clip ARCH (the open_clip architecture of those weights)")
    clip = resolve_clip(args.clip if args.clip is not None else DEFAULT_CLIP, args.clip_weights, args.device)
    if clip is not None:
        for prompts in {m.prompt_set.sha256: m.prompt_set for m in text}.values():
            check_clip_prompts(clip, prompts)
    return clip


def _summary(results: dict) -> str:
    lines = []
    floor = (results.get("protocol") or {}).get("real_vs_real") or {}
    if floor.get("fid_floor") is not None:
        lines.append(f"real vs real at this N (the floor no model can beat): FID {floor['fid_floor']:.4g}")
    for m in results["models"]:
        for r in m["results"]:
            sr = f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}  " if "psnr" in r else ""
            lines.append(f"{m['name']:>20} {m['kind']:>7}  nfe {r['nfe']:>3}  FID {r['fid']:.4g}  "
                         f"KID {r['kid_mean']:.4g} ± {r['kid_std']:.2g}  {sr}{r['seconds_per_image'] * 1e3:.3g} ms/img"
                         + _extra_summary(r))
    return "\n".join(lines)


def _extra_summary(r: dict) -> str:
    """CLIP score, prompt accuracy, diversity and (flow models) straightness of a row, where present."""
    out = ""
    if r.get("clip_score") is not None:
        out += f"  CLIP {r['clip_score']:.4g}"
    if r.get("prompt_accuracy") is not None:
        attrs = ", ".join(f"{a} {v:.2f}" for a, v in (r.get("attribute_accuracy") or {}).items())
        out += f"  prompt acc {r['prompt_accuracy']:.3f} (digit {r['digit_accuracy']:.3f}" + \
               (f"; {attrs})" if attrs else ")")
    if r.get("diversity") is not None:
        real = f" (real {r['diversity_real']:.3g})" if r.get("diversity_real") is not None else ""
        out += f"  diversity {r['diversity']:.3g}{real}"
    if r.get("straightness") is not None:
        out += f"  straightness {r['straightness']:.3g}"
    return out


def run_eval(args) -> int:
    from .nfe import run_benchmark, slug

    settings = _settings(args)
    timesteps = parse_timesteps(args.timesteps) if args.timesteps else None
    model = _load(args, args.source, args.kind, args.name, args.guidance, _prompts(args))
    clip = _clip(args, [model])
    if timesteps:
        model.use_timesteps(timesteps)
    if args.eta is not None:
        if not 0 <= args.eta <= 1:
            raise _error(f"--eta is TCD's gamma and must be in [0, 1], not {args.eta}")
        model.use_eta(args.eta)
    nfes = parse_nfe(args.nfe) if args.nfe else model.default_nfe
    if not nfes:
        raise _error(f"{args.source} does not record its steps: pass --nfe (e.g. --nfe 1,2,4)")
    out = Path(args.out) if args.out else Path(f"eval_{slug(model.name)}") / "results.json"
    results = run_benchmark([(model, nfes)], settings, out, log=_log(args), clip=clip)
    print(_summary(results))
    print(f"wrote {out}")
    return 0


def run_bench(args) -> int:
    from .nfe import run_benchmark

    settings = _settings(args)
    prompts = _prompts(args)
    models = []
    if args.teacher and args.teacher.lower() != "none":
        teacher = _load(args, args.teacher, "teacher", None, args.guidance, prompts)
        models.append((teacher, parse_nfe(args.teacher_nfe)))
    for spec in args.student:
        path, _, nfe = spec.partition("@")
        student = _load(args, path, "student", None, None, prompts)
        nfes = parse_nfe(nfe) if nfe else student.default_nfe
        if not nfes:
            raise _error(f"student {path} does not record its steps: give them as {path}@1,2,4")
        models.append((student, nfes))
    if not models:
        raise _error("nothing to benchmark: give --teacher and/or --student")
    names = [m.name for m, _ in models]
    if len(set(names)) != len(names):
        raise _error(f"models need distinct names (folder names): {names}")
    clip = _clip(args, [m for m, _ in models])
    reuse = _read_results(args.reuse)
    out = Path(args.out_dir) / "results.json"
    results = run_benchmark(models, settings, out, log=_log(args), reuse=reuse, clip=clip)
    print(_summary(results))
    floor = results["protocol"].get("real_vs_real")
    if floor:
        print(f"real vs real: FID floor {floor['fid_floor']:.4g} at N={settings.n} (halves: "
              f"{floor['fid_halves_mean']:.4g} ± {floor['fid_halves_std']:.2g})")
    print(f"wrote {out}, {out.parent / 'nfe_vs_fid.png'}, {out.parent / 'samples'}/ "
          f"({results['protocol']['wall_seconds']:.0f} s)")
    return 0


def _read_results(path: str | None) -> dict | None:
    if not path:
        return None
    import json

    try:
        results = json.loads(Path(path).read_text())
        results["protocol"], results["models"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _error(f"--reuse {path}: not a readable results.json of `stepdistill bench` ({exc})") from None
    return results


def _log(args):
    if args.no_progress:
        return lambda *a, **k: None
    from tqdm.auto import tqdm

    return tqdm.write
