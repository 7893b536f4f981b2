"""Loading and saving teachers: local Diffusers folders, Hub ids (from the local cache), the shipped digits
teacher, and new backbones built from a config for teacher training."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .backbones import unwrap
from .config import ModelConfig
from .denoiser import Denoiser
from .guided import ADAPTER_FILE, load_guidance_adapters, model_class
from .prompts import PromptEncoder, TEXT_COMPONENTS, prompt_family
from .schedule import NoiseSchedule


ASSETS = Path(__file__).parent / "assets"
NAMED_MODELS = {"digits-teacher": ASSETS / "digits-teacher", "digits-t2i": ASSETS / "digits-t2i"}
DENOISER_SUBFOLDERS = ("unet", "transformer")
META_FILE = "stepdistill.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model that cannot be found or does not fit; the message says how to get or fix it."""


@dataclass
class LoadedModel:
    denoiser: Denoiser
    scheduler: object  # the Diffusers scheduler instance the teacher was trained with
    folder: Path | None = None
    meta: dict = field(default_factory=dict)  # num_classes, resolution, channels, ...


_RESOLVED: dict[tuple[str, str | None], Path] = {}
_ENCODERS: dict[tuple, object] = {}


def _local_folder(source: str, revision: str | None) -> Path:
    """The local folder of a model source, resolved once per process (a Hub id: its snapshot in the cache)."""
    key = (source, revision)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve_folder(source, revision)
    return _RESOLVED[key]


def _resolve_folder(source: str, revision: str | None) -> Path:
    if source in NAMED_MODELS:
        folder = NAMED_MODELS[source]
        if not folder.is_dir():
            raise ModelLoadError(f"the shipped model {source!r} is missing from {folder}; reinstall stepdistill")
        return folder
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model source {source} is a file; give a Diffusers model or pipeline folder")
        return run_model_folder(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(f"model folder {source} does not exist (and it is not a Hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (f"'{source}' is not in the local Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}). "
            f"On a machine with internet run `huggingface-cli download {source}` (and copy the cache here), "
            "or pass a local folder as model.source.")
    if offline:
        raise ModelLoadError(hint)
    try:
        return Path(snapshot_download(source, revision=revision))
    except Exception as exc:
        raise ModelLoadError(f"{hint} (download failed: {type(exc).__name__})") from exc


RUN_CONFIG = "config.yaml"  # a training run folder holds it (and its trained model in final/)


def _has_denoiser(folder: Path) -> bool:
    return any((folder / name / "config.json").is_file() for name in DENOISER_SUBFOLDERS) or \
        (folder / "config.json").is_file()


def run_model_folder(folder: Path) -> Path:
    """``folder`` itself, or, for a training run folder (``config.yaml``, no model of its own), the model it
    trained: ``final/`` (its EMA weights where the run keeps an EMA), so that a run is a model source (a reflow round
    on the previous round's run, make-pairs from a student run)."""
    if _has_denoiser(folder) or not (folder / RUN_CONFIG).is_file():
        return folder
    if not _has_denoiser(folder / "final"):
        raise ModelLoadError(f"{folder} is a training run without a trained model (final/): let it finish "
                             f"(`stepdistill train {folder / RUN_CONFIG}` resumes it), or export one of its "
                             "checkpoints (`stepdistill export`) and give that folder")
    return folder / "final"


def pipeline_folder(folder: Path | None) -> Path | None:
    """The Diffusers pipeline folder (``model_index.json``: VAE, tokenizers, text encoders) a model folder belongs
    to: the folder itself, or for a run's ``final/`` the pipeline folder of the model that run started from (its
    ``config.yaml``'s ``model.source``, followed through earlier runs); None when there is none."""
    seen = set()
    while folder is not None and str(folder) not in seen:
        seen.add(str(folder))
        if (folder / "model_index.json").is_file():
            return folder
        config = folder.parent / RUN_CONFIG if folder.name == "final" else None
        if config is None or not config.is_file():
            return None
        try:
            source = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("source")
        except (OSError, yaml.YAMLError):
            return None
        if not source:
            return None
        try:
            folder = _local_folder(str(source), None)
        except ModelLoadError:
            return None
    return None


def _denoiser_folder(folder: Path, subfolder: str | None) -> Path:
    if subfolder:
        if not (folder / subfolder / "config.json").is_file():
            raise ModelLoadError(f"{folder / subfolder} has no config.json (model.subfolder={subfolder!r})")
        return folder / subfolder
    for name in DENOISER_SUBFOLDERS:
        if (folder / name / "config.json").is_file():
            return folder / name
    if (folder / "config.json").is_file():
        return folder
    raise ModelLoadError(f"{folder} holds no Diffusers denoiser: expected unet/config.json, "
                         "transformer/config.json or config.json")


