"""Dense head checked against a separate implementation of the reference head on random open_clip towers."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from denseclip.dense import dense_features, output_stride

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return open_clip.create_model("RN50").eval()


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16").eval()


def _capture_input(module, target, call):
    """Run ``call()`` and return what ``target`` received (via a forward pre-hook) or produced."""
    seen = {}
    handle = target.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    try:
        call()
    finally:
        handle.remove()
    return seen["out"]


def reference_resnet_head(model, images):
    """MaskCLIP's ResNet head written independently: tokens through the attention pool's linear layers."""
    visual = model.visual
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    b, _, h, w = x.shape
    tokens = x.flatten(2).permute(0, 2, 1)  # (B, hw, C)
    pool = visual.attnpool
    v = tokens @ pool.v_proj.weight.T + pool.v_proj.bias
    out = v @ pool.c_proj.weight.T + pool.c_proj.bias
    return out.permute(0, 2, 1).reshape(b, -1, h, w)


def reference_vit_head(model, images):
    """The value path written independently: the last block's own MultiheadAttention with a mask that lets each
    token attend only to itself, on a tower whose positional embedding is resized to the input grid."""
    visual = model.visual
    p = visual.patch_size[0]
    gh, gw = images.shape[2] // p, images.shape[3] // p
    pos = visual.positional_embedding
    g0 = int((pos.shape[0] - 1) ** 0.5)
    grid_pos = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    new_pos = torch.cat([pos[:1], grid_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + new_pos
    x = visual.ln_pre(x)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    n = x.shape[1]
    self_only = torch.full((n, n), float("-inf"))
    self_only.fill_diagonal_(0.0)
    y = last.ln_1(x)
    attn_out = last.attn(y, y, y, need_weights=False, attn_mask=self_only)[0]
    x = x + attn_out
    x = x + last.mlp(last.ln_2(x))
    tokens = visual.ln_post(x[:, 1:]) @ visual.proj
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


@pytest.mark.parametrize("size", [(224, 224), (320, 448)])
@pytest.mark.parametrize("arch", ["rn50", "vit_b16"])
def test_matches_reference_head(arch, size, request):
    model = request.getfixturevalue(arch)
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = dense_features(model, images)
        ref = (reference_resnet_head if arch == "rn50" else reference_vit_head)(model, images)
    s = output_stride(model)
    assert ours.shape == (2, model.visual.output_dim, size[0] // s, size[1] // s)
    cosine = F.cosine_similarity(ours, ref, dim=1)
    assert cosine.min() >= 0.9999
    # Random towers give nearly constant maps; the spatial variations must agree too (a broadcast of one
    # pooled vector, or a transposed grid, would fail here).
    centred = F.cosine_similarity(ours - ours.mean((2, 3), keepdim=True), ref - ref.mean((2, 3), keepdim=True), dim=1)
    assert centred.mean() >= 0.999


def test_constant_feature_map_equals_global_embedding(rn50):
    """With a spatially constant layer-4 map and no positional embedding, attention pooling averages identical
    values, so CLIP's global embedding equals the dense embedding at every location."""
    model = rn50
    pool = model.visual.attnpool
    saved = pool.positional_embedding.data.clone()
    torch.manual_seed(2)
    constant = torch.randn(1, 2048, 1, 1).expand(2, 2048, 7, 7).contiguous()
    handle = model.visual.layer4.register_forward_hook(lambda m, a, out: constant)
    try:
        pool.positional_embedding.data.zero_()
        images = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            global_emb = model.encode_image(images)  # (B, D)
            dense = dense_features(model, images)  # (B, D, 7, 7)
    finally:
        handle.remove()
        pool.positional_embedding.data.copy_(saved)
    expected = global_emb[:, :, None, None].expand_as(dense)
    assert torch.allclose(dense, expected, atol=1e-4, rtol=1e-4)


def test_rejects_size_not_multiple_of_stride(rn50):
    with pytest.raises(ValueError, match="multiple of the tower's stride 32"):
        dense_features(rn50, torch.randn(1, 3, 100, 224))


def test_bf16_close_to_fp32(vit_b16):
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = dense_features(vit_b16, images)
        half = dense_features(vit_b16.to(torch.bfloat16), images)
    vit_b16.float()
    assert half.dtype == torch.bfloat16
    assert F.cosine_similarity(half.float(), ref, dim=1).mean() > 0.99
