"""The inference tower: BatchNorm folded, ReLUs and residual sums fused, channels_last, the loaded model untouched."""

import open_clip
import pytest
import torch
from torch import nn

from denseclip.dense import dense_features, dense_features_and_keys
from denseclip.engine import inference_tower, input_memory_format

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    model = open_clip.create_model("RN50").eval()
    # Fresh BatchNorms are identities; give them statistics and affine terms so that folding has work to do.
    for module in model.visual.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def test_folded_tower_computes_the_same_features(rn50):
    tower = inference_tower(rn50)
    images = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        expected, expected_keys = dense_features_and_keys(rn50, images)
        ours, keys = dense_features_and_keys(tower, images.contiguous(memory_format=input_memory_format(tower)))
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.allclose(keys, expected_keys, rtol=1e-4, atol=1e-4 * float(expected_keys.abs().max()))


def conv_weights(tower: nn.Module) -> list[torch.Tensor]:
    return [p for p in tower.parameters() if p.dim() == 4]


def test_folding_leaves_no_norm_or_relu_and_the_model_untouched(rn50):
    before = {name: (p.data_ptr(), p.clone()) for name, p in rn50.visual.state_dict().items()}
    tower = inference_tower(rn50)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in tower.modules())  # folded, fused
    weights = conv_weights(tower)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in rn50.visual.modules()) == len(weights)
    for name, value in rn50.visual.state_dict().items():
        assert value.data_ptr() == before[name][0] and torch.equal(value, before[name][1]), name
    # What folding does not change is shared, not copied: the attention pool's projections.
    assert tower.attnpool.v_proj.weight is rn50.visual.attnpool.v_proj.weight


def test_low_precision_tower_folds_in_its_dtype(rn50):
    import copy

    half = copy.deepcopy(rn50)
    open_clip.model.convert_weights_to_lp(half, torch.bfloat16)
    tower = inference_tower(half)
    assert {w.dtype for w in conv_weights(tower)} == {torch.bfloat16}
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ours = dense_features(tower, images)
        reference = dense_features(rn50, images)
    assert ours.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(ours.float(), reference, dim=1).min() > 0.99


def test_vit_towers_are_used_as_they_are():
    model = open_clip.create_model("ViT-B-32").eval()
    assert inference_tower(model) is model.visual
    assert input_memory_format(model.visual) == torch.contiguous_format
