"""Protocol presets and the keep-ratio resize: defaults layered under explicit settings, sizes as MMSegmentation
computes them."""

import argparse

import numpy as np
import pytest
import torch

from denseclip.config import ConfigError, LabelerConfig, add_labeler_arguments, labeler_config_from_args
from denseclip.models import load_clip
from denseclip.predictor import DenseCLIP
from denseclip.protocols import protocol_defaults, protocol_names


def test_paper_protocol_is_registered_with_per_dataset_overrides():
    assert "paper" in protocol_names()
    voc, context = protocol_defaults("paper", "voc"), protocol_defaults("paper", "context")
    assert voc["resize_to"] == [2048, 512] and context["resize_to"] == [520, 520]
    assert voc["protocol"] == "paper" and voc["mode"] == "whole"


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
    assert LabelerConfig().effective_resize_to is None
    assert LabelerConfig(model="RN50").effective_resize_to == (2048, 512)
    assert LabelerConfig(model="RN50", resize_to="native").effective_resize_to is None
    assert LabelerConfig(model="RN50").resolved().resize_to == [2048, 512]


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
    clip = load_clip()
    predictor = DenseCLIP(clip, [["red circle"], ["blue square"]], templates=["a {}."], resize_to=fit)
    assert predictor.inference_size(*size) == expected


def test_labels_come_back_at_the_input_size_after_a_resize(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path))
    clip = load_clip()
    seen = []
    handle = clip.model.visual.conv1.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
    predictor = DenseCLIP(clip, [["red circle"], ["blue square"]], templates=["a {}."], resize_to=(256, 64))
    image = np.random.default_rng(0).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    with torch.no_grad():
        labels, confidence = predictor.label_images([image])[0]
    handle.remove()
    # 75x100 fits (256, 64) at 64x85, padded to the tower's stride of 32.
    assert predictor.inference_size(75, 100) == (64, 85) and tuple(seen[0]) == (64, 96)
    assert labels.shape == confidence.shape == (75, 100)
