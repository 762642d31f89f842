"""``lcv-export CHECKPOINT OUT [--weights ema|model] [--lora] [--base PUBLISHED]`` (also ``python -m
lcv_train.export``): a training checkpoint (any world size, sharded DCP) -> a consolidated published-format
folder (``OUT/dit``) for inference.

CHECKPOINT is a ``step_N`` directory, a run's ``checkpoints`` directory or a run directory (the latest
published checkpoint is used).

A LoRA run (its ``meta.json`` has a ``lora`` entry: the ``LoRAConfig``) is exported with the adapters merged
into the base by default, or, with ``--lora``, as the adapters alone in the published LongCat LoRA format
(``OUT/lora/<--lora-name>.safetensors``, what the published demos load with ``dit.load_lora``). The LoRA
tensors come from the EMA (``--weights ema``) or the model; the base weights from the checkpoint when it holds
them, otherwise from ``--base`` (default: the run's ``init_from`` recorded in ``meta.json``).
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


def load_lora_run(ckpt: Path, weights: str = "ema", base: str | Path | None = None) -> LongCatDiT:
    """The model of a LoRA run's checkpoint, with its (unmerged) adapters, on CPU in fp32."""
    from lcv_train.checkpoints import load_published_dit
    from lcv_train.lora import LoRAConfig, add_lora, base_state_dict, lora_state_dict

    meta = json.loads((ckpt / "meta.json").read_text())
    cfg, lora_cfg = DiTConfig.from_json_dict(meta["model"]), LoRAConfig(**meta["lora"])
    stored = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    if any("@tp" in k for k in stored):
        raise CheckpointError(f"{ckpt}: a tensor-parallel LoRA checkpoint; LoRA runs use tp=1")
    with torch.device("cpu"):
        model = LongCatDiT(cfg)
    add_lora(model, lora_cfg)
    base_sd = {k: v.float() for k, v in base_state_dict(model).items()}
    if all(f"engine.model.{k}" in stored for k in base_sd):
        state = {"engine": {"model": base_sd}}
        dcp.load(state, checkpoint_id=str(ckpt))
        model.load_state_dict(state["engine"]["model"], strict=False)
    else:
        base = base or meta.get("init_from")
        if not base:
            raise CheckpointError(f"{ckpt} holds the LoRA only and records no init_from; pass --base with the "
                                  f"published LongCat-Video folder the run started from")
        load_published_dit(model, base)
    prefix = "ema." if weights == "ema" else "engine.model."
    lora_sd = {k: v.float() for k, v in lora_state_dict(model).items()}
    absent = [k for k in lora_sd if prefix + k not in stored]
    if absent:
        raise CheckpointError(f"{ckpt} has no {prefix.rstrip('.')} value for {absent[0]!r} (is the run's lora "
                              f"config the one in meta.json?)" + ("; use --weights model" if weights == "ema" else ""))
    state = {"ema": lora_sd} if weights == "ema" else {"engine": {"model": lora_sd}}
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["ema"] if weights == "ema" else state["engine"]["model"], strict=False)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lcv-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--lora", action="store_true",
                    help="LoRA run: write the adapters alone (published LongCat LoRA format) instead of merging them")
    ap.add_argument("--lora-name", default="lora", help="file name under OUT/lora/ for --lora (default: lora)")
    ap.add_argument("--base", default=None,
                    help="LoRA run whose checkpoint holds only the adapters: the published folder it started from")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        is_lora = "lora" in json.loads((ckpt / "meta.json").read_text())
        if args.lora and not is_lora:
            raise CheckpointError(f"{ckpt} is not a LoRA run (its meta.json has no lora entry); export it "
                                  f"without --lora")
        if is_lora:
            model = load_lora_run(ckpt, args.weights, args.base)
        else:
            cfg, sd = load_training_weights(ckpt, args.weights)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"lcv-export: error: {e}", file=sys.stderr)
        return 2
    if is_lora and args.lora:
        from lcv_train.lora import published_lora_state_dict, save_published_lora

        out = save_published_lora(published_lora_state_dict(model, dtype),
                                  Path(args.out).expanduser() / "lora" / f"{args.lora_name}.safetensors")
        print(f"exported the LoRA of {ckpt} ({args.weights} weights) to {out}")
        return 0
    if is_lora:
        from lcv_train.lora import base_state_dict, merge_lora

        merge_lora(model)
        cfg, sd = model.config, base_state_dict(model)
    out = export_published_dit(sd, cfg, args.out, dtype=dtype)
    print(f"exported {ckpt} ({args.weights} weights{', LoRA merged' if is_lora else ''}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
