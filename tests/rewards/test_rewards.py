"""Reward scorers: motion (closed form), CLIP / HPSv3 / VideoAlign on tiny random configs of the real model
classes, written here in the published layouts and loaded through the scorers' own loading code."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcv_train.errors import CheckpointError
from lcv_train.rewards import build_scorer
from tests.rewards.tiny_qwen2vl import char_tokenizer, old_layout, write_base


def test_motion_is_mean_frame_difference():
    still = torch.zeros(1, 3, 5, 8, 8)
    moving = torch.zeros(1, 3, 3, 8, 8)
    moving[:, :, 1] = 1.0                                  # frame 0: -0 -> 1 -> 0: |diff| = 0.5 each pair
    videos = torch.cat([still[:, :, :3], moving])
    scores = build_scorer("motion")(videos, ["a", "b"], 8.0)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.5]))


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    tok = char_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64,
                                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    return model, tok


def test_clip_is_mean_frame_cosine(tmp_path):
    from lcv_train.rewards._loading import embedding_of

    model, tok = _tiny_clip(tmp_path / "clip")
    scorer = build_scorer("clip", path=str(tmp_path / "clip"), device="cpu", max_frames=3)
    torch.manual_seed(1)
    videos = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "a blue square moves"]
    got = scorer(videos, prompts, 8.0)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = []
        for b in range(2):
            px = ((videos[b].transpose(0, 1) + 1) / 2 - mean) / std
            img = F.normalize(embedding_of(model.get_image_features(pixel_values=px)), dim=-1)
            t = tok([prompts[b]], return_tensors="pt")
            txt = F.normalize(embedding_of(model.get_text_features(**t)), dim=-1)
            ref.append((img @ txt.T).mean())
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_missing_weights_fail_with_one_line_naming_the_path(tmp_path):
    for name, kwargs, needle in [
        ("clip", {"path": str(tmp_path / "nope")}, "nope"),
        ("hpsv3", {"path": str(tmp_path / "nope.safetensors")}, "nope.safetensors"),
        ("videoalign", {"path": str(tmp_path / "vr")}, "vr"),
    ]:
        with pytest.raises(CheckpointError, match=needle) as e:
            build_scorer(name, **kwargs)
        assert "\n" not in str(e.value)
    (tmp_path / "vr").mkdir()
    (tmp_path / "vr" / "model_config.json").write_text("{}")
    (tmp_path / "vr" / "checkpoint-5").mkdir()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        build_scorer("videoalign", path=str(tmp_path / "vr"), base_path=str(tmp_path))


def test_patches_match_transformers_image_processor():
    """Our torch patchify (no torchvision) against transformers' PIL image processor on one image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lcv_train.rewards.qwen2vl import VisionSpec, to_patches

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 84, max_pixels=56 * 84)
    ref = ip(images=[img], return_tensors="pt")
    frame = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    patches, grid = to_patches(frame, VisionSpec(), 56 * 84, 56 * 84)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(patches, ref["pixel_values"].float(), rtol=1e-5, atol=1e-5)


def _reference_rewards(model, head, inputs, token_ids, pixel_key):
    """transformers' own Qwen2VLModel forward; rm_head at each reward token (found here by hand)."""
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        out = []
        for b in range(hidden.shape[0]):
            ids = inputs["input_ids"][b].tolist()
            out.append(torch.stack([head(hidden[b, ids.index(t)]) for t in token_ids]))
    return torch.stack(out)


def test_hpsv3_loads_published_layout_and_scores_per_frame(tmp_path):
    from safetensors.torch import save_file

    from lcv_train.rewards.qwen2vl import reward_model_class

    base = tmp_path / "Qwen2-VL-7B-Instruct"
    write_base(base, with_weights=False)
    tok = char_tokenizer(["<|Reward|>"])
    from transformers import AutoConfig

    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Dropout(0.05), torch.nn.Linear(16, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ref = reward_model_class()(AutoConfig.from_pretrained(base), head=head)
    ref.resize_token_embeddings(len(tok))
    ref.eval()
    save_file(old_layout(ref.state_dict()), str(tmp_path / "HPSv3.safetensors"))
    scorer = build_scorer("hpsv3", path=str(tmp_path), base_path=str(base), device="cpu", dtype="float32", max_frames=2)
    torch.manual_seed(4)
    videos = torch.rand(2, 3, 3, 40, 60) * 2 - 1
    prompts = ["a red circle", "two squares"]
    got = scorer(videos, prompts, 8.0)
    assert got.shape == (2,) and got.dtype == torch.float32
    frames = videos[:, :, [0, 2]].permute(0, 2, 1, 3, 4).reshape(4, 3, 40, 60)
    inputs = scorer.prepare(frames, [p for p in prompts for _ in range(2)])
    assert int((inputs["input_ids"] == scorer.reward_token_id).sum()) == 4
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(1).sum())
    want = _reference_rewards(ref, head, inputs, [scorer.reward_token_id], "pixel_values")[:, 0, 0]
    torch.testing.assert_close(got, want.view(2, 2).mean(1), rtol=1e-4, atol=1e-5)


