"""The router split through the prep stage: `prep/router.jsonl` written, declared and reported, test and validation
unchanged by it, a frontier log read as it is (with leakage across the splits caught), and gone with the key."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline.evaluation.inference import read_split
from pipeline.run.rundir import RunDir
from tests.smoke.test_prep_logs import gateway_line, log_recipe, write_log
from tests.smoke.test_prep_stage import good_rows, prep, read_jsonl, recipe_for

pytestmark = pytest.mark.smoke


def test_prep_writes_a_carved_router_split_and_reports_it(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "good.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good_rows(90)))
    plain, routed = tmp_path / "plain", tmp_path / "routed"
    assert prep(tmp_path, recipe_for(tiny_model_dir, source), plain).exit_code == 0
    recipe = recipe_for(tiny_model_dir, source, split={"router": 0.2})
    result = prep(tmp_path, recipe, routed)
    assert result.exit_code == 0, result.output

    for split in ("validation", "test"):
        assert (routed / f"prep/{split}.jsonl").read_bytes() == (plain / f"prep/{split}.jsonl").read_bytes(), split
    router, train = read_jsonl(routed / "prep/router.jsonl"), read_jsonl(routed / "prep/train.jsonl")
    assert len(router) == 18, "20% of each of three classes of 30"
    assert sorted(r["id"] for r in router + train) == sorted(r["id"] for r in read_jsonl(plain / "prep/train.jsonl"))
    assert set(router[0]) == set(read_jsonl(routed / "prep/validation.jsonl")[0]), "the same row format"
    assert read_split(RunDir(routed), "router") == router

    manifest = json.loads((routed / "manifest.json").read_text())
    assert "prep/router.jsonl" in manifest["stages"]["prep"]["outputs"]
    assert "prep/router.jsonl" not in json.loads((plain / "manifest.json").read_text())["stages"]["prep"]["outputs"]
    stats = json.loads((routed / "prep/stats.json").read_text())
    assert stats["rows"]["router"] == 18 and stats["router"] == {"rows": 18, "source": "carved from data.source, 20%"}
    assert "Router split: 18 rows, carved from data.source, 20%;" in (routed / "prep/report.md").read_text()
    inputs = MlflowClient().get_run(manifest["stages"]["prep"]["mlflow_run_id"]).inputs.dataset_inputs
    assert sorted(t.value for d in inputs for t in d.tags if t.key == "mlflow.data.context") == \
        ["router", "test", "train", "validation"]

    # the router split is a declared output: editing it makes prep run again
    assert "up to date" in prep(tmp_path, recipe, routed).output
    (routed / "prep/router.jsonl").write_text("")
    again = prep(tmp_path, recipe, routed)
    assert again.exit_code == 0 and "up to date" not in again.output
    assert read_jsonl(routed / "prep/router.jsonl") == router

    # without the key, the run's router split is gone (eval must not read an old one) and train is whole again
    assert prep(tmp_path, recipe_for(tiny_model_dir, source), routed).exit_code == 0
    assert not (routed / "prep/router.jsonl").exists()
    assert (routed / "prep/train.jsonl").read_bytes() == (plain / "prep/train.jsonl").read_bytes()
    fingerprints = [json.loads((d / "manifest.json").read_text())["stages"]["prep"]["fingerprint"] for d in (plain, routed)]
    assert fingerprints[0] == fingerprints[1]


def test_a_gateway_log_is_the_router_split_as_it_is_and_leaks_are_caught(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "gateway.jsonl"
    planted = write_log(source, "gateway")
    rows = good_rows()
    test_log, router_log = tmp_path / "test.jsonl", tmp_path / "router.jsonl"
    test_log.write_text("".join(json.dumps(gateway_line(f"held out {i}", "billing")) + "\n" for i in range(6)))
    router_lines = [gateway_line(f"production ticket {i}", ["billing", "SHIPPING", "`returns`"][i % 3],
                                 model="gpt-4.1") for i in range(12)]
    router_lines.append(gateway_line(rows[0]["text"], rows[0]["label"], model="gpt-4.1"))  # also in data.source
    router_lines.append(gateway_line("held out 2", "billing", model="gpt-4.1"))  # also in the test split
    router_log.write_text("".join(json.dumps(line) + "\n" for line in router_lines))
    run_dir = tmp_path / "run"
    recipe = log_recipe(tiny_model_dir, source, "gateway", test_source=str(test_log), router_source=str(router_log),
                        split={"router": 0.3})
    result = prep(tmp_path, recipe, run_dir)
    assert result.exit_code == 0, result.output

    router = read_jsonl(run_dir / "prep/router.jsonl")
    assert [r["text"] for r in router] == [f"production ticket {i}" for i in range(12)] + [rows[0]["text"]]
    assert [r["target"] for r in router[:3]] == ["billing", "shipping", "returns"], "the logged answer, parsed"
    assert {r["provenance"] for r in router} == {"log:gpt-4.1"}
    assert all(r["id"].startswith("router:router:") for r in router)
    kept = [r["text"] for s in ("train", "validation") for r in read_jsonl(run_dir / f"prep/{s}.jsonl")]
    assert len(kept) == 59 and rows[0]["text"] not in kept, "data.split.router is ignored; the leaked row left train"

    rejected = {(r["source"], r["line"]): r for r in read_jsonl(run_dir / "prep/rejected.jsonl")}
    assert {k[1]: r["reason"] for k, r in rejected.items() if k[0] == "gateway.jsonl"} == {**planted, 1: "leakage"}
    assert "in the router split; removed from train" in rejected[("gateway.jsonl", 1)]["detail"]
    assert rejected[("router.jsonl", 14)]["reason"] == "leakage"
    assert "test.jsonl:3 in the test split; removed from router" in rejected[("router.jsonl", 14)]["detail"]
    stats = json.loads((run_dir / "prep/stats.json").read_text())
    assert stats["router"] == {"rows": 13, "source": "data.router_source: router.jsonl"}
    assert stats["provenance"]["router"] == {"log:gpt-4.1": 13}
    assert "Router split: 13 rows, data.router_source: router.jsonl;" in (run_dir / "prep/report.md").read_text()
