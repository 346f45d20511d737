"""What prep reports about the data it wrote: the fingerprint, `stats.json`, `report.md`, the class plot, the
console table and the `prep` MLflow run."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline import tasks
from pipeline.console import console
from pipeline.data.splitting import ROUTER
from pipeline.evaluation.stats import label_mix_differs, label_mix_shift, moved_labels
from pipeline.files import file_hash
from pipeline.recipe.schema import Recipe
from pipeline.run import tracking
from pipeline.run.rundir import RunDir

REPORT_EXAMPLES = 5


def data_fingerprint(recipe: Recipe, split_files: list[Path]) -> str:
    h = hashlib.sha256(_data_and_task_hash(recipe).encode())
    for p in split_files:
        h.update(file_hash(p).encode())
    return h.hexdigest()


def _data_and_task_hash(recipe: Recipe) -> str:
    """`recipe.section_hash("data", "task")`, except that a recipe without a router split hashes as if the router
    keys did not exist: its fingerprint stays the one it had before they did, so promotion still compares it
    with the champion evaluated then."""
    payload = {s: recipe.model_dump(mode="json", by_alias=True)[s] for s in ("data", "task")}
    if not recipe.data.has_router_split:
        del payload["data"]["router_source"], payload["data"]["split"]["router"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def router_source(recipe: Recipe) -> str | None:
    """Where the router split's rows come from, in words; None without one."""
    if recipe.data.router_source is not None:
        source = recipe.data.router_source
        return f"data.router_source: {source if isinstance(source, str) else source.name}"
    if recipe.data.split.router > 0:
        return f"carved from data.source, {recipe.data.split.router * 100:g}%"
    return None


