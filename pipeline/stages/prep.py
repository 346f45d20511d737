"""Stage 1, prep: load the user's data, reject bad rows loudly, split, render chat prompts.

Outputs (under `prep/`): `train.jsonl`, `validation.jsonl`, `test.jsonl` and,
with `data.split.router` or `data.router_source`, `router.jsonl` (each
row: id, text, target, and the TRL prompt/completion chat messages),
`spec.json` (the label set or JSON Schema), `fewshot.json` (examples drawn from
train for prompted baselines), `rejected.jsonl` (every rejected row with its
source location and reason code), `truncated.jsonl`, `stats.json`,
`report.md`, `record.json` (the base it resolved: training loads that, not
`model.base` resolved again) and, for classification, `class_distribution.png`.

Rows stream from the source and are kept as compact `Example`s (the split and
the duplicate checks need all of them); token lengths are measured in batches
and split files are written row by row, so memory grows with the number of
rows, not with the rendered or tokenised size of the data.

This module is the stage in the order it runs; each step lives in a module of
its own: `readers` (sources into `Example`s), `row_checks` (targets,
duplicates, leakage, limits), `token_count` (`data.max_tokens`), `splitting`
(the seeded split, few-shot draw), `examples` (the rendered rows) and
`prep_report` (fingerprint, stats, report, plot, MLflow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.console import console
from pipeline.data import teacher
from pipeline.data.examples import Example, render
from pipeline.data.readers import load_examples, sources_of, traces_digest
from pipeline.data.row_checks import (
    check_class_counts,
    check_duplicates,
    check_pii,
    check_rejected_fraction,
    check_targets,
    scrub_records,
    spec_of,
)
from pipeline.data.splitting import ROUTER, fewshot_examples, split_examples, split_names
from pipeline.data.token_count import enforce_max_tokens
from pipeline.errors import UserError
from pipeline.files import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    file_hash,
)
from pipeline.inference import models
from pipeline.recipe.schema import TRACES_PREFIX, Recipe
from pipeline.run import contracts
from pipeline.run.contracts import StageOptions
from pipeline.run.rundir import RunDir
from pipeline.stages.prep_report import (
    build_stats,
    data_fingerprint,
    log_to_mlflow,
    plot_class_distribution,
    print_stats,
    render_report,
)

STAGE = "prep"


def outputs_of(recipe: Recipe) -> list[str]:
    names = [f"{s}.jsonl" for s in split_names(recipe)]
    names += ["spec.json", "fewshot.json", "stats.json", "report.md", "rejected.jsonl", "truncated.jsonl", contracts.RECORD]
    if tasks.for_type(recipe.task.type).label_set:
        names.append("class_distribution.png")
    return [f"{STAGE}/{n}" for n in names]


# what prep reads of the recipe (the base for its tokenizer): its input hash covers these keys
RECIPE_KEYS = ("name", "task", "data", "model.base", "model.trust_remote_code")


def inputs_of(recipe: Recipe, run: RunDir | None = None, options: StageOptions = StageOptions()) -> dict[str, str]:
    """The data files (by content) and recipe keys prep reads; `run` and `options` are every stage's signature."""
    inputs = contracts.reads_entry(recipe, RECIPE_KEYS)
    for key, source in sources_of(recipe).items():
        if isinstance(source, str) and source.startswith(TRACES_PREFIX):  # traces arrive: their ids are the content
            inputs[f"data.{key}"] = traces_digest(source[len(TRACES_PREFIX):])
        elif isinstance(source, str):  # hf: a dataset id names its content
            inputs[f"data.{key}"] = source
        elif not source.is_file():
            raise UserError(f"data.{key}: {source} {_not_a_file(source)}; point it at a data file "
                            "(relative paths start at the recipe's folder)")
        else:
            inputs[f"data.{key}"] = file_hash(source)
    if recipe.data.batch_requests is not None:
        if not recipe.data.batch_requests.is_file():
            raise UserError(f"data.batch_requests: {recipe.data.batch_requests} {_not_a_file(recipe.data.batch_requests)}; "
                            "point it at the Batch API input file")
        inputs["data.batch_requests"] = file_hash(recipe.data.batch_requests)
    return inputs


