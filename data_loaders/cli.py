"""``lcv-data``: pack / synth / encode / stats / curate. Run ``lcv-data <command> --help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from data_loaders.config import DataConfig, DataConfigError, DataError


def _buckets(text: str) -> list[list[int]]:
    """``"93x480x832,1x480x832"`` -> [[93, 480, 832], [1, 480, 832]]."""
    out = []
    for part in text.split(","):
        try:
            f, h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bucket {part!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 93x480x832") from None
        out.append([f, h, w])
    return out


def _frames(text: str) -> list[int]:
    parts = [int(v) for v in text.replace("-", ",").split(",")]
    return [parts[0], parts[-1]]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcv-data", description="Shards for lcv-train: pack, synth, encode, stats, curate.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("pack", help="CSV of video/image files + captions -> WebDataset shards + index.json")
    a.add_argument("--input", required=True, help="CSV with a path column, a caption column, any metadata columns")
    a.add_argument("--out", required=True)
    a.add_argument("--shard-size", default="1GB", help="target bytes per shard (1GB, 512MiB, ...)")
    a.add_argument("--path-column", default=None)
    a.add_argument("--caption-column", default=None)

    a = sub.add_parser("synth", help="write the synthetic moving-shapes set as real mp4 shards")
    a.add_argument("--out", required=True)
    a.add_argument("--n", type=int, default=2000)
    a.add_argument("--frames", type=_frames, default=[9, 16],
                   help="frames per clip, N or MIN-MAX (default 9-16: every clip fills the default 9-frame bucket)")
    a.add_argument("--height", type=int, default=32)
    a.add_argument("--width", type=int, default=32)
    a.add_argument("--fps", type=float, default=8.0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--image-fraction", type=float, default=0.0, help="share of 1-frame still images (jpg)")
    a.add_argument("--samples-per-shard", type=int, default=256)

    a = sub.add_parser("encode", help="precompute VAE latents + text embeddings into new shards")
    a.add_argument("--shards", required=True, nargs="+", help="pixel shard dirs / index files / shard URLs")
    a.add_argument("--out", required=True)
    a.add_argument("--buckets", type=_buckets, default=None, help="FxHxW,... (default: data config default)")
    a.add_argument("--fps", type=float, default=None)
    a.add_argument("--batch-size", type=int, default=4)
    a.add_argument("--num-workers", type=int, default=1)
    a.add_argument("--shard-size", default="1GB")
    a.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    a.add_argument("--config-dir", default=None, help="the conf/ dir (default: the installed conf package)")
    a.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="this process's share (default $RANK); with --world-size > 1 it writes OUT/part-RANK")
    a.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    a.add_argument("overrides", nargs="*", help="vae=<name> text_encoder=<name> [vae.path=...] ...")

    a = sub.add_parser("stats", help="counts by bucket, subset, media; skip reasons; metadata ranges")
    a.add_argument("shards", nargs="+")
    a.add_argument("--buckets", type=_buckets, default=None, help="FxHxW,... (default: data config default)")
    a.add_argument("--fps", type=float, default=None)
    a.add_argument("--temporal-stride", type=int, default=1)
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")

    a = sub.add_parser("curate", help="raw videos -> deduplicated, cut, cropped, scored, captioned, clustered shards")
    a.add_argument("--input", required=True, help="folder of raw videos (+ optional <stem>.json/.txt sidecars)")
    a.add_argument("--out", required=True, help="metadata.parquet, shards/, conf/data/curated.yaml, report")
    a.add_argument("--steps", default=None, help="comma-separated subset of: " + ",".join(_curate_steps()))
    a.add_argument("--engine", default="local", choices=("local", "ray"))
    a.add_argument("--workers", type=int, default=0, help="local processes (0 = one per CPU)")
    a.add_argument("--ray-address", default=None, help="existing Ray cluster (default $RAY_ADDRESS or auto)")
    a.add_argument("--report", action="store_true", help="print counts per step, write PNG histograms")
    a.add_argument("--scene-detector", default="auto", choices=("auto", "content", "transnetv2"))
    a.add_argument("--scene-threshold", type=float, default=27.0)
    a.add_argument("--transnet-weights", default=None)
    a.add_argument("--min-clip-s", type=float, default=0.5)
    a.add_argument("--max-clip-s", type=float, default=10.0)
    a.add_argument("--sample-fps", type=float, default=4.0, help="frames per second analysed for quality")
    a.add_argument("--scorer", action="append", default=[], metavar="NAME=PATH",
                   help="aesthetic|text_coverage|watermark=TorchScript file (repeatable)")
    a.add_argument("--captioner", default=None, help="package.module:function or a local image-to-text model dir")
    a.add_argument("--translate", default=None, help="package.module:function(text, lang) for caption augmentation")
    a.add_argument("--embedder", default=None, help="local sentence-embedding model dir (default: TF-IDF)")
    a.add_argument("--clusters", type=int, default=8)
    a.add_argument("--cluster-balance", type=float, default=0.5, help="0: clusters equally often, 1: as found")
    a.add_argument("--shard-size", default="1GB")
    a.add_argument("--seed", type=int, default=0)
    return p


def _curate_steps() -> tuple[str, ...]:
    from data_loaders.curate.config import STEPS

    return STEPS


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (DataConfigError, DataError, ValueError, FileNotFoundError) as e:  # incl. CurateConfigError
        print(f"lcv-data {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    d = DataConfig()
    if args.cmd == "pack":
        from data_loaders.pack import pack

        summary = pack(args.input, args.out, args.shard_size, args.path_column, args.caption_column)
        print(f"packed {summary['written']} samples into {summary['shards']} shards; index {summary['index']}")
        if summary["skipped"]:
            print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())))
        return 0
    if args.cmd == "synth":
        from data_loaders.synthetic import ensure_synthetic_shards, train_command

        out = ensure_synthetic_shards(args.out, args.n, args.frames, args.height, args.width, args.fps, args.seed,
                                      image_fraction=args.image_fraction, samples_per_shard=args.samples_per_shard)
        print(f"synthetic set ({args.n} samples) in {out}")
        print("train on it: " + train_command(args.out, args.frames, args.height, args.width, args.fps,
                                              args.image_fraction))
        return 0
    if args.cmd == "stats":
        from data_loaders.stats import collect_stats, format_stats

        st = collect_stats(args.shards, args.buckets or d.buckets, args.fps or d.fps, args.temporal_stride)
        print(json.dumps(st, indent=1) if args.json else format_stats(st))
        return 0
    if args.cmd == "encode":
        from data_loaders.encode import compose_encoder_config, encode_shards

        cfg = compose_encoder_config(args.overrides, args.config_dir)
        from lcv_train.encoders import build_text_encoder, build_video_codec  # lazy: only this command needs it

        codec = build_video_codec(cfg.vae)
        text = build_text_encoder(cfg.text_encoder)
        from dataclasses import replace

        data = replace(d, buckets=args.buckets or d.buckets, fps=args.fps or d.fps, batch_size=args.batch_size,
                       spatial_multiple=max(1, int(getattr(codec, "spatial_stride", 1))))
        out = args.out if args.world_size <= 1 else os.path.join(args.out, f"part-{args.rank:05d}")
        summary = encode_shards(args.shards, out, codec, text, data, args.shard_size, args.dtype, args.num_workers,
                                rank=args.rank, world_size=args.world_size)
        print(f"encoded {summary['written']} samples into {summary['shards']} shards; index {summary['index']}")
        return 0
    if args.cmd == "curate":
        from data_loaders.curate import CurateConfig, curate
        from data_loaders.curate.report import format_report

        scorers = {}
        for item in args.scorer:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--scorer {item!r}: expected NAME=PATH")
            scorers[name] = path
        steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else list(_curate_steps())
        cfg = CurateConfig(input=args.input, out=args.out, steps=steps, engine=args.engine, workers=args.workers,
                           ray_address=args.ray_address, report=args.report, scene_detector=args.scene_detector,
                           scene_threshold=args.scene_threshold, transnet_weights=args.transnet_weights,
                           min_clip_s=args.min_clip_s, max_clip_s=args.max_clip_s, sample_fps=args.sample_fps,
                           scorers=scorers, captioner=args.captioner, translate=args.translate, embedder=args.embedder,
                           clusters=args.clusters, cluster_balance=args.cluster_balance, shard_size=args.shard_size,
                           seed=args.seed)
        summary = curate(cfg)
        print(format_report(summary) if args.report else f"curated {summary['clips']} clips -> {summary['metadata']}")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
