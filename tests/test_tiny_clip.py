"""The shipped tiny CLIP: small, loads strictly into open_clip, and has learned the synthetic world's captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pipeline_scripts import load_pipeline
from safetensors.torch import load_file

from denseclip.synthetic import CLASS_NAMES, render_scene

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "denseclip" / "assets" / "tiny_clip"
MODEL_NAME = "denseclip-tiny-shapes"
HELD_OUT_SEED = 424242  # never used for training (training.json records the training world seed)


def _tiny_clip() -> torch.nn.Module:
    open_clip.add_model_config(ASSETS / f"{MODEL_NAME}.json")
    model = open_clip.create_model(MODEL_NAME)
    state = {k: v.float() for k, v in load_file(ASSETS / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _images(scenes) -> torch.Tensor:
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def test_checkpoint_is_small_and_documented():
    assert (ASSETS / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    record = json.loads((ASSETS / "training.json").read_text())
    assert record["model"] == MODEL_NAME and record["world_seed"] != HELD_OUT_SEED
    assert record["command"].startswith("python pipelines/train_tiny_clip.py")


def test_checkpoint_loads_strictly_and_retrieves_single_object_captions():
    torch.set_num_threads(1)
    model = _tiny_clip()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    scenes = [s for s in (render_scene(HELD_OUT_SEED, i) for i in range(160)) if len(s.objects) == 1][:40]
    truth = torch.tensor([s.objects[0]["label"] for s in scenes])
    prompts = [f"there is a {name}." for name in CLASS_NAMES]
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(_images(scenes)), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    accuracy = ((image_features @ text_features.T).argmax(dim=1) == truth).float().mean().item()
    assert len(scenes) >= 30
    assert accuracy >= 0.6, f"single-object retrieval accuracy {accuracy:.2f} (chance {1 / len(CLASS_NAMES):.2f})"


def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    train = load_pipeline("train_tiny_clip")
    torch.set_num_threads(1)
    train.main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--log-every", "1"])
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["steps"] == 2 and np.isfinite(record["final_loss"])
    open_clip.add_model_config(tmp_path / f"{MODEL_NAME}.json")
    model = open_clip.create_model(MODEL_NAME)
    model.load_state_dict({k: v.float() for k, v in load_file(tmp_path / "model.safetensors").items()}, strict=True)


def test_soft_targets_treat_repeated_captions_as_positives():
    train = load_pipeline("train_tiny_clip")
    def duplicate_similarity_after_step(set_ids: list[int]) -> float:
        # Scenes 0 and 1 show the same objects with nearly equal embeddings; scene 2 is different.
        features = torch.tensor([[1.0, 0.0], [0.95, 0.3], [0.0, 1.0]], requires_grad=True)
        normed = F.normalize(features, dim=-1)
        train.contrastive_loss(normed, normed, torch.tensor(10.0), torch.tensor(set_ids)).backward()
        moved = F.normalize(features.detach() - 0.1 * features.grad, dim=-1)
        return (moved[0] @ moved[1]).item()

    before = F.cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.95, 0.3]), dim=0).item()
    assert duplicate_similarity_after_step([0, 0, 1]) > before, "equal captions should be pulled together"
    assert duplicate_similarity_after_step([0, 1, 2]) < before, "one-hot targets would push them apart"