def test_videoalign_merges_lora_and_reads_three_dims(tmp_path):
    from safetensors.torch import save_file

    from lcv_train.rewards.videoalign import sample_indices

    base = tmp_path / "Qwen2-VL-2B-Instruct"
    base_model = write_base(base, with_weights=True)
    tok = char_tokenizer(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"])
    # The trained reward model, built independently: base + new token rows + LoRA deltas + rm_head.
    torch.manual_seed(5)
    ref = write_base(tmp_path / "scratch", with_weights=False)
    ref.load_state_dict(base_model.state_dict())
    ref.resize_token_embeddings(len(tok))
    r, alpha = 4, 8
    lora, emb = {}, ref.model.language_model.embed_tokens.weight
    with torch.no_grad():
        emb[-3:] = torch.randn(3, 32)
        for i, layer in enumerate(ref.model.language_model.layers):
            for name, lin in [("self_attn.q_proj", layer.self_attn.q_proj), ("mlp.down_proj", layer.mlp.down_proj)]:
                A, B = torch.randn(r, lin.in_features) * 0.3, torch.randn(lin.out_features, r) * 0.3
                lin.weight += alpha / r * B @ A
                lora[f"base_model.model.model.layers.{i}.{name}.lora_A.weight"] = A
                lora[f"base_model.model.model.layers.{i}.{name}.lora_B.weight"] = B
    head = torch.nn.Linear(32, 1, bias=False)
    vr = tmp_path / "VideoReward"
    (vr / "checkpoint-7").mkdir(parents=True)
    (vr / "checkpoint-3").mkdir()                          # an older step: the latest must be taken
    save_file(lora, str(vr / "checkpoint-7" / "adapter_model.safetensors"))
    torch.save({"base_model.model.rm_head.weight": head.weight.detach().clone(),
                "base_model.model.model.embed_tokens.weight": emb.detach().clone()},
               vr / "checkpoint-7" / "non_lora_state_dict.pth")
    norm = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 0.5, "TA_mean": 0.25, "TA_std": 4.0}
    (vr / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "max_frame_pixels": 56 * 56, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special"},
        "model_config": {"output_dim": 1, "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": r, "lora_alpha": alpha}, "inference_config": norm}))
    scorer = build_scorer("videoalign", path=str(vr), base_path=str(base), device="cpu", dtype="float32",
                          min_frame_pixels=28 * 28)
    torch.manual_seed(6)
    videos = torch.rand(2, 3, 16, 56, 56) * 2 - 1          # 2 s at 8 fps -> 4 frames at 2 fps
    prompts = ["a cat jumps", "rain falls"]
    details = scorer.details(videos, prompts, 8.0)
    inputs = scorer.prepare(videos, prompts, 8.0)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    raw = _reference_rewards(ref, head, inputs, scorer.token_ids, "pixel_values_videos")[..., 0]
    for i, d in enumerate(["VQ", "MQ", "TA"]):
        want = (raw[:, i] - norm[f"{d}_mean"]) / norm[f"{d}_std"]
        torch.testing.assert_close(details[f"videoalign/{d}"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scorer(videos, prompts, 8.0), details["videoalign/MQ"] + details["videoalign/TA"])
    assert sample_indices(16, 8.0, 2.0).tolist() == [0, 5, 10, 15]
    assert len(sample_indices(49, 16.0, 2.0)) == 6 and len(sample_indices(3, 8.0, 2.0)) == 2


def test_reward_models_visit_the_device_only_while_scoring():
    """on_device moves the model to the scoring device and back to the CPU afterwards (also on errors)."""
    from lcv_train.rewards._device import on_device

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    rec = Recorder()
    with on_device(rec, torch.device("cuda:1")):
        assert rec.moves == ["cuda:1"]
    with pytest.raises(RuntimeError), on_device(rec, torch.device("cuda:1")):
        raise RuntimeError("scoring failed")
    assert rec.moves == ["cuda:1", "cpu", "cuda:1", "cpu"]
    with on_device(rec, torch.device("cuda:1"), offload=False):
        pass
    assert rec.moves[-1] == "cuda:1"
