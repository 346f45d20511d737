"""Eval's report: plots, `report.md`, and the summary table printed at the end of eval and of `expert run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from pipeline import tasks
from pipeline.console import console
from pipeline.evaluation import plots, stats
from pipeline.evaluation.evidence import stand_in_note, system_label
from pipeline.recipe.schema import Recipe
from pipeline.run.stage_documents import VerdictDocument


def write_plots(folder: Path, recipe: Recipe, spec, golds, outputs, calibration, cascade, metrics, route) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    task = tasks.for_type(recipe.task.type)
    task.write_plots(folder, golds, {name: [r["prediction"] for r in by_split["test"]] for name, by_split in outputs.items()},
                     spec)
    plots.reliability_diagram(folder / "reliability_expert.png", calibration, "expert reliability")
    if cascade["curve"]:
        name, metric = cascade["frontier"], task.gate_metric(cascade["target_metric"])
        frontier_point = {"metric": stats.metric_value(metric, golds, [r["prediction"] for r in outputs[name]["test"]], spec),
                          "cost_per_1k": metrics[name]["cost_per_1k"]}
        expert_point = {"metric": stats.metric_value(metric, golds, [r["prediction"] for r in outputs["expert"]["test"]],
                                                     spec),
                        "cost_per_1k": metrics["expert"]["cost_per_1k"]}
        plots.cascade_plot(folder / "cascade.png", cascade["curve"], expert_point, frontier_point, cascade.get("test"),
                           metric.name, cascade["target"])
    if route.get("test_grid"):
        plots.route_plot(folder / "route.png", route)


def _quality_columns(metrics: dict[str, Any]) -> list[str]:
    first = next(iter(metrics.values()))
    return [k for k in ("accuracy", "macro_f1", "valid_json_rate", "field_exact_match", "micro_f1", "exact_match")
            if k in first]


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render_report(recipe: Recipe, metrics, skipped, comparisons, calibration, cascade, verdict, n_test: int,
                  route) -> str:
    cols = _quality_columns(metrics)
    decision = {"replace": "REPLACE the frontier with the expert", "cascade": "CASCADE: expert first, frontier when unsure",
                "keep_frontier": "KEEP the frontier",
                "route": "ROUTE across tiers: " + " -> ".join(route.get("chain") or []),
                "incomplete": "NONE: the comparison is incomplete (a baseline did not answer)"}[verdict["decision"]]
    note = VerdictDocument.model_validate(verdict).no_frontier_note()
    decision += f" ({note})" if note else ""
    lines = [
        f"# Evaluation: {recipe.name}",
        "",
        f"Test examples: {n_test}. Gate: `{verdict['metric']}`, at most {verdict['max_drop_vs_best_baseline']} "
        f"below the best baseline. **Gate: {'PASS' if verdict['passed'] else 'FAIL'}. Decision: {decision}.**",
        "",
        "| system | " + " | ".join(cols)
        + " | cost / 1k requests ($) | latency p50 (ms) | latency p95 (ms) | errors | unparsed |",
        "|---" * (len(cols) + 6) + "|",
    ]
    for name, m in metrics.items():
        quality = " | ".join(f"{m[c]:.4f}" for c in cols)
        lines.append(
            f"| {system_label(name, m)} | {quality} | {_fmt(m['cost_per_1k'], '.4f')} | "
            f"{_fmt(m['latency_ms_p50'], '.1f')} | {_fmt(m['latency_ms_p95'], '.1f')} | {m['errors']} | {m['unparsed']} |"
        )
    lines += ["", *(f"- {stand_in_note(n, m['stand_in'])}" for n, m in metrics.items() if m.get("stand_in"))]
    with_fields = {n: m for n, m in metrics.items() if "field_f1" in m}
    if with_fields:
        lines += ["", "## Fields (exact match per example; precision / recall / F1 over leaf values, micro-averaged)",
                  "", "| system | field | exact | precision | recall | F1 | gold values |", "|---|---|---|---|---|---|---|"]
        for name, m in with_fields.items():
            for field, prf in m["field_f1"].items():
                lines.append(f"| {name} | {field} | {m['per_field'][field]:.4f} | {prf['precision']:.4f} | "
                             f"{prf['recall']:.4f} | {prf['f1']:.4f} | {prf['support']} |")
    if comparisons:
        lines += ["", f"## Expert vs each baseline ({verdict['metric']}, paired bootstrap, {recipe.eval.bootstrap_samples} "
                  "resamples)", "",
                  "| baseline | expert - baseline | 95% CI | expert-only correct | baseline-only correct | McNemar exact p |",
                  "|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            mc = c["mcnemar"]
            lines.append(f"| {name} | {c['difference']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | "
                         f"{mc['expert_only_correct']} | {mc['baseline_only_correct']} | {mc['p_value']:.3g} |")
    api = {n: m for n, m in metrics.items() if "api_calls" in m}
    if api:
        lines += ["", "## API usage", "", "| baseline | calls made | cache hits | retries | input tokens | output tokens |",
                  "|---|---|---|---|---|---|"]
        for name, m in api.items():
            lines.append(f"| {name} | {m['api_calls']} | {m['cache_hits']} | {m['retries']} | {m['input_tokens']} | "
                         f"{m['output_tokens']} |")
    lines += ["", "## Calibration of the expert", "",
              f"Expected calibration error: {calibration['ece']:.4f} (10 equal-width bins). "
              "![reliability](plots/reliability_expert.png)"]
    lines += ["", "## Cascade", ""]
    if cascade["threshold"] is not None:
        v, t = cascade["validation"], cascade["test"]
        lines += [
            f"Escalate to `{cascade['frontier']}` when the expert's confidence is below **{cascade['threshold']:.4f}** "
            f"(the cheapest threshold meeting {cascade['target_metric']} >= {cascade['target']} on validation: "
            f"{v['metric']:.4f}, {v['escalation_rate']:.1%} escalated).",
            f"On test: {cascade['target_metric']} {t['metric']:.4f}, {t['escalation_rate']:.1%} escalated, "
            f"cost / 1k requests {_fmt(t['cost_per_1k'], '.4f')}.",
        ]
    else:
        lines.append(f"No threshold: {cascade['reason']}.")
    if cascade["curve"]:
        lines += ["", "![cascade](plots/cascade.png)", "", "| threshold | escalated (test) | "
                  f"{cascade['target_metric']} (test) | cost / 1k (test) |", "|---|---|---|---|"]
        step = max(1, len(cascade["curve"]) // 12)
        for p in cascade["curve"][::step]:
            lines.append(f"| {p['threshold']:.4f} | {p['escalation_rate']:.1%} | {p['metric']:.4f} | "
                         f"{_fmt(p['cost_per_1k'], '.4f')} |")
    if recipe.eval.routing is not None:
        lines += ["", "## Routing across tiers", ""] + route_lines(route)
    if route.get("triage") and recipe.eval.routing is not None and recipe.eval.routing.triage is not None:
        lines += ["", "## Triage", ""] + triage_lines(route)
    lines += tasks.for_type(recipe.task.type).report_lines(metrics)
    lines += ["", "## Verdict", ""] + [f"- {r}" for r in verdict["reasons"]]
    unparsed = {n: m["unparsed_ids"] for n, m in metrics.items() if m["unparsed_ids"]}
    if unparsed:
        lines += ["", "## Unparsable answers and failed calls (counted as wrong)", ""]
        for n, ids in unparsed.items():
            lines.append(f"- `{n}`: {len(ids)}: " + ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else ""))
    if skipped:
        lines += ["", "## Skipped baselines", ""] + [f"- `{n}`: {why}" for n, why in skipped.items()]
    lines += [
        "",
        "Local systems' cost is measured machine time per request at `eval.expert_cost_per_hour` "
        f"(${recipe.eval.expert_cost_per_hour}/h); latency of local systems is per example within a batch of "
        f"{recipe.eval.batch_size}. API latency is per call (cached answers keep the latency of the call that made "
        "them). Unparsable answers and failed calls count as wrong.",
        "",
    ]
    return "\n".join(lines)


PARETO_ROWS = 15  # rows of the test Pareto front shown in report.md


def route_lines(route: dict[str, Any]) -> list[str]:
    """report.md's routing section: the chain, the choice and how it was made, the test result against the last
    tier alone, how often the target holds on resamples, the label mix warning, and the Pareto front on test."""
    if route.get("target") is None or not route.get("options"):
        return [f"No route: {route['reason']}."]
    chain, last = route["chain"], route["chain"][-1]
    lines = [f"Chain (cheapest first): {' -> '.join(f'`{n}`' for n in chain)}. Target: {route['target_rule']}, "
             f"chosen on validation, checked on test. Search: {route['search']}.",
             "", "Confidence per tier: " + "; ".join(f"`{n}`: {src}" for n, src in route["confidence"].items()) + ".",
             "", f"| choice | thresholds | split | {route['target_metric']} (95% CI) | target held on resamples | "
             f"cost / 1k | latency p50 / p95 (ms) | shares | cost saving vs `{last}` alone (95% CI) | "
             f"quality vs `{last}` alone (95% CI) |", "|---" * 10 + "|"]
    for how, option in route["options"].items():
        for split in ("validation", "test"):
            m = option[split]
            vs = m["vs_last_tier"]
            saving = ("n/a" if vs["cost_saving"] is None else
                      f"{vs['cost_saving']:.1%} ({vs['cost_saving_interval_95'][0]:.1%} to "
                      f"{vs['cost_saving_interval_95'][1]:.1%})")
            q = vs["quality_difference"]
            lines.append(
                f"| {how}{' (the route)' if how == route['choose'] else ''} | "
                + ", ".join(f"{t:.6g}" for t in option["thresholds"]) + f" | {split} | {m['metric']:.4f} "
                f"({m['metric_interval_95'][0]:.4f} to {m['metric_interval_95'][1]:.4f}) | "
                f"{m['target_held_on_resamples']:.0%} | {m['cost_per_1k']:.4f} | {m['latency_ms_p50']:.1f} / "
                f"{m['latency_ms_p95']:.1f} | " + ", ".join(f"{n} {s:.1%}" for n, s in m["shares"].items()) +
                f" | {saving} | {q['difference']:+.4f} ({q['ci_low']:+.4f} to {q['ci_high']:+.4f}) |")
    lines += [f"\n`{how}`: {why}." for how, why in (route.get("unmet") or {}).items()]
    if route.get("thresholds") is None:
        lines += ["", f"No route: {route['reason']}."]
    elif route["holds_on_test"]:
        lines += ["", f"The `{route['choose']}` choice meets the target on test: the route holds."]
    else:
        lines += ["", f"**The `{route['choose']}` choice misses the target on test by {route['missed_by']:.4f}**: "
                  "the thresholds chosen on validation do not hold, so the decision is not a route."]
    mix = route.get("label_mix")
    if mix and mix.get("p_value") is not None:
        lines += ["", f"Label mix, validation vs test: total variation {mix['tvd']:.3f}, chi-squared p = "
                  f"{mix['p_value']:.2g} (most moved: {stats.moved_labels(mix)})."]
    front = route["test_front"]
    step = max(1, len(front) // PARETO_ROWS)
    lines += ["", "![route](plots/route.png)", "", f"Pareto front on test ({len(route['test_grid']):,} threshold "
              f"combinations evaluated, {len(front)} on the front" + (f", every {step}th shown" if step > 1 else "") +
              "; all of them are in route.json):", "",
              f"| thresholds | {route['target_metric']} | cost / 1k | shares |", "|---|---|---|---|"]
    for p in front[::step]:
        lines.append("| " + ", ".join(f"{t:.6g}" for t in p["thresholds"]) + f" | {p['metric']:.4f} | "
                     f"{p['cost_per_1k']:.4f} | " + ", ".join(f"{s:.1%}" for s in p["shares"]) + " |")
    lines += ["", "Each tier alone on test: " + "; ".join(
        f"`{n}` {s['metric']:.4f} at {s['cost_per_1k']:.4f} / 1k" for n, s in route["singles"].items()) + "."]
    return lines


ROUTING_NAMES = {"confidence_only": "confidence only", "triage_only": "triage only",
                 "triage_then_confidence": "triage then confidence"}


def triage_lines(route: dict[str, Any]) -> list[str]:
    """report.md's triage section: what the routers learned from, the three routings side by side on validation
    and test, each router's own quality on test, and whether triage was kept and why."""
    compared = route["triage"]
    if "routers" not in compared:
        return [f"No triage: {compared['reason']}."]
    last = route["chain"][-1]
    lines = [f"Routers learn from {compared['source']}: whether {compared['outcome']} "
             f"({compared['expert_wrong_on_router']} such rows). A request starts at the highest tier whose cut-off "
             "the router's score reaches; a tier it skips costs nothing and adds no time.", "",
             f"| routing | router | cut-offs | thresholds | split | {route['target_metric']} (95% CI) | cost / 1k | "
             f"latency p50 / p95 (ms) | starts | answers | cost saving vs `{last}` alone (95% CI) | "
             f"quality vs `{last}` alone (95% CI) |", "|---" * 12 + "|"]
    rows = [("confidence_only", "", compared["confidence_only"])]
    rows += [(how, kind, r) for kind, entry in compared["routers"].items() for how, r in entry.get("routings", {}).items()]
    for how, kind, option in rows:
        if option is None or "reason" in option:
            reason = "no route reached the target" if option is None else option["reason"]
            lines.append(f"| {ROUTING_NAMES[how]} | {kind} | | | | {reason} |" + " |" * 6)
            continue
        for split in ("validation", "test"):
            m = option[split]
            vs = m["vs_last_tier"]
            saving = ("n/a" if vs["cost_saving"] is None else f"{vs['cost_saving']:.1%} "
                      f"({vs['cost_saving_interval_95'][0]:.1%} to {vs['cost_saving_interval_95'][1]:.1%})")
            q = vs["quality_difference"]
            lines.append(
                f"| {ROUTING_NAMES[how]} | {kind} | " + ", ".join(f"{c:.4g}" for c in option.get("cutoffs", [])) +
                " | " + ", ".join(f"{t:.4g}" for t in option["thresholds"]) +
                f" | {split} | {m['metric']:.4f} ({m['metric_interval_95'][0]:.4f} to {m['metric_interval_95'][1]:.4f})"
                f" | {m['cost_per_1k']:.4f} | {m['latency_ms_p50']:.1f} / {m['latency_ms_p95']:.1f} | "
                + ", ".join(f"{n} {s:.1%}" for n, s in m.get("starts", {route['chain'][0]: 1.0}).items()) + " | "
                + ", ".join(f"{n} {s:.1%}" for n, s in m["shares"].items()) +
                f" | {saving} | {q['difference']:+.4f} ({q['ci_low']:+.4f} to {q['ci_high']:+.4f}) |")
    lines += ["", "Each router on its own, on test (`caught`: of the requests the expert gets wrong, the share it "
              "sends up; `needless`: of those it sends up, the share the expert gets right), with triage then "
              "confidence's cut-offs:", "",
              "| router | runs | ms / request | ROC AUC, router split (5-fold) | ROC AUC, test | caught | needless |",
              "|---|---|---|---|---|---|---|"]
    for kind, entry in compared["routers"].items():
        if "routings" not in entry:
            lines.append(f"| {kind} | not trained: {entry['reason']} | | | | | |")
            continue
        quality = entry["routings"]["triage_then_confidence"].get("router_on_test")
        auc = entry["test_roc_auc"]
        lines.append(f"| {kind} | {entry['runs']} | {entry['ms_per_request']:.2f} | "
                     f"{entry['training']['cv_roc_auc']:.3f} | {_fmt(auc, '.3f')} | "
                     + (f"{quality['caught']:.1%} | {quality['needless']:.1%} |" if quality else "n/a | n/a |"))
    lines += ["", f"The expert's own confidence ranks its wrong test answers at ROC AUC "
              f"{_fmt(compared['expert_confidence_test_roc_auc'], '.3f')}.", "",
              ("**Triage kept**: " if compared["kept"] else "**Triage not kept**: ") + compared["why"] + "."]
    return lines


