"""Prep's pure parts: field lookup, rejection rules, deterministic stratified splits."""

from collections import Counter
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.prep import Example, check_examples, check_rejected_fraction, get_field, split_examples
from pipeline.recipe import Recipe
from pipeline.tasks import classification


def recipe(**split) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "task": {"type": "classification", "instruction": "x"},
            "data": {"source": "d.jsonl", "fields": {"text": "t", "target": "l"}, "split": split},
            "model": {"base": "m"},
            "registry": {"model_name": "m"},
        }
    )


def examples(counts: dict[str, int]) -> list[Example]:
    out, line = [], 0
    for label, n in counts.items():
        for i in range(n):
            line += 1
            out.append(Example(id=f"r{line}", line=line, text=f"{label} text {i}", target=label))
    return out


def test_get_field_nested():
    assert get_field({"a": {"b": 3}}, "a.b") == 3
    with pytest.raises(KeyError, match="b"):
        get_field({"a": {}}, "a.b")


def test_split_is_deterministic_stratified_and_disjoint():
    data = examples({"a": 50, "b": 30, "c": 3})
    first = split_examples(list(data), recipe(validation=0.1, test=0.2, seed=7))
    second = split_examples(list(reversed(data)), recipe(validation=0.1, test=0.2, seed=7))
    assert {k: [e.id for e in v] for k, v in first.items()} == {k: [e.id for e in v] for k, v in second.items()}
    for split in ("train", "validation", "test"):
        assert set(Counter(e.target for e in first[split])) == {"a", "b", "c"}, f"a class is missing from {split}"
    ids = [e.id for rows in first.values() for e in rows]
    assert len(ids) == len(set(ids)) == len(data)
    other_seed = split_examples(list(data), recipe(validation=0.1, test=0.2, seed=8))
    assert [e.id for e in other_seed["test"]] != [e.id for e in first["test"]]


def test_duplicates_and_conflicts_rejected_with_line():
    data = [
        Example("1", 1, "Where is my parcel?", "shipping"),
        Example("2", 2, "where is  my parcel?", "shipping"),
        Example("3", 3, "WHERE IS MY PARCEL?", "billing"),
        Example("4", 4, "fine", "astrology"),
    ]
    kept, rejected = check_examples(data, [], classification, ["billing", "shipping"])
    assert [e.id for e in kept] == ["1"]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "duplicate"),
        (3, "conflicting_target"),
        (4, "label_outside_set"),
    ]


def test_rejected_fraction_limit_summarises_by_reason():
    rejected = [{"reason": "empty_text"}] * 2 + [{"reason": "duplicate"}]
    check_rejected_fraction(rejected, 100, 0.05, Path("r.jsonl"))
    with pytest.raises(UserError, match="empty_text: 2, duplicate: 1"):
        check_rejected_fraction(rejected, 10, 0.05, Path("r.jsonl"))
