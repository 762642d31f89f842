"""The trainer: a short loop over small components.

shards -> batches (data_loaders) -> encoders -> latents -> the stage's step (``lcv_train.stages``: loss,
backward, ``optimizer_step``: engine step, lr schedule, EMA) -> metrics / checkpoints. Every component with state (model + optimizer via the engine, lr schedule, EMA,
data loader, RNGs, step) is saved by ``Checkpointer``; resume is one call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_loaders.decode import video_to_float
from lcv_train.config import TrainConfig
from lcv_train.encoders import build_text_encoder, build_video_codec
from lcv_train.errors import ConfigError
from lcv_train.model import LongCatDiT
from lcv_train.stages import StageBatch, StepContext, build_stage
from lcv_train.training.checkpoint import Checkpointer, rng_state, set_rng_state
from lcv_train.training.ema import EMA, build_ema
from lcv_train.training.metrics import MetricsLogger, setup_logging
from lcv_train.training.nonfinite import NonFiniteGuard
from lcv_train.training.schedule import build_lr_scheduler
from lcv_train.training.fingerprint import check_same_config
from lcv_train.training.watchdog import PhaseWatchdog
from parallel import build_engine, init_distributed
from parallel.dims import any_rank, start_process_group

log = logging.getLogger("lcv_train")


class Progress:
    """The step counter as a DCP ``Stateful``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])


class _EMAState:
    """The EMA as a DCP ``Stateful``; under tensor parallelism split weights are saved per TP rank."""

    def __init__(self, ema: EMA | None, model, tp_group):
        self.ema, self.model, self.tp_group = ema, model, tp_group

    def state_dict(self):
        if not self.ema:
            return {}
        sd = self.ema.state_dict()
        if self.tp_group is not None:
            from parallel.tensor_parallel import tag_tp_keys

            sd, _ = tag_tp_keys(self.model, sd, None, self.tp_group)
        return sd

    def load_state_dict(self, sd):
        if not self.ema:
            return
        if self.tp_group is not None:
            from parallel.tensor_parallel import untag_tp_keys

            sd, _ = untag_tp_keys(self.model, sd, None, self.tp_group)
        self.ema.load_state_dict(sd)


def _pick_device(choice: str, dims) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: cuda was asked for but no CUDA device is visible")
    return dims.device if torch.cuda.is_available() else torch.device("cpu")


def dp_mean_and_any(loss: torch.Tensor, flag: bool) -> tuple[float, bool]:
    """``(mean of loss over ranks, flag on any rank)`` in one all-reduce and one host sync. Every rank of
    a data-parallel replica holds the same loss (context- and tensor-parallel outputs are gathered), so the
    mean over all ranks is the mean over replicas; a NaN on any rank makes the mean NaN everywhere."""
    packed = torch.stack([loss.detach().float().reshape(()), torch.ones((), device=loss.device) * float(flag)])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and packed.device.type != "cuda":
            packed = packed.cuda()
        dist.all_reduce(packed)  # SUM (AVG is NCCL-only)
        packed[0] /= dist.get_world_size()
    mean, anyflag = packed.tolist()
    return mean, anyflag > 0