def _diffusers_class(name: str, what: str):
    import diffusers

    cls = getattr(diffusers, name, None) or model_class(name)
    if cls is None:
        raise ModelLoadError(f"{what} class {name!r} is not in diffusers {diffusers.__version__}")
    return cls


def prediction_type_of(scheduler, override: str | None = None) -> str:
    if override:
        return override
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    return scheduler.config.get("prediction_type", "epsilon")


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load a teacher from ``cfg.source`` (or build a new one when ``cfg.backbone`` is set; its folder is then the
    pipeline folder ``cfg.source`` names, if any, whose VAE and text encoders it is trained with)."""
    if cfg.backbone:
        loaded = build_model(cfg)
        loaded.folder = teacher_folder(cfg)
        return loaded
    if not cfg.source:
        raise ModelLoadError("model.source is empty: give a Diffusers folder, a Hub id or 'digits-teacher', "
                             "or set model.backbone to train a new model")
    folder = _local_folder(cfg.source, cfg.revision)
    model_dir = _denoiser_folder(folder, cfg.subfolder)
    model_config = json.loads((model_dir / "config.json").read_text())
    cls = _diffusers_class(model_config.get("_class_name", ""), "model")
    try:
        backbone = cls.from_pretrained(model_dir, torch_dtype=DTYPES[cfg.dtype], variant=cfg.variant)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the weights in {model_dir}: {exc}") from exc
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else model_dir.parent / "scheduler"
    if cfg.scheduler_config:
        scheduler = _diffusers_class(cfg.scheduler, "scheduler").from_config(cfg.scheduler_config)
    elif (sched_dir / "scheduler_config.json").is_file():
        sched_config = json.loads((sched_dir / "scheduler_config.json").read_text())
        name = sched_config["_class_name"]
        import diffusers

        if not hasattr(diffusers, name) and "FlowMatch" in name:
            # an export's stepdistill flow scheduler (pipelines.schedulers): its noise schedule is the stock one's
            name = "FlowMatchEulerDiscreteScheduler"
        scheduler = _diffusers_class(name, "scheduler").from_pretrained(sched_dir)
    else:
        raise ModelLoadError(f"no scheduler found next to {model_dir}: add scheduler/scheduler_config.json or "
                             "set model.scheduler and model.scheduler_config")
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
    adapters = next((p for p in (model_dir / ADAPTER_FILE, folder / ADAPTER_FILE) if p.is_file()), None)
    if adapters is not None:  # an AGD student: the base plus its guidance adapters
        load_guidance_adapters(backbone, adapters)
    return LoadedModel(_make_denoiser(backbone, scheduler, cfg, meta), scheduler, folder, meta)


def teacher_folder(cfg: ModelConfig) -> Path | None:
    """The local folder ``cfg.source`` names. For a model built from ``cfg.backbone`` that is a pipeline folder
    (``model_index.json``) whose VAE and text encoders the new model uses, or None."""
    if not cfg.source:
        return None
    folder = _local_folder(cfg.source, cfg.revision)
    return None if cfg.backbone and not (folder / "model_index.json").is_file() else folder


def _index(folder: Path | None) -> dict:
    path = folder / "model_index.json" if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def vae_scale_factor(folder: Path) -> int:
    """Pixels per latent of a pipeline folder's VAE (``2 ** (len(block_out_channels) - 1)``, as pipelines do)."""
    config = json.loads((Path(folder) / "vae" / "config.json").read_text())
    return 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def prompt_encoder_for(cfg: ModelConfig, resolution: int | None = None):
    """The teacher's own :class:`~stepdistill.conditioning.PromptEncoder` — lazy: nothing is loaded until a prompt
    must be encoded — or None when ``cfg.source`` is not a Diffusers pipeline folder with text encoders.

    ``resolution`` is the (latent) training resolution; SDXL's ``time_ids`` get the pixel size, ``resolution``
    times the VAE's scale factor. The text encoders run in ``cfg.dtype``, like the teacher.
    """
    folder = pipeline_folder(teacher_folder(cfg))
    index = _index(folder)
    if not any(isinstance(index.get(n), list) and index[n][0] is not None
               for n in TEXT_COMPONENTS if n.startswith("text_encoder")):
        return None
    family = prompt_family(str(index.get("_class_name", "")))
    if family is None:
        raise ModelLoadError(f"{folder} has text encoders, but stepdistill does not know how a "
                             f"{index.get('_class_name')} encodes prompts")
    options = {}
    if family == "sdxl" and resolution and (folder / "vae" / "config.json").is_file():
        options["size"] = int(resolution) * vae_scale_factor(folder)
    # one encoder per folder, settings and text files: the data and the objective share it, so a run loads the
    # teacher's text encoders at most once
    text_files = [p for name in index if name.startswith(("text_encoder", "tokenizer"))
                  for p in (folder / name).rglob("*") if p.is_file()]
    files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in text_files)
    key = (str(folder), family, cfg.dtype, cfg.variant, tuple(sorted(options.items())), tuple(files))
    if key not in _ENCODERS:
        try:
            _ENCODERS[key] = PromptEncoder.from_pretrained(folder, family, torch_dtype=DTYPES[cfg.dtype],
                                                           variant=cfg.variant, **options)
        except ValueError as exc:
            raise ModelLoadError(f"cannot encode prompts with the text encoders of {folder}: {exc}") from exc
    return _ENCODERS[key]


