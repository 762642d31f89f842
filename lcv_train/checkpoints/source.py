"""Where a model's starting weights come from (``trainer.init_from``): a published LongCat-Video folder
(``published.py``) or one of our runs / checkpoints (``ours.py``).

``init_source(model, path, weights)`` checks, cheaply (configs, safetensors headers, checkpoint metadata;
every rank runs it, so a bad path stops all ranks alike), that the weights at ``path`` fit ``model`` and
returns the source; ``source.read()`` then gives ``{published name: whole tensor}`` (rank 0 alone calls it
when the model is sharded) and ``source.load_into(model)`` fills a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lcv_train.errors import ConfigError
from lcv_train.lora import is_lora_name

WEIGHTS = ("ema", "model")  # which of a checkpoint's weights: the EMA or the optimizer's


@dataclass
class WeightSource:
    path: Path  # the published dit/ folder, or our step_N checkpoint
    kind: str  # published | checkpoint
    weights: str = "ema"  # which of a checkpoint's weights (a published folder has one set)

    def read(self) -> dict[str, torch.Tensor]:
        """Every DiT tensor by published name, whole (LoRA adapters not included): bf16 as published, fp32
        from our checkpoints."""
        if self.kind == "published":
            from lcv_train.checkpoints.published import load_published_state_dict

            return load_published_state_dict(self.path)
        from lcv_train.checkpoints.ours import read_our_weights

        return read_our_weights(self.path, self.weights)[1]

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into ``model`` (a plain, unsharded ``LongCatDiT``), strictly; LoRA adapters, if
        any, are left as they are."""
        own = {k: v for k, v in model.state_dict().items() if not is_lora_name(k)}
        sd = self.read()
        missing, unexpected = model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=False)
        assert not unexpected and all(is_lora_name(k) for k in missing), (missing, unexpected)

    def describe(self) -> str:
        return str(self.path) if self.kind == "published" else f"{self.path} ({self.weights} weights)"


def init_source(model: torch.nn.Module, path: str | Path, weights: str = "ema") -> WeightSource:
    """The checked source of ``model``'s starting weights at ``path``: a LongCat-Video folder (or its
    ``dit/``), a run directory of ours (its latest checkpoint), or a ``step_N`` checkpoint directory."""
    from lcv_train.checkpoints.ours import check_our_checkpoint, is_our_checkpoint
    from lcv_train.checkpoints.published import check_published_dit

    if weights not in WEIGHTS:
        raise ConfigError(f"trainer.init_weights: must be ema|model, got {weights!r}")
    p = Path(path).expanduser()
    if (p / "dit" / "config.json").is_file() or (p / "config.json").is_file():
        return WeightSource(check_published_dit(model, p), "published", weights)
    if is_our_checkpoint(p):
        return WeightSource(check_our_checkpoint(model, p, weights), "checkpoint", weights)
    raise FileNotFoundError(f"{p}: neither a published LongCat-Video folder (no {p / 'dit' / 'config.json'}) nor a "
                            f"run or checkpoint of ours (no checkpoints/latest, meta.json); point trainer.init_from "
                            f"at one of those")


def source_fingerprint(path: str | Path, weights: str = "ema", blocks: int = 64, block_bytes: int = 1 << 16) -> str:
    """A sha256 hex digest of the weights ``init_source(model, path, weights)`` would read: every file of the
    resolved folder (the published ``dit/``, or our ``step_N``: a run directory's latest) by relative name
    and size, and ``blocks`` evenly spaced ``block_bytes`` blocks of each. Another or a rewritten checkpoint
    changes it; a 27 GB model costs a few MB of reads. A missing source raises ``FileNotFoundError``."""
    import hashlib

    from lcv_train.checkpoints.ours import is_our_checkpoint, resolve_checkpoint
    from lcv_train.checkpoints.published import dit_dir

    p = Path(path).expanduser()
    published = (p / "dit" / "config.json").is_file() or (p / "config.json").is_file() or not is_our_checkpoint(p)
    folder = dit_dir(p) if published else resolve_checkpoint(p)  # as init_source decides
    h = hashlib.sha256(b"published" if published else f"checkpoint {weights} weights".encode())
    for f in sorted(x for x in folder.rglob("*") if x.is_file()):
        size = f.stat().st_size
        h.update(f"\n{f.relative_to(folder).as_posix()} {size}\n".encode())
        with open(f, "rb") as fh:
            for k in range(blocks):
                fh.seek(size * k // blocks)
                h.update(fh.read(block_bytes))
    return h.hexdigest()
