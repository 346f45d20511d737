"""The `expert` command line: thin commands that load the recipe and call a stage.

Exit codes: 0 success; 2 bad usage, recipe or data (the message says what to
fix); 1 anything unexpected.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import UserError
from pipeline.ui import console
from pipeline.recipe import Recipe, dump_recipe, load_recipe
from pipeline.rundir import RECIPE_FILE, STAGES, RunDir, atomic_write_text, create_run, init_run, latest_run, open_run

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
        from pipeline.frontier import scrub

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


def _sync_recipe(run: RunDir, recipe: Recipe) -> None:
    """The run directory always holds the recipe its latest stage ran with."""
    atomic_write_text(run.path / RECIPE_FILE, dump_recipe(recipe))
    manifest = run.read_manifest()
    manifest["recipe_hash"] = recipe.recipe_hash()
    run.write_manifest(manifest)


def _new_run(recipe: Recipe, runs_root: Path) -> RunDir:
    run = create_run(runs_root, recipe.name, dump_recipe(recipe), recipe.recipe_hash())
    console.print(f"new run: [bold]{run.path}[/]")
    return run


def _existing_run(recipe: Recipe, run_dir: Path | None, runs_root: Path, stage: str, sync: bool = True) -> RunDir:
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
    _hold(run, stage)
    if sync:
        _sync_recipe(run, recipe)
    return run


def _open_or_create(recipe: Recipe, run_dir: Path, command: str) -> RunDir:
    if (run_dir / "manifest.json").is_file():
        run = _hold(open_run(run_dir), command)
        _sync_recipe(run, recipe)
        return run
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--run-dir {run_dir}: exists, is not empty and is not a run directory; pick another path")
    return init_run(run_dir, recipe.name, dump_recipe(recipe), recipe.recipe_hash())


def _stage_module(stage: str):
    import importlib

    import datasets
    from transformers.utils import logging as hf_logging

    from pipeline import tracking

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    datasets.disable_progress_bars()
    tracking.configure()
    return importlib.import_module({"eval": "pipeline.evaluate"}.get(stage, f"pipeline.{stage}"))


@app.command()
def validate(recipe_path: RecipeArg) -> None:
    """Check a recipe: every problem is listed with its YAML path."""

    def body() -> None:
        recipe = load_recipe(recipe_path)
        console.print(f"[green]ok[/]: {recipe_path} is a valid {recipe.task.type} recipe `{recipe.name}`")

    _guarded(body)


@app.command()
def prep(recipe_path: RecipeArg, run_dir: RunDirOpt = None, runs_root: RunsRootOpt = Path("runs")) -> None:
    """Stage 1: load, check, split and render the data (starts a new run unless --run-dir)."""

    def body() -> None:
        recipe = load_recipe(recipe_path)
        run = _hold(_open_or_create(recipe, run_dir, "prep") if run_dir else _new_run(recipe, runs_root), "prep")
        _stage_module("prep").run(recipe, run)

    _guarded(body)


def _later_stage(stage: str, recipe_path: Path, run_dir: Path | None, runs_root: Path) -> None:
    def body() -> None:
        recipe = load_recipe(recipe_path)
        run = _existing_run(recipe, run_dir, runs_root, stage)
        _stage_module(stage).run(recipe, run)

    _guarded(body)


@app.command()
def train(
    recipe_path: RecipeArg,
    run_dir: RunDirOpt = None,
    runs_root: RunsRootOpt = Path("runs"),
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
        recipe = load_recipe(recipe_path)
        run = _existing_run(recipe, run_dir, runs_root, "train", sync=not dry_run)
        train_stage = _stage_module("train")
        if dry_run:
            train_stage.print_plan(recipe, train_stage.plan(recipe, run))
            return
        train_stage.run(recipe, run, resume=resume)

    _guarded(body)


@app.command("eval")
def eval_(recipe_path: RecipeArg, run_dir: RunDirOpt = None, runs_root: RunsRootOpt = Path("runs")) -> None:
    """Stage 3: the expert vs the baselines on the test split; writes the verdict."""
    _later_stage("eval", recipe_path, run_dir, runs_root)


@app.command()
def push(
    recipe_path: RecipeArg,
    run_dir: RunDirOpt = None,
    runs_root: RunsRootOpt = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Promote to @champion even if the evidence says no.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why --force was needed (recorded as a tag).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen; register nothing.")] = False,
    include_base: Annotated[
        bool, typer.Option("--include-base", help="Copy the base model's weights into the version (default: record it).")
    ] = False,
) -> None:
    """Stage 4: register the expert as @challenger; move @champion only on evidence (or --force)."""

    def body() -> None:
        from pipeline.push import PushOptions

        recipe = load_recipe(recipe_path)
        run = _existing_run(recipe, run_dir, runs_root, "push")
        options = PushOptions(force=force, reason=reason, dry_run=dry_run, include_base=include_base)
        _stage_module("push").run(recipe, run, options)

    _guarded(body)


@app.command("run")
def run_all(
    recipe_path: RecipeArg,
    run_dir: RunDirOpt = None,
    runs_root: RunsRootOpt = Path("runs"),
    new: Annotated[bool, typer.Option("--new", help="Start a new run even if the latest one matches the recipe.")] = False,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Redo this stage (and what depends on it). Repeatable.")
    ] = None,
) -> None:
    """All stages in order. Resumes the latest run of an unchanged recipe; finished stages are skipped."""

    def body() -> None:
        recipe = load_recipe(recipe_path)
        for stage in force or []:
            if stage not in STAGES:
                raise UserError(f"--force {stage}: unknown stage; use one of {', '.join(STAGES)}")
        if run_dir is not None:
            run = _open_or_create(recipe, run_dir, "run")
        else:
            run = None if new else latest_run(runs_root, recipe.name)
            if run is not None and run.read_manifest().get("recipe_hash") == recipe.recipe_hash():
                console.print(f"resuming run: [bold]{run.path}[/]")
            else:
                run = _new_run(recipe, runs_root)
        _hold(run, "run")
        _mark_forced(run, force or [])
        before = {s: run.stage_record(s).get("ended") for s in STAGES}
        for stage in STAGES:
            _stage_module(stage).run(recipe, run)
        redone = [s for s in STAGES if run.stage_record(s).get("ended") != before[s]]
        if not redone:
            console.print("[green]nothing to do[/]: every stage is complete and its inputs are unchanged.")
        _print_final_summary(recipe, run)

    _guarded(body)


def _mark_forced(run: RunDir, stages: list[str]) -> None:
    if not stages:
        return
    manifest = run.read_manifest()
    for stage in stages:
        if stage in manifest["stages"]:
            manifest["stages"][stage]["status"] = "forced"
    run.write_manifest(manifest)


def _print_final_summary(recipe: Recipe, run: RunDir) -> None:
    from pipeline.evaluate import summary_table
    from pipeline.tracking import configure

    metrics = json.loads((run.path / "eval/metrics.json").read_text(encoding="utf-8"))
    verdict = json.loads((run.path / "eval/verdict.json").read_text(encoding="utf-8"))
    registered = json.loads((run.path / "push/registered.json").read_text(encoding="utf-8"))
    out = Console(soft_wrap=True)
    out.print(summary_table(metrics["systems"], metrics["skipped"], recipe.eval.gate.metric))
    out.print(
        f"verdict: {'PASS' if verdict['passed'] else 'FAIL'}; registered {registered['model_name']} "
        f"v{registered['version']} as {', '.join('@' + a for a in registered['aliases'])}"
    )
    out.print(f"run directory: {run.path}  (report: {run.path / 'eval/report.md'})")
    uri = configure()
    if uri.startswith("sqlite:"):
        out.print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        out.print(f"MLflow UI: {uri}")


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

        from pipeline import registry

        if input_path == "-":
            rows = list(registry.read_inputs(sys.stdin, "<stdin>"))
        else:
            path = Path(input_path)
            if not path.is_file():
                raise UserError(f"--input {path}: file not found")
            with path.open(encoding="utf-8") as f:
                rows = list(registry.read_inputs(f, str(path)))
        registry.write_jsonl(registry.predict_with_cascade(model_uri, rows, escalate))

    _guarded(body)


@app.command()
def serve(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or any MLflow model URI.")],
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    escalate: Annotated[
        bool, typer.Option("--escalate/--no-escalate", help="Send answers under the cascade threshold to the frontier.")
    ] = True,
    frontier_down: Annotated[
        str, typer.Option("--frontier-down", help="When the frontier fails: `flag` (the expert's answer, flagged) or `502`.")
    ] = "flag",
    max_batch: Annotated[int, typer.Option(help="Most requests answered in one model call.")] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="After the first queued request, wait this long for more (0: batch what queued meanwhile).")
    ] = 0.0,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 64 * 1024,
    max_input_tokens: Annotated[
        int | None, typer.Option(help="Longer input texts get 413. Default: the recipe's data.max_tokens.")
    ] = None,
    frontier_retries: Annotated[int, typer.Option(help="Retries per escalated request.")] = 1,
    frontier_timeout: Annotated[float, typer.Option(help="Seconds per frontier attempt.")] = 10.0,
    merge: Annotated[
        bool, typer.Option("--merge/--no-merge", help="Fold the adapter into the base weights at load (faster).")
    ] = True,
    pack: Annotated[
        bool, typer.Option("--pack/--no-pack", help="Keep merged bf16 weights in oneDNN's layout (same answers, faster).")
    ] = True,
    lean_forward: Annotated[
        bool, typer.Option("--lean-forward/--no-lean-forward",
                           help="Score labels with a leaner Llama forward pass, q/k/v and gate/up fused (same answers, faster).")
    ] = True,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the model (default: one per core; 1 helps on a busy machine).")
    ] = None,
) -> None:
    """Serve a registered expert: OpenAI-compatible /v1/chat/completions, /v1/predict, /health, /metrics."""

    def body() -> None:
        from pipeline import serve as serving

        if frontier_down not in ("flag", "502"):
            raise UserError(f"--frontier-down {frontier_down}: use `flag` or `502`")
        options = serving.ServeOptions(
            escalate=escalate, frontier_down=frontier_down, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
            max_body_bytes=max_body_bytes, max_input_tokens=max_input_tokens, frontier_retries=frontier_retries,
            frontier_timeout_s=frontier_timeout, merge=merge, pack=pack, lean_forward=lean_forward, threads=threads,
        )
        serving.run(model_uri, host, port, options)

    _guarded(body)


@app.command("export")
def export_cmd(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or any MLflow model URI.")],
    fmt: Annotated[str, typer.Option("--format", help="`peft` (adapter directory for vLLM --enable-lora) or `merged`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must be empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Write a version as a PEFT adapter directory or a merged safetensors model (for vLLM and other servers)."""

    def body() -> None:
        from pipeline.export import export

        export(model_uri, fmt, out, force)  # type: ignore[arg-type]

    _guarded(body)


@app.command()
def compare(
    refs: Annotated[list[str], typer.Argument(help="Run directories and/or models:/NAME/VERSION, models:/NAME@ALIAS.")],
) -> None:
    """Runs or registered versions side by side: metrics, cost, latency, verdict."""

    def body() -> None:
        from pipeline import registry

        Console(soft_wrap=True).print(registry.compare_table(refs))

    _guarded(body)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Open the MLflow UI on the project's store (the local SQLite file unless MLFLOW_TRACKING_URI is set)."""
    import subprocess
    import sys

    from pipeline.tracking import configure

    uri = configure()
    if not uri.startswith("sqlite:"):
        console.print(f"MLFLOW_TRACKING_URI points at a server; open {uri} in a browser")
        return
    console.print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


if __name__ == "__main__":
    app()
