"""Teacher (noise, image) pairs as ``stepdistill make-pairs`` writes them: the folder format and its reader."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..cache import file_sha256
from .images import DataError

MANIFEST = "pairs.json"
FORMAT = "stepdistill-pairs"
VERSION = 1
PROMPT_EMBEDDINGS = "prompt-embeddings.safetensors"
LABEL_MODES = ("balanced", "random")
#: manifest keys that must be equal for a re-run to resume in the same folder (``n`` may change)
SETTINGS_KEYS = ("teacher_weights", "teacher_dtype", "prediction_type", "scheduler", "timesteps", "solver", "nfe",
                 "guidance_scale", "seed", "labels", "num_classes", "prompts_sha256", "shard_size", "resolution",
                 "channels")
TMP_PATTERN = re.compile(r"^pairs-\d{5}\.safetensors\.tmp-\d+$")
SHARD_PATTERN = re.compile(r"^pairs-\d{5}\.safetensors$")


def shard_name(k: int) -> str:
    return f"pairs-{k:05d}.safetensors"


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: Path, name: str = MANIFEST, fmt: str = FORMAT) -> dict | None:
    """The manifest ``name`` of a sharded cache folder (make-pairs', or another cache of that kind such as AGD's
    trajectories, ``fmt``); None when there is none."""
    path = out_dir / name
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); delete the folder {out_dir} (or use another --out) "
                        "and make the pairs again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise DataError(f"{path} is not a {fmt} manifest; use another folder")
    return manifest


def settings_key(manifest_settings: dict) -> str:
    return sha256_json({k: manifest_settings.get(k) for k in SETTINGS_KEYS})


class PairDataset(torch.utils.data.Dataset):
    """The pairs in a ``make_pairs`` folder, loaded into memory.

    Items: ``noise`` and ``image`` (float32 ``(C, H, W)``), ``class_label`` (int64) for class-conditional pairs, or
    ``prompt_index`` plus the prompt's text conditioning (``encoder_hidden_states``, ... named as ``Cond`` fields,
    so ``Cond.from_batch(batch)`` reads them) for prompt pairs. ``manifest`` is the folder's ``pairs.json``;
    ``noise``, ``images``, ``labels`` (or ``prompt_index``) are the stacked tensors.

    Raises :class:`~stepdistill.data.DataError` for a missing folder, a folder without a manifest or shards, an
    unfinished run (unless ``allow_incomplete``: then the completed shards are served), and a manifest that does
    not match its shards. ``verify=True`` also checks each shard's sha256 against the manifest.
    """

    def __init__(self, folder, *, allow_incomplete: bool = False, verify: bool = False):
        from safetensors import safe_open

        folder = Path(folder).expanduser()
        hint = f"make them with `stepdistill make-pairs --teacher TEACHER --out {folder}`"
        if not folder.is_dir():
            raise DataError(f"pairs folder {folder} does not exist; {hint}")
        manifest = read_manifest(folder)
        if manifest is None:
            raise DataError(f"{folder} holds no {MANIFEST}, so it is not a pairs folder; {hint}")
        shards = manifest.get("shards") or []
        total = sum(s["count"] for s in shards)
        rerun = "re-run the make-pairs command that made it to finish it"
        if not shards:
            raise DataError(f"{folder} holds no completed shard of pairs; {rerun}")
        if not manifest.get("complete") and not allow_incomplete:
            raise DataError(f"{folder} is unfinished: {total} of {manifest.get('n')} pairs "
                            f"({len(shards)} of {manifest.get('num_shards')} shards); {rerun}")
        key = settings_key(manifest)
        shape = (manifest["channels"], manifest["resolution"], manifest["resolution"])
        cond_key = "prompt_index" if manifest.get("prompts") else "class_labels"
        has_cond = manifest.get("labels") is not None
        noise, images, conds, expected_start = [], [], [], 0
        for k, shard in enumerate(sorted(shards, key=lambda s: s["start"])):
            path = folder / shard["file"]
            bad = f"the manifest {folder / MANIFEST} does not match its shards"
            if not path.is_file():
                raise DataError(f"{bad}: {shard['file']} is missing; {rerun}")
            if shard["start"] != k * manifest["shard_size"]:
                raise DataError(f"{bad}: shard {shard['file']} starts at {shard['start']}, expected "
                                f"{k * manifest['shard_size']}; {rerun}")
            if verify and shard.get("sha256") != file_sha256(path):
                raise DataError(f"{bad}: {shard['file']} has another sha256 than the manifest records (changed or "
                                f"damaged); delete it and {rerun}")
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {name: f.get_tensor(name) for name in f.keys()}
            except Exception as exc:
                raise DataError(f"{path} is not a readable safetensors file ({exc}); delete it and {rerun}") from exc
            problems = []
            if meta.get("settings_key") != key:
                problems.append("it was made with other settings")
            for name in ("noise", "image"):
                t = tensors.get(name)
                if t is None or tuple(t.shape) != (shard["count"], *shape):
                    problems.append(f"{name} has shape {None if t is None else tuple(t.shape)}, expected "
                                    f"{(shard['count'], *shape)}")
            if has_cond and (cond_key not in tensors or len(tensors[cond_key]) != shard["count"]):
                problems.append(f"{cond_key} is missing or has the wrong length")
            if "index" in tensors and not torch.equal(
                    tensors["index"], torch.arange(shard["start"], shard["start"] + shard["count"])):
                problems.append("its sample indices are not the ones the manifest lists")
            if problems:
                raise DataError(f"{bad}: {shard['file']}: {'; '.join(problems)}")
            noise.append(tensors["noise"])
            images.append(tensors["image"])
            if has_cond:
                conds.append(tensors[cond_key])
            expected_start = shard["start"] + shard["count"]
        if manifest.get("complete") and expected_start != manifest.get("n"):
            raise DataError(f"the manifest {folder / MANIFEST} lists {expected_start} pairs in its shards but "
                            f"n = {manifest.get('n')}; {rerun}")
        self.folder, self.manifest = folder, manifest
        self.noise, self.images = torch.cat(noise), torch.cat(images)
        self.labels = torch.cat(conds) if has_cond and cond_key == "class_labels" else None
        self.prompt_index = torch.cat(conds) if has_cond and cond_key == "prompt_index" else None
        self.num_classes = manifest.get("num_classes")
        self.prompts = manifest.get("prompts")
        self.prompt_tensors = {}
        if self.prompt_index is not None:
            path = folder / PROMPT_EMBEDDINGS
            if not path.is_file():
                raise DataError(f"{folder} has prompt pairs but no {PROMPT_EMBEDDINGS}; {rerun}")
            from safetensors.torch import load_file

            self.prompt_tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("extra.")}

    @property
    def timesteps(self) -> list[float]:
        return self.manifest["timesteps"]

    def __len__(self):
        return len(self.noise)

    def __getitem__(self, i):
        item = {"noise": self.noise[i], "image": self.images[i]}
        if self.labels is not None:
            item["class_label"] = self.labels[i]
        if self.prompt_index is not None:
            p = int(self.prompt_index[i])
            item["prompt_index"] = self.prompt_index[i]
            item["prompt"] = self.prompts[p]
            item.update({k: v[p] for k, v in self.prompt_tensors.items()})
        return item


# --------------------------------------------------------------------------------------------------------------