def summary_table(metrics: dict[str, Any], skipped: dict[str, str], gate_metric: str) -> Table:
    cols = _quality_columns(metrics)
    table = Table(title=f"expert vs baselines (gate metric: {gate_metric})")
    for c in ["system", *cols, "cost / 1k req ($)", "latency p50 (ms)", "latency p95 (ms)"]:
        table.add_column(c, justify="left" if c == "system" else "right")
    for name, m in sorted(metrics.items(), key=lambda kv: kv[0] != "expert"):
        table.add_row(escape(system_label(name, m)), *(f"{m[c]:.3f}" for c in cols), _fmt(m["cost_per_1k"], ".4f"),
                      _fmt(m.get("latency_ms_p50"), ".1f"), _fmt(m.get("latency_ms_p95"), ".1f"))
    for name in skipped:
        table.add_row(name, *("skipped" for _ in cols), "", "", "")
    captions = [stand_in_note(n, m["stand_in"]) for n, m in metrics.items() if m.get("stand_in")]
    if skipped:
        captions.append("skipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()))
    table.caption = escape("\n".join(captions)) if captions else None
    return table


def route_summary(route: dict[str, Any], metrics: dict[str, Any]) -> str | None:
    """The route in one line, as `expert run` ends with it: each tier's share of the test requests, the route's
    quality against its target, its cost per 1,000 against the last tier alone and the saving with its paired
    bootstrap 95% interval; tiers that were recorded stand-ins are named. None without `eval.routing`."""
    chain = route.get("chain")
    if not chain:
        return None
    stand_ins = [f"`{n}`" for n in chain if (metrics.get(n) or {}).get("stand_in")]
    labelled = f" ({', '.join(stand_ins)}: recorded stand-in{'s' if len(stand_ins) > 1 else ''})" if stand_ins else ""
    if route.get("thresholds") is None:
        return f"route {' -> '.join(chain)}{labelled}: none ({route['reason']})"
    test, last = route["options"][route["choose"]]["test"], chain[-1]
    vs = test["vs_last_tier"]
    saving = ("n/a (the last tier has no cost)" if vs["cost_saving"] is None else
              f"{vs['cost_saving']:.1%} (95% CI {vs['cost_saving_interval_95'][0]:.1%} to "
              f"{vs['cost_saving_interval_95'][1]:.1%})")
    return (f"route {' -> '.join(chain)}{labelled} on test: " +
            ", ".join(f"{n} {share:.1%}" for n, share in test["shares"].items()) +
            f"; {route['target_metric']} {test['metric']:.4f} (target {route['target']:.4f}, " +
            ("met" if test["meets_target"] else "missed") + f"); cost / 1k ${test['cost_per_1k']:.4f} vs "
            f"${vs['last_tier_cost_per_1k']:.4f} for `{last}` alone; saving {saving}" + triage_summary(route))


def triage_summary(route: dict[str, Any]) -> str:
    """The route line's triage part: where the kept router started the test requests, or why triage was not kept."""
    compared = route.get("triage")
    if not compared:
        return ""
    if not compared.get("kept"):
        return f"; triage not kept: {compared.get('why') or compared.get('reason')}"
    starts = route["options"][route["choose"]]["test"]["starts"]
    return (f"; triage (`{route['triage_route']['router']}` router) started requests at " +
            ", ".join(f"{n} {share:.1%}" for n, share in starts.items()))


def print_summary(metrics, skipped, verdict, gate_metric: str, route: dict[str, Any]) -> None:
    console.print(summary_table(metrics, skipped, gate_metric))
    line = route_summary(route, metrics)
    if line:
        console.print(escape(line))
    word = "[green]PASS[/]" if verdict["passed"] else "[red]FAIL[/]"
    decision = VerdictDocument.model_validate(verdict).decision_text()
    console.print(f"gate: {word}; decision: [bold]{escape(decision)}[/] - " + escape("; ".join(verdict["reasons"])))
