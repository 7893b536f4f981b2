"""The ``stepdistill`` command: parse, build, call. Also runs as ``accelerate launch -m stepdistill ...``.

Each command imports what it needs when it runs, so that ``stepdistill --help`` stays fast."""
from __future__ import annotations

import argparse
import sys

#: exit status of a run stopped by a non-finite loss or weights (2: a user error; 128 + N: stopped by signal N)
DIVERGED = 3


def _train(args, method_default: str | None) -> int:
    from .trainers import load_config
    from .trainers import build_trainer

    defaults = {"method": method_default} if method_default else None
    run = load_config(args.config, args.overrides, defaults=defaults)
    if method_default and run.method != method_default:
        from .config import ConfigError

        raise ConfigError(f"train-teacher trains method 'teacher', but the config says method: {run.method}; "
                          "use `stepdistill train` for distillation configs")
    trainer = build_trainer(run)
    trainer.train(resume=None if args.no_resume else "latest")
    if trainer.stopped_by is not None:  # unfinished: a scheduler or an `&&` chain must not take it for success
        return 128 + int(trainer.stopped_by)
    trainer.accelerator.print(f"done: {run.output_dir} (final model in {run.output_dir}/final)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdistill", description="Distil diffusion and flow models into one- to four-step generators. Also runs as `accelerate launch -m stepdistill ...` or `torchrun -m stepdistill ...`.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "distil a teacher with the method a config names"),
                            ("train-teacher", "train a diffusion/flow teacher (method: teacher)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML recipe (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 output_dir=runs/x")
        p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in output_dir")
    from .metrics.commands import add_parsers as add_metric_parsers

    add_metric_parsers(sub)  # eval, bench
    from .runs import add_cli as add_export_parser

    add_export_parser(sub)  # export
    from .pairs import add_cli as add_pairs_parser

    add_pairs_parser(sub)  # make-pairs
    from .quickstart import add_cli as add_quickstart_parser

    add_quickstart_parser(sub)  # quickstart
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Mistakes in what the user gave us: printed as one line, exit status 2, no traceback."""
    from .config import ConfigError
    from .data import DataError
    from .locks import FolderInUse
    from .models import ModelLoadError
    from .trainers.checkpoint import CheckpointError

    return ConfigError, DataError, ModelLoadError, CheckpointError, FolderInUse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # dotted overrides may come after options too (`export RUN --out DIR objective.student_steps=4`), which
    # argparse alone rejects once the positional run folder has taken its (empty) list of overrides
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, None)
        if args.command == "train-teacher":
            return _train(args, "teacher")
        if args.command in ("eval", "bench"):
            from .metrics import commands

            return commands.run_eval(args) if args.command == "eval" else commands.run_bench(args)
        if args.command == "export":
            from .runs import run_cli

            return run_cli(args)
        if args.command == "make-pairs":
            from .pairs import run_cli as run_make_pairs

            return run_make_pairs(args)
        if args.command == "quickstart":
            from .quickstart import run_cli as run_quickstart

            return run_quickstart(args)
    except user_errors() as exc:
        print(f"stepdistill: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # NonFiniteLoss / NonFiniteWeights: the run diverged
        print(f"stepdistill: diverged: {exc}", file=sys.stderr)
        return DIVERGED
    return 1


if __name__ == "__main__":
    sys.exit(main())
