"""The trainer's evaluation: every ``eval.every`` steps and at the end, the same figures on every world size.

1. The validation curve (``validation.py``) on the held-out set: ``eval.shards``, or for the embedded
   default a synthetic set made like the training set with ``eval.synthetic_seed``.
2. Sample videos from fixed prompts with the EMA weights and the ``sample.*`` sampler settings; prompt ``i``
   starts from noise drawn from ``(eval.seed, i)``, so a video depends on the weights only. Data-parallel
   rank ``r`` renders the prompts with ``i % dp_size == r``; the first rank of each replica writes them to
   ``eval/step_N/iii.mp4``; rank 0 adds a frame strip (``eval/step_N.png``, one row per prompt it holds)
   and returns every video as ``eval/video/iii`` (a ``LoggedVideo``: the metrics logger sends it to W&B).
3. ``eval.scorers`` on those videos; per-video figures are summed across ranks into slots (exact), so the
   means are those of one process.

Nothing here touches the training state: no global RNG draw, the model back in its mode, the EMA swapped
out again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lcv_train.errors import ConfigError
from lcv_train.eval.validation import ValSample, sample_noise, validation_loss

log = logging.getLogger("lcv_train")


class Evaluator:
    def __init__(self, trainer):
        self.t = trainer
        cfg = trainer.cfg
        self.cfg = cfg.eval
        dims = trainer.dims
        self.dp_rank, self.dp_size = dims.dp_rank, dims.dp_size
        self.leader = dims.cp_rank == 0 and dims.tp_rank == 0
        self.device = trainer.device
        self.data_cfg = self._heldout_config()
        self.held_out_captions: list[str] = []
        if self.data_cfg is not None and self.cfg.samples:
            if self.cfg.samples < self.dp_size:
                raise ConfigError(f"eval.samples: {self.cfg.samples} is fewer than the {self.dp_size} data-parallel ranks")
        if self.data_cfg is not None:
            self.held_out_captions = [c for _, _, c in self._read(max(self.cfg.num_prompts, 1), encode=False)]
        self.prompts = (list(self.cfg.prompts) or [c for c in self.held_out_captions[: self.cfg.num_prompts] if c]
                        or list(cfg.sample.captions))
        from lcv_train.rewards import build_scorer

        self.scorers = [build_scorer(name) for name in self.cfg.scorers]

    # -- the held-out set ------------------------------------------------------------------------
    def _heldout_config(self):
        """The held-out set's data config (read in shard order, one epoch, T2V), or None when there is none."""
        from data_loaders import to_data_config, validate

        cfg, t = self.cfg, self.t
        shards = list(cfg.shards)
        syn = t.cfg.synthetic
        if not shards and syn.enabled and not t.cfg.data.get("shards"):
            from data_loaders.synthetic import ensure_synthetic_shards

            root = Path(syn.dir).expanduser()
            name = f"heldout_n{cfg.synthetic_n}_f{syn.frames}_{syn.height}x{syn.width}_fps{syn.fps:g}_seed{cfg.synthetic_seed}"
            shards = [ensure_synthetic_shards(str(root / name), n=cfg.synthetic_n, frames=syn.frames,
                                              height=syn.height, width=syn.width, fps=syn.fps,
                                              seed=cfg.synthetic_seed, rank=t.rank, world_size=t.dims.world_size)]
        if not shards:
            if t.rank == 0 and cfg.samples:
                log.info("eval: no held-out set (eval.shards), so no validation loss")
            return None
        data = dict(t.cfg.data)
        data.update(shards=shards, subsets={}, epochs=1, shuffle=False, shuffle_buffer=0, num_workers=0,
                    batch_size=cfg.batch_size, batch_sizes=[], tasks={"t2v": 1.0, "i2v": 0.0, "vc": 0.0},
                    temporal_stride=t.codec.temporal_stride,
                    spatial_multiple=t.codec.spatial_stride * t.cfg.model.patch_size[1])
        return validate(to_data_config(data))

    def _read(self, n: int, encode: bool = True):
        """The first ``n`` held-out samples: ``(index, batch row, caption)``; every rank reads the same ones."""
        from data_loaders import build_loader
        from data_loaders.decode import video_to_float

        loader = build_loader(self.data_cfg, 0, 1, self.cfg.seed)  # one reader: the order is the world size's none
        out = []
        try:
            for batch in loader:
                captions = list(batch.get("caption") or [""] * len(batch["keys"]))  # cached shards: no text
                if encode:
                    with torch.no_grad():
                        if "latents" in batch:
                            lat = batch["latents"].float()
                        else:
                            lat = self.t.codec.encode(video_to_float(batch["video"].to(self.device))).float().cpu()
                        if "text" in batch:
                            text, mask = batch["text"], batch["text_mask"]
                        else:
                            text, mask = self.t.text_encoder.encode(captions)
                for j, caption in enumerate(captions):
                    if len(out) == n:
                        break
                    row = (lat[j], text[j].float().cpu(), mask[j].bool().cpu()) if encode else None
                    out.append((len(out), row, caption))
                if len(out) == n:
                    break
        finally:
            loader.close()
        return out

    # -- one evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, step: int) -> dict:
        t = self.t
        was_training = t.model.training
        t.model.eval()
        metrics: dict[str, float] = {}
        try:
            ctx = t.ema.swapped_in() if t.ema is not None else _Null()
            with ctx:
                if self.data_cfg is not None and self.cfg.samples:
                    metrics.update(self._validation())
                if self.prompts and (self.cfg.videos or self.scorers):
                    metrics.update(self._samples(step))
        finally:
            t.model.train(was_training)
        log.info("%s", summary_line(step, metrics))  # the console (above the progress bar) and the log file
        return metrics

    def _validation(self) -> dict[str, float]:
        read = self._read(self.cfg.samples)
        n = len(read)
        samples = [ValSample(i, *row) for i, row, _ in read if i % self.dp_size == self.dp_rank]
        curve = validation_loss(self.t.model, samples, n, self.cfg.sigmas, self.cfg.seed, dp_rank=self.dp_rank,
                                dp_size=self.dp_size, contributes=self.leader, batch_size=self.cfg.batch_size,
                                device=self.device, autocast=self.t.engine.autocast)
        out = {f"eval/val_loss/sigma_{s:g}": v for s, v in curve.items()}
        out["eval/val_loss"] = sum(curve.values()) / len(curve)
        return out

    def _samples(self, step: int) -> dict:
        from lcv_train.sampling import sample

        t, s = self.t, self.t.cfg.sample
        P = len(self.prompts)
        mine = [i for i in range(P) if i % self.dp_size == self.dp_rank]
        chunks = [mine[k:k + self.cfg.batch_size] for k in range(0, len(mine), self.cfg.batch_size)]
        n_calls = len(chunks)
        if dist.is_initialized():
            c = torch.tensor([n_calls], device=self.device)
            dist.all_reduce(c, op=dist.ReduceOp.MAX)
            n_calls = int(c)
        C, T, h, w = t.codec.latent_shape(s.frames, s.height, s.width)
        figures: dict[str, torch.Tensor] = {}
        videos: dict[int, torch.Tensor] = {}
        for k in range(n_calls):
            idx = chunks[k] if k < len(chunks) else (chunks[-1] if chunks else [0])  # padding calls are discarded
            text, mask = t.text_encoder.encode([self.prompts[i] for i in idx])
            noise = torch.stack([sample_noise((C, T, h, w), self.cfg.seed, 1_000_000 + i) for i in idx]).to(self.device)
            with t.engine.autocast():
                latents = sample(t.model, text.float(), mask, (C, T, h, w), s, noise=noise)
            if k >= len(chunks):
                continue
            video = t.codec.decode(latents.float()).float().clamp(-1, 1).cpu()  # [b, 3, F, H, W]
            for j, i in enumerate(idx):
                videos[i] = video[j]
            for scorer in self.scorers:
                d = scorer.details(video, [self.prompts[i] for i in idx], s.fps)
                for key, vals in d.items():
                    name = f"eval/{scorer.name}" if key == scorer.name else f"eval/{scorer.name}/{key}"
                    slot = figures.setdefault(name, torch.zeros(P, dtype=torch.float64))
                    if self.leader:
                        for j, i in enumerate(idx):
                            slot[i] = float(vals[j])
        out = {}
        for name in sorted(figures):
            vec = figures[name].to(self.device)
            if dist.is_initialized():
                dist.all_reduce(vec)
            out[name] = float(vec.mean())
        if self.cfg.videos:
            out.update(self._save(step, videos))
        return out

    def _save(self, step: int, videos: dict[int, torch.Tensor]) -> dict:
        """Write this rank's videos; rank 0 returns all of them as ``eval/video/iii`` entries (``LoggedVideo``)."""
        from data_loaders.decode import encode_mp4
        from lcv_train.training.metrics import LoggedVideo

        t, fps = self.t, self.t.cfg.sample.fps
        folder = t.run_dir / "eval" / f"step_{step:07d}"
        if self.leader:
            folder.mkdir(parents=True, exist_ok=True)
            for i, video in videos.items():
                (folder / f"{i:03d}.mp4").write_bytes(encode_mp4(to_uint8_frames(video), fps=fps))
        if t.rank == 0:
            (folder / "prompts.txt").write_text("\n".join(self.prompts) + "\n")
            if videos:
                write_frame_strip(folder.with_suffix(".png"), [videos[i] for i in sorted(videos)])
        if dist.is_initialized():
            dist.barrier()
        if t.rank != 0:
            return {}
        return {f"eval/video/{p.stem}": LoggedVideo(p, self.prompts[int(p.stem)]) for p in sorted(folder.glob("*.mp4"))}


