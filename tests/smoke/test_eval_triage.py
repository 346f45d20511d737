"""Triage in eval, end to end on the tiny model: a router split carved by prep, every tier asked on it, both router
kinds trained on the expert's outcomes there, their cut-offs searched with the thresholds on validation, and the
three routings (confidence only, triage only, triage then confidence) measured on the same test rows, with the
decision to keep triage following its rule. The tiers are recorded answers (a mid tier right on a fixed two thirds
of the rows and sure only then, an oracle frontier), priced by their token counts."""

from __future__ import annotations

import json
import zlib

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.routing import triage
from tests.conftest import shipped_recipe, shipped_rows, write_recipe


def recorded(path, rows, right, confidence, tokens):
    queues = sorted({r["queue"] for r in rows})
    path.write_text("".join(json.dumps({
        "id": r["id"], "output": r["queue"] if right(r) else next(q for q in queues if q != r["queue"]),
        "confidence": confidence(right(r)), "input_tokens": tokens, "output_tokens": 2, "latency_ms": 100 + tokens,
    }) + "\n" for r in rows))


def test_routers_trained_on_the_router_split_join_the_route_search(tiny_model_dir, tracking_env, tmp_path):
    rows = shipped_rows("tickets/tickets.jsonl")
    mid, frontier = tmp_path / "mid.jsonl", tmp_path / "frontier.jsonl"
    recorded(mid, rows, lambda r: zlib.crc32(r["text"].encode()) % 3 != 0, lambda ok: 0.9 if ok else 0.3, 150)
    recorded(frontier, rows, lambda r: True, lambda ok: None, 400)
    recipe = write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "name": "triaged-tickets", "registry.model_name": "triaged-tickets", "model.base": str(tiny_model_dir),
        "data.split": {"validation": 0.15, "test": 0.2, "router": 0.25, "seed": 13},
        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1},
        "eval.baselines": [
            {"name": "mid", "kind": "predictions", "path": str(mid), "price_per_mtok": {"input": 0.1, "output": 0.4}},
            {"name": "frontier", "kind": "predictions", "path": str(frontier),
             "price_per_mtok": {"input": 2.5, "output": 10.0}}],
        "eval.routing": {"tiers": ["expert", "mid", "frontier"], "target": {"metric": "accuracy", "below_last": 0.1},
                         "triage": {"routers": ["text", "probe"], "max_candidates": 7}},
        "eval.bootstrap_samples": 200,
    }))
    run_dir = tmp_path / "run"
    for step in ("prep", "train", "eval"):
        result = CliRunner().invoke(app, [step, str(recipe), "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
    splits = {s: [json.loads(line) for line in (run_dir / f"prep/{s}.jsonl").read_text().splitlines()]
              for s in ("train", "router", "validation", "test")}
    ids = {s: {r["id"] for r in rs} for s, rs in splits.items()}
    assert len(ids["router"]) > 50 and all(not (ids["router"] & ids[s]) for s in ("train", "validation", "test"))

    out = run_dir / "eval"
    for system in ("expert", "mid", "frontier"):  # every tier answered the router split, row for row
        answered = [json.loads(line) for line in (out / f"predictions/{system}.router.jsonl").read_text().splitlines()]
        assert [r["id"] for r in answered] == [r["id"] for r in splits["router"]]
    route = json.loads((out / "route.json").read_text())
    compared = route["triage"]
    expert_router = [json.loads(line) for line in (out / "predictions/expert.router.jsonl").read_text().splitlines()]
    assert "carved from data.source, 25%" in compared["source"]
    assert compared["expert_wrong_on_router"] == sum(r["prediction"] != r["target"] for r in expert_router)
    assert set(compared["routers"]) == {"text", "probe"}
    text = compared["routers"]["text"]
    assert text["runs"] == "before any tier" and compared["routers"]["probe"]["runs"] == "on the expert's forward pass"
    assert 0 < text["ms_per_request"] < 50 and text["training"]["rows"] == len(splits["router"])
    for kind, entry in compared["routers"].items():
        for how in ("triage_only", "triage_then_confidence"):
            routing = entry["routings"][how]
            if "reason" in routing:
                continue
            assert routing["validation"]["metric"] >= route["target"], (kind, how)
            quality = routing["router_on_test"]
            assert 0 <= quality["caught"] <= 1 and 0 <= quality["needless"] <= 1
            assert abs(sum(routing["test"]["starts"].values()) - 1) < 1e-9
            per_row = [json.loads(line) for line in (out / f"triage/test.{kind}.{how}.jsonl").read_text().splitlines()]
            assert [r["id"] for r in per_row] == [r["id"] for r in splits["test"]]
            order = ["expert", "mid", "frontier"]
            assert all(order.index(r["tier"]) >= order.index(r["start"]) for r in per_row), "no tier below the start"
            for tier_name, share in routing["test"]["starts"].items():
                assert abs(sum(r["start"] == tier_name for r in per_row) / len(per_row) - share) < 1e-9
            if how == "triage_only":
                assert routing["thresholds"] == [0.0, 0.0], "whichever tier a request starts at answers it"
                assert all(r["tier"] == r["start"] for r in per_row)
    # the decision follows its rule: cheaper than confidence alone on validation, and the target met on test
    chosen = compared["chosen"]
    if chosen is not None and compared["confidence_only"] is not None:
        kept = compared["routers"][chosen["router"]]["routings"][chosen["routing"]]
        cheaper = kept["validation"]["cost_per_1k"] < compared["confidence_only"]["validation"]["cost_per_1k"]
        assert compared["kept"] == (cheaper and kept["test"]["meets_target"]), compared["why"]
    verdict = json.loads((out / "verdict.json").read_text())
    if compared["kept"]:
        assert verdict["route"]["triage"]["router"] == chosen["router"]
        assert verdict["route"]["triage"]["cutoffs"] == route["triage_route"]["cutoffs"]
        assert route["thresholds"] == chosen["thresholds"]
    else:
        assert verdict["route"] is None or verdict["route"]["triage"] is None
    for kind in ("text", "probe"):  # the routers eval trained, saved without pickle, load and score
        router = triage.load(out / "triage" / kind)
        assert router.kind == kind
    scores = triage.load(out / "triage/text").score([r["text"] for r in splits["test"][:5]])
    assert ((0 <= scores) & (scores <= 1)).all()
    report = (out / "report.md").read_text()
    assert "## Triage" in report and "confidence only" in report and "triage then confidence" in report
