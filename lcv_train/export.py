"""``lcv-export CHECKPOINT OUT [--weights ema|model]`` (also ``python -m lcv_train.export``): a training checkpoint (any world
size, sharded DCP) -> a consolidated published-format folder (``OUT/dit``) for inference.

CHECKPOINT is a ``step_N`` directory, a run's ``checkpoints`` directory or a run directory (the latest
published checkpoint is used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lcv_train.checkpoints import export_published_dit
from lcv_train.errors import CheckpointError
from lcv_train.model import DiTConfig, LongCatDiT


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path).expanduser()
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "meta.json").is_file():
        return p
    raise FileNotFoundError(f"no checkpoint at {p}: expected {p / 'meta.json'} or {p / 'checkpoints' / 'latest'}")


def _load_tp_checkpoint(ckpt: Path, prefix: str, cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """A tensor-parallel checkpoint: read every rank's pieces and put the full tensors back together."""
    from parallel.tensor_parallel import consolidate_tp_state_dict

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and hasattr(m, "size")}
    if not sd:
        raise CheckpointError(f"{ckpt} has no {prefix.rstrip('.')} weights; use --weights model")
    dcp.load(sd, checkpoint_id=str(ckpt))
    full = consolidate_tp_state_dict({k[len(prefix):]: v.float() for k, v in sd.items()}, cfg)
    return full


def load_training_weights(ckpt: Path, weights: str = "ema") -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = DiTConfig.from_json_dict(meta["model"])
    stored = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    if any("@tp" in k for k in stored):
        return cfg, _load_tp_checkpoint(ckpt, "ema." if weights == "ema" else "engine.model.", cfg)
    with torch.device("cpu"):
        model = LongCatDiT(cfg)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    if weights == "ema":
        state = {"ema": dict(sd)}
        try:
            dcp.load(state, checkpoint_id=str(ckpt))
        except Exception as e:  # EMA disabled in that run, or only some weights trained
            raise CheckpointError(f"{ckpt} has no EMA weights for every parameter ({e.__class__.__name__}); "
                                  f"use --weights model") from e
        return cfg, state["ema"]
    state = {"engine": {"model": dict(sd)}}
    dcp.load(state, checkpoint_id=str(ckpt))
    return cfg, state["engine"]["model"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lcv-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg, sd = load_training_weights(ckpt, args.weights)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"lcv-export: error: {e}", file=sys.stderr)
        return 2
    out = export_published_dit(sd, cfg, args.out, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    print(f"exported {ckpt} ({args.weights} weights) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
