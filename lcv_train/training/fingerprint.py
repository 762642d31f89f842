"""The config fingerprint: every rank must run the resolved config that rank 0 runs.

``check_same_config(config)`` is called once at start-up, right after the process group exists and
before anything else uses it. Rank 0 sends its flattened config; every rank compares it with its own,
except ``PER_RANK_KEYS`` (values that may differ from node to node); any difference raises the same
``ConfigError`` on every rank, naming the differing keys and the ranks that differ. Nodes started with
different overrides (``optim.lr``, ``trainer.checkpoint_every``, ``trainer.max_steps``, the model...)
would otherwise train different things side by side, or hang at the first collective that only some
ranks reach.
"""

from __future__ import annotations

import hashlib
import json
import socket

import torch.distributed as dist

from lcv_train.errors import ConfigError

# Keys allowed to differ between ranks: where things live on this node, and the run name (every rank
# takes rank 0's; launch/torchrun.sh fixes one for all).
PER_RANK_KEYS = ("run.name", "trainer.device", "synthetic.dir", "vae.path", "vae.device", "text_encoder.path",
                 "text_encoder.device")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (values as canonical JSON)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def compared(config: dict) -> dict[str, str]:
    return {k: v for k, v in flatten(config).items()
            if not any(k == p or k.startswith(p + ".") for p in PER_RANK_KEYS)}


def fingerprint(config: dict) -> str:
    """A short hash of the compared part of ``config`` (logged by every rank)."""
    return hashlib.sha256(json.dumps(compared(config), sort_keys=True).encode()).hexdigest()[:16]


def differences(mine: dict[str, str], reference: dict[str, str]) -> list[str]:
    return sorted(k for k in set(mine) | set(reference) if mine.get(k) != reference.get(k))


def check_same_config(config: dict) -> str:
    """Compare this rank's resolved config with rank 0's (a collective); return the fingerprint."""
    mine = compared(config)
    digest = fingerprint(config)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return digest
    # Hashes first: one small object each way when (as almost always) every rank agrees.
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if all(d == digests[0] for d in digests):
        return digest
    ref = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(ref, src=0)
    diff = differences(mine, ref[0])
    report = [None] * dist.get_world_size()
    dist.all_gather_object(report, (socket.gethostname(), {k: mine.get(k, "<absent>") for k in diff}))
    keys = sorted({k for _, d in report for k in d})
    ranks = [r for r, (_, d) in enumerate(report) if d]
    first = ranks[0]
    host, values = report[first]
    k = sorted(values)[0]
    raise ConfigError(
        f"the ranks run different configs: {k} is {values[k]} on rank {first} ({host}) and "
        f"{ref[0].get(k, '<absent>')} on rank 0 ({report[0][0]}); differing keys: {', '.join(keys)}; "
        f"differing ranks: {_ranges(ranks)}; start every node with the same overrides "
        f"(allowed to differ: {', '.join(PER_RANK_KEYS)})")


def _ranges(ranks: list[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)
