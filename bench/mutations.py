"""Mutation testing of the training mechanics: plant named bugs one at a time, see whether the tests notice.

    python bench/mutations.py                      # every mutation (long: the multi-process tests run too)
    python bench/mutations.py --list               # the mutations and the tests each one runs
    python bench/mutations.py -k ema -k rope       # only mutations whose name contains one of these
    python bench/mutations.py --quick              # skip the mutations whose tests take minutes
    python bench/mutations.py --tests-from main    # the same mutations against another commit's tests/
    python bench/mutations.py --markdown out.md    # also write the result table as markdown

Each mutation is one exact text replacement in one source file (core modules: the model, diffusion,
training, the parallel engines and context parallelism; kernels' block selection is not covered here).
For each, a copy of the working tree (without .git) gets the replacement and runs the tests named for it
(``pytest -x``, with the copy first on PYTHONPATH, so subprocess and multi-process tests use the copy too).
A mutation is *killed* when a test fails (or errors, or times out), *survived* when all pass. A
replacement whose text is not found exactly once is reported as *stale* (the code moved: update it here).
Outside CI on purpose: the full list took about an hour on the shared 2-core box. Scores are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    slow: bool = False  # its tests take minutes (multi-process runs)
    issue: bool = False  # one of the planted bugs of issue 18


# Test selections (pytest node ids or files).
DIT = ("tests/model/test_dit.py",)
FM = ("tests/diffusion/test_flow_matching.py",)
MECH = ("tests/training/test_mechanics.py",)
LAYOUTS = ("tests/parallel/test_layouts.py::test_two_ranks_match_single_process",)
LAYOUTS_TP = ("tests/parallel/test_layouts.py::test_two_ranks_match_single_process",)
E2E_RESUME = ("tests/training/test_train_e2e.py::test_train_resume_continues_exactly",)
DIST_FSDP = ("tests/training/test_distributed_train.py::test_fsdp_two_ranks_save_resume_on_two_and_one",)
DIST_CP = ("tests/training/test_distributed_train.py::test_context_parallel_training_matches_single_process",)
CP_OPS = ("tests/parallel/test_context_parallel.py",)
RL = ("tests/rl/test_formulas.py", "tests/rl/test_rollout.py")
REWARDS = ("tests/rewards/test_rewards.py",)
GRPO_STAGE = tuple(f"tests/training/test_grpo_stage.py::{t}" for t in (
    "test_first_update_is_on_policy_only_lora_changes_and_kl_starts_at_zero",
    "test_full_fine_tune_keeps_the_initial_weights_as_reference_across_resume",
    "test_grpo_raises_a_closed_form_reward_with_bounded_kl", "test_resume_continues_exactly",
    "test_update_in_chunks_equals_the_whole_batch"))
GRPO_DP = ("tests/training/test_grpo_stage.py::test_fsdp_two_ranks_with_cp2_or_dp2_take_the_updates_of_one_process",)
RECIPES = ("tests/training/test_stage_recipes.py",)
PIPELINE = ("tests/training/test_pipeline.py",)

M = Mutation
MUTATIONS: list[Mutation] = [
    # -- the eight planted bugs that survived in issue 18 ------------------------------------------
    M("rope_split_reversed_in_model", "lcv_train/model/dit.py",
      "rope_tables(grid, self.config.rope_split,", "rope_tables(grid, tuple(self.config.rope_split)[::-1],",
      DIT, issue=True),
    M("ema_shadow_weight_decayed", "lcv_train/training/ema.py",
      "        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)",
      "        torch._foreach_mul_(shadows, 1.0 - 1e-2 * 0.1)  # lr * weight decay\n"
      "        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)", MECH + LAYOUTS, issue=True),
    M("ema_lerp_weight_swapped", "lcv_train/training/ema.py",
      "torch._foreach_lerp_(shadows, current, 1.0 - self.decay)", "torch._foreach_lerp_(shadows, current, self.decay)",
      MECH + LAYOUTS, issue=True),
    M("timestep_shift_dropped", "lcv_train/diffusion/flow_matching.py",
      "return shift_sigma(torch.sigmoid(u), shift_for_tokens(num_tokens, cfg))", "return torch.sigmoid(u)",
      FM, issue=True),
    M("loss_not_divided_by_grad_accum", "lcv_train/training/trainer.py",
      "self.engine.backward(loss / cfg.trainer.grad_accum)", "self.engine.backward(loss)", MECH, issue=True),
    M("warmup_step_over_warmup", "lcv_train/training/schedule.py",
      "return (step + 1) / warmup", "return step / warmup", MECH, issue=True),
    M("grad_clip_condition_inverted", "parallel/engine.py", "if coef < 1.0:", "if coef > 1.0:", MECH, issue=True),
    M("same_noise_on_every_dp_rank", "lcv_train/training/trainer.py",
      "manual_seed(cfg.run.seed * 100003 + self.dims.dp_rank)", "manual_seed(cfg.run.seed * 100003)",
      DIST_FSDP, slow=True, issue=True),
    # -- the six the issue found caught (BSA count rounding belongs to the block-selection work) ------
    M("velocity_sign_flipped", "lcv_train/diffusion/flow_matching.py", "    return x0 - eps", "    return eps - x0",
      FM, issue=True),
    M("condition_frames_noised", "lcv_train/diffusion/flow_matching.py",
      "    per_frame[:, :num_cond] = 0.0\n", "", FM, issue=True),
    M("x_t_formula_swapped", "lcv_train/diffusion/flow_matching.py",
      "(s * eps.float() + (1 - s) * x0.float())", "((1 - s) * eps.float() + s * x0.float())", FM, issue=True),
    M("ring_lse_merge_wrong", "parallel/context_parallel/ring.py",
      "a, b = torch.exp(lse - ref), torch.exp(lse_s - ref)", "a, b = torch.exp(lse - ref), torch.exp(lse - ref)",
      CP_OPS, issue=True),
    # -- the model ----------------------------------------------------------------------------------
    M("rope_rotation_sign", "lcv_train/model/rope.py", "x0 * sin + x1 * cos", "x1 * cos - x0 * sin", DIT),
    M("rope_t_offset_ignored", "lcv_train/model/rope.py",
      "pos = torch.arange(offset, offset + n,", "pos = torch.arange(0, n,", DIT),
    M("cached_queries_use_condition_positions", "lcv_train/model/dit.py",
      "            q = apply_rope(q, cos[Tc:], sin[Tc:])", "            q = apply_rope(q, cos[:-Tc], sin[:-Tc])", DIT),
    M("condition_frames_attend_to_noisy", "lcv_train/model/dit.py",
      "out_c = op.self_attention(q[:, :n], k[:, :n], v[:, :n], cgrid, cgrid)",
      "out_c = op.self_attention(q[:, :n], k, v, cgrid, grid)", DIT),
    M("condition_timestep_not_zeroed", "lcv_train/model/dit.py",
      "            t[:, :num_cond] = 0\n", "", DIT),
    M("modulate_without_one_plus_scale", "lcv_train/model/dit.py",
      "xf * (1 + scale) + shift", "xf * scale + shift", DIT),
    M("attention_gate_dropped", "lcv_train/model/dit.py",
      "x = x + (gate_a * h.float()).to(x.dtype)", "x = x + h.float().to(x.dtype)", DIT),
    M("condition_tokens_cross_attend", "lcv_train/model/dit.py",
      "c = 0 if cache_mode == \"read\" else num_cond", "c = 0", DIT),
    M("text_padding_mask_dropped", "lcv_train/model/dit.py",
      "out = self.cross_attn(self.pre_crs_attn_norm(xn), y, key_mask, op)",
      "out = self.cross_attn(self.pre_crs_attn_norm(xn), y, None, op)", DIT),
    M("timestep_embedding_cos_sin_swapped", "lcv_train/model/dit.py",
      "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)", "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
      DIT),
    M("unpatchify_h_w_swapped", "lcv_train/model/dit.py",
      "permute(0, 7, 1, 4, 2, 5, 3, 6)", "permute(0, 7, 1, 4, 3, 6, 2, 5)", DIT),
    M("rmsnorm_without_eps", "lcv_train/model/dit.py", "+ self.eps)", ")", DIT),
    M("rmsnorm_sum_not_mean", "lcv_train/model/dit.py", "xf.pow(2).mean(-1, keepdim=True)", "xf.pow(2).sum(-1, keepdim=True)",
      DIT),
    M("swiglu_w1_w3_swapped", "lcv_train/model/dit.py", "F.silu(self.w1(x)) * self.w3(x)", "F.silu(self.w3(x)) * self.w1(x)",
      DIT),
    M("adaln_chunk_order_wrong", "lcv_train/model/dit.py", "shift_a, scale_a, gate_a, shift_f, scale_f, gate_f =",
      "scale_a, shift_a, gate_a, shift_f, scale_f, gate_f =", DIT),
    M("final_layer_shift_scale_swapped", "lcv_train/model/dit.py", "shift, scale = self.adaLN_modulation(",
      "scale, shift = self.adaLN_modulation(", DIT),
    M("text_padding_not_zeroed", "lcv_train/model/dit.py", "y = y * text_mask[..., None].to(y.dtype)", "y = y", DIT),
    M("initial_weights_ignore_name", "lcv_train/model/dit.py",
      "manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)", "manual_seed(seed % 2**63)", DIT),
    # -- diffusion ----------------------------------------------------------------------------------
    M("shift_interpolation_reversed", "lcv_train/diffusion/flow_matching.py",
      "math.exp((1 - a) * math.log(cfg.shift_min) + a * math.log(cfg.shift_max))",
      "math.exp(a * math.log(cfg.shift_min) + (1 - a) * math.log(cfg.shift_max))", FM),
    M("shift_counts_condition_tokens", "lcv_train/stages/flow_matching.py",
      "noisy_tokens = (T - batch.num_cond) * (H * W)", "noisy_tokens = T * (H * W)", FM),
    M("logit_std_ignored", "lcv_train/diffusion/flow_matching.py",
      "* cfg.logit_std + cfg.logit_mean", "+ cfg.logit_mean", FM),
    M("timestep_not_1000_sigma", "lcv_train/diffusion/flow_matching.py",
      "timestep = (sigma[:, None] * 1000.0)", "timestep = (sigma[:, None] * 999.0)", FM),
    M("condition_timestep_nonzero_in_inputs", "lcv_train/diffusion/flow_matching.py",
      "    timestep[:, :num_cond] = 0.0\n", "", FM),
    M("caption_dropout_rate_inverted", "lcv_train/diffusion/flow_matching.py",
      "generator=generator, device=text.device) < p", "generator=generator, device=text.device) > p", FM),
    M("caption_dropout_rate_off", "lcv_train/diffusion/flow_matching.py",
      "generator=generator, device=text.device) < p", "generator=generator, device=text.device) < 1.4 * p", FM),
    M("cfg_guidance_reversed", "lcv_train/sampling/sampler.py",
      "return v_uncond + guidance * (v_cond - v_uncond)", "return v_cond + guidance * (v_uncond - v_cond)", FM),
    # -- training -----------------------------------------------------------------------------------
    M("cosine_half_period", "lcv_train/training/schedule.py",
      "math.cos(math.pi * progress)", "math.cos(math.pi * progress / 2)", MECH),
    M("cosine_counts_warmup", "lcv_train/training/schedule.py",
      "progress = min(max(step - warmup, 0) / span, 1.0)", "progress = min(max(step, 0) / span, 1.0)", MECH),
    M("min_lr_ratio_ignored", "lcv_train/training/schedule.py",
      "return min_ratio + (1.0 - min_ratio) * 0.5", "return (1.0 - min_ratio) * 0.5", MECH),
    M("lr_scheduler_never_steps", "lcv_train/training/trainer.py",
      "        self.lr_scheduler.step()\n", "", MECH),
    M("ema_never_updated", "lcv_train/training/trainer.py",
      "self.progress.step % cfg.ema.every == 0", "self.progress.step % cfg.ema.every != 0", MECH),
    M("ema_updated_before_step", "lcv_train/training/trainer.py",
      "        grad_norm = self.engine.step()\n        self.lr_scheduler.step()\n        self.progress.step += 1\n"
      "        if self.ema is not None and self.progress.step % cfg.ema.every == 0:\n            self.ema.update()\n",
      "        if self.ema is not None and (self.progress.step + 1) % cfg.ema.every == 0:\n            self.ema.update()\n"
      "        grad_norm = self.engine.step()\n        self.lr_scheduler.step()\n        self.progress.step += 1\n",
      MECH),
    M("logged_loss_not_averaged", "lcv_train/training/trainer.py",
      "\"train/loss\": loss_sum / cfg.trainer.grad_accum", "\"train/loss\": loss_sum", MECH),
    M("ema_swap_not_restored", "lcv_train/training/ema.py",
      "                    p.copy_(backup[n])", "                    pass", LAYOUTS, slow=True),
    M("noise_seed_uses_global_rank", "lcv_train/training/trainer.py",
      "manual_seed(cfg.run.seed * 100003 + self.dims.dp_rank)", "manual_seed(cfg.run.seed * 100003 + self.dims.rank)",
      DIST_CP, slow=True),
    M("noise_state_not_restored_on_resume", "lcv_train/training/trainer.py",
      "            self.noise_gen.set_state(rank_state[\"noise_gen\"])\n", "", E2E_RESUME, slow=True),
    # -- the parallel engines -----------------------------------------------------------------------
    M("grad_norm_not_squared", "parallel/engine.py", "return norm.float().pow(2)", "return norm.float()", MECH),
    M("grads_not_cleared_after_step", "parallel/engine.py",
      "        self.optimizer.zero_grad(set_to_none=True)\n", "", MECH),
    M("clip_to_half_the_norm", "parallel/engine.py",
      "coef = self.grad_clip / (norm + 1e-6)", "coef = 0.5 * self.grad_clip / (norm + 1e-6)", MECH),
    M("tp_norm_not_reduced", "parallel/engine.py",
      "            dist.all_reduce(sq_tp, group=self.tp_group)\n", "", LAYOUTS_TP, slow=True),
    M("tp_replicated_norm_counted_per_rank", "parallel/engine.py",
      "sq = sq_tp + sq_rep", "sq = sq_tp + sq_rep * dist.get_world_size(self.tp_group)", LAYOUTS_TP, slow=True),
    M("zero_clipping_off", "parallel/zero.py",
      "\"gradient_clipping\": float(grad_clip or 0.0)", "\"gradient_clipping\": 0.0", LAYOUTS, slow=True),
    M("zero_ema_lerp_swapped", "parallel/zero.py", "                             1.0 - self.decay)",
      "                             self.decay)", LAYOUTS, slow=True),
    # -- GRPO formulas, rollouts and rewards (issue 13) -------------------------------------------------
    M("sde_score_term_sign", "lcv_train/rl/sde.py", "(u + g**2 / (2 * s) *", "(u - g**2 / (2 * s) *", RL),
    M("sde_diffusers_sign_v", "lcv_train/rl/sde.py", "x, u = x.to(dtype), -v.to(dtype)",
      "x, u = x.to(dtype), v.to(dtype)", RL),
    M("sde_std_not_truncated", "lcv_train/rl/sde.py", "std = std.clamp(max=std_max)", "std = std", RL),
    M("sde_log_prob_summed", "lcv_train/rl/sde.py", "return lp.flatten(1).mean(1)", "return lp.flatten(1).sum(1)", RL),
    M("sde_sample_not_detached", "lcv_train/rl/sde.py", "x_next = (mean + std * noise.to(dtype)).detach()",
      "x_next = mean + std * noise.to(dtype)", RL),
    M("adv_sample_std", "lcv_train/rl/advantages.py", "r.std(dim=1, correction=0)", "r.std(dim=1)", RL),
    M("adv_mean_of_group_stds", "lcv_train/rl/advantages.py", "group_std.amax(dim=0)", "group_std.mean(dim=0)", RL),
    M("adv_own_group_std", "lcv_train/rl/advantages.py", "scale = group_std.amax(dim=0) + EPS",
      "scale = group_std[:, None] + EPS", RL),
    M("grpo_loss_kl_weight_w", "lcv_train/rl/loss.py", "kl_beta * w**2 * kl", "kl_beta * w * kl", RL),
    M("grpo_loss_unclipped", "lcv_train/rl/loss.py", "torch.maximum(-adv * ratio, -adv * clipped)", "-adv * ratio", RL),
    M("grpo_loss_min_not_max", "lcv_train/rl/loss.py", "torch.maximum(-adv * ratio", "torch.minimum(-adv * ratio", RL),
    M("grpo_weight_inverted", "lcv_train/rl/loss.py", "torch.sqrt(s / (1 - s))", "torch.sqrt((1 - s) / s)", RL),
    M("rollout_step_off_by_one", "lcv_train/rl/rollout.py", "here = crit == i\n", "here = crit == i + 1\n", RL),
    # the GRPO stage's plumbing (lcv_train/stages/grpo.py)
    M("grpo_stage_seeds_by_local_index", "lcv_train/stages/grpo.py",
      "prompt_generator(self.seed, batch_index, ctx.dims.dp_rank * P + j)",
      "prompt_generator(self.seed, batch_index, j)", GRPO_DP, slow=True),
    M("grpo_stage_rank0_advantages", "lcv_train/stages/grpo.py", "adv = adv_all[rank * P:(rank + 1) * P]",
      "adv = adv_all[:P]", GRPO_DP, slow=True),
    M("grpo_stage_reference_is_policy", "lcv_train/stages/grpo.py", "set_lora_multiplier(ctx.core_model, 0.0)",
      "set_lora_multiplier(ctx.core_model, self.lora.multiplier)", GRPO_STAGE),
    M("grpo_stage_old_log_prob_recomputed", "lcv_train/stages/grpo.py",
      "out = grpo_loss(log_prob, part.log_prob, adv[lo:hi]", "out = grpo_loss(log_prob, log_prob.detach(), adv[lo:hi]",
      GRPO_STAGE),
    M("grpo_stage_chunks_unweighted", "lcv_train/stages/grpo.py", "ctx.engine.backward(out.loss * ((hi - lo) / N))",
      "ctx.engine.backward(out.loss)", GRPO_STAGE),
    M("grpo_stage_running_stats_reset", "lcv_train/stages/grpo.py", "        self.running.copy_(sd[\"running\"])\n", "",
      GRPO_STAGE),
    M("grpo_stage_full_ft_reference_not_kept", "lcv_train/stages/grpo.py",
      "            self.reference = [p.detach().clone() for p in model.parameters() if p.requires_grad]",
      "            self.reference = None", GRPO_STAGE),
    M("videoalign_lora_scale_inverted", "lcv_train/rewards/videoalign.py", "else alpha / r", "else r / alpha", REWARDS),
    M("qwen2vl_patch_time_channel_swapped", "lcv_train/rewards/qwen2vl.py", "x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)",
      "x.permute(0, 3, 6, 4, 7, 1, 2, 5, 8)", REWARDS),
    # -- the sparse fine-tune and the stage chain (issue 11) ---------------------------------------------
    M("sparse_ft_warmup_off_by_one", "lcv_train/stages/sparse_ft.py", "min(1.0, step / warmup_steps)",
      "min(1.0, (step - 1) / warmup_steps)", RECIPES),
    M("sparse_ft_sparsity_not_set", "lcv_train/stages/sparse_ft.py", "            op.sparsity = sparsity\n", "", RECIPES),
    M("ulysses_inner_op_cached", "parallel/context_parallel/ops.py", "out = self.inner_op().self_attention(",
      "out = self.__dict__.setdefault('_inner', self.inner_op()).self_attention(", RECIPES),
    M("pipeline_stage_starts_fresh", "lcv_train/pipeline.py",
      "        mine.append(f\"trainer.init_from={previous}\")\n", "", PIPELINE),
    M("pipeline_reruns_finished_stages", "lcv_train/pipeline.py", "if done >= total:", "if done > total:", PIPELINE),
    M("pipeline_hands_on_a_stopped_stage", "lcv_train/pipeline.py", "            break\n    return summary",
      "            continue\n    return summary", PIPELINE),
]


def _copy_tree(dst: Path, tests_from: str | None) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "outputs", "multirun", "wandb",
                                    "*.egg-info", ".benchmarks", ".whl")
    shutil.copytree(REPO, dst, ignore=ignore)
    if tests_from:
        shutil.rmtree(dst / "tests")
        archive = subprocess.run(["git", "-C", str(REPO), "archive", tests_from, "tests"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def _existing(tests: tuple[str, ...], root: Path) -> list[str]:
    """The selections that exist in ``root``'s tests (another commit's tests may lack some)."""
    out = []
    for t in tests:
        path, _, func = t.partition("::")
        f = root / path
        if f.is_file() and (not func or re.search(rf"^def {re.escape(func)}\b", f.read_text(), re.M)):
            out.append(t)
    return out


def _run_tests(root: Path, tests: list[str], timeout: int) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LCV_NO_PROGRESS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("WANDB_API_KEY", None)
    t0 = time.time()
    try:
        # the suite's per-test timeout is sized for an idle machine; here only the mutation's timeout counts
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o",
                            f"timeout={timeout}", *tests], cwd=root,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.time() - t0, ""
    dt = time.time() - t0
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    if p.returncode == 0:
        return "survived", dt, tail[0]
    if p.returncode in (1, 2, 3):
        return "killed", dt, _first_failure(p.stdout) or tail[0]
    if p.returncode == 5:
        return "survived (no tests)", dt, tail[0]
    return f"error (pytest rc {p.returncode})", dt, tail[0]


def _first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", action="append", default=[], help="only mutations whose name contains this (repeatable)")
    ap.add_argument("--quick", action="store_true", help="skip mutations whose tests take minutes")
    ap.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    ap.add_argument("--tests-from", metavar="REF", help="run another commit's tests/ (e.g. main) against the mutants")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mutation (default 1800)")
    ap.add_argument("--baseline", action="store_true", help="first run every selected test on the unmutated copy")
    ap.add_argument("--markdown", metavar="PATH", help="also write the result table as markdown")
    args = ap.parse_args(argv)

    todo = [m for m in MUTATIONS if (not args.k or any(k in m.name for k in args.k)) and not (args.quick and m.slow)]
    if args.list:
        for m in todo:
            flags = ",".join(f for f, on in (("issue", m.issue), ("slow", m.slow)) if on)
            n = (REPO / m.path).read_text().count(m.old)
            flags += "" if n == 1 else f" STALE({n})"
            print(f"{m.name:42s} {m.path:40s} {flags:10s} {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="lcv-mutants-") as tmp:
        root = Path(tmp) / "repo"
        _copy_tree(root, args.tests_from)
        if args.baseline:
            sel = sorted({t for m in todo for t in _existing(m.tests, root)})
            verdict, dt, tail = _run_tests(root, sel, args.timeout * 4)
            print(f"baseline ({len(sel)} selections, {dt:.0f} s): {'green' if verdict == 'survived' else tail}")
            if verdict != "survived":
                return 1
        rows = []
        for m in todo:
            f = root / m.path
            src = f.read_text()
            n = src.count(m.old)
            tests = _existing(m.tests, root)
            if n != 1:
                verdict, dt, tail = f"stale ({n} matches)", 0.0, ""
            elif not tests:
                verdict, dt, tail = "survived (no tests)", 0.0, "none of its tests exist here"
            else:
                f.write_text(src.replace(m.old, m.new))
                try:
                    verdict, dt, tail = _run_tests(root, tests, args.timeout)
                finally:
                    f.write_text(src)
            rows.append((m, verdict, dt, tail))
            print(f"{m.name:42s} {verdict:18s} {dt:6.0f} s  {tail[:110]}", flush=True)
    scored = [r for r in rows if not r[1].startswith(("stale", "error"))]
    killed = sum(r[1].startswith("killed") for r in scored)
    issue = [r for r in scored if r[0].issue]
    print(f"\nkilled {killed}/{len(scored)} ({100 * killed / max(len(scored), 1):.0f}%); issue-18 mutations killed "
          f"{sum(r[1].startswith('killed') for r in issue)}/{len(issue)}; "
          f"tests: {args.tests_from or 'working tree'}")
    if args.markdown:
        lines = ["| mutation | file | result | s |", "| --- | --- | --- | ---: |"]
        lines += [f"| {m.name}{' (issue)' if m.issue else ''} | `{m.path}` | {v} | {dt:.0f} |" for m, v, dt, _ in rows]
        lines.append(f"\nkilled {killed}/{len(scored)}")
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
