"""Training-step throughput of a parallel layout on synthetic latents (no data loading, no encoders).

    torchrun --nproc_per_node 8 bench/layouts.py --layout fsdp --model small --frames 13 --size 64 --steps 20
    torchrun --nproc_per_node 8 bench/layouts.py --layout fsdp_tp2 --ac 1 --model longcat-13.6b --frames 93 --size 480x832
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 bench/layouts.py --layout zero2 --model tiny   # CPU

Prints, from rank 0: tokens/s (global), step time, model TFLOP/s per GPU, MFU against
``parallel.device_info.peak_flops`` and peak device memory; the planner's prediction for the same layout
comes from ``lcv-plan`` (same preset and overrides). ``--layout`` is a ``conf/parallel`` preset;
``--cp/--tp/--ac/--compile`` override it.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist


RESULTS = __file__.rsplit("/", 1)[0] + "/RESULTS.md"
SECTION = "## Parallel layouts"
HEADER = ("| machine | date | layout | model | grid x batch/rank | step ms | tokens/s | model TFLOP/s/device | MFU | "
          "peak GiB |\n| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")


def _machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "CPU")
    import os

    return f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}"


def _record(row: str) -> None:
    """Append ``row`` to the table of the ``## Parallel layouts`` section of bench/RESULTS.md."""
    import os

    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + (f"\n\n{SECTION}\n\n`bench/layouts.py`: one training step of a layout on "
                                   f"synthetic latents (no data loading), mean over the timed steps.\n\n{HEADER}\n")
    head, _, tail = text.partition(SECTION)
    nxt = tail.find("\n## ")
    body, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
    text = head + SECTION + body.rstrip("\n") + "\n" + row + "\n" + rest
    with open(RESULTS, "w") as f:
        f.write(text)
    print(f"recorded in {RESULTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="fsdp")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--frames", type=int, default=9, help="pixel frames (1 + 4k)")
    ap.add_argument("--size", default="64", help="pixel HxW or one number")
    ap.add_argument("--batch", type=int, default=1, help="samples per data-parallel rank")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="do not record the result in bench/RESULTS.md")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cp", type=int)
    ap.add_argument("--tp", type=int)
    ap.add_argument("--ac", type=int, help="activation checkpointing every k blocks")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from conf.parsing import from_mapping
    from lcv_train.model.config import preset
    from lcv_train.model.dit import LongCatDiT
    from parallel import ParallelConfig, build_engine, init_distributed, parallelize_model
    from parallel.device_info import peak_flops
    from lcv_train.planner import compose, forward_flops, latent_grid

    c = compose([f"parallel={args.layout}"])
    pdict = OmegaConf.to_container(c.parallel, resolve=True)
    for key, value in (("cp", args.cp), ("tp", args.tp), ("activation_checkpointing", args.ac)):
        if value is not None:
            pdict[key] = value
    if args.compile:
        pdict["compile"] = True
    pcfg = from_mapping(ParallelConfig, pdict, "parallel").validate()
    mcfg = preset(args.model)
    dims = init_distributed(pcfg, mcfg)
    device = dims.device
    h, w = (int(v) for v in (args.size.split("x") if "x" in args.size else (args.size, args.size)))
    grid = latent_grid((args.frames, h, w), mcfg.patch_size)
    lat_shape = (args.batch, mcfg.in_channels, grid[0], grid[1] * mcfg.patch_size[1], grid[2] * mcfg.patch_size[2])

    torch.manual_seed(0)
    with torch.device(device):
        model = LongCatDiT(mcfg)
    model = parallelize_model(model, dims, pcfg)
    engine = build_engine(model, {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-8}, dims, pcfg)
    g = torch.Generator(device="cpu").manual_seed(dims.dp_rank)
    lat = torch.randn(lat_shape, generator=g).to(device)
    target = torch.randn(lat_shape, generator=g).to(device)
    text = torch.randn(args.batch, args.text_len, mcfg.caption_channels, generator=g).to(device)
    t = (torch.rand(args.batch, generator=g) * 1000).to(device)

    def step():
        with engine.autocast():
            out = engine.model(lat, t, text)
            loss = torch.nn.functional.mse_loss(out.float(), target)
        engine.backward(loss)
        return engine.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps

    tokens = grid[0] * grid[1] * grid[2] * args.batch * dims.dp_size
    flops = 3 * forward_flops(mcfg, grid, args.text_len) * args.batch * dims.dp_size
    per_gpu = flops / dims.world_size / dt
    if dims.is_rank0:
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"layout {dims.describe()} engine={pcfg.engine} ac={pcfg.activation_checkpointing} "
              f"compile={pcfg.compile} model={args.model} grid={grid} batch/rank={args.batch}")
        print(f"step {dt * 1e3:.1f} ms  tokens/s {tokens / dt:,.0f}  model TFLOP/s/GPU {per_gpu / 1e12:.2f}  "
              f"MFU {per_gpu / peak_flops(device):.1%}  peak mem {mem:.2f} GiB")
        if not args.no_write:
            row = (f"| {_machine(device)} | {time.strftime('%Y-%m-%d')} | {dims.describe()} {pcfg.engine} "
                   f"ac={pcfg.activation_checkpointing} | {args.model} | {list(grid)} x {args.batch} | "
                   f"{dt * 1e3:.1f} | {tokens / dt:,.0f} | {per_gpu / 1e12:.3f} | {per_gpu / peak_flops(device):.1%} | "
                   f"{f'{mem:.2f}' if device.type == 'cuda' else 'n/a (CPU)'} |")
            _record(row)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