def text_null_cond(cfg: ModelConfig, cache_dir=None, resolution: int | None = None):
    """The teacher's unconditional (CFG) condition — the encoded empty prompt, as its pipeline makes it — or
    None for a teacher without text encoders. Cached in ``cache_dir`` (a later run loads no text encoder)."""
    encoder = prompt_encoder_for(cfg, resolution)
    return None if encoder is None else encoder.null(cache_dir).to("cpu")


def load_vae(cfg: ModelConfig):
    """The VAE of the teacher's pipeline folder (``vae/``), or None when it has none (pixel-space teachers)."""
    folder = pipeline_folder(teacher_folder(cfg))
    if folder is None or not (folder / "vae" / "config.json").is_file():
        return None
    config = json.loads((folder / "vae" / "config.json").read_text())
    cls = _diffusers_class(config.get("_class_name", "AutoencoderKL"), "VAE")
    return cls.from_pretrained(folder / "vae", torch_dtype=DTYPES[cfg.dtype], variant=cfg.variant).eval()


def build_model(cfg: ModelConfig, meta: dict | None = None) -> LoadedModel:
    """A new, randomly initialised backbone and scheduler from their configs (teacher training)."""
    cls = _diffusers_class(cfg.backbone, "model.backbone")
    try:
        backbone = cls.from_config(cfg.backbone_config)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"model.backbone_config does not fit {cfg.backbone}: {exc}") from exc
    scheduler = _diffusers_class(cfg.scheduler, "model.scheduler").from_config(cfg.scheduler_config)
    meta = dict(meta or {})
    if cfg.dtype != "float32":
        backbone = backbone.to(DTYPES[cfg.dtype])
    return LoadedModel(_make_denoiser(backbone, scheduler, cfg, meta), scheduler, None, meta)


def set_attention(backbone, attention: str) -> None:
    """``sdpa``: Diffusers' default processors (PyTorch SDPA); ``xformers``: xformers' memory-efficient kernels."""
    if attention == "sdpa":
        return
    if importlib.util.find_spec("xformers") is None:
        raise ModelLoadError('model.attention=xformers needs xformers: pip install -e ".[xformers]", or use '
                             "model.attention=sdpa")
    if not torch.cuda.is_available():
        raise ModelLoadError("model.attention=xformers runs on CUDA GPUs only; use model.attention=sdpa here")
    try:
        backbone.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # xformers reports a missing kernel or build mismatch in several exception types
        raise ModelLoadError(f"xformers attention does not work for {type(backbone).__name__} here ({exc}); use "
                             "model.attention=sdpa") from exc


def _make_denoiser(backbone, scheduler, cfg: ModelConfig, meta: dict) -> Denoiser:
    schedule = NoiseSchedule.from_scheduler(scheduler)
    num_classes = meta.get("num_classes")
    return Denoiser(backbone, schedule, prediction_type_of(scheduler, cfg.prediction_type),
                    null_class=num_classes if num_classes is not None else None)


def save_model(denoiser: Denoiser, scheduler, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write ``unet/`` (or ``transformer/``), ``scheduler/`` and ``stepdistill.json`` (safetensors only)."""
    out_dir = Path(out_dir)
    backbone = unwrap(denoiser.backbone)
    sub = "unet" if "UNet" in type(backbone).__name__ else "transformer"
    backbone.save_pretrained(out_dir / sub, safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")
    (out_dir / META_FILE).write_text(json.dumps({"prediction_type": denoiser.prediction_type, **(meta or {})},
                                                indent=1))
    return out_dir


def check_resolution(backbone, resolution: int) -> None:
    """Raise a clear error when the backbone cannot take images of ``resolution``."""
    model = unwrap(backbone)
    config = model.config
    name = type(model).__name__
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        factor = 2 ** (len(config.block_out_channels) - 1)
    elif name == "FluxTransformer2DModel":
        factor = 2
    else:
        factor = config.get("patch_size") or 1
    if resolution % factor:
        raise ModelLoadError(f"{name} downsamples by {factor}, so the (latent) resolution must be a multiple of "
                             f"{factor}; {resolution} is not: change data.resolution")
