"""The shipped tiny CLIPs (ResNet and ViT): small enough for git (each checkpoint under 8 MiB, its token embedding
packed), load strictly into open_clip, and have learned the synthetic world's captions; retraining them writes
elsewhere unless told to replace them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from pipeline_scripts import load_pipeline
from safetensors.torch import load_file

from denseclip.models import load_clip
from denseclip.packed_weights import ROWS
from denseclip.synthetic import CLASS_NAMES, render_scene

ROOT = Path(__file__).resolve().parents[1]
ASSETS = {"denseclip-tiny-shapes": ROOT / "denseclip" / "assets" / "tiny_clip",
          "denseclip-tiny-shapes-vit": ROOT / "denseclip" / "assets" / "tiny_clip_vit"}
MODEL_NAME = "denseclip-tiny-shapes"
HELD_OUT_SEED = 424242  # never used for training (training.json records the training world seed)


def _tiny_clip(name: str) -> torch.nn.Module:
    return load_clip(name).model  # the shipped weights, unpacked and loaded strictly


def _images(scenes) -> torch.Tensor:
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.mark.parametrize("name", ASSETS)
def test_checkpoint_is_small_and_documented(name):
    assert (ASSETS[name] / "model.safetensors").stat().st_size <= 8 * 1024 * 1024
    # Only the rows of the token embedding that the world's captions use were trained and are stored.
    rows = load_file(ASSETS[name] / "model.safetensors")[ROWS]
    vocabulary = {t for caption in ("there is a red circle.", *CLASS_NAMES) for t in
                  open_clip.get_tokenizer(name)([caption])[0].tolist() if t}
    assert vocabulary <= set(rows.tolist()) and len(rows) < 100
    record = json.loads((ASSETS[name] / "training.json").read_text())
    assert record["model"] == name and record["world_seed"] != HELD_OUT_SEED
    assert record["command"].startswith("python pipelines/train_tiny_clip.py")


@pytest.mark.parametrize("name", ASSETS)
def test_checkpoint_loads_strictly_and_retrieves_single_object_captions(name):
    torch.set_num_threads(1)
    model = _tiny_clip(name)
    tokenizer = open_clip.get_tokenizer(name)
    scenes = [s for s in (render_scene(HELD_OUT_SEED, i) for i in range(160)) if len(s.objects) == 1][:40]
    truth = torch.tensor([s.objects[0]["label"] for s in scenes])
    prompts = [f"there is a {cls}." for cls in CLASS_NAMES]
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(_images(scenes)), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    accuracy = ((image_features @ text_features.T).argmax(dim=1) == truth).float().mean().item()
    assert len(scenes) >= 30
    # The ResNet retrieves most single objects; the ViT (600 steps of batch 64, README "Four heads on a tiny ViT
    # CLIP of our own") is the weaker model: it must still be several times better than chance (1/16).
    bar = {"denseclip-tiny-shapes": 0.6, "denseclip-tiny-shapes-vit": 0.2}[name]
    assert accuracy >= bar, f"single-object retrieval accuracy {accuracy:.2f} (chance {1 / len(CLASS_NAMES):.2f})"


def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    train = load_pipeline("train_tiny_clip")
    torch.set_num_threads(1)
    name = "denseclip-tiny-shapes-vit"
    train.main(["--model", name, "--output", str(tmp_path), "--steps", "2", "--batch-size", "8", "--log-every", "1"])
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["steps"] == 2 and np.isfinite(record["final_loss"]) and record["model"] == name
    trained = load_clip(name, str(tmp_path / "model.safetensors")).model
    # Packed: the untrained rows are the initial ones of the seed, rebuilt on loading.
    assert 0 < len(load_file(tmp_path / "model.safetensors")[ROWS]) < 100
    assert not torch.equal(trained.token_embedding.weight, _tiny_clip(name).token_embedding.weight)


def test_retraining_writes_elsewhere_unless_told_to_replace_the_shipped_weights(capsys):
    train = load_pipeline("train_tiny_clip")
    assert train.parse_args([]).output == Path("runs/tiny_clip/denseclip-tiny-shapes")
    assert train.parse_args(["--model", "denseclip-tiny-shapes-vit"]).output == Path(
        "runs/tiny_clip/denseclip-tiny-shapes-vit")
    shipped = str(ASSETS["denseclip-tiny-shapes"])
    with pytest.raises(SystemExit):
        train.parse_args(["--output", shipped])
    assert "would replace the shipped weights" in capsys.readouterr().err
    assert train.parse_args(["--output", shipped, "--overwrite-shipped"]).output == Path(shipped)


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
