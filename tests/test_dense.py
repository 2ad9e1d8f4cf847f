"""Dense heads checked against separate implementations of their formulas on random open_clip towers."""

import itertools

import open_clip
import pytest
import torch
import torch.nn.functional as F

from denseclip.dense import dense_features, dense_features_and_keys, neighbourhood_bias, output_stride
from denseclip.models import TINY_VIT_MODEL, load_clip
from denseclip.names import HEADS

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


def tokens_entering_last_block(visual, images):
    """``(B, 1 + gh*gw, C)``: the ViT's tokens before its last block, the positional embedding resized to the
    input grid by size."""
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
    for blk in list(visual.transformer.resblocks)[:-1]:
        x = blk(x)
    return x


def reference_vit_head(model, images):
    """The value path written independently: the last block's own MultiheadAttention with a mask that lets each
    token attend only to itself, on a tower whose positional embedding is resized to the input grid."""
    visual = model.visual
    p = visual.patch_size[0]
    gh, gw = images.shape[2] // p, images.shape[3] // p
    x = tokens_entering_last_block(visual, images)
    last = visual.transformer.resblocks[-1]
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


# ---------------------------------------------------------------------------------------------- ViT heads
def reference_heads(model, images):
    """Every ViT head written from its equations (issue 15), per attention head with explicit einsums over the
    q, k, v of the last block's in_proj: ``{head: (B, D, gh, gw)}``.

    x: tokens entering the last block (class token first), h = ln_1(x), s = head_dim ** -0.5,
    o(A) = out_proj(A @ v); maskclip: x + out_proj(v), then + mlp(ln_2(.)); sclip: x + o(softmax(s q q^T) +
    softmax(s k k^T)), then the MLP; clearclip: o(softmax(s q q^T)); naclip: o(softmax(s k k^T + G)),
    G_ij = exp(-|p_i - p_j|^2 / (2 * 5^2)) over patch positions, 0 in the class token's row and column.
    Every head ends with ln_post(.)[:, 1:] @ proj.
    """
    visual = model.visual
    p = visual.patch_size[0]
    gh, gw = images.shape[2] // p, images.shape[3] // p
    x = tokens_entering_last_block(visual, images)
    last = visual.transformer.resblocks[-1]
    b, t, c = x.shape
    heads = last.attn.num_heads
    d = c // heads
    s = d ** -0.5
    w, bias = last.attn.in_proj_weight, last.attn.in_proj_bias
    h = last.ln_1(x)
    q, k, v = ((h @ w[i * c:(i + 1) * c].T + bias[i * c:(i + 1) * c]).reshape(b, t, heads, d) for i in range(3))

    def softmax_logits(a, key, extra=0.0):
        return (s * torch.einsum("bihd,bjhd->bhij", a, key) + extra).softmax(dim=-1)

    def o(attention):  # (B, heads, T, T) -> out_proj(A @ v), (B, T, C)
        return last.attn.out_proj(torch.einsum("bhij,bjhd->bihd", attention, v).reshape(b, t, c))

    def with_mlp(y):
        return y + last.mlp(last.ln_2(y))

    gauss = torch.zeros(t, t)
    cells = list(itertools.product(range(gh), range(gw)))
    for (i, (yi, xi)), (j, (yj, xj)) in itertools.product(enumerate(cells), repeat=2):
        gauss[1 + i, 1 + j] = torch.exp(torch.tensor(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * 5.0**2)))
    tokens = {
        "maskclip": with_mlp(x + last.attn.out_proj(v.reshape(b, t, c))),
        "sclip": with_mlp(x + o(softmax_logits(q, q) + softmax_logits(k, k))),
        "clearclip": o(softmax_logits(q, q)),
        "naclip": o(softmax_logits(k, k, gauss)),
    }
    return {name: (visual.ln_post(y)[:, 1:] @ visual.proj).transpose(1, 2).reshape(b, -1, gh, gw)
            for name, y in tokens.items()}


