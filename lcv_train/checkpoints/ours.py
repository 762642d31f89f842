"""Our own training checkpoints, read back as whole fp32 tensors by published name: the one place that
does (``lcv-export`` and ``trainer.init_from`` both use it).

A checkpoint (``step_N/``: ``meta.json`` + DCP shards, see ``lcv_train.training.checkpoint``) keeps the
model under ``engine.model.<name>`` and the EMA under ``ema.<name>``, whatever layout wrote it: FSDP2 / HSDP /
context parallel save DTensor shards whose global shape DCP records; ZeRO-2/3 save every trainable tensor
whole; tensor parallel saves each TP rank's piece as ``<name>@tp<r>of<tp>`` (put back together by
``parallel.tensor_parallel.consolidate_tp_state_dict``). Reading needs no model and no process group: the
tensors are allocated from DCP's metadata and read on one process.

Which weights: ``model`` (the optimizer's weights) or ``ema`` (the average; a tensor that did not train
has no average of its own and is its own average, so it comes from the model). A LoRA run's checkpoint
holds only the adapters (its ``meta.json`` names the base it started from, ``init_from``): its weights are
that base with the adapters (model or EMA) merged in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from conf.parsing import from_mapping
from lcv_train.errors import CheckpointError
from lcv_train.model import DiTConfig, LongCatDiT

MODEL, EMA = "engine.model.", "ema."


def is_our_checkpoint(path: str | Path) -> bool:
    """Does ``path`` look like a run directory, its ``checkpoints/`` or a ``step_N`` checkpoint of ours?"""
    p = Path(path).expanduser()
    return (p / "meta.json").is_file() or (p / "latest").is_file() or (p / "checkpoints").is_dir()


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``step_N`` directory that ``path`` (a run directory, its ``checkpoints/`` or a ``step_N``) names:
    the latest published one for the first two."""
    p = Path(path).expanduser()
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "meta.json").is_file():
        return p
    raise FileNotFoundError(f"no checkpoint at {p}: expected {p / 'meta.json'} or {p / 'checkpoints' / 'latest'} "
                            f"(has the run saved one yet?)")


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def _stored(ckpt: Path) -> dict:
    """DCP's metadata: every saved key and its global size and dtype (no tensor is read)."""
    try:
        return dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"{ckpt}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def _name(key: str, prefix: str) -> str:
    """The published name of a stored key (wrapper prefixes and the tensor-parallel tag removed)."""
    from parallel.parallelize import canonical_name

    return canonical_name(key[len(prefix):].split("@tp")[0])


def _stored_names(stored: dict, prefix: str) -> set[str]:
    return {_name(k, prefix) for k, m in stored.items() if k.startswith(prefix) and hasattr(m, "size")}


