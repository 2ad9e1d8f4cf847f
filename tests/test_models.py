"""Loading weights by path, URL and tag; refusing what cannot be loaded safely."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from denseclip.models import TINY_MODEL, ModelLoadError, load_clip, read_state_dict

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trained_like():
    """A tiny CLIP with non-default weights, as a stand-in for someone's fine-tuned checkpoint."""
    torch.manual_seed(3)
    clip = load_clip(TINY_MODEL, "random")
    return {k: v.clone() for k, v in clip.model.state_dict().items()}


def _assert_loaded(clip, state):
    for key, value in clip.model.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key


def test_safetensors_checkpoint_roundtrip(tmp_path, trained_like):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in trained_like.items()}, str(path))
    clip = load_clip(TINY_MODEL, str(path))
    assert clip.dtype == torch.float32  # half-precision files are cast back
    _assert_loaded(clip, {k: v.half() for k, v in trained_like.items()})
    assert clip.fingerprint.startswith(f"{TINY_MODEL}/sha256:")


def test_torch_checkpoint_nested_and_ddp_prefixed(tmp_path, trained_like):
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in trained_like.items()}}, path)
    _assert_loaded(load_clip(TINY_MODEL, str(path)), trained_like)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weights": Payload()}, f)
    with pytest.raises(ModelLoadError, match="evil.pt"):
        read_state_dict(str(path))
    assert "this must never run" not in capsys.readouterr().out


def test_wrong_architecture_names_checkpoint(tmp_path, trained_like):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in trained_like.items()}, str(path))
    with pytest.raises(ModelLoadError, match="does not fit model 'RN50'"):
        load_clip("RN50", str(path))


def test_unknown_names_and_tags():
    with pytest.raises(ModelLoadError, match="unknown model 'RN51'"):
        load_clip("RN51")
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'openia'.*openai"):
        load_clip("RN50", "openia")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_clip(TINY_MODEL, "/nonexistent/weights.safetensors")


def test_checkpoint_from_object_store(make_bucket, trained_like, tmp_path):
    import fsspec

    url = make_bucket("weights") + "/ckpt/w.safetensors"
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained_like.items()}, str(path))
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    _assert_loaded(load_clip(TINY_MODEL, url), trained_like)
