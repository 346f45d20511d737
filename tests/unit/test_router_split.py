"""The router split (`data.split.router`, `data.router_source`): rows the expert does not train on and thresholds
are not chosen on, for the triage router to learn from. It only ever takes rows that would have been train, so
recipes without it keep the split they had, byte for byte."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline import tasks
from pipeline.data.examples import Example
from pipeline.data.readers import load_examples
from pipeline.data.row_checks import check_duplicates, check_targets
from pipeline.data.splitting import split_examples
from pipeline.errors import UserError
from pipeline.recipe.schema import Recipe, load_recipe
from pipeline.stages.prep import read_and_label
from pipeline.stages.prep_report import build_stats, data_fingerprint, render_report
from pipeline.tasks import classification

ROOT = Path(__file__).resolve().parents[2]


def recipe(**data) -> Recipe:
    split = data.pop("split", {})
    return Recipe.model_validate({
        "name": "t", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b", "c"]},
        "data": {"source": "/data/d.jsonl", "fields": {"text": "t", "target": "l"}, "split": split, **data},
        "model": {"base": "m"}, "registry": {"model_name": "m"}})


def rows() -> list[Example]:
    """Three classes of 50, 30 and 3 gold rows, and 12 teacher-labelled rows (a stratum of their own: kept out
    of test)."""
    out, line = [], 0
    for label, n in {"a": 50, "b": 30, "c": 3}.items():
        for i in range(n):
            line += 1
            out.append(Example(id=f"r{line}", line=line, text=f"{label} text {i}", target=label))
    out += [Example(f"t{i}", 200 + i, f"taught {i}", "ab"[i % 2], provenance="teacher:m") for i in range(12)]
    return out


def ids(splits: dict[str, list[Example]]) -> dict[str, list[str]]:
    return {name: [e.id for e in members] for name, members in splits.items()}


def test_without_a_router_split_the_split_is_the_one_before_it_existed():
    """The digest of these ids was recorded from the split function before the router split was added."""
    splits = ids(split_examples(rows(), recipe(split={"validation": 0.1, "test": 0.2, "seed": 7})))
    assert list(splits) == ["train", "validation", "test"], "no router split unless the recipe asks for one"
    assert hashlib.sha256(json.dumps(splits).encode()).hexdigest() == \
        "980ce110a32c96924710f74a0b9dcd6f6299ccb185e179a6f4bebfea6b4a19a4"


def test_the_router_split_comes_out_of_train_only_and_is_stratified():
    before = ids(split_examples(rows(), recipe(split={"validation": 0.1, "test": 0.2, "seed": 7})))
    after = split_examples(rows(), recipe(split={"validation": 0.1, "test": 0.2, "router": 0.2, "seed": 7}))
    assert ids(after)["test"] == before["test"] and ids(after)["validation"] == before["validation"]
    router, train = ids(after)["router"], ids(after)["train"]
    assert not set(router) & set(train)
    assert sorted(router + train) == sorted(before["train"]), "train shrinks by exactly the router rows"
    assert len(train) == len(before["train"]) - len(router)
    by_class = Counter(e.target for e in after["router"] if e.provenance == "gold")
    assert by_class == {"a": 10, "b": 6}, "20% of each class; a 3-row class keeps its one train row"
    assert Counter(e.target for e in after["train"])["c"] == 1
    assert sum(e.provenance != "gold" for e in after["router"]) == 2, "teacher rows are carved like validation"
    assert [e.line for e in after["router"]] == sorted(e.line for e in after["router"]), "in source order"


def test_the_router_split_is_seeded_and_deterministic():
    r = recipe(split={"router": 0.3, "seed": 7})
    first = ids(split_examples(rows(), r))
    assert first == ids(split_examples(list(reversed(rows())), r))
    other = ids(split_examples(rows(), recipe(split={"router": 0.3, "seed": 8})))
    assert other["router"] != first["router"]
    everything = [i for members in first.values() for i in members]
    assert len(everything) == len(set(everything)) == len(rows())


def test_a_router_source_is_the_router_split_and_nothing_is_carved():
    fixed = [Example(f"router:r:{i}", i, f"logged {i}", "ab"[i % 2], "r.jsonl", "router") for i in range(1, 7)]
    splits = split_examples(rows() + fixed, recipe(router_source="/data/r.jsonl", split={"router": 0.3, "seed": 7}))
    without = split_examples(rows(), recipe(split={"seed": 7}))
    assert [e.id for e in splits["router"]] == [e.id for e in fixed]
    assert ids(splits) == {**ids(without), "router": [e.id for e in fixed]}, "data.split.router is ignored"


def test_a_split_that_leaves_under_10_percent_for_training_is_refused_naming_the_key(tmp_path):
    good = {"name": "d", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b"]},
            "data": {"source": "d.jsonl", "fields": {"text": "t", "target": "l"},
                     "split": {"validation": 0.1, "test": 0.2, "router": 0.59}},
            "model": {"base": "m"}, "registry": {"model_name": "m"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(good))
    assert load_recipe(path).data.split.router == 0.59
    with pytest.raises(UserError) as err:
        load_recipe(path, ["data.split.router=0.6"])
    message = " ".join(str(err.value).split())
    assert "data -> split" in message
    assert "validation + test + router (0.1 + 0.2 + 0.6) must leave at least 10% of rows for training" in message


def test_router_source_resolves_like_the_other_sources_and_follows_the_log_rules(tmp_path):
    base = {"name": "d", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b"]},
            "data": {"source": "logs.jsonl", "router_source": "router.jsonl", "format": "gateway"},
            "model": {"base": "m"}, "registry": {"model_name": "m"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_recipe(path).data.router_source == (tmp_path / "router.jsonl").resolve()
    with pytest.raises(UserError, match=r"data -> router_source: `gateway` logs are read from \.jsonl files"):
        load_recipe(path, ["data.router_source=router.csv"])
    base["data"] |= {"format": "openai_batch", "batch_requests": "in.jsonl"}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(UserError, match="split it with data.split instead of fixed sources"):
        load_recipe(path)


def test_a_frontier_log_as_router_source_gives_router_rows_whose_target_is_the_logged_answer(tmp_path):
    log = tmp_path / "router.jsonl"
    lines = [{"request": {"messages": [{"role": "user", "content": f"ticket {i}"}]},
              "response": {"model": "gpt-4o", "choices": [{"message": {"role": "assistant", "content": f"`{label}`."}}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 2}}}
             for i, label in enumerate(["A", "b", "a"])]
    log.write_text("\n".join(map(json.dumps, lines)) + "\n{not json\n", encoding="utf-8")
    r = Recipe.model_validate({
        "name": "t", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b"]},
        "data": {"source": str(tmp_path / "logs.jsonl"), "router_source": str(log), "format": "gateway"},
        "model": {"base": "m"}, "registry": {"model_name": "m"}})
    rejected: list[dict] = []
    loaded = load_examples(r, classification, "router_source", log, rejected)
    assert [(e.id, e.text, e.target, e.fixed_split, e.provenance) for e in loaded] == [
        ("router:router:1", "ticket 0", "a", "router", "log:gpt-4o"),
        ("router:router:2", "ticket 1", "b", "router", "log:gpt-4o"),
        ("router:router:3", "ticket 2", "a", "router", "log:gpt-4o"),
    ]
    assert [(r["source"], r["line"], r["reason"]) for r in rejected] == [("router.jsonl", 4, "unparsable")]


def test_a_text_in_the_router_split_and_another_split_is_kept_once_in_the_more_protected_one():
    data = [
        Example("s1", 1, "Lost card", "a", "d.jsonl"),
        Example("s2", 2, "Where is my parcel", "a", "d.jsonl"),
        Example("r1", 1, "lost card", "a", "router.jsonl", "router"),
        Example("r2", 2, "Refund please", "b", "router.jsonl", "router"),
        Example("r3", 3, "Cancel it", "b", "router.jsonl", "router"),
        Example("t1", 1, "refund please", "b", "test.jsonl", "test"),
        Example("v1", 1, "CANCEL it", "b", "val.jsonl", "validation"),
        Example("v2", 2, "where is my  parcel", "a", "val.jsonl", "validation"),
    ]
    rejected: list[dict] = []
    kept = check_duplicates(data, rejected, classification, ["a", "b"])
    assert [e.id for e in kept] == ["r1", "t1", "v1", "v2"]
    details = {(r["source"], r["line"]): (r["reason"], r["detail"]) for r in rejected}
    assert details == {
        ("d.jsonl", 1): ("leakage", "same text as router.jsonl:1 in the router split; removed from train"),
        ("d.jsonl", 2): ("leakage", "same text as val.jsonl:2 in the validation split; removed from train"),
        ("router.jsonl", 2): ("leakage", "same text as test.jsonl:1 in the test split; removed from router"),
        ("router.jsonl", 3): ("leakage", "same text as val.jsonl:1 in the validation split; removed from router"),
    }


@pytest.mark.parametrize("name", ["ticket-classification", "ticket-tagging", "schema-extraction"])
def test_a_shipped_recipe_keeps_test_and_validation_when_a_router_split_is_added(name):
    splits = {}
    for router in ("0.0", "0.15"):
        r = load_recipe(ROOT / "recipes" / f"{name}.yaml", [f"data.split.router={router}", "eval.routing=null"])
        task = tasks.for_type(r.task.type)
        rejected: list[dict] = []
        examples, spec, *_ = read_and_label(r, task, rejected)
        examples = check_duplicates(check_targets(examples, rejected, task, spec), rejected, task, spec)
        splits[router] = ids(split_examples(examples, r))
    plain, routed = splits["0.0"], splits["0.15"]
    assert "router" not in plain
    assert routed["test"] == plain["test"] and routed["validation"] == plain["validation"]
    assert sorted(routed["train"] + routed["router"]) == sorted(plain["train"])
    n = sum(map(len, plain.values()))
    assert abs(len(routed["router"]) - 0.15 * n) <= 0.01 * n + 8, "about 15% of the rows, give or take rounding per stratum"


def test_the_fingerprint_of_a_recipe_without_a_router_split_is_the_one_it_had_before(tmp_path):
    """The value was recorded from `data_fingerprint` before the router keys existed: a champion evaluated then
    is still comparable."""
    files = []
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text(f'{{"id": "{split}"}}\n')
        files.append(tmp_path / f"{split}.jsonl")
    r = Recipe.model_validate({"name": "t", "task": {"type": "classification", "instruction": "x"},
                               "data": {"source": "/data/d.jsonl", "fields": {"text": "t", "target": "l"}},
                               "model": {"base": "m"}, "registry": {"model_name": "m"}})
    assert data_fingerprint(r, files) == "7f511affe7819b4e39a259438c2c22c1a357ec615ebde6f70161a57a85e3d213"
    routed = r.model_copy(update={"data": r.data.model_copy(update={"split": r.data.split.model_copy(
        update={"router": 0.1})})})
    assert data_fingerprint(routed, files) != data_fingerprint(r, files)


@pytest.mark.parametrize(("data", "source"), [
    ({"split": {"router": 0.15}}, "carved from data.source, 15%"),
    ({"router_source": "/logs/frontier.jsonl"}, "data.router_source: frontier.jsonl"),
])
def test_the_report_states_the_router_split_size_and_source(data, source):
    r = recipe(**data)
    splits = split_examples(rows() + [Example(f"x{i}", i, f"x {i}", "a", "frontier.jsonl", "router") for i in range(4)]
                            if "router_source" in data else rows(), r)
    stats = build_stats(splits, [], [], r, "f" * 64, Counter(), {})
    n = len(splits["router"])
    assert stats["rows"]["router"] == stats["router"]["rows"] == n > 0
    assert stats["router"]["source"] == source
    report = render_report(r, stats, [], [])
    assert f"| router | {n} |" in report and f"Router split: {n} rows, {source};" in report
    assert "| source | train | validation | test | router |" in report
    assert "router_vs_test" in stats["label_mix"]
    plain = build_stats(split_examples(rows(), recipe()), [], [], recipe(), "f" * 64, Counter(), {})
    assert "router" not in plain and "router" not in plain["rows"] and "Router split" not in render_report(
        recipe(), plain, [], [])
