"""Loading weights by path, URL and tag; refusing what cannot be loaded safely; QuickGELU where the weights were
trained with it; never random weights unless asked for."""

import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from denseclip.models import (
    TINY_MODEL,
    ModelLoadError,
    check_weights,
    load_clip,
    read_state_dict,
    resolve_pretrained,
    weights_activation,
)
from denseclip.text import encode_prompts, name_embeddings

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
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'laion2b_s34b_b88k' for 'RN50-quickgelu'"):
        load_clip("RN50-quickgelu", "laion2b_s34b_b88k")  # the -quickgelu names carry only QuickGELU tags
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


PROMPTS = ["a photo of a cat.", "there is a red car in the scene.", "a"]


def _hub_snapshot(cache, repo: str, state: dict) -> None:
    """Write ``state`` where a finished Hugging Face download of ``repo``'s open_clip weights would be."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0000000000000000000000000000000000000000"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "open_clip_model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(snapshot.name)


def test_openai_tag_is_built_with_quickgelu(offline_hub, tmp_path):
    # A random RN50-quickgelu state dict served in place of the "openai" download (open_clip fetches that tag
    # from the Hugging Face hub; here it is already in the hub's cache and the hub cannot be reached).
    torch.manual_seed(0)
    reference = open_clip.create_model("RN50-quickgelu").eval()
    state = reference.state_dict()
    _hub_snapshot(tmp_path / "hf-cache", open_clip.get_pretrained_cfg("RN50", "openai")["hf_hub"].rstrip("/"), state)

    clip = load_clip("RN50", "openai")
    assert (clip.activation, clip.fingerprint, weights_activation("RN50", "openai")) == (
        "quick_gelu", "RN50/openai", "quick_gelu")
    with torch.no_grad():
        expected = F.normalize(reference.encode_text(open_clip.get_tokenizer("RN50")(PROMPTS)), dim=-1)
    ours = encode_prompts(clip, PROMPTS)
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-5

    # The same weights as a checkpoint: built as the model name says, so "-quickgelu" gives OpenAI's model ...
    path = tmp_path / "rn50-openai.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    named = load_clip("RN50-quickgelu", str(path))
    assert named.activation == "quick_gelu"
    assert ((encode_prompts(named, PROMPTS) - expected).norm() / expected.norm()).item() <= 1e-5
    # ... and plain "RN50" the GELU model open_clip builds by default, whose text embeddings differ.
    plain = load_clip("RN50", str(path))
    assert plain.activation == "gelu" and weights_activation("RN50", str(path)) == "gelu"
    assert ((encode_prompts(plain, PROMPTS) - expected).norm() / expected.norm()).item() > 1e-3


def test_no_silent_random_weights(offline_hub):
    assert resolve_pretrained("RN50", None) == "openai"  # the paper's weights by default
    assert resolve_pretrained("ViT-B-16", None) == "openai"
    with pytest.raises(ModelLoadError, match="'ViT-B-16-SigLIP' has no openai weights.*webli.*'random'"):
        load_clip("ViT-B-16-SigLIP")
    # Offline: one line naming the model, the tag and how to give a local checkpoint instead.
    for call in (lambda: load_clip("RN50"), lambda: check_weights("RN50", None)):
        with pytest.raises(ModelLoadError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and "RN50/openai" in message and "--pretrained PATH_OR_URL" in message
        assert "offline.invalid cannot be reached" in message
    with pytest.raises(ModelLoadError, match="no such file"):
        check_weights("RN50", "/nonexistent/rn50.safetensors")
    check_weights("RN50", "random")
    check_weights(TINY_MODEL, None)


def test_random_weights_have_a_fingerprint_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path))
    first, second = load_clip(TINY_MODEL, "random"), load_clip(TINY_MODEL, "random")
    assert first.fingerprint.startswith(f"{TINY_MODEL}/random-init/") and first.fingerprint != second.fingerprint
    # Two random models never share a text-embedding cache entry ...
    a, b = (name_embeddings(c, ["red circle"], ["a {}."]) for c in (first, second))
    assert not torch.allclose(a, b) and len(list(tmp_path.rglob("*.safetensors"))) == 2
    # ... while the same weights drawn again are the same model.
    torch.manual_seed(5)
    again = load_clip(TINY_MODEL, "random")
    torch.manual_seed(5)
    assert load_clip(TINY_MODEL, "random").fingerprint == again.fingerprint
