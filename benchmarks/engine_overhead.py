"""Engine overhead: one DMD2 iteration of the training loop against the sum of its network passes timed alone.

A DMD2 iteration with the generator updated (TTUR step) and the GAN term on runs, on the shipped digits teacher:
generator phase — generator forward+backward, teacher and fake-score forwards at the DM timestep, the fake score's
bottleneck forward+backward for the GAN term, AdamW; critic phase — generator forward (no grad), fake-score
forward+backward (denoising loss), two discriminator feature passes+backward, AdamW. Each pass is timed alone on
the same shapes (median of repeats); the loop's iteration is timed through ``DistillTrainer``.

    python benchmarks/engine_overhead.py [--batch 64] [--steps 20] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stepdistill.trainers import resolve
from stepdistill.conditioning import Cond
from stepdistill.quickstart import COMMON, DMD2, _merge
from stepdistill.trainers import build_trainer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/engine_overhead.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        raw = _merge(_merge(COMMON, DMD2), {"output_dir": tmp, "train": {
            "batch_size": args.batch, "max_steps": 3, "checkpoint_every": 0, "progress": False, "log_every": 1000}})
        trainer = build_trainer(resolve(raw))
        o = trainer.objective
        trainer.train(resume=None)  # warm-up (3 iterations)
        trainer.train_cfg.max_steps = 3 + args.steps
        t0 = time.perf_counter()
        trainer.train(resume=None)
        loop = (time.perf_counter() - t0) / args.steps  # includes the final checkpoint and save (amortised below)
        t0 = time.perf_counter()
        trainer.save_checkpoint()
        with trainer.ema_weights():
            o.save_pretrained(Path(tmp) / "final")
        loop -= (time.perf_counter() - t0) / args.steps

    n, shape = args.batch, (args.batch, 1, 16, 16)
    cond = Cond(class_labels=torch.randint(0, 10, (n,)))
    z, t = torch.randn(shape), torch.full((n,), 500.0)
    real = torch.randn(shape)
    gen_params = [q for q in o.generator.parameters() if q.requires_grad]
    critic_params = [q for q in (*o.fake_score.parameters(), *o.disc_head.parameters()) if q.requires_grad]
    opt_g, opt_c = torch.optim.AdamW(gen_params, lr=1e-9), torch.optim.AdamW(critic_params, lr=1e-9)

    def gen_fwd_bwd():
        o.generator(z, torch.full((n,), 999.0), cond).sum().backward()

    def no_grad(net):
        def run():
            with torch.no_grad():
                net(z, t, cond)
        return run

    def gan_generator_term():
        x = z.clone().requires_grad_(True)
        o.disc_head(o._features(o.fake_score, x, t, cond)).sum().backward()

    def fake_denoising():
        o.fake_score(z, t, cond, output="v_prediction").sum().backward()

    def discriminator():
        (o.disc_head(o._features(o.fake_score, z, t, cond)).sum()
         + o.disc_head(o._features(o.fake_score, real, t, cond)).sum()).backward()

    def step(opt):
        def run():
            opt.step()
            opt.zero_grad(set_to_none=False)
        return run

    gen_fwd_bwd(), fake_denoising(), discriminator()  # gradients exist for the optimizer timings
    passes = {
        "generator forward+backward": gen_fwd_bwd,
        "teacher forward (DM, no grad)": no_grad(o.teacher),
        "fake score forward (DM, no grad)": no_grad(o.fake_score),
        "fake score features forward+backward (GAN, generator phase)": gan_generator_term,
        "AdamW step, generator": step(opt_g),
        "generator forward (critic phase, no grad)": no_grad(o.generator),
        "fake score forward+backward (denoising loss)": fake_denoising,
        "discriminator: 2 feature passes+backward": discriminator,
        "AdamW step, critic": step(opt_c),
    }
    seconds = {name: timed(fn, args.repeats) for name, fn in passes.items()}
    total = sum(seconds.values())
    result = {"batch_size": n, "threads": args.threads, "iteration_seconds": loop, "sum_of_passes_seconds": total,
              "overhead_fraction": loop / total - 1, "passes_seconds": seconds,
              "setup": "digits teacher (UNet2DModel 3.9M, 16x16), DMD2 with GAN, generator every step, EMA 0.99"}
    for name, s in seconds.items():
        print(f"{s * 1e3:8.1f} ms  {name}")
    print(f"{total * 1e3:8.1f} ms  sum of passes\n{loop * 1e3:8.1f} ms  one loop iteration "
          f"(overhead {100 * result['overhead_fraction']:+.1f}%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