class Trainer:
    def __init__(self, cfg: TrainConfig, config_dict: dict | None = None):
        self.cfg = cfg
        self.config_dict = config_dict or {}
        # Several ranks: a stuck phase ends the job naming step and phase; a rank that ends the job ends it
        # on every node. Then every rank must run rank 0's config, before the layout or anything else.
        t = cfg.trainer
        self.watchdog = PhaseWatchdog(t.collective_timeout_s, t.save_timeout_s, on_timeout=self._remove_partial_save)
        self.watchdog.enter("startup", 0)
        start_process_group(cfg.parallel, timeout_s=t.save_timeout_s + 60)
        check_same_config(config_dict if config_dict is not None else dataclasses.asdict(cfg))
        self.dims = init_distributed(cfg.parallel, cfg.model)  # layout errors before any memory is used
        self.rank = self.dims.rank
        self.device = _pick_device(cfg.trainer.device, self.dims)
        if dist.is_initialized():  # every rank uses rank 0's run name (a timestamp default can differ)
            name = [cfg.run.name]
            dist.broadcast_object_list(name, src=0)
            cfg.run.name = name[0]
        self.run_dir = Path(cfg.run.root).expanduser() / cfg.run.name
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        setup_logging(self.run_dir, self.rank)
        if self.rank == 0 and config_dict is not None:
            import yaml

            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))

        # Encoders and the data config first: a missing weight file or a bucket that does not fit the
        # model stops here, before the DiT takes any memory.
        self.codec = build_video_codec(cfg.vae).to(self.device)
        self.text_encoder = build_text_encoder(cfg.text_encoder).to(self.device)
        if self.text_encoder.dim != cfg.model.caption_channels:
            raise ConfigError(f"text_encoder: produces {self.text_encoder.dim}-dim embeddings but "
                              f"model.caption_channels={cfg.model.caption_channels}")
        if self.codec.latent_channels != cfg.model.in_channels:
            raise ConfigError(f"vae: produces {self.codec.latent_channels} latent channels but "
                              f"model.in_channels={cfg.model.in_channels}")
        data_cfg = self._data_config()

        self.stage = build_stage(cfg.stage, cfg)
        self.model = self._build_model()
        self.stage.model_ready(self.model)  # its starting weights, before a checkpoint is loaded over them
        o = cfg.optim
        self.engine = build_engine(self.model, {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay,
                                                "eps": o.eps}, self.dims, cfg.parallel, grad_clip=o.grad_clip,
                                   grad_accum_steps=cfg.trainer.grad_accum, save_frozen=not cfg.lora.rank)
        self.lr_scheduler = build_lr_scheduler(self.engine.optimizer, cfg.schedule, cfg.trainer.max_steps)
        self.ema = build_ema(self.model, cfg.ema.decay) if cfg.ema.decay > 0 else None
        self.progress = Progress()
        self.nonfinite = NonFiniteGuard(cfg.trainer.skip_nonfinite_steps, self.engine.can_skip_nonfinite)

        self.loader = self._build_loader(data_cfg)
        from lcv_train.eval.evaluator import Evaluator

        self.evaluator = Evaluator(self) if cfg.eval.enabled else None  # held-out set, prompts, scorers
        # Noise differs across data-parallel replicas but not across the cp/tp ranks of one replica,
        # which must see the same sample.
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.run.seed * 100003 + self.dims.dp_rank)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.trainer.keep_last)
        self.checkpointer.clean_stale()
        self.resumed_from: Path | None = None
        self._resume()
        self.watchdog.leave()
        self._stop_requested = False
        self.history: list[dict] = []

    # -- setup ---------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        """The DiT, parallelized, with its starting weights (``lcv_train.model.build.build_dit``)."""
        from lcv_train.model.build import build_dit

        cfg = self.cfg
        return build_dit(cfg.model, self.dims, cfg.parallel, self.device, seed=cfg.run.seed,
                         init_from=cfg.trainer.init_from, init_weights=cfg.trainer.init_weights,
                         prepare=self.stage.prepare, initial_parameter=self.stage.initial_parameter)

    def _remove_partial_save(self) -> None:
        """After a timeout: rank 0 removes a half-written checkpoint (``*.tmp``), as the next start would."""
        if self.rank == 0 and getattr(self, "checkpointer", None) is not None:
            import shutil

            for p in self.checkpointer.dir.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _data_config(self):
        """The validated data config, with the synthetic set made on first use."""
        from data_loaders import to_data_config, validate

        data = dict(self.cfg.data)
        syn = self.cfg.synthetic
        subsets = data.get("subsets") or {}
        # Given shards (e.g. from `lcv-data synth`) are what it trains on; the synthetic set fills data.shards,
        # or, with named subsets (stage=sft: curated), every subset that names no shards.
        unfilled = [name for name, s in subsets.items() if not s.get("shards")]
        if syn.enabled and not data.get("shards") and (unfilled or not subsets):
            from data_loaders.synthetic import ensure_synthetic_shards

            root = Path(syn.dir).expanduser()
            name = f"n{syn.n}_f{syn.frames}_{syn.height}x{syn.width}_fps{syn.fps:g}_seed{syn.seed}"
            path = ensure_synthetic_shards(str(root / name), n=syn.n, frames=syn.frames, height=syn.height,
                                           width=syn.width, fps=syn.fps, seed=syn.seed, rank=self.rank,
                                           world_size=self.dims.world_size)
            if subsets:
                data["subsets"] = {n: {**s, "shards": [str(path)]} if n in unfilled else s for n, s in subsets.items()}
            else:
                data["shards"] = [str(path)]
        # Derived from the codec and the model, so they cannot disagree with them.
        data["temporal_stride"] = self.codec.temporal_stride
        data["spatial_multiple"] = self.codec.spatial_stride * self.cfg.model.patch_size[1]
        return validate(to_data_config(data))

    def _build_loader(self, dcfg):
        from data_loaders import build_loader

        op = self._core_model().attention_op
        if hasattr(op, "layout") and self.rank == 0:  # context parallelism: say how each bucket is tiled
            stride = self.codec.spatial_stride
            for frames, height, width in dcfg.buckets:
                rows, cols = height // (stride * self.cfg.model.patch_size[1]), width // (stride * self.cfg.model.patch_size[2])
                log.info("context parallel, bucket %dx%dx%d: %s", frames, height, width, op.layout(rows, cols).describe())
        return build_loader(dcfg, self.dims.dp_rank, self.dims.dp_size, self.cfg.run.seed)

    def _state(self) -> dict:
        tp_group = self.dims.group("tp") if self.dims.tp > 1 else None
        return {"engine": self.engine, "lr_scheduler": self.lr_scheduler,
                "ema": _EMAState(self.ema, self.model, tp_group), "progress": self.progress, "stage": self.stage}

    def _meta(self) -> dict:
        meta = {"model": self.cfg.model.to_json_dict(), "stage": self.cfg.stage.name}
        if self.cfg.lora.rank:  # lcv-export reads these to rebuild, merge or write the LoRA
            from lcv_train.checkpoints.ours import is_our_checkpoint, resolve_checkpoint

            init_from = self.cfg.trainer.init_from
            if init_from and is_our_checkpoint(init_from):  # the step_N it started from, not the run's latest
                init_from = resolve_checkpoint(init_from)
            meta.update(lora=dataclasses.asdict(self.cfg.lora),
                        init_from=str(Path(init_from).expanduser().resolve()) if init_from else None,
                        init_weights=self.cfg.trainer.init_weights)
        return meta

    def _resume(self) -> None:
        choice = self.cfg.trainer.resume
        if choice == "none":
            return
        path = self.checkpointer.latest() if choice == "auto" else Path(choice).expanduser()
        if path is None:
            return
        if not path.is_dir():
            raise ConfigError(f"trainer.resume: {path} is not a checkpoint directory")
        rank_state = self.checkpointer.load(path, self._state(), self._meta())
        # The schedule's position comes from the checkpoint, its peak lr from the config (so a resumed
        # run can change optim.lr).
        sched = self.lr_scheduler
        sched.base_lrs = [self.cfg.optim.lr] * len(sched.base_lrs)
        for group, lam in zip(self.engine.optimizer.param_groups, sched.lr_lambdas):
            group["lr"] = self.cfg.optim.lr * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.engine.optimizer.param_groups]
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
            self.noise_gen.set_state(rank_state["noise_gen"])
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.progress.step)

    def save_checkpoint(self) -> Path:
        self.nonfinite.check_weights(self.model, self.progress.step)
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state(), "noise_gen": self.noise_gen.get_state()}
        path = self.checkpointer.save(self.progress.step, self._state(), rank_state, self._meta())
        log.info("saved checkpoint %s", path)
        return path

    # -- one step ------------------------------------------------------------------------------
    def to_stage_batch(self, batch: dict) -> StageBatch:
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(self.device, non_blocking=True)
            else:
                latents = self.codec.encode(video_to_float(batch["video"].to(self.device, non_blocking=True)))
            if "text" in batch:
                text, mask = batch["text"].to(self.device), batch["text_mask"].to(self.device)
            else:
                text, mask = self.text_encoder.encode(list(batch["caption"]))
        return StageBatch(latents.float(), text.float(), mask.to(torch.bool), int(batch["num_cond_latents"]),
                          pixels=batch.get("video"), captions=list(batch["caption"]) if "caption" in batch else None)

    def train_step(self, data_iter) -> dict:
        """One step: the stage's ``step`` with a ``StepContext``; returns every metric it and the trainer made."""
        t0 = time.perf_counter()
        step = self.progress.step + 1
        counters = {"wait": 0.0, "tokens": 0, "grid": (0, 0, 0), "stop": None}
        self.model.train()

        def next_batch() -> StageBatch:
            self.watchdog.enter("forward", step)
            tw = time.perf_counter()
            batch = next(data_iter)
            counters["wait"] += time.perf_counter() - tw
            sb = self.to_stage_batch(batch)
            B, _, T, H, W = sb.latents.shape
            counters["grid"] = self._core_model().token_grid((T, H, W))
            counters["tokens"] += B * math.prod(counters["grid"])
            return sb

        def optimizer_step(loss: torch.Tensor) -> dict:
            return self._optimizer_step(step, loss, counters)

        ctx = StepContext(step=step, model=self.model, core_model=self._core_model(), engine=self.engine,
                          dims=self.dims, device=self.device, codec=self.codec, text_encoder=self.text_encoder,
                          generator=self.noise_gen, grad_accum=self.cfg.trainer.grad_accum, next_batch=next_batch,
                          optimizer_step=optimizer_step, phase=lambda name: self.watchdog.enter(name, step),
                          run_dir=self.run_dir)
        metrics = self.stage.step(ctx)
        if self.progress.step != step:
            raise RuntimeError(f"stage {self.stage.name}: its step must call ctx.optimizer_step exactly once "
                               f"(step {step})")
        self._stop_agreed = counters["stop"]
        metrics.update({"perf/step_time_s": time.perf_counter() - t0, "perf/data_wait_s": counters["wait"],
                        "perf/tokens": counters["tokens"], "perf/grid": counters["grid"]})
        return metrics

    def _optimizer_step(self, step: int, loss: torch.Tensor, counters: dict) -> dict:
        """Engine step, lr schedule and EMA together. ``loss`` is this rank's mean loss of the step (on the
        device); the logged loss is its mean over data-parallel ranks (``dp_mean_and_any``: one all-reduce
        that also carries the stop request, so every rank agrees on a non-finite loss and on stopping)."""
        self.watchdog.enter("optimizer", step)
        loss_value, stop = dp_mean_and_any(loss, self._stop_requested)
        counters["stop"] = stop
        loss_finite = math.isfinite(loss_value)  # the same on every rank: a NaN anywhere makes the sum NaN
        if loss_finite or not self.engine.can_skip_nonfinite:
            grad_norm = self.engine.step()  # skips the update itself when the norm is not finite
        else:
            grad_norm = float("nan")
            self.engine.skip_step()
        self.lr_scheduler.step()
        self.progress.step += 1
        skipped = self.nonfinite.after_step(self.progress.step, loss_value, grad_norm, loss_finite)
        if self.ema is not None and self.progress.step % self.cfg.ema.every == 0 and not skipped:
            self.ema.update()
        return {"train/loss": loss_value, "train/grad_norm": grad_norm, "train/skipped_steps": self.nonfinite.skipped,
                "train/lr": self.lr_scheduler.get_last_lr()[0]}

    # -- the loop ------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            log.warning("received signal %d: checkpointing at the end of this step, then stopping", signum)
            self._stop_requested = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass

    def _should_stop(self) -> bool:
        """Whether any rank asked to stop: agreed in the step's own all-reduce when it ran one."""
        agreed, self._stop_agreed = getattr(self, "_stop_agreed", None), None
        return any_rank(self._stop_requested) if agreed is None else agreed

    def _core_model(self) -> LongCatDiT:
        m = self.model
        while not isinstance(m, LongCatDiT) and hasattr(m, "module"):
            m = m.module
        return m

    def _perf_metrics(self, m: dict) -> dict:
        world = self.dims.world_size
        tokens = m["perf/tokens"] * self.dims.dp_size  # the global batch
        out = {"perf/tokens_per_s": tokens / max(m["perf/step_time_s"], 1e-9)}
        if self.device.type == "cuda":
            out["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        from parallel.device_info import peak_flops

        peak = peak_flops(self.device)
        if peak:
            from lcv_train.planner import forward_flops

            # Model FLOPs (forward + backward = 3x forward matmuls; recomputation not counted), of the whole
            # model whatever the sharding, over the peak of every device.
            grid = m["perf/grid"]
            text_len = int(self.cfg.text_encoder.get("max_length", 0) or 0)
            samples = m["perf/tokens"] * self.dims.dp_size / max(math.prod(grid), 1)
            flops = 3 * forward_flops(self.cfg.model, grid, text_len) * samples
            out["perf/mfu"] = flops / m["perf/step_time_s"] / (peak * world)
        return out

    def fit(self) -> dict:
        cfg = self.cfg
        total = cfg.trainer.max_steps
        metrics_logger = MetricsLogger(cfg.logger, self.run_dir, self.rank, total, self.progress.step,
                                       self.config_dict)
        self._install_signal_handlers()
        data_iter = iter(self.loader)
        last_saved = self.progress.step if self.resumed_from is not None else -1
        first_loss = None
        try:
            while self.progress.step < total:
                m = self.train_step(data_iter)
                m.update(self._perf_metrics(m))
                del m["perf/grid"]
                m.update(self.loader.metrics())
                step = self.progress.step
                first_loss = m["train/loss"] if first_loss is None else first_loss
                self.history.append({"step": step, "loss": m["train/loss"]})
                if step % cfg.trainer.log_every == 0 or step == total:
                    log.info("step %d loss %.5f grad_norm %.3f lr %.3g step_time %.3fs tokens/s %.0f", step,
                             m["train/loss"], m["train/grad_norm"], m["train/lr"], m["perf/step_time_s"],
                             m["perf/tokens_per_s"])
                if self.evaluator is not None and cfg.eval.due(step, total):  # into this step's metrics row
                    self.watchdog.enter("sample", step)
                    m.update(self.evaluator.run(step))
                metrics_logger.log(step, m)
                self.watchdog.enter("sync", step)
                stop = self._should_stop()
                if step % cfg.trainer.checkpoint_every == 0 or step == total or stop:
                    self.watchdog.enter("save", step)
                    self.save_checkpoint()
                    last_saved = step
                self.watchdog.leave()
                if stop:
                    metrics_logger.write(f"stopped on request at step {step}; checkpoint saved")
                    break
                every = cfg.trainer.sample_every
                if every and step % every == 0 and not (step == total and cfg.trainer.sample_at_end):
                    self.watchdog.enter("sample", step)
                    path = self.write_sample()
                    self.watchdog.leave()
                    if path is not None:
                        metrics_logger.write(f"sample {path}")
            if last_saved != self.progress.step:
                self.watchdog.enter("save", self.progress.step)
                self.save_checkpoint()
            sample_path = None
            if cfg.trainer.sample_at_end and self.progress.step >= total:
                self.watchdog.enter("sample", self.progress.step)
                sample_path = self.write_sample()
        finally:
            self.watchdog.close()
            metrics_logger.close()
            self.loader.close()  # workers ignore SIGTERM (the trainer decides), so stop them explicitly
        summary = {"step": self.progress.step, "first_loss": first_loss, "run_dir": str(self.run_dir),
                   "sample": str(sample_path) if sample_path else None, "history": self.history}
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                                    if k != "history"}, indent=2))
        return summary

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def write_sample(self) -> Path | None:
        """Generate a video per caption with the EMA weights (every rank runs the model; rank 0 writes)."""
        from data_loaders.decode import encode_mp4
        from lcv_train.sampling import sample

        s = self.cfg.sample
        was_training = self.model.training
        self.model.eval()
        text, mask = self.text_encoder.encode(list(s.captions))
        C, T, h, w = self.codec.latent_shape(s.frames, s.height, s.width)
        gen = torch.Generator(self.device).manual_seed(self.cfg.run.seed)
        ctx = self.ema.swapped_in() if self.ema is not None else _null()
        with ctx, self.engine.autocast():
            latents = sample(self.model, text.float(), mask, (C, T, h, w), s, generator=gen)
        self.model.train(was_training)
        video = self.codec.decode(latents.float())  # [B, 3, F, H, W] in [-1, 1]
        if self.rank != 0:
            return None
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        # Captions side by side in one clip.
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = torch.cat(list(frames), dim=-1).permute(1, 2, 3, 0).cpu().numpy()  # [F, H, B*W, 3]
        path = out / f"step_{self.progress.step:07d}.mp4"
        path.write_bytes(encode_mp4(frames, fps=s.fps))
        (out / f"step_{self.progress.step:07d}.txt").write_text("\n".join(s.captions) + "\n")
        return path


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