def to_uint8_frames(video: torch.Tensor):
    """[3, F, H, W] in [-1, 1] -> uint8 numpy [F, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_frame_strip(path: Path, videos: list[torch.Tensor], scale: int = 4) -> Path:
    """One row of frames per video ([3, F, H, W] in [-1, 1]), a 1-pixel gap, upscaled ``scale``x: a PNG."""
    from PIL import Image

    rows = []
    for v in videos:
        frames = to_uint8_frames(v)  # [F, H, W, 3]
        F_, H, W, _ = frames.shape
        gap = np.full((H, 1, 3), 255, dtype=np.uint8)
        parts = []
        for f in range(F_):
            parts += [frames[f], gap]
        rows.append(np.concatenate(parts[:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    sep = np.full((1, width, 3), 255, dtype=np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def summary_line(step: int, m: dict[str, float]) -> str:
    parts = []
    if "eval/val_loss" in m:
        curve = " ".join(f"{k.rsplit('_', 1)[1]}:{v:.3f}" for k, v in m.items() if k.startswith("eval/val_loss/sigma_"))
        parts.append(f"val loss {m['eval/val_loss']:.4f} (sigma {curve})")
    for k, v in m.items():
        if k.startswith("eval/") and k.count("/") == 1 and k != "eval/val_loss":
            name = k.split("/", 1)[1]
            sub = " ".join(f"{part} {m[f'{k}/{part}']:.2f}" for part in ("colour", "shape", "motion")
                           if f"{k}/{part}" in m)
            parts.append(f"{name} {v:.3f}" + (f" ({sub})" if sub else ""))
    return f"eval at step {step}: " + ("; ".join(parts) if parts else "nothing measured")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