def _not_a_file(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def read_and_label(recipe: Recipe, task, rejected: list[dict[str, Any]]):
    """Every source read, personal data handled, rows without a target labelled by the teacher: what `expert label`
    runs alone, and prep first. Returns the examples, the spec, the baseline system prompt, the PII finds and
    the teacher's summary."""
    examples: list[Example] = []
    for key, source in sources_of(recipe).items():
        console.print(f"[bold]prep[/]: reading data.{key} {source}")
        before = len(rejected)
        loaded = load_examples(recipe, task, key, source, rejected)
        console.print(f"  {len(loaded):,} rows read, {len(rejected) - before:,} unreadable or incomplete", highlight=False)
        examples += loaded
    if not examples and not rejected:
        raise UserError(f"data: {', '.join(map(str, sources_of(recipe).values()))} holds no rows; check data.source")
    examples, pii_found = check_pii(examples, rejected, recipe)  # before anything is written, logged or sent
    spec = spec_of(recipe, [e for e in examples if e.provenance != "unlabeled"])
    baseline_system = task.system_prompt(recipe.task.instruction, spec)
    examples, labelled = teacher.label(examples, rejected, recipe, task, spec, baseline_system)
    return examples, spec, baseline_system, pii_found, labelled


def run(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, Any]:
    inputs = inputs_of(recipe)
    if contracts.why_stale(run, STAGE, recipe, lambda: inputs, options) is None:
        console.print(f"[green]prep[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs, recipe, RECIPE_KEYS):
        task = tasks.for_type(recipe.task.type)
        out = run.stage_dir(STAGE)
        rejected: list[dict[str, Any]] = []
        examples, spec, baseline_system, pii_found, labelled = read_and_label(recipe, task, rejected)
        examples = check_targets(examples, rejected, task, spec)
        examples = check_duplicates(examples, rejected, task, spec)
        source, base = models.resolve_base(recipe.model.base)  # once: later stages read it from prep/record.json
        tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
        system = baseline_system if recipe.task.spec_in_expert_prompt else recipe.task.instruction
        console.print(f"[bold]prep[/]: measuring {len(examples):,} rows with the base model's tokenizer")
        examples, truncated = enforce_max_tokens(examples, rejected, tokenizer, system, task, spec, recipe)
        rejected.sort(key=lambda r: (r["source"], r["line"]))
        # every detail quotes what its producer saw (a line, a label, the teacher's answer): scrubbed of secrets and
        # personal data here, before the files, the report and MLflow get them
        rejected, truncated = scrub_records(rejected, recipe), scrub_records(truncated, recipe)
        atomic_write_jsonl(out / "rejected.jsonl", rejected)
        atomic_write_jsonl(out / "truncated.jsonl", truncated)
        total = len(examples) + len(rejected)
        check_rejected_fraction(rejected, total, recipe.data.max_rejected_fraction, out / "rejected.jsonl")
        check_class_counts(examples, recipe, spec)
        splits = split_examples(examples, recipe)
        for name, rows in splits.items():
            if not rows:
                raise UserError(f"data.split: the {name} split is empty ({len(examples)} usable rows); "
                                "add data or change the split fractions")
        for name, rows in splits.items():
            atomic_write_jsonl(out / f"{name}.jsonl", (render(e, system, task, spec) for e in rows))
        if ROUTER not in splits:  # a router split an earlier prep wrote is no split of this recipe's
            (out / f"{ROUTER}.jsonl").unlink(missing_ok=True)
        atomic_write_json(out / "spec.json", {"task": recipe.task.type, "spec": spec, "system_prompt": system,
                                               "baseline_system_prompt": baseline_system})
        atomic_write_json(out / "fewshot.json", fewshot_examples(splits["train"], recipe, task, spec))
        fingerprint = data_fingerprint(recipe, [out / f"{s}.jsonl" for s in splits])
        stats = build_stats(splits, rejected, truncated, recipe, fingerprint, pii_found, labelled)
        atomic_write_json(out / "stats.json", stats)
        if task.label_set:
            plot_class_distribution(stats["classes"], out / "class_distribution.png")
        atomic_write_text(out / "report.md", render_report(recipe, stats, rejected, truncated))
        print_stats(stats)
        contracts.write_record(out / contracts.RECORD, contracts.PrepRecord(base=base))
        mlflow_run_id = log_to_mlflow(recipe, run, stats, out, STAGE)
        run.finish_stage(STAGE, outputs_of(recipe), fingerprint=fingerprint, mlflow_run_id=mlflow_run_id)
    return run.stage_record(STAGE)
