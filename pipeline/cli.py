"""The `expert` command line: thin commands that load the recipe and call a stage.

Exit codes: 0 success; 2 bad usage, recipe or data (the message says what to
fix); 1 anything unexpected.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.recipe.schema import Recipe, dump_recipe, load_recipe
from pipeline.run import runner
from pipeline.run.contracts import PushOptions, StageOptions
from pipeline.run.rundir import (
    STAGES,
    RunDir,
    create_run,
    init_run,
    latest_run,
    open_run,
)


def quiet_libraries() -> None:
    """Silence library output a user cannot act on: bitsandbytes' note that an optional hub kernel for 4-bit CPU
    matmuls is not installed (it falls back to its own), transformers' deprecation of a name TRL calls, MLflow's
    type-hint suggestion and its artifact-download progress bar."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's suggestion to type-hint our pyfunc's `predict` (`_texts` validates its input instead) is raised
    # under MLflow's own `simplefilter("once")`, which no filter of ours can override: it is dropped when shown
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "Add type hints to the `predict` method" not in str(message):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


quiet_libraries()

app = typer.Typer(
    help="Fine-tune small open models into narrow experts and prove them against the frontier.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold API keys
    add_completion=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Run directory to use. Default: the latest run of this recipe (prep/run: a new one)."),
]
RunsRootOpt = Annotated[
    Path,
    typer.Option("--runs-root", envvar="EXPERT_RUNS_ROOT", help="Where runs live: <runs-root>/<recipe name>/<run id>/."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set train.epochs=3 (dotted path, YAML value). Repeatable.",
                 show_default=False),
]


# the run-directory locks this command holds: released when the command ends
_HELD: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("held", default=None)


def _guarded(body: Callable[[], Any]) -> Any:
    """Run a command body, turning a UserError into exit code 2 with its message."""
    try:
        with contextlib.ExitStack() as held:
            held.paths = set()  # run directories already held, so a command never waits for itself
            token = _HELD.set(held)
            try:
                return body()
            finally:
                _HELD.reset(token)
    except UserError as err:
        from pipeline.routing.frontier import scrub

        console.print(f"[red]error:[/] {escape(scrub(str(err)))}")
        raise typer.Exit(code=2) from None


def _hold(run: RunDir, command: str) -> RunDir:
    """Lock the run directory for the rest of this command, before anything in it is read or written. Under
    torchrun/accelerate the ranks of one training share it: rank 0 holds it for all of them."""
    held = _HELD.get()
    if held is not None and int(os.environ.get("RANK", "0")) == 0 and run.path.resolve() not in held.paths:
        held.enter_context(run.locked(command))
        held.paths.add(run.path.resolve())
    return run


def _new_run(recipe: Recipe, runs_root: Path) -> RunDir:
    run = create_run(runs_root, recipe.name, dump_recipe(recipe), recipe.recipe_hash())
    console.print(f"new run: [bold]{run.path}[/]")
    return run


def _existing_run(recipe: Recipe, run_dir: Path | None, runs_root: Path, stage: str) -> RunDir:
    """`--run-dir`, or the newest run of the recipe whose stage before `stage` is complete: a newer run whose
    prep failed (or was interrupted) must not hide the completed one."""
    if run_dir is not None:
        run = open_run(run_dir)
    else:
        needs = STAGES[STAGES.index(stage) - 1]
        newest = latest_run(runs_root, recipe.name)
        run = latest_run(runs_root, recipe.name, complete=needs)
        if run is None:
            raise UserError(f"no run of `{recipe.name}` under {runs_root} has a completed {needs} stage; "
                            f"run `expert {needs}` (or `expert run`) first")
        if newest is not None and newest.path != run.path:
            console.print(f"[yellow]note[/]: the newest run {newest.path.name} has no completed {needs}; "
                          f"using the newest that has")
        console.print(f"using run: [bold]{run.path}[/]")
    return _hold(run, stage)


def _open_or_create(recipe: Recipe, run_dir: Path, command: str) -> RunDir:
    if (run_dir / "manifest.json").is_file():
        return _hold(open_run(run_dir), command)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--run-dir {run_dir}: exists, is not empty and is not a run directory; pick another path")
    return init_run(run_dir, recipe.name, dump_recipe(recipe), recipe.recipe_hash())