def _agreement(ours, ref):
    """(min per-location cosine, relative error ||ours - ref|| / ||ref||)."""
    return F.cosine_similarity(ours, ref, dim=1).min().item(), ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("size", [(224, 224), (224, 320)])
def test_every_vit_head_matches_its_formula(vit_b16, size):
    torch.manual_seed(3)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        refs = reference_heads(vit_b16, images)
        ours = {head: dense_features(vit_b16, images, head=head) for head in HEADS}
        default = dense_features(vit_b16, images)
    assert torch.equal(default, ours["maskclip"]), "without head, dense_features is maskclip"
    for head in HEADS:
        cosine, rel = _agreement(ours[head], refs[head])
        assert cosine >= 0.9999 and rel <= 1e-4, f"{head} at {size}: cosine {cosine:.6f}, relative error {rel:.2e}"
    # The bar tells the heads apart: each head misses every other head's reference.
    for head, other in itertools.permutations(HEADS, 2):
        cosine, rel = _agreement(ours[head], refs[other])
        assert cosine < 0.9999 or rel > 1e-4, f"{head} is indistinguishable from {other}'s reference"


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return load_clip(TINY_VIT_MODEL, "random").model


@pytest.mark.parametrize("head", HEADS)
def test_batched_equals_one_image_at_a_time(tiny_vit, head):
    torch.manual_seed(4)
    images = torch.randn(3, 3, 96, 160)
    with torch.no_grad():
        features, keys = dense_features_and_keys(tiny_vit, images, head=head)
        singles = [dense_features_and_keys(tiny_vit, image[None], head=head) for image in images]
    width = tiny_vit.visual.transformer.width
    assert features.shape == (3, 128, 12, 20) and keys.shape == (3, width, 12, 20)
    torch.testing.assert_close(features, torch.cat([f for f, _ in singles]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, torch.cat([k for _, k in singles]), rtol=1e-5, atol=1e-5)


def test_vit_keys_pass_through_out_proj_as_the_official_code_takes_them(tiny_vit):
    """The official ViT backbone (mmseg/models/backbones/vit.py, ``return_qkv``) splits the last block's in_proj
    output into q, k and v and passes each through the attention's out_proj; its key smoothing compares those k."""
    torch.manual_seed(5)
    images = torch.randn(2, 3, 64, 96)
    visual = tiny_vit.visual
    attn = visual.transformer.resblocks[-1].attn
    with torch.no_grad():
        _, keys = dense_features_and_keys(tiny_vit, images)
        x = tokens_entering_last_block(visual, images)
        y = F.linear(visual.transformer.resblocks[-1].ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        n, length, c = y.shape
        y = y.view(n, length, 3, c // 3).permute(2, 0, 1, 3).reshape(3 * n, length, c // 3)
        _, k, _ = F.linear(y, attn.out_proj.weight, attn.out_proj.bias).tensor_split(3, dim=0)
    grid = (64 // visual.patch_size[0], 96 // visual.patch_size[1])
    official = k[:, 1:].transpose(1, 2).reshape(2, -1, *grid)
    torch.testing.assert_close(keys, official, rtol=1e-5, atol=1e-5)
    raw = y[n:2 * n, 1:].transpose(1, 2).reshape(2, -1, *grid)  # the keys before out_proj differ
    assert not torch.allclose(keys, raw, atol=1e-3)


def test_neighbourhood_bias_is_cached_per_grid_and_skips_the_class_token():
    first = neighbourhood_bias((3, 4))
    assert neighbourhood_bias((3, 4)) is first and neighbourhood_bias((4, 3)) is not first
    assert first.shape == (13, 13)
    assert torch.all(first[0] == 0) and torch.all(first[:, 0] == 0)
    assert torch.allclose(first[1:, 1:].diagonal(), torch.ones(12))


def test_resnet_towers_refuse_vit_heads(rn50):
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="'naclip' needs a ViT tower"):
        dense_features(rn50, images, head="naclip")
    with pytest.raises(ValueError, match="unknown dense head 'segclip'"):
        dense_features(rn50, images, head="segclip")
