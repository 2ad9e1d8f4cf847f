"""Prompt ensembles, vocabularies and the padding-trimmed text encoder."""

import pytest
import torch
import torch.nn.functional as F

from denseclip.models import load_clip
from denseclip.text import class_embeddings, encode_prompts, name_embeddings
from denseclip.vocabulary import VocabularyError, load_templates, parse_class_list, read_classes_file

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("RN50", "random")


def test_shipped_template_sets():
    assert len(load_templates("denseclip85")) == 85
    assert len(load_templates("imagenet80")) == 80
    with pytest.raises(VocabularyError, match="unknown template set 'nope'"):
        load_templates("nope")


def test_trimmed_encoding_equals_full_context(clip):
    prompts = ["a photo of a cat.", "there is a potted plant in the scene.", "a", "a very " * 20 + "long dog."]
    full = F.normalize(clip.model.encode_text(clip.tokenizer(prompts)).float(), dim=-1)
    trimmed = encode_prompts(clip, prompts, batch_size=3)
    assert torch.allclose(trimmed, full, atol=1e-5)


def test_ensemble_is_mean_of_normalised_prompts(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path))
    templates = ["a photo of a {}.", "a drawing of a {}."]
    emb = name_embeddings(clip, ["cat"], templates)
    parts = F.normalize(clip.model.encode_text(clip.tokenizer([t.format("cat") for t in templates])).float(), dim=-1)
    assert torch.allclose(emb[0], F.normalize(parts.mean(0), dim=0), atol=1e-5)
    assert list(tmp_path.rglob("*.safetensors")), "embeddings were not cached"
    # A second call reads the cache (same values); changing the names changes the key.
    assert torch.equal(name_embeddings(clip, ["cat"], templates), emb)
    other = name_embeddings(clip, ["dog"], templates)
    assert not torch.allclose(other, emb)


def test_class_embeddings_map_synonyms_to_classes(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path))
    emb, class_of_name = class_embeddings(clip, [["person", "person in shirt"], ["sky"]], ["a {}."])
    assert emb.shape[0] == 3 and class_of_name.tolist() == [0, 0, 1]


def test_vocabulary_errors(tmp_path):
    with pytest.raises(VocabularyError, match="empty"):
        parse_class_list(" , ")
    with pytest.raises(VocabularyError, match="duplicate class name 'Cat'"):
        parse_class_list("cat, dog, Cat")
    f = tmp_path / "classes.txt"
    f.write_text("background, sky\nperson, person in shirt\n\ncar\n")
    assert read_classes_file(f) == [["background", "sky"], ["person", "person in shirt"], ["car"]]
    with pytest.raises(VocabularyError, match="missing.txt"):
        read_classes_file(tmp_path / "missing.txt")
