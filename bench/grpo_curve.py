"""The GRPO reward curve on the tiny model on CPU: ``stage=grpo`` with one weights-free reward.

Writes a tiny DiT with random weights in the published layout, then runs the real trainer with
``stage=grpo`` (LoRA r4, G=4, 2 prompts a step, 3 sampling steps, 2-frame 16x16 videos) and prints the
reward mean, the KL to the base and the clip fraction per step. The reward is ``--reward``: ``brightness``
(mean pixel value, defined here: a closed-form optimum) or any registered scorer (``motion``,
``synthetic_compliance`` where that scorer exists).

    python bench/grpo_curve.py                      # 24 steps, brightness
    python bench/grpo_curve.py --reward motion --steps 40
    python bench/grpo_curve.py --write              # also replace its section of bench/RESULTS.md

Compliance on the demo model trained on still frames (README, GRPO; tests/training/test_grpo_compliance.py):

    lcv-train synthetic.frames=1 sample.frames=1 'data.buckets=[[1,16,16]]' +data.video_in_image_buckets=true \
        trainer.max_steps=600 run.name=stills
    python bench/grpo_curve.py --reward synthetic_compliance --init-from outputs/stills --steps 40 --lr 0.01 \
        --prompts-per-step 8 --group-size 8 --train-prompts 8 --eval-every 10 --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_loaders.synthetic import synthetic_captions  # noqa: E402
from lcv_train.rewards import VideoScorer, register_scorer  # noqa: E402

SECTION = "## GRPO reward curve on the tiny model (issue 13)"
SECTION_TRAINED = "## GRPO with a reward from a trained demo model (issue 13)"
SECTION_HELD_OUT = "## GRPO on the colours the demo model confuses, judged on held-out captions (issue 13)"
SECTION_OWN = "## GRPO raises caption compliance on the demo model trained on stills (issue 13)"
TRAIN_SEED, HELD_OUT_SEED = 777, 4242  # captions GRPO trains on, and the held-out ones it is judged on


@register_scorer("brightness")
class Brightness(VideoScorer):
    name = "brightness"

    def __call__(self, videos, prompts, fps):
        return videos.float().flatten(1).mean(1).cpu()


def _from_our_run(run: Path, tmp: Path, sampling_steps: int, colours: list[str] | None = None,
                  train_prompts: int = 0) -> list[str]:
    """Overrides that start GRPO from one of our runs (its EMA weights, model and text encoder) at its sample
    size, on the prompts of its last evaluation (``eval/step_N/prompts.txt``: the held-out captions), or on
    ``train_prompts`` (512 with ``colours``) training-style captions (of those object colours)."""
    import shutil

    import yaml

    c = yaml.safe_load((run / "config.yaml").read_text())
    if colours or train_prompts:
        captions = synthetic_captions(train_prompts or 512, TRAIN_SEED, c["sample"]["frames"] == 1, colours)
        (tmp / "prompts.txt").write_text("\n".join(captions) + "\n")
    else:
        evaluated = sorted(run.glob("eval/step_*/prompts.txt"))
        if not evaluated:
            sys.exit(f"grpo_curve: {run} has no eval/step_N/prompts.txt; evaluate the run first (eval.at_end=true)")
        shutil.copyfile(evaluated[-1], tmp / "prompts.txt")
    out = [f"model.{k}={v}" for k, v in c["model"].items() if k in ("hidden_size", "depth", "num_heads",
                                                                     "adaln_tembed_dim", "caption_channels")]
    out += [f"text_encoder.{k}={v}" for k, v in c["text_encoder"].items() if k in ("max_length", "tokenizer", "dim")]
    s = c["sample"]
    return out + [f"trainer.init_from={run}", f"stage.frames={s['frames']}", f"stage.height={s['height']}",
                  f"stage.width={s['width']}", f"stage.steps={sampling_steps}", f"stage.shift={s['shift']}",
                  f"stage.sde_window=[1,{max(2, sampling_steps // 2)}]", f"stage.guidance={s['guidance']}",
                  f"sample.frames={s['frames']}", f"sample.height={s['height']}", f"sample.width={s['width']}",
                  "lora.rank=8", "lora.alpha=8.0"]


def run(reward: str, steps: int, lr: float, clip: float, beta: float, init_from: Path | None = None,
        prompts_per_step: int = 2, sampling_steps: int = 10, group_size: int = 4, colours: list[str] | None = None,
        eval_every: int = 0, eval_prompts: int = 64, train_prompts: int = 0,
        seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The per-step reward figures, and (``eval_every`` > 0, with ``init_from``) the held-out evaluations: before
    the first update and every ``eval_every`` updates, ``eval_prompts`` captions (of ``colours``) from another
    seed, each with its fixed noise, sampled with the run's ``sample.*`` settings at the rollouts' number of steps
    (the sampler GRPO trains) and scored by ``synthetic_compliance`` (the trainer's evaluator, EMA off so it
    scores the policy itself)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import conf
    from lcv_train.checkpoints import export_published_dit
    from lcv_train.config import train_config_from_dict
    from lcv_train.model import LongCatDiT
    from lcv_train.training.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="grpo_curve_"))
    overrides = [f"run.root={tmp / 'runs'}", "run.name=r", "logger=none", f"synthetic.dir={tmp / 'data'}",
                 "synthetic.n=4", "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16",
                 "data.buckets=[[5,16,16]]", "data.batch_size=2", "data.num_workers=0", "trainer.sample_at_end=false",
                 "eval.at_end=false", "trainer.device=cpu", "stage=grpo", f"stage.prompts={tmp / 'prompts.txt'}",
                 f"stage.group_size={group_size}", f"stage.prompts_per_step={prompts_per_step}", f"trainer.max_steps={steps}",
                 f"trainer.checkpoint_every={steps}", f"stage.rewards=[{reward}]", "stage.reward_weights=[1.0]",
                 f"stage.clip_range={clip}", f"stage.kl_beta={beta}", f"optim.lr={lr}", "ema.decay=0",
                 f"run.seed={seed}"]
    if init_from is not None:
        overrides += _from_our_run(init_from, tmp, sampling_steps, colours, train_prompts)
        if eval_every:
            overrides += [f"eval.every={eval_every}", "eval.samples=0", "eval.videos=false",
                          "eval.scorers=[synthetic_compliance]", f"sample.steps={sampling_steps}"]
    else:
        torch.manual_seed(3)
        m = LongCatDiT.from_preset("tiny")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(std=0.05)
        export_published_dit(m.state_dict(), m.config, tmp / "pub")
        (tmp / "prompts.txt").write_text("a red circle moves right\na blue square moves up\na green ball falls\n")
        overrides += ["stage.frames=2", "stage.height=16", "stage.width=16", "stage.steps=3", "stage.sde_window=[1,3]",
                      "stage.guidance=1.0", "lora.rank=4", "lora.alpha=4.0", f"trainer.init_from={tmp / 'pub'}"]
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        cfg = compose("train", overrides=overrides)
    d = OmegaConf.to_container(cfg, resolve=True)
    if eval_every and init_from is not None:
        if train_prompts:  # judged on its own prompts, each with eval_prompts // train_prompts fixed noises
            own = (tmp / "prompts.txt").read_text().split("\n")[:train_prompts]
            d["eval"]["prompts"] = [p for p in own for _ in range(max(1, eval_prompts // train_prompts))]
        else:
            d["eval"]["prompts"] = synthetic_captions(eval_prompts, HELD_OUT_SEED, d["stage"]["frames"] == 1, colours)
    trainer = Trainer(train_config_from_dict(d))
    evals = []
    if eval_every and init_from is not None:
        evals.append({"step": 0, **trainer.evaluator.run(0)})  # LoRA up projections are zero: the base model
    trainer.fit()
    rows = [json.loads(x) for x in (tmp / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    evals += [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}} for r in rows
              if "eval/compliance" in r]
    return [{"step": r["step"], "reward": r[f"grpo/reward/{reward}_mean"], "kl": r["grpo/kl"],
             "clip": r["grpo/clip_fraction"], "flat": r[f"grpo/reward/{reward}_flat_groups"]}
            for r in rows], evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward", default="brightness")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--beta", type=float, default=0.004)
    ap.add_argument("--init-from", type=Path, help="one of our runs (e.g. the demo's): start from its EMA weights "
                    "and roll out its held-out captions at its sample size")
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--sampling-steps", type=int, default=10, help="with --init-from: rollout sampling steps")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--colours", help="with --init-from: train on 512 captions of these object colours (comma "
                    "separated, e.g. yellow,orange) instead of the run's evaluated prompts")
    ap.add_argument("--eval-every", type=int, default=0, help="with --init-from: score held-out captions (of "
                    "--colours) before the first update and every k updates")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--train-prompts", type=int, default=0, help="with --init-from: train on this many training-"
                    "style captions (and judge on them, --eval-prompts videos in all) instead of the run's evaluated "
                    "prompts")
    ap.add_argument("--seed", type=int, default=0, help="run.seed: the rollouts' prompts order and noises")
    ap.add_argument("--write", action="store_true", help="replace this script's section of bench/RESULTS.md")
    a = ap.parse_args()
    colours = a.colours.split(",") if a.colours else None
    rows, evals = run(a.reward, a.steps, a.lr, a.clip, a.beta, a.init_from, a.prompts_per_step, a.sampling_steps,
                      a.group_size, colours, a.eval_every, a.eval_prompts, a.train_prompts, a.seed)
    section = (SECTION if a.init_from is None else SECTION_OWN if a.train_prompts else SECTION_HELD_OUT if evals
               else SECTION_TRAINED)
    start = ("tiny DiT (random weights), LoRA r4, G=4, 2 prompts a step, 3 sampling steps, 2x16x16 videos"
             if a.init_from is None else
             f"from the EMA weights of {a.init_from.name} (its model, text encoder and sample size; "
             + (f"{a.train_prompts} training-style captions" if a.train_prompts else
                f"512 training-style captions of {' and '.join(colours)} objects" if colours else
                "the prompts of its last evaluation")
             + f"), LoRA r8, G={a.group_size}, {a.prompts_per_step} prompts a step, {a.sampling_steps} sampling steps")
    extra = "" if a.init_from is None else (f" --init-from RUN --prompts-per-step {a.prompts_per_step} "
                                            f"--sampling-steps {a.sampling_steps} --group-size {a.group_size}"
                                            + (f" --colours {a.colours}" if colours else "")
                                            + (f" --eval-every {a.eval_every} --eval-prompts {a.eval_prompts}"
                                               if a.eval_every else "")
                                            + (f" --train-prompts {a.train_prompts}" if a.train_prompts else "")
                                            + (f" --seed {a.seed}" if a.seed else ""))
    lines = [section, "",
             f"`python bench/grpo_curve.py --reward {a.reward} --steps {a.steps} --lr {a.lr} --clip {a.clip} "
             f"--beta {a.beta}{extra}` ({platform.machine()}, {torch.get_num_threads()} threads, "
             f"{datetime.date.today()}): {start}, one update per rollout.", "",
             f"| step | {a.reward} mean | flat groups | KL to base | clip fraction |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['reward']:.4f} | {r['flat']:.2f} | {r['kl']:.4f} | {r['clip']:.3f} |" for r in rows]
    if evals:
        judged = (f"Evaluated: the {a.train_prompts} training captions, {a.eval_prompts // a.train_prompts} fixed "
                  f"noises each" if a.train_prompts else
                  f"Held-out: {a.eval_prompts} other captions (seed {HELD_OUT_SEED}"
                  + (f", {' and '.join(colours)} objects" if colours else "") + "), each with its fixed noise")
        lines += ["", judged + f", sampled with the run's sample.* settings at {a.sampling_steps} steps (the "
                  "rollouts'; the trainer's evaluator) and scored by synthetic_compliance.",
                  "", "| updates | compliance | colour | shape | motion |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {e['step']} | {e['eval/compliance']:.3f} | {e['eval/compliance/colour']:.3f} | "
                  f"{e['eval/compliance/shape']:.3f} | {e['eval/compliance/motion']:.3f} |" for e in evals]
    first, last = rows[: max(1, len(rows) // 4)], rows[-max(1, len(rows) // 4):]
    mean = lambda rs: sum(r["reward"] for r in rs) / len(rs)  # noqa: E731
    lines += ["", f"Mean of the first {len(first)} steps {mean(first):.4f}, of the last {len(last)} "
              f"{mean(last):.4f}; largest KL {max(r['kl'] for r in rows):.4f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        path = REPO / "bench" / "RESULTS.md"
        old = path.read_text()
        if section in old:
            head, _, tail = old.partition(section)
            rest = tail.split("\n## ", 1)
            old = head + ("## " + rest[1] if len(rest) > 1 else "")
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
