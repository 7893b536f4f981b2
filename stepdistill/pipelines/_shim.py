"""The one-line module an export writes next to a stepdistill class (``pipeline.py``, ``scheduler/scheduler.py``),
so that ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds the *installed* class. It runs
nothing but that import; no code travels with the folder."""
from __future__ import annotations

from pathlib import Path

SHIM = "from stepdistill.pipelines import {name}  # noqa: F401  (the installed class; nothing else runs)\n"


def write_shim(path: Path, name: str) -> None:
    path.write_text(SHIM.format(name=name))


def only_stepdistill_shims(folder: Path) -> bool:
    """True when every ``.py`` file of an export folder (top level and component folders) is one of our shims."""
    files = [*folder.glob("*.py"), *folder.glob("*/*.py")]
    if not files:
        return False
    prefix, suffix = SHIM.split("{name}")
    for f in files:
        text = f.read_text()
        name = text[len(prefix):len(text) - len(suffix)] if text.startswith(prefix) and text.endswith(suffix) else ""
        if not name.isidentifier():
            return False
    return True