@app.command()
def validate(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="Print every recipe key: type, default, meaning.")] = False,
    explain: Annotated[str | None, typer.Option(
        "--explain", metavar="KEY", show_default=False,
        help="Explain one key (dotted, e.g. data.split.seed or eval.baselines[0].model): type, default, meaning "
             "and this recipe's value.")] = None,
) -> None:
    """Check a recipe: every problem is listed with its YAML path. --keys / --explain KEY document its keys."""

    def body() -> None:
        from pipeline.recipe import keys_doc

        found = keys_doc.lookup(explain) if explain is not None else None  # unknown: exit 2, closest keys named
        recipe, problem = None, None
        try:
            recipe = load_recipe(recipe_path, overrides or ())
        except UserError as err:  # the docs are printed all the same, then the problems
            if found is None and not keys:
                raise
            problem = err
        out = Console(soft_wrap=True)  # stdout: the docs can be piped; messages stay on stderr
        if keys:
            out.print(keys_doc.terminal_table())
        if found is not None:
            out.print(keys_doc.explain(found, recipe), markup=False, highlight=False)
        if problem is not None:
            raise problem
        console.print(f"[green]ok[/]: {recipe_path} is a valid {recipe.task.type} recipe `{recipe.name}`")

    _guarded(body)


@app.command()
def prep(recipe_path: RecipeArg, run_dir: RunDirOpt = None, runs_root: RunsRootOpt = Path("runs"),
         overrides: SetOpt = None) -> None:
    """Stage 1: load, check, split and render the data (starts a new run unless --run-dir)."""

    def body() -> None:
        recipe = load_recipe(recipe_path, overrides or ())
        run = _hold(_open_or_create(recipe, run_dir, "prep") if run_dir else _new_run(recipe, runs_root), "prep")
        runner.run_stage("prep", recipe, run)

    _guarded(body)


@app.command()
def label(recipe_path: RecipeArg, overrides: SetOpt = None) -> None:
    """Label the rows without a target with data.teacher, under its budget; the answers are cached for prep. Exit 2
    when rows are left unlabelled (failed, or not sent because of the budget), or another run holds the cache."""

    def body() -> None:
        from pipeline import tasks
        from pipeline.stages import prep as prep_stage

        recipe = load_recipe(recipe_path, overrides or ())
        if recipe.data.teacher is None:
            raise UserError(f"{recipe_path}: no data.teacher; name the endpoint that labels rows without a target")
        rejected: list = []
        _, _, _, _, labelled = prep_stage.read_and_label(recipe, tasks.for_type(recipe.task.type), rejected)
        if not labelled["rows"]:
            console.print("label: every row has a target; nothing to label")
        console.print("label: the answers are cached; `expert prep` (or `expert run`) uses them without paying again")

    _guarded(body)


@app.command()
def train(
    recipe_path: RecipeArg,
    run_dir: RunDirOpt = None,
    runs_root: RunsRootOpt = Path("runs"),
    overrides: SetOpt = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--restart",
            help="After an interrupted training: continue from the latest complete checkpoint, or start over.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (examples, tokens, steps, peak memory and time from a short throughput probe); "
            "write nothing.",
        ),
    ] = False,
) -> None:
    """Stage 2: fit the LoRA/QLoRA adapter on the prepared training split."""

    def body() -> None:
        recipe = load_recipe(recipe_path, overrides or ())
        run = _existing_run(recipe, run_dir, runs_root, "train")
        if dry_run:
            runner.stage_module("train")  # library progress bars off and MLflow configured, as for the stage
            from pipeline.training import plan as train_plan

            train_plan.print_plan(recipe, train_plan.plan(recipe, run))
            return
        runner.run_stage("train", recipe, run, StageOptions(resume=resume))

    _guarded(body)


@app.command("eval")
def eval_(recipe_path: RecipeArg, run_dir: RunDirOpt = None, runs_root: RunsRootOpt = Path("runs"),
          overrides: SetOpt = None) -> None:
    """Stage 3: the expert vs the baselines on the test split; writes the verdict."""

    def body() -> None:
        recipe = load_recipe(recipe_path, overrides or ())
        runner.run_stage("eval", recipe, _existing_run(recipe, run_dir, runs_root, "eval"))

    _guarded(body)