def percentiles(values: list[int]) -> dict[str, int]:
    """p50, p95 (nearest rank) and max of token counts; zeros for no rows."""
    if not values:
        return {"p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(len(ordered) * q) - 1)]

    return {"p50": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


def build_stats(splits, rejected, truncated, recipe: Recipe, fingerprint: str, pii_found: Counter,
                labelled: dict[str, Any]) -> dict[str, Any]:
    by_reason = Counter(r["reason"] for r in rejected)
    everything = [e for rows in splits.values() for e in rows]
    stats: dict[str, Any] = {
        "rows": {s: len(rows) for s, rows in splits.items()},
        "rejected": dict(sorted(by_reason.items())),
        "rejected_total": len(rejected),
        "duplicates_removed": by_reason["duplicate_exact"] + by_reason["duplicate_normalized"],
        "leakage_removed": by_reason["leakage"],
        "truncated": len(truncated),
        "max_tokens": recipe.data.max_tokens,
        "max_tokens_policy": recipe.data.max_tokens_policy,
        "tokens": {
            name: {"prompt": percentiles([e.prompt_tokens for e in rows]), "answer": percentiles([e.answer_tokens for e in rows])}
            for name, rows in [("all", everything), *splits.items()]
        },
        "fingerprint": fingerprint,
        # where the targets came from, per split: `gold`, `log:<model>`
        "provenance": {s: dict(sorted(Counter(e.provenance for e in rows).items())) for s, rows in splits.items()},
        # data.pii: the policy and what it found, by kind (redacted or rejected; counts, never the values)
        "pii": {"policy": recipe.data.pii, "found": dict(sorted(pii_found.items()))},
        "teacher": labelled,  # data.teacher: rows labelled, failed, cost, agreement with gold
    }
    if ROUTER in splits:  # what the triage router learns from, and where it came from
        stats["router"] = {"rows": len(splits[ROUTER]), "source": router_source(recipe)}
    task = tasks.for_type(recipe.task.type)
    if task.label_set:
        labels = {s: [label for e in rows for label in task.labels_of(e.target)] for s, rows in splits.items()}
        stats["classes"] = {s: dict(sorted(Counter(labels[s]).items())) for s in splits}
        # thresholds and checkpoints chosen on validation hold on test only if the two look alike
        stats["label_mix"] = {f"{a}_vs_test": label_mix_shift(labels[a], labels["test"])
                              for a in ("train", "validation", ROUTER) if splits.get(a) and splits["test"]}
    return stats


def plot_class_distribution(classes: dict[str, dict[str, int]], path: Path) -> None:
    """Horizontal stacked bars: rows per class, coloured by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for counts in classes.values() for label in counts})
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(labels) + 1)))
    left = [0] * len(labels)
    for split in classes:
        values = [classes[split].get(label, 0) for label in labels]
        ax.barh(labels, values, left=left, label=split)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title("rows per class and split")
    ax.tick_params(axis="y", labelsize=7 if len(labels) > 30 else 9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    # fixed metadata so identical data gives an identical file
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def render_report(recipe: Recipe, stats: dict[str, Any], rejected, truncated) -> str:
    lines = [f"# prep report: {recipe.name}", "", f"Fingerprint: `{stats['fingerprint']}`", ""]
    lines += ["## Rows", "", "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in stats["rows"].items()]
    lines += [f"| rejected | {stats['rejected_total']} |", ""]
    if "router" in stats:
        lines += [f"Router split: {stats['router']['rows']} rows, {stats['router']['source']}; the expert does not "
                  "train on it and eval asks every routing tier on it, for the triage router to learn from.", ""]
    lines += [
        f"Duplicates removed: {stats['duplicates_removed']}; leakage removed: {stats['leakage_removed']}; "
        f"truncated to data.max_tokens={stats['max_tokens']}: {stats['truncated']} (policy `{stats['max_tokens_policy']}`).",
        "",
        "## Token lengths (base model tokenizer, chat template applied)",
        "",
        "| split | prompt p50 | prompt p95 | prompt max | answer p50 | answer p95 | answer max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in stats["tokens"].items():
        p, a = t["prompt"], t["answer"]
        lines.append(f"| {name} | {p['p50']} | {p['p95']} | {p['max']} | {a['p50']} | {a['p95']} | {a['max']} |")
    lines.append("")
    if stats["pii"]["policy"] != "keep":
        found = stats["pii"]["found"]
        lines += ["## Personal data", "", f"`data.pii: {stats['pii']['policy']}`: "
                  + (", ".join(f"{n} {kind}" for kind, n in found.items()) if found else "none found") + ".", ""]
    taught = stats["teacher"]
    if taught.get("rows"):
        agreement = taught["agreement_with_gold"]
        lines += ["## Teacher", "", f"`{taught['model']}` labelled {taught['labelled']} of {taught['rows']} rows "
                  f"({taught['failed']} failed, {taught['unparsable']} unparsable) for ${taught['cost_usd']:.4f} "
                  f"({taught['cached_answers']} answers from the cache; estimated beforehand: "
                  + ("unknown" if taught["estimated_cost_usd"] is None else f"${taught['estimated_cost_usd']:.4f}") + ")."]
        if taught.get("cost_estimated_answers"):
            lines.append(f"The cost is estimated in part: {taught['cost_estimated_answers']} answers came without "
                         "token usage and are priced from an upper bound of their length.")
        if taught.get("failed_requests", {}).get("count"):
            failed = taught["failed_requests"]
            lines.append(f"{failed['count']} requests brought no answer; each is counted at its upper-bound cost "
                         f"(${failed['cost_usd']:.4f} in all), since the endpoint may have billed it.")
        confidence = taught.get("confidence")
        if confidence and confidence["rows"]:
            lines.append(f"Teacher confidence (probability of its whole answer, from log-probabilities) on "
                         f"{confidence['rows']} rows: mean {confidence['mean']:.3f}; {confidence['below_0.5']:.1%} "
                         f"under 0.5 ({confidence['without_logprobs']} answers came without log-probabilities).")
        if agreement["rows"]:
            low, high = agreement["interval_95"]
            lines.append(f"Agreement with gold on {agreement['rows']} gold rows: {agreement['agreement']:.3f} "
                         f"(Wilson 95% interval {low:.3f}-{high:.3f}).")
        lines.append("")
    splits = list(stats["rows"])
    sources = sorted({p for counts in stats["provenance"].values() for p in counts})
    lines += ["## Label sources", "", "| source | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    lines += [f"| {p} | " + " | ".join(str(stats["provenance"][s].get(p, 0)) for s in splits) + " |" for p in sources]
    lines.append("")
    if "classes" in stats:
        lines += ["## Classes", "", "![rows per class](class_distribution.png)", "", "| class | " + " | ".join(splits) + " |"]
        lines.append("|---" * (len(splits) + 1) + "|")
        labels = sorted({label for counts in stats["classes"].values() for label in counts})
        lines += [f"| {label} | " + " | ".join(str(stats["classes"][s].get(label, 0)) for s in splits) + " |" for label in labels]
        lines.append("")
        for pair, shift in stats.get("label_mix", {}).items():
            if shift["p_value"] is not None:
                lines.append(f"Label mix, {pair.replace('_', ' ')}: total variation {shift['tvd']:.3f}, chi-squared "
                             f"p = {shift['p_value']:.2g}" + (" (**differs**)" if label_mix_differs(shift) else "") + ".")
        lines.append("")
    lines += ["## Rejected rows", ""]
    if not rejected:
        lines += ["None.", ""]
    by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rejected:
        by_reason[r["reason"]].append(r)
    for reason in sorted(by_reason):
        rows = by_reason[reason]
        lines.append(f"- **{reason}**: {len(rows)}; e.g. "
                     + "; ".join(f"{r['source']}:{r['line']} ({r['detail']})" for r in rows[:REPORT_EXAMPLES]))
    if rejected:
        lines += ["", "Every rejected row is listed in `rejected.jsonl`.", ""]
    if truncated:
        lines += ["## Truncated rows", "",
                  f"{len(truncated)} rows had their input cut to fit; all are listed in `truncated.jsonl`.", ""]
    return "\n".join(lines)


def print_stats(stats: dict[str, Any]) -> None:
    table = Table(title="prep: rows and token lengths (prompt / answer, p50 · p95 · max)")
    for col in ("split", "rows", "prompt tokens", "answer tokens"):
        table.add_column(col)
    for split, n in stats["rows"].items():
        t = stats["tokens"][split]
        table.add_row(split, f"{n:,}", _fmt(t["prompt"]), _fmt(t["answer"]))
    table.add_row("rejected", f"{stats['rejected_total']:,}", "", "")
    console.print(table)
    if "router" in stats:
        console.print(f"router split: {stats['router']['rows']:,} rows, {stats['router']['source']}", highlight=False)
    sources = Counter()
    for counts in stats["provenance"].values():
        sources.update(counts)
    if set(sources) != {"gold"}:
        console.print("label sources: " + ", ".join(f"{k}={v:,}" for k, v in sorted(sources.items())))
    if stats["pii"]["found"]:
        console.print(f"personal data ({stats['pii']['policy']}): "
                      + ", ".join(f"{k}={v:,}" for k, v in stats["pii"]["found"].items()))
    for pair, shift in stats.get("label_mix", {}).items():
        if label_mix_differs(shift):
            console.print(f"[yellow]label mix[/]: {pair.replace('_', ' ')} differ (total variation {shift['tvd']:.3f}, "
                          f"chi-squared p={shift['p_value']:.2g}; {moved_labels(shift)}): what is chosen on one may not hold on "
                          "the other", highlight=False)
    if stats["rejected"]:
        console.print("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in stats["rejected"].items()))
    if stats["truncated"]:
        console.print(f"[yellow]truncated[/] {stats['truncated']} rows to data.max_tokens={stats['max_tokens']} "
                      "(see prep/truncated.jsonl)")


def _fmt(p: dict[str, int]) -> str:
    return f"{p['p50']} · {p['p95']} · {p['max']}"


def log_to_mlflow(recipe: Recipe, run: RunDir, stats: dict[str, Any], out: Path, stage: str) -> str:
    """A prep MLflow run: data/task params, row and token metrics, the fingerprint as tag and dataset input."""
    fingerprint = stats["fingerprint"]
    tags = {"expert.recipe": recipe.name, "expert.data_fingerprint": fingerprint}
    with tracking.stage_run(recipe.name, stage, run, tags) as (mlflow_client, mlflow_run_id):
        dump = recipe.model_dump(mode="json", by_alias=True)
        tracking.log_params(mlflow_client, mlflow_run_id, tracking.flatten({"task": dump["task"], "data": dump["data"]}))
        metrics = {f"rows.{s}": n for s, n in stats["rows"].items()}
        metrics |= {f"rejected.{reason}": n for reason, n in stats["rejected"].items()}
        metrics |= {k: stats[k] for k in ("rejected_total", "duplicates_removed", "leakage_removed", "truncated")}
        for part in ("prompt", "answer"):
            metrics |= {f"tokens.{part}.{q}": v for q, v in stats["tokens"]["all"][part].items()}
        tracking.log_metrics(mlflow_client, mlflow_run_id, metrics)
        tracking.log_split_inputs(mlflow_client, mlflow_run_id, recipe, run, list(stats["rows"]))
        for name in ("stats.json", "report.md", "spec.json", "fewshot.json", "rejected.jsonl", "truncated.jsonl",
                     "class_distribution.png"):
            if (out / name).is_file():
                mlflow_client.log_artifact(mlflow_run_id, str(out / name), stage)
    return mlflow_run_id
