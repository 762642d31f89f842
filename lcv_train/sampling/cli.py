"""``lcv-sample key=value ...``: videos from a checkpoint (ours or the published LongCat-Video folder).

    lcv-sample ckpt=outputs/exp1 prompt="a red circle moves to the right"
    lcv-sample ckpt=/ckpt/LongCat-Video task=i2v image=cat.jpg prompt="..." frames=93 steps=50 guidance=4.0
    lcv-sample ckpt=/ckpt/LongCat-Video task=vc video=clip.mp4 prompt="..." enhance_hf=true
    lcv-sample ckpt=... prompt="..." long=true segments=11                # minutes-long, by continuation
    lcv-sample ckpt=... prompt="..." distill=true lora=/ckpt/LongCat-Video/lora/cfg_step_lora.safetensors
    lcv-sample ckpt=... prompt="..." refine=true refine_lora=/ckpt/LongCat-Video/lora/refinement_lora.safetensors
    torchrun --nproc-per-node 8 -m lcv_train.sampling.cli ckpt=... prompts=prompts.txt   # prompts over ranks
    torchrun --nproc-per-node 8 -m lcv_train.sampling.cli ckpt=... cp=4 long=true ...   # 2 groups of 4 (context parallel)

Every key is listed in ``SampleRequest``. Each prompt ``i`` (its line in ``prompts=``) uses seed ``seed + i``,
so a prompt gives the same video whichever rank draws it. Files: ``<out>/<i>-<prompt>.mp4`` with a frame
strip ``.png`` and the prompt ``.txt``; ``out`` defaults to the run folder's ``samples/`` (our
checkpoints) or ``./samples``. A wrong key or value is one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from conf.parsing import from_mapping

from lcv_train.errors import CheckpointError, ConfigError, require

_UNSET: Any = None


@dataclass
class SampleRequest:
    ckpt: str = ""                     # run dir | step_N checkpoint | published folder (dit/config.json)
    prompt: str | None = None
    prompts: str | None = None         # a text file, one prompt per line
    task: str = "t2v"                  # t2v | i2v | vc
    image: str | None = None           # i2v: the first frame
    video: str | None = None           # vc: its last cond_frames frames condition the clip
    cond_frames: int = 13              # vc and long: condition frames (pixel frames)
    frames: int | None = None          # default: the run's sample.frames, 93 for published weights
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    steps: int | None = None           # default 50 (16 with distill=true)
    guidance: float | None = None      # default 4.0 (1.0, no CFG, with distill=true)
    cfg_zero_star: bool = True
    negative_prompt: str | None = None  # default: "" (published) / training's null text (our checkpoints)
    shift: float | None = None         # default: the checkpoint's (scheduler config / the run's sample.shift)
    enhance_hf: bool = False           # vc and long continuations: the published demo's enhance_hf schedule
    seed: int = 0
    out: str | None = None
    weights: str = "ema"               # our checkpoints: ema | model
    device: str | None = None          # default: cuda:<local rank> when available, else cpu
    dtype: str | None = None           # fp32 | bf16 (default: bf16 on GPU, fp32 on CPU)
    cache: bool = True                 # condition K/V cache (false: recompute the condition every call)
    cp: int = 1                        # context parallel: ranks per video (torchrun's world = cp x prompt groups)
    cp_mode: str = "ring"              # ring | ulysses
    long: bool = False
    segments: int = 1
    refine: bool = False
    refine_lora: str | None = None
    refine_height: int | None = None   # default: 1.5x (480p -> 720p)
    refine_width: int | None = None
    refine_steps: int = 50             # the regular schedule whose sigmas below 0.5 the refiner takes
    distill: bool = False
    lora: str | None = None            # a LoRA for the base pass (the distillation LoRA with distill=true)
    lora_multiplier: float = 1.0
    vae: str | None = None             # override: pixel | <LongCat-Video folder> (wan2.1)
    text_encoder: str | None = None    # override: tiny_umt5 | <LongCat-Video folder> (umt5_xxl)

    def validate(self) -> "SampleRequest":
        from lcv_train.sampling.pipeline import TASKS

        require(bool(self.ckpt), "ckpt", "is required: a run folder, a checkpoint or a published LongCat-Video folder")
        require((self.prompt is None) != (self.prompts is None), "prompt",
                "give exactly one of prompt=\"...\" and prompts=<file, one prompt per line>")
        require(self.task in TASKS, "task", f"must be one of {'|'.join(TASKS)}, got {self.task!r}")
        require(self.task != "i2v" or self.image is not None, "image", "task=i2v needs image=<file>")
        require(self.task != "vc" or self.video is not None, "video", "task=vc needs video=<file>")
        require(self.image is None or self.task == "i2v", "image", f"only for task=i2v (task={self.task})")
        require(self.video is None or self.task == "vc", "video", f"only for task=vc (task={self.task})")
        require(self.weights in ("ema", "model"), "weights", f"must be ema or model, got {self.weights!r}")
        require(self.dtype in (None, "fp32", "bf16"), "dtype", f"must be fp32 or bf16, got {self.dtype!r}")
        require(self.segments >= 1, "segments", f"must be >= 1, got {self.segments}")
        require(self.long or self.segments == 1, "segments", "needs long=true")
        require(self.cond_frames >= 1, "cond_frames", f"must be >= 1, got {self.cond_frames}")
        require(not self.distill or self.lora is not None, "lora", "distill=true needs lora=<distillation LoRA file>")
        for key in ("frames", "height", "width", "steps", "refine_height", "refine_width"):
            v = getattr(self, key)
            require(v is None or v >= 1, key, f"must be >= 1, got {v}")
        require(self.refine_steps >= 1, "refine_steps", f"must be >= 1, got {self.refine_steps}")
        require(self.cp >= 1, "cp", f"must be >= 1, got {self.cp}")
        require(self.cp_mode in ("ring", "ulysses"), "cp_mode", f"must be ring or ulysses, got {self.cp_mode!r}")
        return self


def _value(raw: str, typ: Any) -> Any:
    """A command-line string as the value ``conf.parsing.from_mapping`` checks: text stays text for a string
    key (``prompt=1`` is the prompt "1"; ``null`` is None where the key allows it), anything else is read as a
    YAML scalar (``steps=8``, ``guidance=4.5``, ``long=true``), so the one parser reports a wrong type."""
    args = typing.get_args(typ)
    if typ is str or str in args:
        return None if raw.lower() in ("null", "none") and type(None) in args else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_args(argv: list[str]) -> SampleRequest:
    hints = typing.get_type_hints(SampleRequest)
    fields = [f.name for f in dataclasses.fields(SampleRequest)]
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            print("keys: " + " ".join(fields))
            sys.exit(0)
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r}: arguments are key=value (keys: {', '.join(fields)})")
        if key not in hints:
            raise ConfigError(f"{key}: unknown key; known keys: {', '.join(fields)}")
        values[key] = _value(raw, hints[key])
    return from_mapping(SampleRequest, values).validate()


def read_prompts(req: SampleRequest) -> list[str]:
    if req.prompt is not None:
        return [req.prompt]
    p = Path(req.prompts).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompts={req.prompts}: no such file (one prompt per line)")
    lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompts={req.prompts}: the file has no prompt")
    return lines


def _encoder_override(value: str | None, stand_in: str, real: str) -> dict | None:
    if value is None:
        return None
    return {"kind": stand_in} if value == stand_in else {"kind": real, "path": value}


def _read_image(path: str, height: int, width: int) -> torch.Tensor:
    from data_loaders.decode import decode_image

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"image={path}: no such file")
    frames = torch.from_numpy(decode_image(p.read_bytes(), height, width))  # [1, H, W, 3]
    return frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def _read_video_tail(path: str, count: int, height: int, width: int) -> torch.Tensor:
    from data_loaders.decode import decode_video, probe_video

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"video={path}: no such file")
    data = p.read_bytes()
    info = probe_video(data)
    if info["num_frames"] < count:
        raise ConfigError(f"video={path}: has {info['num_frames']} frames, cond_frames={count} are needed")
    start = (info["num_frames"] - count) / info["fps"]
    frames = torch.from_numpy(decode_video(data, count, height, width, info["fps"], start=start))
    return frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


@dataclass
class Ranks:
    """Under torchrun: ``world = cp x groups``; consecutive ranks form a context-parallel group that makes one
    video at a time; the groups share out the prompts (data parallel)."""

    group: int = 0       # which prompt group this rank is in
    groups: int = 1
    cp_rank: int = 0
    cp_group: Any = None  # the ProcessGroup of this rank's cp group (None: cp = 1)
    device: torch.device = torch.device("cpu")


def _setup_ranks(req: SampleRequest) -> Ranks:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    require(world % req.cp == 0, "cp", f"{req.cp} does not divide the {world} ranks")
    if req.device:
        device = torch.device(req.device)
    else:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    r = Ranks(group=rank // req.cp, groups=world // req.cp, cp_rank=rank % req.cp, device=device)
    if req.cp > 1:
        for g in range(world // req.cp):  # every rank creates every group, in the same order
            pg = dist.new_group(list(range(g * req.cp, (g + 1) * req.cp)))
            if g == r.group:
                r.cp_group = pg
    return r


def run(req: SampleRequest) -> list[Path]:
    """Generate this rank's share of the prompts; returns the mp4 files it wrote."""
    from lcv_train.lora import set_lora_multiplier
    from lcv_train.sampling.load import load_sampling_model, use_lora
    from lcv_train.sampling.output import slug, write_video
    from lcv_train.sampling.pipeline import GenerationConfig, encode_prompts, generate, long_video, refine

    ranks = _setup_ranks(req)
    device = ranks.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[req.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompts = read_prompts(req)
    sm = load_sampling_model(req.ckpt, req.weights, device, dtype,
                             vae=_encoder_override(req.vae, "pixel", "wan2.1"),
                             text_encoder=_encoder_override(req.text_encoder, "tiny_umt5", "umt5_xxl"))
    if ranks.cp_group is not None:
        from parallel.context_parallel import apply_context_parallel

        apply_context_parallel(sm.model, ranks.cp_group, req.cp_mode)
    d = sm.defaults
    frames, height, width = req.frames or d.get("frames", 93), req.height or d.get("height", 480), \
        req.width or d.get("width", 832)
    fps = req.fps or d.get("fps", 15.0)

    def base_pass_lora():
        if req.lora is not None:
            use_lora(sm.model, req.lora, req.lora_multiplier)
        elif req.refine_lora is not None:
            set_lora_multiplier(sm.model, 0.0)  # the refinement LoRA of the previous prompt, off

    cfg = GenerationConfig(frames=frames, height=height, width=width,
                           steps=req.steps or (16 if req.distill else 50),
                           guidance=req.guidance if req.guidance is not None else (1.0 if req.distill else 4.0),
                           cfg_zero_star=req.cfg_zero_star, shift=req.shift or sm.shift,
                           schedule="distill" if req.distill else "base", use_cache=req.cache)
    continuation = dataclasses.replace(cfg, schedule="enhance_hf") if req.enhance_hf and not req.distill else cfg
    first = continuation if req.task == "vc" else cfg
    out_dir = Path(req.out).expanduser() if req.out else (sm.run_dir / "samples" if sm.run_dir else Path("samples"))
    written = []
    for i in range(ranks.group, len(prompts), ranks.groups):
        t0 = time.perf_counter()
        base_pass_lora()
        gen = torch.Generator(device).manual_seed(req.seed + i)
        p = encode_prompts(sm, [prompts[i]], cfg.guidance, req.negative_prompt)
        cond = None
        if req.task == "i2v":
            cond = _read_image(req.image, height, width)
        elif req.task == "vc":
            cond = _read_video_tail(req.video, req.cond_frames, height, width)
        if req.long:
            video, _ = long_video(sm, p, first, req.segments, req.cond_frames, cond, gen, segment_cfg=continuation)
        else:
            video = generate(sm, p, first, cond, gen)
        name = f"{i:04d}-{slug(prompts[i])}"
        out_fps = fps
        if req.refine:
            if ranks.cp_rank == 0:
                write_video(video[0], out_dir, name + "-coarse", fps, prompts[i])
            if req.refine_lora is not None:
                use_lora(sm.model, req.refine_lora)
            elif req.lora is not None:
                set_lora_multiplier(sm.model, 0.0)  # the refiner runs on the base (+ refinement LoRA) only
            stride = sm.codec.spatial_stride * sm.model.config.patch_size[1]
            rh = req.refine_height or int(round(height * 1.5 / stride)) * stride
            rw = req.refine_width or int(round(width * 1.5 / stride)) * stride
            cond_hr = _read_image(req.image, rh, rw) if req.task == "i2v" else None  # the image, kept exactly
            video = refine(sm, encode_prompts(sm, [prompts[i]], 1.0), video, rh, rw, steps=req.refine_steps,
                           cond_video=cond_hr, generator=gen)
            out_fps = fps * 2
        if ranks.cp_rank != 0:
            continue  # the cp group's ranks hold the same video; its first rank writes it
        path = write_video(video[0], out_dir, name, out_fps, prompts[i])
        written.append(path)
        print(f"lcv-sample: {path} ({video.shape[2]} frames {video.shape[3]}x{video.shape[4]}, "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    argv = sys.argv[1:] if argv is None else argv
    try:
        run(parse_args(argv))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"lcv-sample: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
