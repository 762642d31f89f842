"""What the generic parallel mechanics need to know about a model: its ``ParallelPlan``.

``parallel`` never imports a model. A model says how it is parallelised through a method,
``model.parallel_plan() -> ParallelPlan`` (the DiT's is ``lcv_train/model/parallel_plan.py``): which module
list holds its repeated blocks (FSDP units, activation checkpointing, compile), which modules keep fp32
FSDP groups or cast their inputs, and which linears of a block are split for tensor parallelism and how.
The plan is plain data (module paths), so checkpoint code can use it without building the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TPLinear:
    """A linear inside each block, split across tensor-parallel ranks.

    ``split="column"``: output rows are split; with ``head_parts=n > 0`` the output is laid out
    ``[n, heads, head_dim]`` (fused q/k/v) and each rank keeps its heads of every part, otherwise a
    contiguous row range. ``split="row"``: input columns are split (a contiguous range; the bias is kept
    whole)."""

    path: str  # inside the block, e.g. "attn.qkv"
    split: str  # column | row
    head_parts: int = 0


@dataclass(frozen=True)
class ParallelPlan:
    blocks: str  # the attribute holding the ``nn.ModuleList`` of repeated blocks
    fsdp_fp32: tuple[str, ...] = ()  # modules (paths from the root) with their own fp32 FSDP group
    fsdp_output: str = ""  # the output layer: its own fp32 group, kept gathered after forward
    block_fp32: tuple[str, ...] = ()  # the same, inside each block
    fsdp_inputs: tuple[str, ...] = ()  # modules whose FSDP group casts its inputs (the embedders)
    tp_linears: tuple[TPLinear, ...] = ()
    tp_attention: tuple[str, ...] = ()  # attention modules in a block whose ``heads`` becomes the local count
    tp_partial_grads: tuple[str, ...] = ()  # modules in a block (per-head norms) whose weight grads are partial
    config_heads: str = "num_heads"  # the model config's attributes for the head count and size
    config_head_dim: str = "head_dim"
    extra: dict = field(default_factory=dict, compare=False)

    def tp_linear(self, key: str) -> tuple[TPLinear | None, str]:
        """For a state-dict key ``<blocks>.<i>.<path>.<param>``: its ``TPLinear`` (None when not split) and
        the parameter name."""
        names = key.split(".")
        if len(names) < 4 or names[0] != self.blocks or not names[1].isdigit():
            return None, names[-1]
        path, param = ".".join(names[2:-1]), names[-1]
        for rule in self.tp_linears:
            if rule.path == path:
                return rule, param
        return None, param


def plan_of(model) -> ParallelPlan:
    """The model's plan (``model.parallel_plan()``); a clear error for a model without one."""
    get = getattr(model, "parallel_plan", None)
    if get is None:
        raise TypeError(f"{type(model).__name__} has no parallel_plan(): parallel needs one to shard it "
                        f"(see parallel/plan.py)")
    return get()
