"""``lcv-export CHECKPOINT OUT [--weights ema|model] [--lora] [--base PUBLISHED]`` (also ``python -m
lcv_train.export``): a training checkpoint (any world size, sharded DCP) -> a consolidated published-format
folder (``OUT/dit``) for inference.

CHECKPOINT is a ``step_N`` directory, a run's ``checkpoints`` directory or a run directory (the latest
published checkpoint is used).

A LoRA run (its ``meta.json`` has a ``lora`` entry: the ``LoRAConfig``) is exported with the adapters merged
into the base by default, or, with ``--lora``, as the adapters alone in the published LongCat LoRA format
(``OUT/lora/<--lora-name>.safetensors``, what the published demos load with ``dit.load_lora``). The LoRA
tensors come from the EMA (``--weights ema``) or the model; the base weights from the checkpoint when it holds
them, otherwise from ``--base`` (default: the run's ``init_from`` recorded in ``meta.json``). Reading
checkpoints is ``lcv_train.checkpoints.ours``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lcv_train.checkpoints import export_published_dit
from lcv_train.checkpoints.ours import load_lora_run, read_meta, read_our_weights, resolve_checkpoint
from lcv_train.errors import CheckpointError


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
        is_lora = "lora" in read_meta(ckpt)
        if args.lora and not is_lora:
            raise CheckpointError(f"{ckpt} is not a LoRA run (its meta.json has no lora entry); export it "
                                  f"without --lora")
        if is_lora:
            model = load_lora_run(ckpt, args.weights, args.base)
        else:
            cfg, sd = read_our_weights(ckpt, args.weights)
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
