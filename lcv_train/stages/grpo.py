"""``stage=grpo``: GRPO fine-tuning of the flow-matching model with several rewards (SPEC section 6).

One trainer step is one optimizer update. Every ``updates_per_rollout`` steps the stage makes a new rollout
batch on each data-parallel rank (its groups stay whole on that rank):

1. prompts: ``prompts_per_step`` lines of the ``prompts`` file (read in passes, each line once a pass, in
   a fresh order each pass), or the captions of the next data batch (``prompts: null``);
2. ``lcv_train.rl.rollout``: G samples per prompt from one initial noise, Euler ODE steps with CFG, one
   critical SDE step per prompt drawn from ``sde_window``. Prompt k of the job's batch draws its noise, its
   critical step and its SDE noise from ``prompt_generator(seed, rollout index, k)`` (its line of the file
   from ``prompt_line``, a function of the same numbers):
   the job's rollouts are the same however ranks split them, and a resume draws them again without state;
3. decode with the trainer's codec, score with every reward (``lcv_train.rewards``), gather the rewards
   of all data-parallel ranks and take ``group_advantages`` over the global batch (so the largest group
   std is the whole job's), keeping this rank's rows; every ``video_every`` rollouts rank 0 logs a few of
   its videos (``LoggedVideo``).

Each update recomputes the critical step's velocity under the current policy, its log-probability of the
stored sample, the reference mean (the LoRA switched off, or for a full fine-tune the starting weights,
kept by ``model_ready`` before a checkpoint is loaded over them), and steps on ``lcv_train.rl.grpo_loss``.
The first update of a rollout is on-policy (ratio 1). Its figures are the job's: each rank's ``stats`` are
gathered in one collective (``job_figures``). The formulas live in ``lcv_train.rl``; this module only
plumbs the model into them.

State saved with checkpoints: per-reward running statistics (count, mean, M2 over every scored video); for
a full fine-tune the fingerprint of the reference's source (``trainer.init_from``), checked at resume.
The kept rollout batch is not saved: a run resumed in the middle of a rollout's updates makes a new
rollout (resume is exact when ``trainer.checkpoint_every`` is a multiple of ``updates_per_rollout``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from lcv_train.diffusion import null_text
from lcv_train.errors import ConfigError, require
from lcv_train.rl import (Rollout, group_advantages, grpo_loss, grpo_metrics, prompt_generator, prompt_line, rollout,
                          sde_step)
from lcv_train.sampling import guided_velocity, sigma_schedule
from lcv_train.stages.base import Stage, StageConfig, StepContext, register_stage


@dataclasses.dataclass
class GRPOConfig(StageConfig):
    name: str = "grpo"
    kind: str = "grpo"
    prompts: str | None = None  # a text file, one prompt a line; null: the captions of the data shards
    prompts_per_step: int = 1  # per data-parallel rank
    group_size: int = 4  # G
    steps: int = 16  # sampling steps of a rollout
    shift: float = 3.0  # sigma shift of the rollout schedule
    sde_window: tuple[int, int] = (1, 8)  # the critical step is drawn from start <= i < stop
    eta: float = 1.0
    std_max: float | None = 0.45  # the truncated noise: cap on the critical step's std
    guidance: float = 4.5  # CFG during rollout (1: off)
    cfg_zero_star: bool = True
    clip_range: float = 1e-3
    kl_beta: float = 0.004
    rewards: list[str] = dataclasses.field(default_factory=lambda: ["motion"])
    reward_weights: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    reward_args: dict = dataclasses.field(default_factory=dict)  # {reward name: keyword arguments of build_scorer}
    updates_per_rollout: int = 1
    update_batch: int = 0  # rows per forward/backward of the update (0: all P*G at once; same gradient)
    frames: int = 9
    height: int = 32
    width: int = 32
    fps: float = 8.0
    video_every: int = 10  # log rollout videos every k rollout batches (the first one too; 0: never)
    video_count: int = 4  # how many: rank 0's first rows (its first prompt's group first)

    def validate(self) -> "GRPOConfig":
        super().validate()
        p = "stage"
        require(self.update_batch >= 0, f"{p}.update_batch", f"must be >= 0 (0 = the whole rollout batch), got "
                f"{self.update_batch}")
        require(self.video_every >= 0, f"{p}.video_every", f"must be >= 0 (0 = never), got {self.video_every}")
        require(self.video_count >= 1, f"{p}.video_count", f"must be >= 1, got {self.video_count}")
        for key in ("prompts_per_step", "group_size", "steps", "updates_per_rollout", "frames", "height", "width"):
            require(getattr(self, key) >= 1, f"{p}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.group_size >= 2, f"{p}.group_size", f"must be >= 2 (advantages are relative to the group), "
                f"got {self.group_size}")
        start, stop = self.sde_window
        require(1 <= start < stop <= self.steps, f"{p}.sde_window",
                f"must satisfy 1 <= start < stop <= steps={self.steps} (step 0 is at sigma = 1), got "
                f"{list(self.sde_window)}")
        require(self.eta > 0, f"{p}.eta", f"must be > 0, got {self.eta}")
        require(self.std_max is None or self.std_max > 0, f"{p}.std_max", f"must be > 0 or null, got {self.std_max}")
        require(self.clip_range > 0, f"{p}.clip_range", f"must be > 0, got {self.clip_range}")
        require(self.kl_beta >= 0, f"{p}.kl_beta", f"must be >= 0, got {self.kl_beta}")
        require(self.guidance >= 1, f"{p}.guidance", f"must be >= 1 (1 = no CFG), got {self.guidance}")
        require(len(self.rewards) >= 1, f"{p}.rewards", "must name at least one reward")
        require(len(self.reward_weights) == len(self.rewards), f"{p}.reward_weights",
                f"must have one weight per reward ({len(self.rewards)}), got {list(self.reward_weights)}")
        require(len(set(self.rewards)) == len(self.rewards), f"{p}.rewards", f"has duplicates: {self.rewards}")
        unknown = sorted(set(self.reward_args) - set(self.rewards))
        require(not unknown, f"{p}.reward_args", f"names rewards not in stage.rewards: {unknown}")
        if self.prompts is not None:
            require(Path(self.prompts).expanduser().is_file(), f"{p}.prompts",
                    f"no such file: {self.prompts} (a text file with one prompt a line, or null for the data's "
                    f"captions)")
        return self


def read_prompts(path: str) -> list[str]:
    lines = [x.strip() for x in Path(path).expanduser().read_text().splitlines()]
    prompts = [x for x in lines if x]
    if not prompts:
        raise ConfigError(f"stage.prompts: {path} holds no prompt (one a line)")
    return prompts


@register_stage("grpo", GRPOConfig)
class GRPOStage(Stage):
    def __init__(self, cfg: GRPOConfig, train_cfg):
        super().__init__(cfg, train_cfg)
        from lcv_train.rewards import build_scorer

        if cfg.update_batch and train_cfg.parallel.engine != "fsdp":
            raise ConfigError(f"stage.update_batch: several backward passes per step need parallel.engine=fsdp "
                              f"(got {train_cfg.parallel.engine}); set stage.update_batch=0")
        if not train_cfg.lora.rank and cfg.kl_beta > 0 and train_cfg.parallel.engine == "zero3":
            raise ConfigError("stage.kl_beta: a full fine-tune's KL reference is a whole copy of the starting weights, "
                              "swapped into the model for each update, but parallel.engine=zero3 keeps only a shard "
                              "of each parameter on a rank; use parallel.engine=fsdp (a full fine-tune, or LoRA, whose "
                              "reference is the base with LoRA off) or zero2, or stage.kl_beta=0")
        if train_cfg.trainer.grad_accum != 1:
            raise ConfigError(f"trainer.grad_accum: stage grpo takes one update per step over its rollout batch; "
                              f"set trainer.grad_accum=1 (got {train_cfg.trainer.grad_accum})")

        self.scorers = [build_scorer(name, **dict(cfg.reward_args.get(name, {}))) for name in cfg.rewards]
        self.prompt_list = read_prompts(cfg.prompts) if cfg.prompts is not None else None
        self.seed = train_cfg.run.seed
        # Per reward: count, mean, M2 (Welford) over every video scored so far, the same on every rank.
        self.running = torch.zeros(len(cfg.rewards), 3, dtype=torch.float64)
        self.current: dict | None = None  # the kept rollout batch: rollout, advantages, text, updates done
        self.reference: list[torch.Tensor] | None = None  # full fine-tune with a KL: the starting weights
        # ... and the fingerprint of where they came from (sha256 as 32 uint8), saved with checkpoints.
        self.reference_source = torch.zeros(32, dtype=torch.uint8)
        self.reference_from = ""  # what that is, in words

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {"running": self.running.clone()}
        if self.lora is None:
            sd["reference_source"] = self.reference_source.clone()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.running.copy_(sd["running"])
        changed = self.lora is None and not torch.equal(sd["reference_source"], self.reference_source)
        if changed and self.cfg.kl_beta > 0:
            from lcv_train.errors import CheckpointError

            raise CheckpointError(f"stage grpo: this full fine-tune's KL reference is its starting weights, read again "
                                  f"at every start from {self.reference_from}, but the checkpoint's run started from "
                                  f"other weights (fingerprint differs); resume with the trainer.init_from (and "
                                  f"trainer.init_weights) the run started from, unchanged")
        if changed:  # no KL now: the run's own origin stays recorded for a later resume that has one
            self.reference_source = sd["reference_source"].clone()

    def model_ready(self, model: torch.nn.Module) -> None:
        """A full fine-tune with a KL keeps the starting weights as its reference. They are read here, before a
        checkpoint is loaded over them, so a resumed run has the same reference; ``trainer.init_from`` is read
        again at every start, and its fingerprint (``source_fingerprint``) in the stage state says whether it
        is still what the run started from."""
        if self.lora is not None:
            return
        t = self.train_cfg.trainer
        if t.init_from:
            from lcv_train.checkpoints.source import source_fingerprint

            digest = source_fingerprint(t.init_from, t.init_weights)
            self.reference_from = f"trainer.init_from={t.init_from}"
        else:
            digest = hashlib.sha256(f"seed {self.seed}".encode()).hexdigest()
            self.reference_from = f"the weights of run.seed={self.seed} (no trainer.init_from)"
        self.reference_source = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
        if self.cfg.kl_beta > 0:
            self.reference = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    # -- the policy --------------------------------------------------------------------------------
    def velocity_fn(self, ctx: StepContext, text, mask):
        """``v_fn(x, sigma)`` for rows prompt-major over ``text`` (already repeated per group member), with CFG."""
        c = self.cfg
        neg_text, neg_mask = null_text(text, mask)

        def v_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = sigma.float() * 1000.0
            with ctx.engine.autocast():
                v = ctx.model(x, t, text, mask).float()
                if c.guidance != 1.0:
                    v_u = ctx.model(x, t, neg_text, neg_mask).float()
                    v = guided_velocity(v, v_u, c.guidance, c.cfg_zero_star)
            return v.float()

        return v_fn

    @contextmanager
    def reference_policy(self, ctx: StepContext):
        """The reference: the LoRA switched off, or (full fine-tune) the weights of the stage's first step."""
        if self.lora is not None:
            from lcv_train.lora import set_lora_multiplier

            set_lora_multiplier(ctx.core_model, 0.0)
            try:
                yield
            finally:
                set_lora_multiplier(ctx.core_model, self.lora.multiplier)
            return
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        if self.reference is None:
            raise RuntimeError("grpo: the reference weights were not taken (the trainer calls stage.model_ready)")
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ref in zip(params, self.reference):
                p.copy_(ref)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    # -- rollouts ----------------------------------------------------------------------------------
    def prompts_for(self, ctx: StepContext, batch_index: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This rank's ``prompts_per_step`` prompts of rollout batch ``batch_index``: lines of the prompts file
        (``prompt_line`` of each prompt's position in the job's sequence of prompts), or the captions of the next
        data batch."""
        P = self.cfg.prompts_per_step
        if self.prompt_list is not None:
            first = batch_index * ctx.dims.dp_size * P + ctx.dims.dp_rank * P
            prompts = [self.prompt_list[prompt_line(self.seed, len(self.prompt_list), first + j)] for j in range(P)]
            text, mask = ctx.text_encoder.encode(prompts)
            return prompts, text.float().to(ctx.device), mask.to(ctx.device, torch.bool)
        batch = ctx.next_batch()
        if batch.text.shape[0] < P:
            raise ConfigError(f"stage.prompts_per_step: {P} prompts but data.batch_size gives {batch.text.shape[0]}; "
                              f"set data.batch_size >= stage.prompts_per_step")
        prompts = list(batch.captions[:P]) if batch.captions is not None else [""] * P
        return prompts, batch.text[:P], batch.text_mask[:P]

    @torch.no_grad()
    def make_rollout(self, ctx: StepContext) -> dict:
        c = self.cfg
        ctx.phase("forward")
        P, G = c.prompts_per_step, c.group_size
        # Prompt k of the job's batch (this rank holds k = dp_rank * P + j) draws its initial noise, its critical
        # step and its G SDE noises from its own generator, and takes its line of the prompts file from
        # prompt_line: functions of the run seed, the rollout batch and k, so the job's rollouts do not depend
        # on how ranks split them.
        batch_index = (ctx.step - 1) // c.updates_per_rollout
        gens = [prompt_generator(self.seed, batch_index, ctx.dims.dp_rank * P + j) for j in range(P)]
        prompts, text, mask = self.prompts_for(ctx, batch_index)
        text_g, mask_g = text.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
        shape = ctx.codec.latent_shape(c.frames, c.height, c.width)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(ctx.device)
        sigmas = sigma_schedule(c.steps, c.shift, ctx.device)
        was_training = ctx.model.training
        ctx.model.eval()
        ro = rollout(self.velocity_fn(ctx, text_g, mask_g), noise, sigmas, G, tuple(c.sde_window), c.eta, c.std_max,
                     generator=gens)
        ctx.model.train(was_training)
        videos = ctx.codec.decode(ro.final.float())  # [P*G, 3, F, H, W] in [-1, 1]
        prompts_g = [p for p in prompts for _ in range(G)]
        scores = []
        for scorer in self.scorers:
            scorer.to(ctx.device)
            try:
                scores.append(scorer(videos, prompts_g, c.fps).float().cpu())
            finally:
                scorer.to("cpu")
        rewards = torch.stack(scores, dim=-1).view(P, G, len(self.scorers))  # [P, G, R]
        # The critical step rides along as one more column, so the histogram is the job's too.
        crit = ro.step.view(P, G, 1).cpu().float()
        gathered = gather_dp(torch.cat([rewards, crit], dim=-1), ctx)  # [dp * P, G, R + 1], rank-major
        all_rewards, all_crit = gathered[..., :-1], gathered[:, 0, -1].long()
        adv_all = group_advantages(all_rewards, c.reward_weights)
        rank = ctx.dims.dp_rank if all_rewards.shape[0] > P else 0
        adv = adv_all[rank * P:(rank + 1) * P].reshape(P * G)
        metrics = self._reward_metrics(all_rewards, adv_all, all_crit)
        if c.video_every and batch_index % c.video_every == 0 and ctx.dims.rank == 0 and ctx.run_dir is not None:
            metrics.update(self.rollout_videos(ctx, videos, prompts_g, rewards.view(P * G, -1), adv))
        return {"rollout": ro, "advantages": adv.to(ctx.device), "text": text_g, "mask": mask_g, "updates": 0,
                "metrics": metrics}

    def rollout_videos(self, ctx: StepContext, videos: torch.Tensor, prompts: list[str], rewards: torch.Tensor,
                       adv: torch.Tensor) -> dict:
        """The first ``video_count`` rows of this rank's rollout (``videos`` [N, 3, F, H, W] in [-1, 1], their
        prompts, ``rewards`` [N, R], advantages [N]) as mp4 files under ``grpo_videos/step_N/`` of the run, returned
        as ``grpo/video/<i>`` entries (``LoggedVideo``: the metrics logger sends them to W&B with their caption)."""
        from data_loaders.decode import encode_mp4
        from lcv_train.eval.evaluator import to_uint8_frames
        from lcv_train.training.metrics import LoggedVideo

        c = self.cfg
        folder = Path(ctx.run_dir) / "grpo_videos" / f"step_{ctx.step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for i in range(min(c.video_count, videos.shape[0])):
            path = folder / f"{i:03d}.mp4"
            path.write_bytes(encode_mp4(to_uint8_frames(videos[i].float().cpu()), fps=c.fps))
            scores = ", ".join(f"{name} {float(rewards[i, r]):.4g}" for r, name in enumerate(c.rewards))
            out[f"grpo/video/{i:03d}"] = LoggedVideo(path, f"{prompts[i]} | {scores} | advantage {float(adv[i]):+.3f}")
        return out

    def _reward_metrics(self, rewards: torch.Tensor, adv: torch.Tensor, crit: torch.Tensor) -> dict:
        """The job's reward figures: ``rewards`` [P_all, G, R], ``adv`` [P_all, G], ``crit`` [P_all]."""
        m: dict = {}
        flat = rewards.reshape(-1, rewards.shape[-1]).double()  # [N, R], the whole job's videos
        for r, name in enumerate(self.cfg.rewards):
            x = flat[:, r]
            m[f"grpo/reward/{name}_mean"] = float(x.mean())
            m[f"grpo/reward/{name}_std"] = float(x.std(correction=0))
            group_std = rewards[..., r].std(dim=1, correction=0)
            m[f"grpo/reward/{name}_group_std_max"] = float(group_std.max())
            # Groups whose G videos all scored the same: they give this reward no advantage (no signal). High
            # for a coarse reward (a 0/1 judgement) on a model whose group members end alike.
            m[f"grpo/reward/{name}_flat_groups"] = float((group_std == 0).double().mean())
            n0, mean0, m2 = (float(v) for v in self.running[r])
            n1 = x.numel()
            mean1, m2_1 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
            n = n0 + n1
            delta = mean1 - mean0
            mean = mean0 + delta * n1 / n
            m2 = m2 + m2_1 + delta**2 * n0 * n1 / n
            self.running[r] = torch.tensor([n, mean, m2], dtype=torch.float64)
            m[f"grpo/reward_running/{name}_mean"] = mean
            m[f"grpo/reward_running/{name}_std"] = (m2 / n) ** 0.5
        m["grpo/videos_scored"] = int(self.running[0, 0])  # the whole job's, since the start
        w = torch.as_tensor(self.cfg.reward_weights, dtype=torch.float64)
        m["grpo/reward/weighted_mean"] = float((flat * w).sum(1).mean())
        m["grpo/rollout_advantage_abs_max"] = float(adv.abs().max())
        counts = torch.bincount(crit, minlength=self.cfg.steps)
        for i in range(*self.cfg.sde_window):
            m[f"grpo/critical_step/{i}"] = int(counts[i])
        return m

    # -- the update ------------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> dict:
        c = self.cfg
        if self.current is None or self.current["updates"] >= c.updates_per_rollout:
            self.current = self.make_rollout(ctx)
        cur = self.current
        ro: Rollout = cur["rollout"]
        N = ro.x.shape[0]
        chunk = c.update_batch or N
        adv = cur["advantages"]
        log_probs, means, stds, mean_refs = [], [], [], []
        for lo in range(0, N, chunk):  # rows [lo, hi): the chunk losses, scaled by hi - lo, sum to the batch's
            hi = min(lo + chunk, N)
            part = _rows(ro, lo, hi)
            ctx.phase("forward")
            v_fn = self.velocity_fn(ctx, cur["text"][lo:hi], cur["mask"][lo:hi])
            mean_ref = None
            if c.kl_beta > 0:  # before the policy's forward: a full fine-tune swaps weights in place
                with torch.no_grad(), self.reference_policy(ctx):
                    v_ref = v_fn(part.x, part.sigma)
                    _, mean_ref, _, _ = sde_step(part.x, v_ref, part.sigma, part.sigma_next, c.eta,
                                                 noise=torch.zeros_like(part.x_next), std_max=c.std_max)
                mean_refs.append(mean_ref)
            v = v_fn(part.x, part.sigma)
            log_prob, mean, std = part.log_prob_under(v, c.eta, c.std_max)
            out = grpo_loss(log_prob, part.log_prob, adv[lo:hi], part.sigma, part.sigma_next,
                            clip_range=c.clip_range, kl_beta=c.kl_beta, mean=mean, mean_ref=mean_ref, std=std)
            ctx.phase("backward")
            ctx.engine.backward(out.loss * ((hi - lo) / N))
            log_probs.append(log_prob.detach())
            means.append(mean.detach())
            stds.append(std.detach())
        log_prob = torch.cat(log_probs)
        with torch.no_grad():  # the batch's loss and figures, from the chunks' detached values
            out = grpo_loss(log_prob, ro.log_prob, adv, ro.sigma, ro.sigma_next, clip_range=c.clip_range,
                            kl_beta=c.kl_beta, mean=torch.cat(means),
                            mean_ref=torch.cat(mean_refs) if mean_refs else None, std=torch.cat(stds))
        cur["updates"] += 1
        metrics = ctx.optimizer_step(out.loss.detach())
        figures = job_figures(out.stats, ctx)
        metrics.update({f"grpo/{k}": v for k, v in figures.items()})
        metrics["grpo/update_in_rollout"] = cur["updates"]
        if cur["updates"] == 1:
            metrics.update(cur["metrics"])  # the rollout's figures, logged once
            # On-policy, grpo/log_ratio_abs_max of this first update is the drift of the recomputed log-prob
            # from the rollout's (numerics: batch composition, bf16); near clip_range it would clip the update.
        return metrics


def job_figures(stats: torch.Tensor, ctx: StepContext) -> dict[str, float]:
    """The loss figures (``grpo_metrics``) of the whole job's samples from each data-parallel rank's ``stats``
    (``GRPOLossOutput.stats``): one all-gather of a small vector per step, not a collective per figure."""
    return grpo_metrics(gather_dp(stats[None], ctx))


def gather_dp(t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """``t`` [n, ...] of every data-parallel rank, concatenated rank-major on the CPU in ``t``'s dtype (one
    all-gather over the ``dp`` group; ``t`` itself without one). The ranks of one replica (cp, tp) hold the same."""
    dims = ctx.dims
    if not dist.is_initialized() or dims.dp_size == 1:
        return t.cpu()
    group = dims.group("dp")
    backend_device = ctx.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    local = t.to(backend_device, torch.float64)
    out = [torch.empty_like(local) for _ in range(dims.dp_size)]
    dist.all_gather(out, local, group=group)
    return torch.cat(out).to(t.dtype).cpu()


def _rows(ro: Rollout, lo: int, hi: int) -> Rollout:
    """Rows ``lo:hi`` of a rollout batch."""
    return Rollout(**{f.name: getattr(ro, f.name)[lo:hi] for f in dataclasses.fields(ro)})
