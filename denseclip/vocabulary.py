"""Vocabularies and prompt templates as data: class lists with synonyms, template sets; no model needed."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
TEMPLATE_SETS = ("denseclip85", "imagenet80")


class VocabularyError(ValueError):
    """An empty vocabulary, a duplicate class or an unreadable template/class file; the message names it."""


def load_templates(name_or_path: str = "denseclip85") -> list[str]:
    """Prompt templates with ``{}`` for the class name: a shipped set (``denseclip85``, ``imagenet80``, any
    ``denseclip/data/templates/<name>.txt``) or a text file with one template per line."""
    path = DATA_DIR / "templates" / f"{name_or_path}.txt"
    if not path.exists():
        path = Path(name_or_path)
    if not path.is_file():
        shipped = sorted(p.stem for p in (DATA_DIR / "templates").glob("*.txt"))
        raise VocabularyError(f"unknown template set {name_or_path!r}; shipped sets: {', '.join(shipped)}")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise VocabularyError(f"template file {str(path)!r}: every line needs exactly one '{{}}' (bad: {bad[:3]})")
    return templates


def parse_class_lines(lines: list[str], source: str = "classes") -> list[list[str]]:
    """One class per line, synonyms separated by commas -> ``[[name, synonym, ...], ...]``; validated."""
    classes = [[n.strip() for n in line.split(",") if n.strip()] for line in lines if line.strip()]
    return validate_classes(classes, source)


def parse_class_list(text: str, source: str = "--classes") -> list[list[str]]:
    """A comma-separated class list (``"cat, dog, sofa"``), one name per class; validated."""
    return validate_classes([[n.strip()] for n in text.split(",") if n.strip()], source)


def read_classes_file(path: str | os.PathLike) -> list[list[str]]:
    """Read a class file in the shared format (one class per line, synonyms after commas)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise VocabularyError(f"cannot read classes file {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_class_lines(text.splitlines(), source=str(path))


def validate_classes(classes: list[list[str]], source: str = "classes") -> list[list[str]]:
    if not classes:
        raise VocabularyError(f"{source}: the vocabulary is empty")
    seen: dict[str, int] = {}
    for i, names in enumerate(classes):
        for name in names:
            key = name.lower()
            if key in seen and seen[key] != i:
                raise VocabularyError(f"{source}: duplicate class name {name!r}")
            seen[key] = i
    return classes
