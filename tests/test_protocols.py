"""Protocol presets and the keep-ratio resize: defaults layered under explicit settings, sizes as MMSegmentation
computes them."""

import argparse

import numpy as np
import pytest
import torch

from denseclip.config import ConfigError, LabelerConfig, add_labeler_arguments, labeler_config_from_args
from denseclip.models import load_clip
from denseclip.names import IMAGENET_MEAN, IMAGENET_STD
from denseclip.predictor import DenseCLIP
from denseclip.protocols import protocol_defaults, protocol_names


def test_paper_protocol_is_registered_with_per_dataset_overrides():
    assert "paper" in protocol_names()
    voc, context = protocol_defaults("paper", "voc"), protocol_defaults("paper", "context")
    assert voc["resize_to"] == [2048, 512] and context["resize_to"] == [520, 520]
    assert voc["protocol"] == "paper" and voc["mode"] == "whole"


@pytest.mark.parametrize("dataset", ["voc", "voc20", "coco_stuff", "context", "context59"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_paper_preset_is_the_official_code_in_normalisation_padding_and_precision(dataset, device):
    """configs/_base_/datasets/*: Normalize with ImageNet's mean/std; whole-image test, the image padded to the
    tower's stride only (no 128-pixel buckets on a GPU, where a ViT's padding tokens would join attention); fp32."""
    config = LabelerConfig.from_dict({"model": "RN50", "protocol": "paper", "device": device}, dataset=dataset)
    official = ("imagenet", "fp32", None)
    assert (config.normalisation, config.effective_precision, config.effective_size_bucket) == official
    assert (config.mode, config.upsample_topk) == ("whole", None)
    assert LabelerConfig.from_dict({"protocol": "paper"}, dataset="synthetic").normalisation == "clip"  # ours
    assert LabelerConfig.from_dict({"model": "RN50", "protocol": "successors"}, dataset=dataset).normalisation == "clip"
    kept = LabelerConfig.from_dict({"model": "RN50", "protocol": "paper", "precision": "fp16", "device": device},
                                   dataset=dataset)
    assert kept.effective_precision == "fp16"  # a spec that chooses otherwise says so


def test_normalisation_feeds_the_tower_clip_or_imagenet_statistics():
    clip = load_clip("denseclip-tiny-shapes")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    for normalisation, (mean, std) in (("clip", (clip.mean, clip.std)), ("imagenet", (IMAGENET_MEAN, IMAGENET_STD))):
        predictor = DenseCLIP(clip, [["red circle"]], templates=["a {}."], normalisation=normalisation)
        expected = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(predictor.preprocess(image), expected)
    with pytest.raises(ConfigError, match="labeler.normalisation"):
        LabelerConfig.from_dict({"normalisation": "caffe"})


def test_preset_supplies_defaults_and_explicit_fields_win():
    config = LabelerConfig.from_dict({"model": "RN50", "protocol": "paper", "mode": "slide"}, dataset="context")
    assert (config.protocol, config.mode, config.effective_resize_to) == ("paper", "slide", (520, 520))
    assert config.upsample_topk is None  # the preset's exact upsampling
    own_resize = LabelerConfig.from_dict({"model": "RN50", "protocol": "paper", "short_side": 600}, dataset="voc")
    assert (own_resize.short_side, own_resize.effective_resize_to) == (600, None)


def test_bad_resize_and_protocol_values_name_the_field():
    with pytest.raises(ConfigError, match=r"labeler\.protocol"):
        LabelerConfig.from_dict({"protocol": "nope"})
    with pytest.raises(ConfigError, match=r"labeler\.resize_to: must be"):
        LabelerConfig.from_dict({"resize_to": [512]})
    with pytest.raises(ConfigError, match="not both"):
        LabelerConfig.from_dict({"resize_to": [2048, 512], "short_side": 512})


def test_auto_resize_keeps_tiny_models_native_and_fits_real_ones():
    assert LabelerConfig(model="denseclip-tiny-shapes").effective_resize_to is None
    assert LabelerConfig().effective_resize_to == (2048, 512)  # the default model is RN50, the paper's
    assert LabelerConfig(model="RN50").effective_resize_to == (2048, 512)
    assert LabelerConfig(model="RN50", resize_to="native").effective_resize_to is None
    assert LabelerConfig(model="RN50", device="cpu").resolved().resize_to == [2048, 512]


def test_cli_flags_left_at_default_give_way_to_the_protocol():
    parser = argparse.ArgumentParser()
    add_labeler_arguments(parser)
    config = labeler_config_from_args(parser.parse_args(["--model", "RN50", "--protocol", "paper",
                                                         "--batch-size", "2"]), dataset="coco_stuff")
    assert (config.batch_size, config.upsample_topk, config.effective_resize_to) == (2, None, (2048, 512))
    native = labeler_config_from_args(parser.parse_args(["--model", "RN50", "--resize-to", "none"]))
    assert native.effective_resize_to is None
    assert labeler_config_from_args(parser.parse_args(["--resize-to", "1024x256"])).effective_resize_to == (1024, 256)


@pytest.mark.parametrize("size, fit, expected", [
    ((375, 500), (2048, 512), (512, 683)),     # a VOC image under the paper's protocol
    ((4000, 6000), (2048, 512), (512, 768)),   # a 24-megapixel photo: short side 512
    ((100, 3000), (2048, 512), (68, 2048)),    # a panorama is bounded by the long side
    ((333, 500), (520, 520), (346, 520)),      # PASCAL Context
])
def test_keep_ratio_resize_sizes(size, fit, expected):
    clip = load_clip("denseclip-tiny-shapes")
    predictor = DenseCLIP(clip, [["red circle"], ["blue square"]], templates=["a {}."], resize_to=fit)
    assert predictor.inference_size(*size) == expected


def test_labels_come_back_at_the_input_size_after_a_resize(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path))
    clip = load_clip("denseclip-tiny-shapes")
    seen = []
    predictor = DenseCLIP(clip, [["red circle"], ["blue square"]], templates=["a {}."], resize_to=(256, 64))
    handle = predictor.tower.conv1.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
    image = np.random.default_rng(0).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    with torch.no_grad():
        labels, confidence = predictor.label_images([image])[0]
    handle.remove()
    # 75x100 fits (256, 64) at 64x85, padded to the tower's stride of 32.
    assert predictor.inference_size(75, 100) == (64, 85) and tuple(seen[0]) == (64, 96)
    assert labels.shape == confidence.shape == (75, 100)


def test_successors_protocol_as_their_configs_set_it():
    assert "successors" in protocol_names()
    voc = LabelerConfig.from_dict({"model": "ViT-B-16", "protocol": "successors"}, dataset="voc")
    assert (voc.mode, voc.crop_size, voc.crop_stride, voc.effective_resize_to) == ("slide", 224, 112, (2048, 336))
    assert (voc.templates, voc.synonyms, voc.temperature, voc.background_threshold) == ("imagenet80", True, 65, 0.1)
    assert voc.name_softmax and not LabelerConfig().name_softmax
    coco = LabelerConfig.from_dict({"model": "ViT-B-16", "protocol": "successors"}, dataset="coco_stuff")
    assert (coco.effective_resize_to, coco.temperature, coco.background_threshold) == ((2048, 448), 40, None)
    free = LabelerConfig.from_dict({"model": "ViT-B-16", "protocol": "successors", "head": "naclip"})
    assert (free.head, free.temperature, free.background_threshold, free.upsample_topk) == ("naclip", 40, None, None)


def test_head_and_synonyms_are_validated_fields():
    assert LabelerConfig().head == "maskclip" and LabelerConfig().synonyms is False
    with pytest.raises(ConfigError, match=r"labeler\.head: must be one of maskclip, sclip, clearclip, naclip"):
        LabelerConfig.from_dict({"model": "ViT-B-16", "head": "segclip"})
    with pytest.raises(ConfigError, match=r"labeler\.head: needs a ViT model; RN50 is a ResNet"):
        LabelerConfig.from_dict({"model": "RN50", "head": "sclip"})
    with pytest.raises(ConfigError, match=r"labeler\.synonyms: must be true or false"):
        LabelerConfig.from_dict({"synonyms": "yes"})
    parser = argparse.ArgumentParser()
    add_labeler_arguments(parser)
    config = labeler_config_from_args(parser.parse_args(["--model", "ViT-B-16", "--head", "clearclip",
                                                         "--protocol", "successors"]), dataset="context")
    assert (config.head, config.synonyms, config.temperature, config.background_threshold) == (
        "clearclip", True, 50, 0.1)


def test_every_paper_dataset_has_its_preset_and_tiny_models_keep_their_resolution():
    fits = {d: protocol_defaults("paper", d)["resize_to"] for d in ("voc", "voc20", "coco_stuff", "context",
                                                                    "context59", "synthetic")}
    assert fits == {"voc": [2048, 512], "voc20": [2048, 512], "coco_stuff": [2048, 512], "context": [520, 520],
                    "context59": [520, 520], "synthetic": None}
    assert all(protocol_defaults("paper", d)["upsample_topk"] is None for d in fits)
    tiny = LabelerConfig.from_dict({"model": "denseclip-tiny-shapes", "protocol": "paper"}, dataset="voc")
    assert (tiny.protocol, tiny.effective_resize_to, tiny.upsample_topk) == ("paper", None, None)


def test_voc_preset_feeds_a_500x375_image_to_the_network_at_683x512(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path))
    templates = tmp_path / "one.txt"
    templates.write_text("a photo of a {}.\n")
    config = LabelerConfig.from_dict({"model": "RN50", "pretrained": "random", "protocol": "paper",
                                      "templates": str(templates)}, dataset="voc")
    predictor = DenseCLIP.from_config(config, [["cat"], ["dog"]])
    seen = []
    hook = predictor.tower.conv1.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    image = np.random.default_rng(0).integers(1, 255, (375, 500, 3), dtype=np.uint8)
    labels, _ = predictor.label_images([image])[0]
    hook.remove()
    network_input = seen[0][0]
    # 683x512, then padded with zeros (the mean colour) to 704 columns, the tower's stride of 32.
    assert network_input.shape == (3, 512, 704)
    assert network_input[:, :, 683:].abs().max() == 0 and network_input[:, :, 682].abs().max() > 0
    assert labels.shape == (375, 500)
