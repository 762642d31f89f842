"""Benchmark: 3D block-sparse attention (forward + backward) vs dense attention on the same inputs.

GPU (default when CUDA is available): LongCat shapes, 93 frames -> latent T = 24, head_dim 128, 32 heads,
bf16, sparsity 0.9375, 4x4x4 blocks; BSA Triton backend vs flash-attn (if installed) else PyTorch SDPA.
    480p: 24 x 30 x 52 = 37,440 tokens      720p: 24 x 45 x 80 = 86,400 tokens
CPU (``--device cpu``): BSA torch backend vs SDPA at 16,384 tokens (16 x 32 x 32), fp32, few heads.

Prints a markdown table and writes it into the ``## BSA`` section of bench/RESULTS.md (``--no-write`` to skip).

    python bench/bsa.py                  # GPU if present, else CPU
    python bench/bsa.py --device cpu --heads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kernels.bsa import block_sparse_attention  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
GPU_SHAPES = {"480p": (24, 30, 52), "720p": (24, 45, 80)}
CPU_SHAPES = {"16k": (16, 32, 32)}


def machine_description(device: str) -> str:
    if device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        hw = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        hw = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        hw += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        try:
            hw += f", load average {os.getloadavg()[0]:.1f} at the end (machine shared with other jobs)"
        except OSError:
            pass
    return f"{hw}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def dense_fn(device: str):
    if device == "cuda":
        try:
            from flash_attn import flash_attn_func

            return "flash-attn", lambda q, k, v: flash_attn_func(q, k, v)
        except Exception:
            pass

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return "SDPA", sdpa


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, q, k, v, dout, device):
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sync(device)
    t0 = time.perf_counter()
    out = fn(qa, ka, va)
    sync(device)
    t1 = time.perf_counter()
    out.backward(dout)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def bench_shape(name, latent, device, heads, dim, dtype, sparsity, repeats, warmup, backend=None):
    S = math.prod(latent)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, heads, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(1, S, heads, dim, generator=g).to(device=device, dtype=dtype)
    backend = backend or ("triton" if device == "cuda" else "torch")
    dense_name, dense = dense_fn(device)

    def bsa(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, latent, block_shape=(4, 4, 4), sparsity=sparsity, backend=backend)

    best = {"bsa": [math.inf, math.inf], "dense": [math.inf, math.inf]}
    for i in range(warmup + repeats):  # interleaved so that machine noise hits both alike
        for key, fn in (("bsa", bsa), ("dense", dense)):
            f, b = time_fwd_bwd(fn, q, k, v, dout, device)
            if i >= warmup:
                best[key] = [min(best[key][0], f), min(best[key][1], b)]
    bsa_total, dense_total = sum(best["bsa"]), sum(best["dense"])
    return {
        "shape": f"{name} {latent[0]}x{latent[1]}x{latent[2]} ({S:,} tok), H={heads}, D={dim}, {str(dtype)[6:]}",
        "bsa": f"BSA {backend}", "dense": dense_name,
        "bsa_fwd": best["bsa"][0] * 1e3, "bsa_bwd": best["bsa"][1] * 1e3,
        "dense_fwd": best["dense"][0] * 1e3, "dense_bwd": best["dense"][1] * 1e3,
        "speedup": dense_total / bsa_total,
    }


def table(rows, machine, sparsity):
    lines = [f"Machine: {machine}. Sparsity {sparsity}, 4x4x4 blocks, batch 1, best of the timed repeats "
             "(times in ms; BSA includes blockify, pooling and top-k selection).", "",
             "| shape | BSA | fwd | bwd | dense | fwd | bwd | speedup fwd+bwd |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['bsa']} | {r['bsa_fwd']:.0f} | {r['bsa_bwd']:.0f} | {r['dense']} | "
                     f"{r['dense_fwd']:.0f} | {r['dense_bwd']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def write_results(subsection: str, body: str):
    """Replace (or add) ``### <subsection>`` inside the ``## BSA`` section of bench/RESULTS.md."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if "## BSA" not in lines:
        lines += ["", "## BSA", "", "Produced by `python bench/bsa.py` (see its docstring)."]
    start = lines.index("## BSA")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = lines[start:end]
    head = f"### {subsection}"
    new_sub = [head, "", *body.split("\n"), ""]
    if head in section:
        s0 = section.index(head)
        s1 = next((i for i in range(s0 + 1, len(section)) if section[i].startswith("### ")), len(section))
        section = section[:s0] + new_sub + section[s1:]
    else:
        while section and section[-1] == "":
            section.pop()
        section += ["", *new_sub]
    lines = lines[:start] + section + lines[end:]
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", type=int, default=None, help="default 32 on GPU, 2 on CPU")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9375)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 GPU, 2 CPU)")
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of 480p 720p (GPU) / 16k (CPU)")
    ap.add_argument("--latent", nargs=3, type=int, default=None, metavar=("T", "H", "W"),
                    help="one custom latent grid instead of the presets (implies --no-write)")
    ap.add_argument("--backend", choices=("torch", "triton"), default=None,
                    help="BSA backend (default triton on GPU, torch on CPU); triton on CPU needs TRITON_INTERPRET=1")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    if device == "cuda":
        heads, dtype, shapes = args.heads or 32, torch.bfloat16, GPU_SHAPES
        repeats, warmup = args.repeats or 5, 2
    else:
        heads, dtype, shapes = args.heads or 2, torch.float32, CPU_SHAPES
        repeats, warmup = args.repeats or 2, 1
    names = args.shapes or list(shapes)
    if args.latent:
        shapes, names, args.no_write = {"custom": tuple(args.latent)}, ["custom"], True
    rows = []
    for name in names:
        r = bench_shape(name, shapes[name], device, heads, args.dim, dtype, args.sparsity, repeats, warmup,
                        args.backend)
        rows.append(r)
        print(f"{r['shape']}: BSA {r['bsa_fwd']:.0f}+{r['bsa_bwd']:.0f} ms, {r['dense']} "
              f"{r['dense_fwd']:.0f}+{r['dense_bwd']:.0f} ms, speedup {r['speedup']:.2f}x", flush=True)
    out = table(rows, machine_description(device), args.sparsity)
    print(out)
    if not args.no_write:
        gpu_sub = "GPU (Triton backend vs dense)"
        if device == "cuda":
            write_results(gpu_sub, out)
        else:
            write_results(f"CPU (torch backend vs SDPA), {torch.get_num_threads()} thread(s)", out)
            if gpu_sub not in open(RESULTS).read():
                write_results(gpu_sub, "Not measured yet: no GPU was available when this was written. Run "
                              "`python bench/bsa.py` on a GPU machine (480p 24x30x52 and 720p 24x45x80 latents, "
                              "H=32, D=128, bf16, sparsity 0.9375, Triton BSA vs flash-attn/SDPA) to fill this in.")
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
