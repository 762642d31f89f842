"""Sampling time per step on this machine's CPU (``lcv-sample``'s loop: ``lcv_train.sampling``).

One step is what the sampler does per sigma: two DiT forwards with CFG (guidance > 1), one without
(distillation, refiner). Rows: the embedded default's tiny DiT and the ``small`` preset at the demo's clip
size (9 frames 32x32, stand-in pixel codec: 9 x 16 x 16 latents, 576 noisy tokens), T2V with CFG, VC with 4
condition frames with the condition K/V cache and without it (the condition recomputed at every call),
the distilled schedule (no CFG), and one refiner step (BSA on, 17 frames 64x64 after upsampling). Random
weights (time does not depend on them); one thread; the fastest and the median of the steps after the
first (8 per row): on a shared machine the fastest is the closest to the idle figure.

    python bench/sample.py              # ~1-3 min on 2 cores; prints the table, rewrites its RESULTS.md section
    python bench/sample.py --no-write
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bsa_model import write_results  # noqa: E402
from lcv_train.encoders.standins import PixelCodec, TinyUMT5TextEncoder  # noqa: E402
from lcv_train.model import LongCatDiT  # noqa: E402
from lcv_train.sampling import Denoiser, denoise, sigma_schedule  # noqa: E402
from lcv_train.sampling.load import SamplingModel  # noqa: E402
from lcv_train.sampling.pipeline import GenerationConfig, encode_prompts, refine, generate  # noqa: E402


def _model(preset: str, text_dim: int) -> SamplingModel:
    torch.manual_seed(0)
    m = LongCatDiT.from_preset(preset).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return SamplingModel(model=m, codec=PixelCodec(), text_encoder=TinyUMT5TextEncoder(dim=text_dim, max_length=32),
                         shift=3.0, source=ROOT, null_negative=True)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_step(fn, sigmas) -> tuple[float, float]:
    """(fastest, median) wall seconds per step of ``fn(on_step)`` over the steps after the first. On a shared
    machine the fastest step is the one least slowed by other jobs: the closest to the idle figure."""
    marks = []
    t0 = _now()
    fn(lambda i, x: marks.append(_now()))
    times = [b[0] - a[0] for a, b in zip([t0] + marks[:-1], marks)][1:]
    return min(times), statistics.median(times)


@torch.no_grad()
def rows(steps: int = 9) -> list[tuple]:
    out = []
    for preset, dim in (("tiny", 32), ("small", 128)):
        sm = _model(preset, dim)
        cfg = encode_prompts(sm, ["a red circle moves to the right"], 3.0)
        nocfg = encode_prompts(sm, ["a red circle moves to the right"], 1.0)
        x = torch.randn(1, 16, 9, 16, 16, generator=torch.Generator().manual_seed(0))
        sig = sigma_schedule(steps, 3.0)
        params = sm.model.num_parameters() / 1e6

        def run(den, p, x, sig, guidance):
            return lambda cb: denoise(den, x, sig, p.text, p.mask, guidance=guidance, neg_text=p.neg_text,
                                      neg_mask=p.neg_mask, on_step=cb)

        t2v = _per_step(run(Denoiser(sm.model), cfg, x, sig, 3.0), sig)
        cond = torch.randn(1, 16, 4, 16, 16)
        xv = x[:, :, :5]
        enc = []
        for _ in range(5):
            t0 = time.perf_counter()
            cached = Denoiser(sm.model, cond, use_cache=True)
            enc.append(time.perf_counter() - t0)
        encode_s = (min(enc), statistics.median(enc))
        vc_cached = _per_step(run(cached, cfg, xv, sig, 3.0), sig)
        vc_uncached = _per_step(run(Denoiser(sm.model, cond, use_cache=False), cfg, xv, sig, 3.0), sig)
        distill = sigma_schedule(steps, 3.0, kind="distill")
        dist = _per_step(run(Denoiser(sm.model), nocfg, x, distill, 1.0), distill)
        out += [(preset, params, "T2V, CFG (2 forwards)", "9x16x16", t2v),
                (preset, params, "VC 4+5 frames, CFG, condition cache", "5x16x16 (+4 cached)", vc_cached),
                (preset, params, "VC 4+5 frames, CFG, no cache", "9x16x16", vc_uncached),
                (preset, params, "(VC: encoding the condition once)", "4x16x16", encode_s),
                (preset, params, "distilled schedule, no CFG", "9x16x16", dist)]
        if preset == "tiny":
            stage1 = generate(sm, nocfg, GenerationConfig(frames=9, height=32, width=32, steps=1, guidance=1.0,
                                                          shift=3.0), None, torch.Generator().manual_seed(0))
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                refine(sm, nocfg, stage1, 64, 64, steps=10, generator=torch.Generator().manual_seed(0))
                t.append(time.perf_counter() - t0)
            n = len(sigma_schedule(10, 3.0, kind="refine")) - 1
            out.append((preset, params, f"refiner (BSA, no CFG; {n} steps, whole call / {n}, 3 calls)",
                        "20x32x32 (17 frames, padded)", (min(t) / n, statistics.median(t) / n)))
    return out


def report() -> str:
    torch.set_num_threads(1)  # no OpenMP spin-waiting against other jobs: steadier on a shared machine
    threads = torch.get_num_threads()
    lines = [f"`python bench/sample.py` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {threads} threads, fp32, load average at start "
             f"{os.getloadavg()[0]:.1f} (the box is shared: read ratios, not absolutes).", "",
             "| model | params (M) | what | noisy latents (T x h x w) | s / step, fastest | s / step, median |",
             "| --- | ---: | --- | --- | ---: | ---: |"]
    for preset, params, what, shape, (fastest, median) in rows():
        lines.append(f"| {preset} | {params:.2f} | {what} | {shape} | {fastest:.3f} | {median:.3f} |")
    lines += ["", "Reading: a step with CFG is two forwards, a distilled or refiner step one. With a condition, the "
              "cache makes a step cost the noisy frames only (plus one encoding of the condition per segment): "
              "the 'condition cache' rows against 'no cache' (at 4 condition + 5 noisy frames, ~17 % for tiny and "
              "~30 % for small at the first run here). Time per step scales with the model and the tokens, so "
              "a real model's figure comes from a GPU run of this script."]
    return "\n".join(lines) + "\n"


def main() -> int:
    body = report()
    print(body)
    if "--no-write" not in sys.argv:
        write_results(body, "## Sampling time per step (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
