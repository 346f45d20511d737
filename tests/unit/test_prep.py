"""Prep's pure parts: field lookup, rejection rules, deterministic stratified splits, percentiles."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.examples import Example
from pipeline.data.readers import get_field
from pipeline.data.row_checks import (
    check_duplicates,
    check_rejected_fraction,
    check_targets,
)
from pipeline.data.splitting import split_examples
from pipeline.errors import UserError
from pipeline.recipe.schema import Recipe
from pipeline.stages.prep_report import percentiles
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


def test_duplicates_conflicts_and_labels_rejected_with_line():
    data = [
        Example("1", 1, "Where is my parcel?", "shipping"),
        Example("2", 2, "Where is my parcel?", "shipping"),
        Example("3", 3, "where is  my PARCEL?", "shipping"),
        Example("4", 4, "Refund please", "billing"),
        Example("5", 5, "refund please", "shipping"),
        Example("6", 6, "fine", "astrology"),
        Example("1", 7, "another text, reused id", "billing"),
    ]
    rejected: list[dict] = []
    kept = check_targets(data, rejected, classification, ["billing", "shipping"])
    kept = check_duplicates(kept, rejected, classification, ["billing", "shipping"])
    assert [e.id for e in kept] == ["1"]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (6, "label_outside_set"),
        (2, "duplicate_exact"),
        (3, "duplicate_normalized"),
        (4, "conflicting_target"),
        (5, "conflicting_target"),
        (7, "duplicate_id"),
    ]


def test_leaked_text_is_removed_from_the_less_protected_split():
    data = [
        Example("a", 1, "Lost card", "card", "train.jsonl"),
        Example("b", 2, "Other text", "card", "train.jsonl"),
        Example("t", 1, "lost card", "card", "test.jsonl", "test"),
        Example("v", 1, "Other text", "card", "val.jsonl", "validation"),
    ]
    rejected: list[dict] = []
    kept = check_duplicates(data, rejected, classification, ["card"])
    assert [e.id for e in kept] == ["t", "v"]
    assert [(r["source"], r["line"], r["reason"]) for r in rejected] == [
        ("train.jsonl", 1, "leakage"),
        ("train.jsonl", 2, "leakage"),
    ]
    assert "test.jsonl:1 in the test split; removed from train" in rejected[0]["detail"]


def test_fixed_splits_are_kept_and_not_carved_from_source():
    data = examples({"a": 20, "b": 20})
    fixed = [Example(f"t{i}", i, f"test {i}", "a" if i % 2 else "b", "test.jsonl", "test") for i in range(6)]
    r = Recipe.model_validate({**recipe().model_dump(by_alias=True), "data": {
        "source": "d.jsonl", "test_source": "t.jsonl", "fields": {"text": "t", "target": "l"}, "split": {"validation": 0.25}}})
    out = split_examples(data + fixed, r)
    assert [e.id for e in out["test"]] == [e.id for e in fixed]
    assert len(out["validation"]) == 10 and len(out["train"]) == 30


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p95": 95, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p95": 7, "max": 7}
    assert percentiles([]) == {"p50": 0, "p95": 0, "max": 0}


def test_rejected_fraction_limit_summarises_by_reason():
    rejected = [{"reason": "empty_text"}] * 2 + [{"reason": "duplicate"}]
    check_rejected_fraction(rejected, 100, 0.05, Path("r.jsonl"))
    with pytest.raises(UserError, match="empty_text: 2, duplicate: 1"):
        check_rejected_fraction(rejected, 10, 0.05, Path("r.jsonl"))


def _load(path: Path, **fields):
    from pipeline.data.readers import load_examples

    r = Recipe.model_validate({"name": "t", "task": {"type": "classification", "instruction": "x"},
                               "data": {"source": str(path), "fields": {"text": "t", "target": "l", **fields}},
                               "model": {"base": "m"}, "registry": {"model_name": "m"}})
    rejected: list[dict] = []
    return load_examples(r, classification, "source", path, rejected), rejected


def test_a_utf8_bom_keeps_the_first_jsonl_row_and_the_first_csv_column(tmp_path):
    """Spreadsheet programs write a BOM first for "UTF-8": the first JSONL row was lost to it, and a CSV's first
    column became an invisible `\\ufeffid`."""
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"t": "first row", "l": "a"}\n{"t": "second row", "l": "b"}\n')
    kept, rejected = _load(jsonl)
    assert [e.text for e in kept] == ["first row", "second row"] and rejected == []
    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfid,t,l\r\n7,hello there,a\r\n")
    kept, rejected = _load(csv_file, id="id")
    assert [(e.id, e.text) for e in kept] == [("7", "hello there")] and rejected == []
    whole = tmp_path / "bom.json"
    whole.write_bytes(b"\xef\xbb\xbf" + b'[{"t": "only row", "l": "a"}]')
    assert [e.text for e in _load(whole)[0]] == ["only row"]


def test_a_lone_surrogate_is_rejected_with_its_line_before_any_tokenizer_sees_it(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text('{"t": "fine", "l": "a"}\n{"t": "broken \\ud800 text", "l": "a"}\n{"t": "ok", "l": "\\udfff"}\n')
    kept, rejected = _load(source)
    assert [e.text for e in kept] == ["fine"]
    assert [(r["line"], r["reason"]) for r in rejected] == [(2, "undecodable"), (3, "undecodable")]
    assert "lone UTF-16 surrogate" in rejected[0]["detail"]


def test_labels_given_as_a_number_and_as_text_do_not_merge_silently(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text('{"t": "one", "l": 1}\n{"t": "two", "l": 2}\n{"t": "three", "l": "1"}\n')
    with pytest.raises(UserError, match=r"label `1` comes as a number on line 1 and text on line 3"):
        _load(source)
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"t": "one", "l": 1}\n{"t": "two", "l": 2}\n')
    assert [e.target for e in _load(numbers)[0]] == ["1", "2"], "one type throughout is fine"


def test_a_huge_line_is_rejected_unread_in_memory_bounded_by_the_limit(tmp_path):
    """A 10 MB JSONL line used to be parsed and tokenized (4-5 GB) only to be rejected as too long."""
    import tracemalloc

    from pipeline.data.readers import read_rows

    source = tmp_path / "d.jsonl"
    with source.open("wb") as f:
        f.write(b'{"t": "short", "l": "a"}\n')
        f.write(b'{"t": "' + b"x" * 10_000_000 + b'", "l": "a"}\n')
        f.write(b'{"t": "after", "l": "b"}\n')
    tracemalloc.start()
    rows = list(read_rows(source, max_line_bytes=2**20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(line, row and row["t"]) for line, row, _ in rows] == [(1, "short"), (2, None), (3, "after")]
    assert rows[1][2].startswith("too_long: the line is over 1,048,576 bytes")
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB: memory must follow the limit, not the 10 MB line"


def test_a_source_that_is_not_a_file_says_what_it_is(tmp_path):
    from pipeline.stages.prep import inputs_of

    (tmp_path / "data.jsonl").mkdir()
    r = Recipe.model_validate({"name": "t", "task": {"type": "classification", "instruction": "x"},
                               "data": {"source": str(tmp_path / "data.jsonl"), "fields": {"text": "t", "target": "l"}},
                               "model": {"base": "m"}, "registry": {"model_name": "m"}})
    with pytest.raises(UserError, match=r"data.source: .*data.jsonl is a directory, not a file"):
        inputs_of(r)
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is a named pipe"):
        inputs_of(r.model_copy(update={"data": r.data.model_copy(update={"source": fifo})}))


DEEP = "[" * 200_000 + "]" * 200_000  # under 1 MiB; json.loads alone ends in RecursionError on it


@pytest.mark.parametrize("fmt, good, deep", [
    ("table", '{"t": "fine", "l": "a"}', '{"t": "deep", "l": ' + DEEP + "}"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "a"}]}),
     '{"messages": ' + DEEP + "}"),
    ("gateway", json.dumps({"request": {"messages": [{"role": "user", "content": "fine"}]},
                            "response": {"choices": [{"message": {"role": "assistant", "content": "a"}}]}}),
     '{"request": {"messages": [{"role": "user", "content": "x"}]}, "response": ' + DEEP + "}"),
])
def test_a_line_nested_200000_deep_is_rejected_with_its_line_in_every_jsonl_format(tmp_path, fmt, good, deep):
    from pipeline.data.readers import load_examples

    source = tmp_path / "d.jsonl"
    source.write_text("\n".join([good, deep, good.replace("fine", "also fine")]) + "\n")
    assert source.stat().st_size < 2**20
    data = {"source": str(source), "format": fmt} | ({"fields": {"text": "t", "target": "l"}} if fmt == "table" else {})
    r = Recipe.model_validate({"name": "t", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b"]},
                               "data": data, "model": {"base": "m"}, "registry": {"model_name": "m"}})
    rejected: list[dict] = []
    kept = load_examples(r, classification, "source", source, rejected)
    assert [e.text for e in kept] == ["fine", "also fine"]
    assert [(x["source"], x["line"], x["reason"]) for x in rejected] == [("d.jsonl", 2, "too_deep")]
    assert "JSON nested deeper than 100 levels" in rejected[0]["detail"]


def test_a_json_source_nested_200000_deep_is_a_user_error_naming_the_file(tmp_path):
    source = tmp_path / "d.json"
    source.write_text('[{"t": "fine", "l": "a"}, {"t": "deep", "l": ' + DEEP + "}]")
    with pytest.raises(UserError, match=r"data.source: .*d.json: JSON nested deeper than 100 levels"):
        _load(source)


def test_brackets_inside_strings_do_not_count_as_nesting_and_the_limit_is_exact():
    from pipeline.data import json_depth

    assert json_depth.loads('{"t": "' + "[{" * 5000 + '\\"]"}') == {"t": "[{" * 5000 + '"]'}
    at_limit = "[" * 100 + "]" * 100
    assert json_depth.loads(at_limit) == json.loads(at_limit)
    with pytest.raises(json_depth.TooDeep, match="deeper than 100 levels"):
        json_depth.loads("[" + at_limit + "]")
    with pytest.raises(json.JSONDecodeError, match="4300 digits"):  # json's own ValueError, as a parse error
        json_depth.loads('{"n": ' + "9" * 5000 + "}")


def test_an_extraction_target_or_answer_nested_too_deep_is_refused_not_a_crash():
    from pipeline.tasks import extraction

    with pytest.raises(ValueError, match="target is JSON nested deeper than 100 levels"):
        extraction.normalize_target('{"a": ' + DEEP + "}")
    assert extraction.parse_answer('{"a": ' + DEEP + "}", {"type": "object"}) is None


def _pii_recipe(pii: str, **teacher) -> Recipe:
    data = {"source": "d.jsonl", "fields": {"text": "t", "target": "l"}, "pii": pii}
    if teacher:
        data["teacher"] = {"model": "t", "base_url": "http://127.0.0.1:9/v1", **teacher}
    return Recipe.model_validate({"name": "t", "task": {"type": "classification", "instruction": "x",
                                                        "labels": ["billing", "shipping"]},
                                  "data": data, "model": {"base": "m"}, "registry": {"model_name": "m"}})


@pytest.fixture
def pii_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EXPERT_PII_SECRET", raising=False)
    return tmp_path / "cache"


def test_twenty_customers_who_differ_only_by_e_mail_stay_twenty_rows(pii_cache):
    from pipeline.data.row_checks import check_pii

    rows = [Example(id=f"r{i}", line=i + 1, text=f"Refund please, my account is customer{i}@example.com", target="billing")
            for i in range(20)]
    rejected: list[dict] = []
    kept, found = check_pii(rows, rejected, _pii_recipe("redact"))
    assert found == Counter(email=20) and not any("@" in e.text for e in kept)
    assert check_duplicates(kept, rejected, classification, ["billing", "shipping"]) == kept and rejected == []
    assert len({e.text for e in kept}) == 20
    key = (pii_cache / "pii.key").read_bytes()
    assert len(key) == 32 and (pii_cache / "pii.key").stat().st_mode & 0o077 == 0, "the key is its owner's only"
    again, _ = check_pii([Example(id="x", line=1, text="from customer7@example.com", target="billing")], [],
                         _pii_recipe("redact"))
    assert again[0].text.removeprefix("from ") in kept[7].text, "the same e-mail, the same pseudonym, run after run"


@pytest.mark.parametrize("mode", ["redact", "reject"])
def test_rejection_details_are_scrubbed_of_keys_cards_and_e_mails_in_both_modes(pii_cache, monkeypatch, mode):
    from pipeline.data.row_checks import check_pii, scrub_records

    monkeypatch.setenv("TEACHER_KEY", "tk-live-0123456789abcdef")
    recipe = _pii_recipe(mode, api_key_env="TEACHER_KEY")
    rows = [Example(id="a", line=1, text="where is my parcel", target="jane.doe@example.com"),
            Example(id="b", line=2, text="refund please", target="billing")]
    rejected: list[dict] = []
    kept, found = check_pii(rows, rejected, recipe)
    assert [e.id for e in kept] == ["b"] and found == Counter(email=1)
    assert rejected == [{"source": "", "line": 1, "id": "a", "reason": "pii", "detail": "the label holds 1 email"}]
    rejected += [
        {"source": "d.jsonl", "line": 3, "id": "c", "reason": "teacher_unparsable",
         "detail": "the teacher's answer is not a target: 'key tk-live-0123456789abcdef, card 4111 1111 1111 1111, "
                   "mail bob @ example.org'"},
        {"source": "d.jsonl", "line": 4, "id": "d", "reason": "label_outside_set",
         "detail": "label `bob@example.org` is not in the label set"},
    ]
    written = json.dumps(scrub_records(rejected, recipe))
    for secret in ("tk-live-0123456789abcdef", "4111 1111 1111 1111", "bob @ example.org", "bob@example.org"):
        assert secret not in written
    assert "[REDACTED]" in written and "[CARD_" in written
    emails = re.findall(r"\[EMAIL_[a-p]{8}\]", written)
    assert len(emails) == 2 and emails[0] == emails[1], "one person, one pseudonym, however the address is written"


def test_with_pii_keep_details_keep_personal_data_but_never_keys(pii_cache, monkeypatch):
    from pipeline.data.row_checks import scrub_records

    monkeypatch.setenv("TEACHER_KEY", "tk-live-0123456789abcdef")
    detail = {"source": "d", "line": 1, "reason": "teacher_unparsable", "detail": "tk-live-0123456789abcdef bob@x.org"}
    assert scrub_records([detail], _pii_recipe("keep", api_key_env="TEACHER_KEY"))[0]["detail"] == "[REDACTED] bob@x.org"
    assert not (pii_cache / "pii.key").exists(), "no key is made where no pseudonym is"
