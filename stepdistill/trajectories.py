"""The teacher's classifier-free-guided sampling trajectories, cached for AGD (adapter guidance distillation):
``make_trajectories`` writes them as sharded safetensors the way ``make-pairs`` writes pairs (its seeding, shard and
manifest helpers), and :class:`TrajectorySet` reads them.

As agd's ``sample_trajectories.py`` (cristianpjensen/agd, ../shared/reference/methods.md 1.5): trajectory ``i`` draws
its noise and then its guidance scale ``s ~ U[s_min, s_max]`` from its own generator (``sample_generator(seed, i)``
of :mod:`stepdistill.pairs`, then a random condition with ``labels="random"``; ``balanced``: class / prompt
``i % n``), and the teacher samples it with DDIM (eta 0) at ``steps`` timesteps of its scheduler with CFG at ``s``
(standard form). Every step records the point and the guided noise prediction there::

    x       (N*S, C, H, W) f32   the trajectory's point x_t
    eps     (N*S, C, H, W) f32   eps_u + s (eps_c - eps_u) at x_t (CFG in any parameterization, converted: the same)
    t       (N*S,) f32           the timestep
    scale   (N*S,) f32           s
    index   (N*S,) i64           the trajectory
    class_labels / prompt_index  (N*S,) i64 (conditional teachers)

Folder: ``trajectories.json`` (the manifest: settings, the teacher's fingerprint, completed shards),
``trajectories-00000.safetensors``, ... (``shard_size`` trajectories each; written under a temporary name and renamed,
then listed), and ``prompt-embeddings.safetensors`` for text teachers. A re-run with the same settings resumes; other
settings in the same folder are refused.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .conditioning import Cond
from .data import DataError
from .data.pairs import LABEL_MODES, PROMPT_EMBEDDINGS, read_manifest, sha256_json
from .locks import hold_folder
from .pairs import _plan, _shard_metadata, _write_json, add_shard, pair_timesteps, sample_generator
from .solvers import ddim_from_x0

MANIFEST = "trajectories.json"
FORMAT = "stepdistill-trajectories"
SHARD = "trajectories-{:05d}.safetensors"
_SHARD_RE = re.compile(r"^trajectories-\d{5}\.safetensors(\.tmp-\d+)?$")


def trajectory_draws(indices, seed: int, shape, guidance_range, labels: str | None, num_conditions: int | None):
    """Noise ``(B, *shape)``, scales ``(B,)`` and condition indices ``(B,)`` (or None) of trajectories ``indices``."""
    lo, hi = float(guidance_range[0]), float(guidance_range[1])
    noise, scales, conds = [], [], []
    for i in indices:
        g = sample_generator(seed, i)
        noise.append(torch.randn(shape, generator=g))
        scales.append(lo + (hi - lo) * float(torch.rand((), generator=g)))
        if labels == "random" and num_conditions:
            conds.append(int(torch.randint(num_conditions, (), generator=g)))
        elif num_conditions:
            conds.append(int(i) % num_conditions)
    return (torch.stack(noise), torch.tensor(scales), torch.tensor(conds, dtype=torch.int64) if conds else None)


@torch.no_grad()
def guided_trajectory(teacher, schedule, noise, cond: Cond, scale: torch.Tensor, timesteps) -> list[tuple]:
    """``[(x_t, eps_cfg, t), ...]`` along the teacher's DDIM path from ``noise`` with CFG at ``scale`` (per sample)."""
    x, out = noise, []
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = teacher(x, tt, cond, guidance_scale=scale)
        out.append((x.float().cpu(), schedule.convert(x0, x.float(), tt, "sample", "epsilon").float().cpu(), float(t)))
        if i + 1 < len(timesteps):
            x = ddim_from_x0(x0, x, schedule, tt, float(timesteps[i + 1]))
    return out


