"""Where a model's starting weights come from (``trainer.init_from``): one ``WeightSource`` per kind.

``init_source(model, path, weights)`` checks, cheaply (configs, headers, checkpoint metadata; every rank
runs it, so a bad path stops all ranks alike), that the weights at ``path`` fit ``model`` and returns the
source; ``source.read()`` then gives ``{published name: full tensor}`` (called by rank 0 alone when the
model is sharded) and ``source.load_into(model)`` fills a plain model. Kinds: a published LongCat-Video
folder (``lcv_train.checkpoints.published``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lcv_train.lora import is_lora_name

WEIGHTS = ("ema", "model")


@dataclass
class WeightSource:
    path: Path  # the published dit/ folder, or our step_N checkpoint
    kind: str  # published | checkpoint
    weights: str = "ema"  # which of a checkpoint's weights (ignored for a published folder)

    def read(self) -> dict[str, torch.Tensor]:
        """Every DiT tensor by published name, whole (LoRA adapters not included)."""
        from lcv_train.checkpoints.published import load_published_state_dict

        return load_published_state_dict(self.path)

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
    """The checked source of ``model``'s starting weights at ``path`` (see the module docstring)."""
    from lcv_train.checkpoints.published import check_published_dit

    return WeightSource(check_published_dit(model, path), "published", weights)