ForcePromotionOpt = Annotated[bool, typer.Option("--force", help="Promote to @champion even if the evidence says no.")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why --force was needed (recorded as a tag).")]
IncludeBaseOpt = Annotated[
    bool, typer.Option("--include-base", help="Copy the base model's weights into the version (default: record it).")
]


@app.command()
def push(
    recipe_path: RecipeArg,
    run_dir: RunDirOpt = None,
    runs_root: RunsRootOpt = Path("runs"),
    overrides: SetOpt = None,
    force: ForcePromotionOpt = False,
    reason: ReasonOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen; register nothing.")] = False,
    include_base: IncludeBaseOpt = False,
) -> None:
    """Stage 4: register the expert as @challenger; move @champion only on evidence (or --force)."""

    def body() -> None:
        recipe = load_recipe(recipe_path, overrides or ())
        run = _existing_run(recipe, run_dir, runs_root, "push")
        options = StageOptions(push=PushOptions(force=force, reason=reason, dry_run=dry_run, include_base=include_base))
        runner.run_stage("push", recipe, run, options)

    _guarded(body)


@app.command("run")
def run_all(
    recipe_path: RecipeArg,
    run_dir: RunDirOpt = None,
    runs_root: RunsRootOpt = Path("runs"),
    overrides: SetOpt = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new run even if the latest one matches the recipe.")] = False,
    redo: Annotated[
        list[str] | None, typer.Option("--force", help="Redo this stage (and what depends on it). Repeatable.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say which stages would run and why; run nothing, write nothing.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="After an interrupted training: start over instead of resuming.")
    ] = False,
    promote: Annotated[
        bool, typer.Option("--force-promotion", help="Promote to @champion even if the evidence says no (needs --reason).")
    ] = False,
    reason: ReasonOpt = None,
    include_base: IncludeBaseOpt = False,
) -> None:
    """All stages in order. Resumes the latest run of an unchanged recipe; finished stages are skipped."""

    def body() -> None:
        recipe = load_recipe(recipe_path, overrides or ())
        options = StageOptions(redo=frozenset(redo or ()), resume=not restart,
                               push=PushOptions(force=promote, reason=reason, include_base=include_base))
        runner.check_stages(options.redo, "--force")
        if run_dir is not None:
            run = open_run(run_dir) if (run_dir / "manifest.json").is_file() else None
        else:
            run = None if new else latest_run(runs_root, recipe.name)
            if run is not None and run.read_manifest().get("recipe_hash") != recipe.recipe_hash():
                run = None  # the recipe changed: a new run, so the old one stays as it was
        if dry_run:
            runner.print_plan(runner.plan(recipe, run, options), run)
            return
        if run is None:
            run = _open_or_create(recipe, run_dir, "run") if run_dir is not None else _new_run(recipe, runs_root)
        else:
            console.print(f"resuming run: [bold]{run.path}[/]")
        _hold(run, "run")
        if not runner.run_pipeline(recipe, run, options):
            console.print("[green]nothing to do[/]: every stage is complete and its inputs are unchanged.")
        runner.print_summary(recipe, run)

    _guarded(body)


@app.command("predict")
def predict_cmd(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or any MLflow model URI.")],
    input_path: Annotated[str, typer.Option("--input", help="JSONL file with a `text` field per line, or - for stdin.")],
    escalate: Annotated[
        bool, typer.Option("--escalate/--no-escalate", help="Send rows under the cascade threshold to the frontier.")
    ] = True,
) -> None:
    """Answer texts with a registered expert (JSONL to stdout), escalating unsure rows to the frontier."""

    def body() -> None:
        import sys

        from pipeline.commands import batch_predict

        if input_path == "-":
            rows = list(batch_predict.read_inputs(sys.stdin, "<stdin>"))
        else:
            path = Path(input_path)
            if not path.is_file():
                raise UserError(f"--input {path}: file not found")
            with path.open(encoding="utf-8") as f:
                rows = list(batch_predict.read_inputs(f, str(path)))
        batch_predict.write_jsonl(batch_predict.predict_with_cascade(model_uri, rows, escalate))

    _guarded(body)


def serve(model_uri: str, host: str, port: int, **options: Any) -> None:
    """Serve a registered expert: OpenAI-compatible /v1/chat/completions, /v1/predict, /health, /metrics."""

    def body() -> None:
        from pipeline import serving

        # checks its values (a bad --frontier-down, --max-batch 0: exit 2)
        serving.run(model_uri, host, port, serving.ServeOptions(**options))

    _guarded(body)


def _serve_signature() -> inspect.Signature:
    """`expert serve`'s parameters: the model, where to listen, then one flag per ServeOptions field, with the
    default and help that field declares."""
    from pipeline.serving.options import serve_flags

    params = [
        inspect.Parameter("model_uri", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or any MLflow model URI.")]),
        inspect.Parameter("host", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="127.0.0.1", annotation=Annotated[
            str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to expose it.")]),
        inspect.Parameter("port", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=8000,
                          annotation=Annotated[int, typer.Option(help="Port.")]),
    ]
    for name, (kind, flag, default) in serve_flags().items():
        if typing.get_origin(kind) is typing.Literal:  # a choice: ServeOptions checks it and names the choices
            kind = str
        option = typer.Option(*[flag.decl] if flag.decl else [], help=flag.help)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, option]))
    return inspect.Signature(params, return_annotation=None)


serve.__signature__ = _serve_signature()  # type: ignore[attr-defined]
serve.__annotations__ = {p.name: p.annotation for p in serve.__signature__.parameters.values()}
app.command()(serve)


@app.command("export")
def export_cmd(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or any MLflow model URI.")],
    fmt: Annotated[str, typer.Option("--format", help="`peft` (adapter directory for vLLM --enable-lora) or `merged`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must be empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Write a version as a PEFT adapter directory or a merged safetensors model (for vLLM and other servers)."""

    def body() -> None:
        from pipeline.commands.export import export

        export(model_uri, fmt, out, force)  # type: ignore[arg-type]

    _guarded(body)


@app.command()
def compare(
    refs: Annotated[list[str], typer.Argument(help="Run directories and/or models:/NAME/VERSION, models:/NAME@ALIAS.")],
) -> None:
    """Runs or registered versions side by side: metrics, cost, latency, verdict."""

    def body() -> None:
        from pipeline.commands.compare import compare_table

        Console(soft_wrap=True).print(compare_table(refs))

    _guarded(body)


@app.command()
def audit(
    logs: Annotated[Path, typer.Argument(help="Gateway logs or a Batch API output file (JSONL with model and usage).")],
    prices: Annotated[Path, typer.Option("--prices", help="YAML: MODEL: {input: $/Mtok, output: $/Mtok} per model.")],
    fmt: Annotated[str, typer.Option("--format", help="`gateway` or `openai_batch`.")] = "gateway",
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="A run whose eval finished: the same workload with its expert.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the numbers as JSON here.")] = None,
) -> None:
    """What a logged workload costs today (requests, tokens, cost per 1,000 requests by model), and with the expert."""

    def body() -> None:
        from pipeline.commands import audit as auditing
        from pipeline.files import atomic_write_json

        result = auditing.audit_logs(logs, fmt, auditing.read_prices(prices))
        expert = None
        if run_dir is not None:
            today = auditing.report(result, None)["cost_per_1k"]
            if today is None:
                raise UserError(f"--run-dir: today's cost is unknown (no price for {', '.join(result.unpriced)}); "
                                "add them to --prices")
            expert = auditing.with_expert(today, run_dir)
        doc = auditing.report(result, expert)
        auditing.print_report(doc, result)
        if out is not None:
            atomic_write_json(out, doc)

    _guarded(body)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Open the MLflow UI on the project's store (the local SQLite file unless MLFLOW_TRACKING_URI is set)."""
    import subprocess
    import sys

    from pipeline.run.tracking import configure

    uri = configure()
    if not uri.startswith("sqlite:"):
        console.print(f"MLFLOW_TRACKING_URI points at a server; open {uri} in a browser")
        return
    console.print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it); an experiment's runs: "
                  f"http://{host}:{port}/#/experiments/<id>/runs?workflowType=machine_learning")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


if __name__ == "__main__":
    app()
