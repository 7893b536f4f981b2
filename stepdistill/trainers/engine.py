"""DistillTrainer: the only training loop. It never names an algorithm."""
from __future__ import annotations

import json
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig, config_hash, decay_updates, save_config, to_dict
from ..data import ResumableBatches, describe, grid_columns, save_grid
from ..locks import hold_folder
from ..models import set_attention
from . import checkpoint as ckpt
from .base import TEACHER_FILE, Objective
from .callbacks import Callback, SampleGrid
from .runtime import (allow_new_precision, diffusers_models, enable_gradient_checkpointing, flat_for_trackers,
                      no_accelerator, no_sync, warmup_stable_decay)


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or inf; no checkpoint of the broken weights was written."""


NonFiniteWeights = ckpt.NonFiniteWeights


class DistillTrainer:
    """Accelerate for devices, DDP/FSDP and mixed precision; one optimizer and LR schedule per phase;
    gradient accumulation and clipping; an EMA of the student; atomic, exactly resumable checkpoints."""

    def __init__(self, objective: Objective, data, config: RunConfig, callbacks: list[Callback] = ()):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.train_cfg = config, config.train
        if self.train_cfg.threads:
            torch.set_num_threads(self.train_cfg.threads)
        self.output_dir = Path(config.output_dir)
        allow_new_precision(self.train_cfg.mixed_precision)
        self.accelerator = Accelerator(cpu=no_accelerator(), mixed_precision=self.train_cfg.mixed_precision,
                                       log_with=self.train_cfg.trackers or None, project_dir=str(self.output_dir))
        acc = self.accelerator
        set_seed(self.train_cfg.seed + acc.process_index)  # torch, numpy and Python's random, per process
        self.objective = objective.to(acc.device)
        self.data = data
        self.callbacks = list(callbacks)
        if self.train_cfg.sample_every:
            self.callbacks.append(SampleGrid(self.train_cfg.sample_every, self.train_cfg.num_samples))
        self.phases = objective.phases(objective.config)
        self._setup_modules()
        self.batches = None
        if data is not None:
            self.batches = ResumableBatches(data, self.train_cfg.batch_size, seed=self.train_cfg.seed,
                                            rank=acc.process_index, world=acc.num_processes)
        self._iter = None
        self.step = 0
        self._stop_signal = None
        self.stopped_by = None  # the signal that stopped the last train() before max_steps, if one did

    # ------------------------------------------------------------------ set-up
    def _setup_modules(self):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        acc, obj = self.accelerator, self.objective
        self.raw, self.wrapped, self.trainable = {}, {}, {}
        self.optimizers, self.lr_schedulers = {}, {}
        seen = set()
        for phase in self.phases:
            if phase.name not in self.config.optim:
                raise ValueError(f"no optimizer settings for phase {phase.name!r}")
            params = []
            for name in phase.modules:
                if name in seen:
                    raise ValueError(f"module {name!r} is in more than one phase")
                seen.add(name)
                module = getattr(obj, name)
                names = [n for n, p in module.named_parameters() if p.requires_grad]
                if not names:
                    raise ValueError(f"phase {phase.name!r}: module {name!r} has no trainable parameters")
                self.raw[name], self.trainable[name] = module, names
                params += [p for p in module.parameters() if p.requires_grad]
            oc = self.config.optim[phase.name]
            if oc.optimizer == "radam":
                optimizer = torch.optim.RAdam(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                                              eps=oc.eps, decoupled_weight_decay=True)
            else:
                optimizer = torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas),
                                              weight_decay=oc.weight_decay, eps=oc.eps)
            updates = max(1, self.train_cfg.max_steps // oc.every)
            if oc.lr_schedule == "warmup_stable_decay":
                self.lr_schedulers[phase.name] = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, warmup_stable_decay(oc.warmup_steps, decay_updates(oc, updates), updates))
            else:
                self.lr_schedulers[phase.name] = get_scheduler(oc.lr_schedule, optimizer,
                                                               num_warmup_steps=oc.warmup_steps,
                                                               num_training_steps=updates)
            self.optimizers[phase.name] = acc.prepare(optimizer)
        for backbone in diffusers_models(obj):
            set_attention(backbone, self.config.model.attention)
        if self.train_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.raw)
        for name, module in self.raw.items():
            self.wrapped[name] = acc.prepare(module)
        # frozen modules are never wrapped nor given to an optimizer (a LoRA student's base may be shared
        # with its teacher, so freeze by parameter, not by module)
        trainable_ids = {id(p) for m in self.raw.values() for p in m.parameters() if p.requires_grad}
        for p in obj.parameters():
            if id(p) not in trainable_ids:
                p.requires_grad_(False)
        self.ema = None
        ema_name = obj.ema_module
        if self.train_cfg.ema_decay > 0 and ema_name in self.raw:
            params = [p for p in self.raw[ema_name].parameters() if p.requires_grad]
            self.ema = EMAModel(params, decay=self.train_cfg.ema_decay, use_ema_warmup=self.train_cfg.ema_warmup,
                                update_after_step=self.train_cfg.ema_update_after)
            self.ema.to(acc.device)

    def _enter_phase(self, phase_name: str):
        """Wrap and unfreeze only the modules of ``phase_name``; the others run raw and frozen."""
        active = next(p for p in self.phases if p.name == phase_name).modules
        for name, module in self.raw.items():
            on = name in active
            params = dict(module.named_parameters())
            for n in self.trainable[name]:
                params[n].requires_grad_(on)
            setattr(self.objective, name, self.wrapped[name] if on else module)

    def _restore_modules(self):
        for name, module in self.raw.items():
            params = dict(module.named_parameters())
            for n in self.trainable[name]:
                params[n].requires_grad_(True)
            setattr(self.objective, name, module)

    # ------------------------------------------------------------------ the loop
    def _next_batch(self) -> dict:
        batch = {"batch_size": self.train_cfg.batch_size}
        if self.batches is not None:
            if self._iter is None:
                self._iter = iter(self.batches)
            batch.update({k: v.to(self.accelerator.device) if torch.is_tensor(v) else v
                          for k, v in next(self._iter).items()})
        return batch

    def _run_phase(self, phase, step: int) -> dict:
        acc, oc = self.accelerator, self.config.optim[phase.name]
        accum = self.train_cfg.grad_accum
        self._enter_phase(phase.name)
        logs = {}
        for micro in range(accum):
            last = micro == accum - 1
            sync = nullcontext() if last else no_sync([self.wrapped[n] for n in phase.modules], acc)
            with sync, acc.autocast():
                loss, terms = self.objective.loss(phase.name, self._next_batch(), step)
            self._check_finite(step, phase.name, loss, terms)
            acc.backward(loss / accum)
            for k, v in terms.items():
                logs[f"{phase.name}/{k}"] = logs.get(f"{phase.name}/{k}", 0.0) + float(v) / accum
        if oc.max_grad_norm:
            params = [p for n in phase.modules for p in self.raw[n].parameters() if p.requires_grad]
            logs[f"{phase.name}/grad_norm"] = float(acc.clip_grad_norm_(params, oc.max_grad_norm))
        optimizer = self.optimizers[phase.name]
        optimizer.step()
        self.lr_schedulers[phase.name].step()
        optimizer.zero_grad(set_to_none=True)
        logs[f"lr/{phase.name}"] = self.lr_schedulers[phase.name].get_last_lr()[0]
        self.objective.after_step(phase.name, step)
        return logs

    def _check_finite(self, step, phase, loss, terms):
        if torch.isfinite(loss).all():
            return
        bad = [k for k, v in terms.items() if not torch.isfinite(torch.as_tensor(v)).all()] or ["loss"]
        raise NonFiniteLoss(f"non-finite loss at step {step}, phase {phase!r}, term(s) {', '.join(bad)}; "
                            "no checkpoint of these weights was written (the last good one is kept). "
                            "Lower the learning rate or check the inputs.")

    def train(self, resume: str | None = "latest") -> Objective:
        """Train to ``train.max_steps``, holding the run folder alone (another run into it fails at once), from
        the latest checkpoint (``resume="latest"``; refused when run-defining settings changed), a checkpoint
        folder, or the start (None). A signal stops it after a checkpoint, with ``stopped_by`` set."""
        with ExitStack() as stack:
            if self.accelerator.is_main_process:
                stack.enter_context(hold_folder(self.output_dir, "another training run"))
            return self._train(resume)

    def _train(self, resume):
        acc, cfg = self.accelerator, self.train_cfg
        self.stopped_by = None
        if resume:
            self._check_settings(resume)
        if acc.is_main_process:
            save_config(self.config, self.output_dir / "config.yaml")
            if self.objective.teacher_fingerprint is not None:  # what a warm start from this run must be used with
                (self.output_dir / TEACHER_FILE).write_text(json.dumps(
                    {"source": self.config.model.source, "fingerprint": self.objective.teacher_fingerprint}, indent=1))
        acc.print(describe(self.data, self.config.data))
        if resume:
            self.load_checkpoint(resume)
        if cfg.trackers:
            acc.init_trackers("stepdistill", config=flat_for_trackers(to_dict(self.config)))
        old_handlers = self._install_signal_handlers()
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.objective.name or "train",
                       dynamic_ncols=True)
        tick, images, logs = time.perf_counter(), 0, {}
        started, first_step = tick, self.step
        try:
            while self.step < cfg.max_steps:
                step = self.step
                for phase in self.phases:
                    if step % self.config.optim[phase.name].every == 0:
                        logs.update(self._run_phase(phase, step))  # the latest value of every term
                        images += cfg.batch_size * cfg.grad_accum * acc.num_processes
                self._restore_modules()
                if self.ema is not None and any(self.objective.ema_module in p.modules for p in self.phases
                                                if step % self.config.optim[p.name].every == 0):
                    self.ema.step([p for p in self.raw[self.objective.ema_module].parameters() if p.requires_grad])
                self.step = step + 1
                self.objective.set_step(self.step)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - tick
                    logs["images_per_s"] = images / max(elapsed, 1e-9)
                    tick, images = time.perf_counter(), 0
                    self.log(self.step, logs)
                    if bar is not None:
                        bar.set_postfix({k.split("/")[-1] if "/" in k and not k.startswith("lr") else k: f"{v:.4g}"
                                         for k, v in logs.items() if not k.startswith("lr/")
                                         and not k.endswith("grad_norm")}, refresh=False)
                if bar is not None:
                    bar.update(1)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
                if self._stop_requested():
                    self.save_checkpoint()
                    self.stopped_by = self._stop_signal or signal.SIGTERM
                    acc.print(f"stopped by signal at step {self.step} of {cfg.max_steps}; checkpoint saved. Run "
                              "the same command again to resume.")
                    return self.objective
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if not self._has_checkpoint(self.step):
                self.save_checkpoint()
            if acc.is_main_process:
                with self.ema_weights():
                    self.objective.save_pretrained(self.output_dir / "final")
                self._write_summary(first_step, time.perf_counter() - started)
            for cb in self.callbacks:
                cb.on_train_end(self)
        finally:
            self._restore_modules()
            if bar is not None:
                bar.close()
            self._restore_signal_handlers(old_handlers)
            if cfg.trackers:
                acc.end_training()
        return self.objective

    def _write_summary(self, first_step: int, seconds: float) -> None:
        """``train_summary.json``: this invocation's steps, wall time and peak memory (process RSS; CUDA allocated)."""
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
        device = self.accelerator.device
        summary = {"method": self.objective.name, "steps": self.step - first_step, "from_step": first_step,
                   "wall_seconds": round(seconds, 2),
                   "seconds_per_step": round(seconds / max(1, self.step - first_step), 4),
                   "batch_size": self.train_cfg.batch_size, "processes": self.accelerator.num_processes,
                   "peak_cpu_rss_mb": round(rss, 1),
                   "peak_cuda_allocated_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                              if device.type == "cuda" else None),
                   "trainable_parameters": {name: sum(p.numel() for n, p in m.named_parameters()
                                                      if n in set(self.trainable[name]))
                                            for name, m in self.raw.items()},
                   "torch_threads": torch.get_num_threads(), "device": str(device)}
        (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    # ------------------------------------------------------------------ logging and samples
    def log(self, step: int, logs: dict) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in logs.items()}}) + "\n")
        if self.train_cfg.trackers:
            acc.log(logs, step=step)

    @contextmanager
    def ema_weights(self):
        """Temporarily put the EMA weights into the student (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        name = self.objective.ema_module
        named = dict(self.raw[name].named_parameters())
        params = [named[n] for n in self.trainable[name]]  # by name: requires_grad is off outside its phase
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def save_samples(self, path: Path, n: int, seed: int = 0) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        g = torch.Generator(device="cpu").manual_seed(seed)
        with self.ema_weights(), torch.no_grad():
            images = self.objective.sample({"batch_size": n}, generator=g)
        return save_grid(images, path, nrow=grid_columns(getattr(self.objective, "num_classes", None)))

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def _has_checkpoint(self, step: int) -> bool:
        return (self.checkpoint_root / f"step_{step:07d}").is_dir()

    def save_checkpoint(self) -> Path:
        """Write every trainable module, the EMA, optimizers, LR schedules, each process's RNG state and the
        data position into a temporary folder, then rename it: a checkpoint is whole or absent. Weights, EMA or
        optimizer state with NaN or inf raise :class:`NonFiniteWeights` and are never written."""
        acc = self.accelerator
        self._check_finite_state()
        final = self.checkpoint_root / f"step_{self.step:07d}"
        tmp = self.checkpoint_root / f".tmp-step_{self.step:07d}"
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        ckpt.save_tree(tmp / f"rng_rank{acc.process_index}", ckpt.rng_state())
        if acc.is_main_process:
            for name, module in self.raw.items():
                ckpt.save_module(module, tmp / f"{name}.safetensors", self.trainable[name])
            for name in self.objective.state_modules:
                module = getattr(self.objective, name)
                ckpt.save_module(module, tmp / f"state_{name}.safetensors", [n for n, _ in module.named_parameters()])
            for name, opt in self.optimizers.items():
                ckpt.save_tree(tmp / f"optimizer_{name}", opt.optimizer.state_dict())
                ckpt.save_tree(tmp / f"lr_schedule_{name}", self.lr_schedulers[name].state_dict())
            if self.ema is not None:
                ckpt.save_tree(tmp / "ema", self.ema.state_dict())
            meta = {"step": self.step, "world": acc.num_processes, "config_hash": config_hash(self.config),
                    "settings": ckpt.flat_settings(to_dict(self.config)),
                    "data": self.batches.state_dict() if self.batches else None,
                    "modules": {n: self.trainable[n] for n in self.raw}, "ema": self.ema is not None}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.finish(tmp, final, self.train_cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _checkpoint_path(self, which: str) -> Path | None:
        if which == "latest":
            dirs = ckpt.step_dirs(self.checkpoint_root)
            return dirs[-1] if dirs else None
        path = Path(which)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist")
        return path

    def _read_meta(self, path: Path) -> dict:
        try:
            meta = json.loads((path / "trainer.json").read_text())
        except (OSError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {path} has no readable trainer.json ({exc}); delete it "
                                       "to resume from the previous checkpoint") from exc
        missing = [k for k in ("step", "world", "modules", "ema", "data") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path}: its trainer.json lacks {', '.join(missing)} (not written "
                                       "by this loop, or damaged); delete it to resume from the previous checkpoint")
        return meta

    def _check_settings(self, which: str) -> None:
        """Refuse to resume with run-defining settings other than the checkpoint's (say which, and how)."""
        path = self._checkpoint_path(which)
        saved = self._read_meta(path).get("settings") if path is not None else None
        if saved is None:  # nothing to resume, or a checkpoint from before settings were recorded
            return
        changed = ckpt.changed_settings(saved, ckpt.flat_settings(to_dict(self.config)), self.train_cfg.allow_changed)
        if changed:
            raise ConfigError(f"{path} was trained with other settings than this run's: {'; '.join(changed)}. "
                              "Resume with the same values, use another output_dir (or --no-resume) for a new run, "
                              "or list the keys in train.allow_changed to continue with the new values on purpose")

    def _check_finite_state(self) -> None:
        for name, module in self.raw.items():
            ckpt.check_finite(((n, p) for n, p in module.named_parameters()), f"{name} weight")
        if self.ema is not None:
            ckpt.check_finite(enumerate(self.ema.shadow_params), "EMA weight")
        for name, opt in self.optimizers.items():
            ckpt.check_finite(((f"{i}.{k}", v) for i, s in enumerate(opt.optimizer.state.values())
                               for k, v in s.items()), f"{name} optimizer state")

    def load_checkpoint(self, which: str = "latest", quiet: bool = False) -> bool:
        """Resume from ``latest`` or a checkpoint folder (each file checked against its recorded sha256); returns
        False when there is nothing to resume."""
        acc = self.accelerator
        path = self._checkpoint_path(which)
        if path is None:
            return False
        meta = self._read_meta(path)
        ckpt.verify(path)
        if meta["world"] != acc.num_processes:
            raise ckpt.CheckpointError(f"checkpoint {path} was written by {meta['world']} processes; resume it "
                                       f"with the same number (this run has {acc.num_processes})")
        if set(meta["modules"]) != set(self.raw):
            raise ckpt.CheckpointError(f"checkpoint {path} holds modules {sorted(meta['modules'])} but this "
                                       f"method trains {sorted(self.raw)}")
        for name, module in self.raw.items():
            ckpt.load_module(module, path / f"{name}.safetensors", self.trainable[name])
        for name in self.objective.state_modules:
            module = getattr(self.objective, name)
            ckpt.load_module(module, path / f"state_{name}.safetensors", [n for n, _ in module.named_parameters()])
        for name, opt in self.optimizers.items():
            opt.optimizer.load_state_dict(ckpt.load_tree(path / f"optimizer_{name}"))
            schedule = self.lr_schedulers[name]
            schedule.load_state_dict(ckpt.load_tree(path / f"lr_schedule_{name}"))
            # this run's schedule sets the next update's lr: the same lr as saved unless the run was resumed with
            # another schedule or length (say, to close on a decay), which then applies from the first update
            lrs = [base * fn(schedule.last_epoch) for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas)]
            for group, lr in zip(opt.optimizer.param_groups, lrs):
                group["lr"] = lr
            schedule._last_lr = lrs
        if self.ema is not None:
            if not meta["ema"]:
                raise ckpt.CheckpointError(f"checkpoint {path} has no EMA but train.ema_decay > 0")
            self.ema.load_state_dict(ckpt.load_tree(path / "ema"))
            self.ema.to(acc.device)
        ckpt.set_rng_state(ckpt.load_tree(path / f"rng_rank{acc.process_index}"))
        if self.batches is not None and meta["data"] is not None:
            self.batches.load_state_dict(meta["data"])
        self.step = int(meta["step"])
        self.objective.set_step(self.step)
        if not quiet:
            acc.print(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return old

    def _on_signal(self, signum, _frame):
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _restore_signal_handlers(self, old):
        for sig, handler in (old or {}).items():
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self._stop_signal is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag > 0)