def make_trajectories(teacher, scheduler, out_dir, n: int, *, steps: int, guidance_range, resolution: int,
                      channels: int, fingerprint: str, num_classes: int | None = None, prompt_cond: Cond | None = None,
                      prompts: list[str] | None = None, seed: int = 0, labels: str = "balanced", batch_size: int = 64,
                      shard_size: int = 256, device=None, progress: bool = False) -> Path:
    """Write ``n`` guided trajectories of ``teacher`` (a Denoiser with its null condition / class) into ``out_dir``;
    returns the manifest. ``prompt_cond``: the text conditions, one row per prompt (``prompts``: their text)."""
    if labels not in LABEL_MODES:
        raise DataError(f"labels must be one of {', '.join(LABEL_MODES)}, not {labels!r}")
    for name, value in (("n", n), ("steps", steps), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, not {value!r}")
    out_dir = Path(out_dir).expanduser()
    with hold_folder(out_dir, "stepdistill trajectories"):
        return _write(teacher, scheduler, out_dir, n, steps, list(map(float, guidance_range)), resolution, channels,
                      fingerprint, num_classes, prompt_cond, prompts, seed, labels, batch_size, shard_size, device,
                      progress)


def _write(teacher, scheduler, out_dir, n, steps, guidance_range, resolution, channels, fingerprint, num_classes,
           prompt_cond, prompts, seed, labels, batch_size, shard_size, device, progress) -> Path:
    device = torch.device(device or next(teacher.parameters()).device)
    timesteps = pair_timesteps(scheduler, steps)
    num_conditions = len(prompts) if prompt_cond is not None else num_classes
    settings = {"teacher_weights": fingerprint, "prediction_type": teacher.prediction_type, "timesteps": timesteps,
                "steps": steps, "guidance_range": guidance_range, "seed": int(seed),
                "labels": labels if num_conditions else None, "num_classes": num_classes,
                "prompts_sha256": sha256_json(prompts) if prompts is not None else None, "shard_size": shard_size,
                "resolution": resolution, "channels": channels}
    key = sha256_json(settings)
    plan = _plan(n, shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(out_dir, MANIFEST, FORMAT)
    done = {}
    if old is not None:
        diffs = [k for k in settings if old.get(k) != settings[k]]
        if diffs:
            raise DataError(f"{out_dir} holds trajectories made with other settings ({', '.join(diffs[:4])}); use "
                            "another folder (objective.trajectories) or delete it to make them again")
        for shard in old.get("shards", []):
            k = shard["start"] // shard_size
            path = out_dir / shard["file"]
            if (k < len(plan) and (shard["start"], shard["count"]) == plan[k] and path.is_file()
                    and (_shard_metadata(path) or {}).get("settings_key") == key):
                done[k] = shard
    listed = {s["file"] for s in done.values()}
    for path in out_dir.iterdir():
        if _SHARD_RE.match(path.name) and path.name not in listed:
            path.unlink()
    manifest = {"format": FORMAT, "version": 1, **settings, "n": n, "num_shards": len(plan), "prompts": prompts,
                "complete": False, "shards": [done[k] for k in sorted(done)]}
    if prompt_cond is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in prompt_cond.as_dict().items()}, str(out_dir / PROMPT_EMBEDDINGS))
    _write_json(out_dir / MANIFEST, manifest)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=sum(plan[k][1] for k in done), desc="teacher trajectories", disable=not progress)
    try:
        for k in [k for k in range(len(plan)) if k not in done]:
            start, count = plan[k]
            rows = {name: [] for name in ("x", "eps", "t", "scale", "index", "cond")}
            for b in range(start, start + count, batch_size):
                idx = list(range(b, min(b + batch_size, start + count)))
                noise, scale, cond_idx = trajectory_draws(idx, seed, (channels, resolution, resolution),
                                                          guidance_range, labels, num_conditions)
                cond = (prompt_cond[cond_idx] if prompt_cond is not None else
                        Cond(class_labels=cond_idx) if cond_idx is not None else Cond())
                path_points = guided_trajectory(teacher, teacher.schedule, noise.to(device), cond.to(device),
                                                scale.to(device), timesteps)
                for x, eps, t in path_points:
                    rows["x"].append(x)
                    rows["eps"].append(eps)
                    rows["t"].append(torch.full((len(idx),), t))
                    rows["scale"].append(scale)
                    rows["index"].append(torch.tensor(idx, dtype=torch.int64))
                    if cond_idx is not None:
                        rows["cond"].append(cond_idx)
                bar.update(len(idx))
            tensors = {name: torch.cat(v) for name, v in rows.items() if v and name != "cond"}
            if rows["cond"]:
                tensors["prompt_index" if prompt_cond is not None else "class_labels"] = torch.cat(rows["cond"])
            add_shard(out_dir / SHARD.format(k), tensors, key, plan, k, done, manifest, out_dir / MANIFEST)
    finally:
        bar.close()
    manifest["complete"] = True
    _write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


class TrajectorySet:
    """The points of a :func:`make_trajectories` folder in memory: ``x``, ``eps``, ``t``, ``scale`` (one row per
    point), and their condition (``cond(rows)``: class labels, or the prompt's text tensors)."""

    def __init__(self, folder):
        from safetensors.torch import load_file

        folder = Path(folder)
        manifest = read_manifest(folder, MANIFEST, FORMAT)
        if manifest is None or not manifest.get("complete"):
            raise DataError(f"{folder} holds no complete set of teacher trajectories; make them again (delete it)")
        parts = [load_file(str(folder / s["file"])) for s in sorted(manifest["shards"], key=lambda s: s["start"])]
        self.manifest = manifest
        self.tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.prompt_cond = (Cond.from_dict(load_file(str(folder / PROMPT_EMBEDDINGS)))
                            if "prompt_index" in self.tensors else None)

    def __len__(self) -> int:
        return len(self.tensors["t"])

    def rows(self, idx: torch.Tensor, device=None) -> tuple[dict, Cond]:
        """The points ``idx`` (x, eps, t, scale) and their condition, on ``device``."""
        batch = {k: self.tensors[k][idx].to(device) for k in ("x", "eps", "t", "scale")}
        if "class_labels" in self.tensors:
            cond = Cond(class_labels=self.tensors["class_labels"][idx])
        elif self.prompt_cond is not None:
            cond = self.prompt_cond[self.tensors["prompt_index"][idx]]
        else:
            cond = Cond()
        return batch, cond.to(device)