def _read(ckpt: Path, stored: dict, prefix: str, cfg: DiTConfig, skip: set[str] = frozenset()) -> dict:
    """Whole tensors (fp32) stored under ``prefix``, by published name, except the names in ``skip``."""
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()
          if k.startswith(prefix) and hasattr(m, "size") and _name(k, prefix) not in skip}
    if not sd:
        return {}
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)  # this process alone, whatever the others do
    pieces = {k[len(prefix):]: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    if any("@tp" in k for k in pieces):
        from lcv_train.model.parallel_plan import dit_parallel_plan
        from parallel.tensor_parallel import consolidate_tp_state_dict

        pieces = consolidate_tp_state_dict(pieces, cfg, dit_parallel_plan())
    return {_name(k, ""): v for k, v in pieces.items()}


def _dit_names(cfg: DiTConfig) -> set[str]:
    with torch.device("meta"):
        return set(LongCatDiT(cfg).state_dict())


def _no_ema(ckpt: Path) -> CheckpointError:
    return CheckpointError(f"{ckpt} has no EMA weights (its run had ema.decay=0): take its model weights "
                           f"(trainer.init_weights=model, lcv-export --weights model)")


def read_our_weights(path: str | Path, weights: str = "ema") -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """The DiT config and every DiT tensor (fp32, whole, by published name) of the checkpoint ``path`` names
    (see ``resolve_checkpoint``); ``weights``: ``ema`` or ``model``. A LoRA run: base + merged adapters."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = DiTConfig.from_json_dict(meta["model"])
    if "lora" in meta:
        from lcv_train.lora import base_state_dict, merge_lora

        model = load_lora_run(ckpt, weights)
        merge_lora(model)
        return cfg, {k: v.float() for k, v in base_state_dict(model).items()}
    stored = _stored(ckpt)
    sd = {}
    if weights == "ema":
        sd = _read(ckpt, stored, EMA, cfg)
        if not sd:
            raise _no_ema(ckpt)
    sd.update(_read(ckpt, stored, MODEL, cfg, skip=set(sd)))  # what did not train: its own average
    missing = sorted(_dit_names(cfg) - set(sd))
    if missing:
        raise CheckpointError(f"{ckpt}: weight {missing[0]!r} is missing ({len(missing)} missing in all; a ZeRO "
                              f"run saves only the parameters it trains)")
    return cfg, sd


def check_our_checkpoint(model: torch.nn.Module, path: str | Path, weights: str = "ema") -> Path:
    """Check, from ``meta.json`` and DCP's metadata only, that the checkpoint ``path`` names holds ``weights``
    for every tensor of ``model`` (a ``LongCatDiT``; meta, sharded or whole); raise ``CheckpointError``
    naming the first thing that does not fit. Cheap: every rank runs it. Returns the ``step_N`` directory."""
    from lcv_train.checkpoints.published import _model_shapes, check_architecture

    ckpt = resolve_checkpoint(path)
    if not (ckpt / "meta.json").is_file():
        raise CheckpointError(f"{ckpt}: no meta.json; the checkpoint `latest` names is gone (pruned by hand?)")
    meta = read_meta(ckpt)
    check_architecture(DiTConfig.from_json_dict(meta["model"]), model.config, ckpt / "meta.json")
    stored = _stored(ckpt)
    if "lora" in meta:
        _check_lora_run(model, ckpt, meta, stored, weights)
        return ckpt
    ema = _stored_names(stored, EMA)
    if weights == "ema" and not ema:
        raise _no_ema(ckpt)
    have = _stored_names(stored, MODEL) | ema
    own = _model_shapes(model)
    missing = sorted(set(own) - have)
    if missing:
        raise CheckpointError(f"{ckpt}: weight {missing[0]!r} is missing ({len(missing)} missing in all; a ZeRO "
                              f"run saves only the parameters it trains)")
    for key, m in stored.items():
        name = _name(key, MODEL) if key.startswith(MODEL) else _name(key, EMA) if key.startswith(EMA) else None
        if name in own and "@tp" not in key and tuple(m.size) != own[name]:
            raise CheckpointError(f"{ckpt}: weight {name!r} has shape {tuple(m.size)}, model expects {own[name]}")
    return ckpt


def _check_lora_run(model, ckpt: Path, meta: dict, stored: dict, weights: str) -> None:
    from lcv_train.checkpoints.source import init_source
    from lcv_train.lora import LoRAConfig, add_lora, lora_state_dict

    base = meta.get("init_from")
    if not base:
        raise CheckpointError(f"{ckpt} is a LoRA run that holds only its adapters and records no init_from "
                              f"(the base it trained on); export it with lcv-export --base and start from that")
    init_source(model, base, meta.get("init_weights", "ema"))  # the base must fit as well
    with torch.device("meta"):
        adapted = LongCatDiT(DiTConfig.from_json_dict(meta["model"]))
    add_lora(adapted, from_mapping(LoRAConfig, meta["lora"], "lora"))
    prefix = EMA if weights == "ema" else MODEL
    absent = sorted(k for k in lora_state_dict(adapted) if prefix + k not in stored)
    if absent:
        if weights == "ema" and not any(k.startswith(EMA) for k in stored):
            raise _no_ema(ckpt)
        raise CheckpointError(f"{ckpt} has no {prefix.rstrip('.')} value for {absent[0]!r} (is the run's lora "
                              f"config the one in meta.json?)")


def load_lora_run(ckpt: Path, weights: str = "ema", base: str | Path | None = None) -> LongCatDiT:
    """The model of a LoRA run's checkpoint, with its (unmerged) adapters, on CPU in fp32. The base comes
    from the checkpoint when it holds it, else from ``base`` (default: the run's ``init_from``: a published
    folder or, itself, one of our checkpoints)."""
    from lcv_train.checkpoints.source import init_source
    from lcv_train.lora import LoRAConfig, add_lora, base_state_dict, lora_state_dict

    meta = read_meta(ckpt)
    cfg, lora_cfg = DiTConfig.from_json_dict(meta["model"]), from_mapping(LoRAConfig, meta["lora"], "lora")
    stored = _stored(ckpt)
    if any("@tp" in k for k in stored):
        raise CheckpointError(f"{ckpt}: a tensor-parallel LoRA checkpoint; LoRA runs use tp=1")
    with torch.device("cpu"):
        model = LongCatDiT(cfg)
    add_lora(model, lora_cfg)
    base_sd = {k: v.float() for k, v in base_state_dict(model).items()}
    if all(MODEL + k in stored for k in base_sd):
        model.load_state_dict(_read(ckpt, stored, MODEL, cfg, skip=set(lora_state_dict(model))), strict=False)
    else:
        base = base or meta.get("init_from")
        if not base:
            raise CheckpointError(f"{ckpt} holds the LoRA only and records no init_from; pass --base with the "
                                  f"published LongCat-Video folder the run started from")
        init_source(model, base, meta.get("init_weights", "ema")).load_into(model)
    prefix = EMA if weights == "ema" else MODEL
    lora_names = set(lora_state_dict(model))
    absent = sorted(k for k in lora_names if prefix + k not in stored)
    if absent:
        raise CheckpointError(f"{ckpt} has no {prefix.rstrip('.')} value for {absent[0]!r} (is the run's lora "
                              f"config the one in meta.json?)" + ("; use --weights model" if weights == "ema" else ""))
    values = _read(ckpt, stored, prefix, cfg, skip=set(base_sd))
    model.load_state_dict({k: values[k] for k in lora_names}, strict=False)
    return model
