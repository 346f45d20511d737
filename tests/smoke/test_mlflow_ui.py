"""The reviewer's path through MLflow's own UI, in a real headless browser against a real `mlflow server`.

After `expert run` on the tiny model (with a recorded frontier that is wrong on a known share of rows): the
experiment's runs (the link `expert run` prints), the eval run with its description, datasets and per-example
results filtered to the disagreements, the registered version with its description and its logged model, and
that model's metrics measured on the test dataset. Each step asserts on what the page shows and saves a
screenshot (under the test's tmp dir; `EXPERT_UI_SCREENSHOTS=docs/ui` writes the copies docs/reviewing.md shows).

Chromium comes from the Debian package (`apt-get install chromium`, which `.ci/run` does) and is driven by
Playwright; without either the test skips and says which is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import shipped_recipe, shipped_rows, write_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = ("no chromium on PATH (apt-get install chromium)" if CHROMIUM is None else
           "playwright is not installed (pip install -e '.[test]')" if importlib.util.find_spec("playwright") is None
           else None)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
MODEL = "ui-review"
WAIT_MS = 30_000


def recorded_frontier(rows: list[dict], path: Path) -> None:
    """A frontier that is right except on every 5th row, so there are examples the decision turns on."""
    path.write_text("".join(json.dumps({"id": r["id"], "output": r["queue"] if i % 5 else "billing",
                                        "input_tokens": 120, "output_tokens": 2}) + "\n" for i, r in enumerate(rows)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_reviewer_finds_the_evidence_in_the_mlflow_ui(tiny_model_dir, tracking_env, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    rows = shipped_rows("tickets/tickets.jsonl")
    recorded_frontier(rows, tmp_path / "frontier.jsonl")
    recipe = write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "name": "ui-review", "registry.model_name": MODEL, "model.base": str(tiny_model_dir),
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1},
        "eval.baselines": [{"name": "frontier", "kind": "predictions", "path": str(tmp_path / "frontier.jsonl"),
                            "price_per_mtok": {"input": 2.5, "output": 10.0}}]}))
    result = CliRunner().invoke(app, ["run", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    links = dict(re.findall(r"^  ([a-z ]+): (http\S+)$", result.output, re.M))
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model_id = manifest["stages"]["train"]["mlflow_model_id"]
    registered = json.loads((run_dir / "push/registered.json").read_text())
    verdict = json.loads((run_dir / "eval/verdict.json").read_text())
    expert = read_jsonl(run_dir / "eval/predictions/expert.jsonl")
    frontier = {r["id"]: r for r in read_jsonl(run_dir / "eval/predictions/frontier.jsonl")}
    disagreements = sum((r["prediction"] == r["target"]) != (frontier[r["id"]]["prediction"] == r["target"])
                        for r in expert)
    assert 0 < disagreements < len(expert)
    accuracy = json.loads((run_dir / "eval/metrics.json").read_text())["systems"]["expert"]["accuracy"]
    shots = Path(os.environ.get("EXPERT_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1500, "height": 950})
        # MLflow's chat side panel opens itself on a first visit and takes a third of the page: closed, for room
        context.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)  # a page on a busy 2-core machine takes seconds to load its tables

        def shot(name: str) -> None:
            page.wait_for_timeout(500)  # let charts and tables settle
            page.screenshot(path=str(shots / f"{name}.png"))

        # 1. the experiment's runs, from the link `expert run` printed: every stage's run, not a GenAI overview
        page.goto(links["runs"])
        for stage in ("prep", "train", "eval", "push"):
            expect(page.get_by_text(f"{stage} · ui-review · run", exact=True).first).to_be_visible()
        assert "/runs" in page.url and "overview" not in page.url
        shot("1-runs")

        # 2. the eval run: its description states the verdict; its inputs are the splits and the logged model
        page.goto(links["eval examples"].replace("/evaluations", ""))
        expect(page.get_by_text(f"Decision: {verdict['decision']}").first).to_be_visible()
        expect(page.get_by_text("ui-review.test").first).to_be_visible()
        shot("2-eval-run")

        # 3. its per-example results, filtered to where the expert and the frontier disagree, as a reviewer clicks
        page.goto(links["eval examples"])
        expect(page.get_by_text(f"{len(expert)} of {len(expert)}").first).to_be_visible()
        page.get_by_role("button", name="Filters").first.click()
        page.get_by_text("Select column").click()
        page.get_by_role("option", name="Assessments").click()
        page.get_by_text("Select name").click()
        page.get_by_role("option", name="disagreement").click()
        page.get_by_text("Select", exact=True).last.click()
        page.get_by_role("option", name="True").first.click()
        page.get_by_role("button", name="Apply filters").click()
        expect(page.get_by_text(f"{disagreements} of {len(expert)}").first).to_be_visible()
        assert "disagreement" in page.url, "the filtered view is a link a reviewer can share"
        page.keyboard.press("Escape")  # the filter popover closes, the table shows
        shot("3-disagreements")

        # 4. the registered version: its description (the same evidence) and a link to its logged model
        page.goto(links["registered version"])
        expect(page.get_by_text(f"Version {registered['version']}").first).to_be_visible()
        expect(page.get_by_text(f"Decision: {verdict['decision']}").first).to_be_visible()
        expect(page.get_by_text("Promotion:").first).to_be_visible()
        expect(page.get_by_text("Source Model").first).to_be_visible()
        shot("4-version")
        page.locator(f'a[href*="/models/{model_id}"]').first.click()

        # 5. the logged model: the expert's metrics, measured on the test dataset
        page.wait_for_url(re.compile(f"/models/{model_id}"))
        expect(page.get_by_text("expert.accuracy").first).to_be_visible()
        expect(page.get_by_text(f"{accuracy:.4g}"[:5]).first).to_be_visible()
        expect(page.get_by_text("ui-review.test").first).to_be_visible()
        shot("5-logged-model")
        browser.close()
