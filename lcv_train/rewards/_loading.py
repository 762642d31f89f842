"""Shared checks for scorers that load published weights from a local folder: one clear line when not there."""

from __future__ import annotations

import json
from pathlib import Path

from lcv_train.errors import CheckpointError


def require_files(scorer: str, folder, names, what: str) -> Path:
    """``folder`` must be a directory holding every file in ``names``; else one line naming what is missing."""
    folder = Path(folder).expanduser() if folder else None
    if folder is None or not folder.is_dir():
        raise CheckpointError(f"{scorer}: {what} folder {folder} not found (give a local path to the published files)")
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise CheckpointError(f"{scorer}: {folder} is missing {', '.join(missing)} ({what})")
    return folder


def read_json(scorer: str, path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{scorer}: cannot read {path}: {e}") from None


def embedding_of(output):
    """transformers 4 returns the projected embedding; 5 a model output whose pooler_output is it."""
    return output if hasattr(output, "dim") else output.pooler_output
