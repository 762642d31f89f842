"""The one interface every video scorer implements (evaluation metrics and GRPO rewards alike).

A scorer takes a batch of decoded videos and their prompts and returns one number per video::

    scores = scorer(videos, prompts, fps)        # videos [B, 3, F, H, W] float in [-1, 1] -> [B] float32, CPU
    details = scorer.details(videos, prompts, fps)  # {metric name: [B]}; the main score among them

Scorers with weights load them from a local path given in their config and fail with one line naming
the path when it is missing; they live on ``self.device`` only while scoring (``to`` moves them) so that
an idle reward model does not hold GPU memory during training.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch

from lcv_train.errors import ConfigError


class VideoScorer(abc.ABC):
    """Videos + prompts in, one score per video out (higher is better)."""

    name: str = "scorer"

    @abc.abstractmethod
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        """``videos`` [B, 3, F, H, W] in [-1, 1]; returns [B] float32 on the CPU."""

    def details(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> dict[str, torch.Tensor]:
        """Per-video figures to log (each [B]); by default only the score itself."""
        return {self.name: self(videos, prompts, fps)}

    def to(self, device: torch.device | str) -> "VideoScorer":
        """Move any weights to ``device`` (no-op for weights-free scorers)."""
        return self


_REGISTRY: dict[str, Callable[..., VideoScorer]] = {}


def register_scorer(name: str):
    """Class or factory decorator: ``@register_scorer("motion")``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def scorer_names() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def build_scorer(name: str, **kwargs) -> VideoScorer:
    _import_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"scorer {name!r}: unknown (known: {', '.join(sorted(_REGISTRY)) or 'none'})")
    return _REGISTRY[name](**kwargs)


def _import_builtin() -> None:
    """Import the modules that register the built-in scorers (each is optional until it exists)."""
    import importlib
    import pkgutil

    import lcv_train.rewards as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"lcv_train.rewards.{mod.name}")
