"""Packed token embeddings (the shipped tiny CLIPs' checkpoints): a packed checkpoint loads as the exact model it
was packed from, and a model that cannot be rebuilt from the seed is refused, never loaded as another model."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from denseclip.models import ModelLoadError, _register_tiny, load_clip
from denseclip.packed_weights import (
    DIGEST,
    ROWS,
    PackedWeightsError,
    initialised_under,
    pack_token_embedding,
    packed_seed,
    unpack_token_embedding,
)

MODEL = "denseclip-tiny-shapes-vit"


def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    """An fp16 state dict of the model built under ``seed``, with three token rows and every other tensor moved
    as training would move them."""
    _register_tiny()
    with initialised_under(seed):
        model = open_clip.create_model(MODEL)
    state = {k: v.detach().clone().half() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if value.is_floating_point() and key != "token_embedding.weight":
            value += (0.01 * torch.randn(value.shape, generator=generator)).half()
    state["token_embedding.weight"][[5, 320, 49000]] += 0.5
    return state


def test_a_packed_checkpoint_loads_as_the_model_it_was_packed_from(tmp_path):
    state = _trained_state(seed=3)
    with initialised_under(3):
        initial = open_clip.create_model(MODEL).token_embedding.weight
    packed = pack_token_embedding(state, initial, seed=3)
    assert packed[ROWS].tolist() == [5, 320, 49000] and "token_embedding.weight" not in packed
    assert packed_seed(packed) == 3 and packed_seed(state) is None
    save_file(packed, str(tmp_path / "model.safetensors"))
    full = (tmp_path / "full.safetensors")
    save_file(state, str(full))
    assert (tmp_path / "model.safetensors").stat().st_size < full.stat().st_size / 2

    before = torch.get_rng_state()
    loaded = load_clip(MODEL, str(tmp_path / "model.safetensors")).model.state_dict()
    assert torch.equal(torch.get_rng_state(), before), "loading must not reseed the caller's RNG"
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k].half(), state[k]) for k in state)


def test_a_packed_embedding_that_does_not_rebuild_is_refused(tmp_path):
    state = _trained_state(seed=3)
    with initialised_under(3):
        initial = open_clip.create_model(MODEL).token_embedding.weight
    packed = pack_token_embedding(state, initial, seed=3)
    # Other initial values (another torch or open_clip would draw them) do not give the packed matrix.
    with initialised_under(4):
        other = open_clip.create_model(MODEL).token_embedding.weight
    with pytest.raises(PackedWeightsError, match="does not rebuild from seed 3"):
        unpack_token_embedding(packed, other, source="ckpt.safetensors")
    # A checkpoint whose digest was altered is refused by load_clip with the checkpoint named.
    packed[DIGEST] = packed[DIGEST].flip(0).contiguous()
    path = tmp_path / "model.safetensors"
    save_file(packed, str(path))
    with pytest.raises(ModelLoadError, match=f"{path}.*does not rebuild"):
        load_clip(MODEL, str(path))
    del packed[DIGEST]
    with pytest.raises(PackedWeightsError, match="lacks token_embedding.sha256"):
        unpack_token_embedding(packed, initial)
