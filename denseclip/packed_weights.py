"""The shipped tiny CLIPs' compact checkpoints: the token embedding without the rows training never moved.

A tiny CLIP trained on the synthetic world's captions uses a few dozen of the 49,408 tokens of CLIP's tokenizer.
Its trainer leaves embeddings out of weight decay, so AdamW never moves the other rows (their gradient is zero)
from the values open_clip drew for them when it built the model under ``torch.manual_seed(seed)``. A packed
checkpoint keeps every other tensor as it is and, in place of ``token_embedding.weight`` ``(V, D)``:

    token_embedding.rows       (K,) int64     the rows that training moved
    token_embedding.trained    (K, D)         their weights
    token_embedding.init_seed  ()   int64     the seed the model was built under
    token_embedding.sha256     (32,) uint8    SHA-256 of the full ``(V, D)`` matrix, in the checkpoint's dtype

Unpacking builds the model under the same seed (:func:`initialised_under`), puts the trained rows into its fresh
token embedding, and checks the digest: a torch or open_clip that draws other initial values (another version)
fails loudly instead of loading a different model. The shipped ResNet checkpoint shrinks from 16.2 MB to 3.6 MB.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

WEIGHT = "token_embedding.weight"
ROWS, TRAINED, SEED, DIGEST = (f"token_embedding.{k}" for k in ("rows", "trained", "init_seed", "sha256"))


class PackedWeightsError(ValueError):
    """A packed token embedding that does not rebuild the matrix it was packed from."""


def _digest(weight: torch.Tensor) -> torch.Tensor:
    """SHA-256 of a ``(V, D)`` matrix's bytes, as a ``(32,)`` uint8 tensor."""
    data = weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


@contextlib.contextmanager
def initialised_under(seed: int | None) -> Iterator[None]:
    """Draw from torch's global RNG seeded with ``seed`` inside the block, and leave the caller's RNG state as it
    was after it; no-op for None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pack_token_embedding(state: dict[str, torch.Tensor], initial: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with its ``token_embedding.weight`` ``(V, D)`` replaced by the rows that differ from ``initial``
    (the same matrix as open_clip built it under ``torch.manual_seed(seed)``, cast to the state's dtype)."""
    weight = state[WEIGHT]
    initial = initial.detach().to(device=weight.device, dtype=weight.dtype)
    if initial.shape != weight.shape:
        raise PackedWeightsError(f"initial token embedding {tuple(initial.shape)} does not match "
                                 f"{tuple(weight.shape)}")
    rows = (weight != initial).any(dim=1).nonzero().flatten()
    packed = {k: v for k, v in state.items() if k != WEIGHT}
    packed.update({ROWS: rows.to(torch.int64), TRAINED: weight[rows].contiguous(),
                   SEED: torch.tensor(seed, dtype=torch.int64), DIGEST: _digest(weight)})
    return packed


def trained_token_rows(path) -> frozenset[int]:
    """The token ids whose embedding rows the packed checkpoint at ``path`` (a local ``.safetensors`` file) keeps:
    the tokens its training saw. Reads that one tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return frozenset(f.get_tensor(ROWS).tolist())


def packed_seed(state: dict[str, torch.Tensor]) -> int | None:
    """The seed a packed checkpoint's model must be built under; None for an ordinary state dict."""
    return int(state[SEED]) if SEED in state else None


def unpack_token_embedding(state: dict[str, torch.Tensor], initial: torch.Tensor,
                           source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The full state dict of a packed ``state``: ``initial`` (the fresh token embedding of the model built under
    :func:`packed_seed`) with the trained rows put back. Raises PackedWeightsError, naming ``source``, when the
    result is not the matrix that was packed."""
    missing = [k for k in (ROWS, TRAINED, SEED, DIGEST) if k not in state]
    if missing:
        raise PackedWeightsError(f"{source}: packed token embedding lacks {', '.join(missing)}")
    trained = state[TRAINED]
    weight = initial.detach().to(dtype=trained.dtype).clone()
    weight[state[ROWS]] = trained
    if not torch.equal(_digest(weight), state[DIGEST]):
        raise PackedWeightsError(
            f"{source}: the token embedding does not rebuild from seed {int(state[SEED])} with torch "
            f"{torch.__version__}: this torch or open_clip draws other initial weights than the versions the "
            "checkpoint was packed with (requirements.lock pins them)")
    full = {k: v for k, v in state.items() if k not in (ROWS, TRAINED, SEED, DIGEST)}
    full[WEIGHT] = weight
    return full
