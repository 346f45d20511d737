"""MLflow set-up and logging helpers.

Default store: embedded SQLite (`sqlite:///mlflow.db` in the working
directory), so nothing needs to be started; `MLFLOW_TRACKING_URI` points at a
server instead. Telemetry is off. Everything goes through `MlflowClient` with
batched calls (against a server, every call is an HTTP round trip).

`Tracker` carries a training's MLflow run on a background thread: a slow or
vanished tracking server never stalls or kills training; the run is then
tagged that its logging is incomplete.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.console import console

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe
    from pipeline.run.rundir import RunDir

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_LIMIT = 6000  # MLflow's maximum param value length
BATCH = 100
MLFLOW_CLOSE_TIMEOUT_S = 60


BUNDLE = "bundle"  # the pyfunc's artifact holding the version's files
# where the adapter lies in a logged model: train uploads it there, push adds the rest of the pyfunc around it
ADAPTER_PATH = f"artifacts/{BUNDLE}/adapter"


def configure() -> str:
    """Point MLflow at the right store with telemetry off; returns the tracking URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=configure())


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(mlflow_client, name: str) -> str:
    """The recipe's experiment, marked as model development: without the mark, MLflow's UI infers GenAI from the
    eval runs' traces and opens the experiment on an empty GenAI overview instead of its runs."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        return mlflow_client.create_experiment(name, tags=EXPERIMENT_KIND)
    if not exp.tags.get("mlflow.experimentKind"):  # an experiment made before, or by hand: a kind set by a user stays
        for key, value in EXPERIMENT_KIND.items():
            mlflow_client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested recipe dict -> `train.lora.r`-style params; lists of mappings are indexed."""
    out: dict[str, str] = {}
    if isinstance(obj, dict) and obj and not (prefix.endswith("schema")):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        value = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        if len(value) > PARAM_LIMIT:
            value = f"(too long for a param: {len(value)} characters; see the recipe.yaml artifact)"
        out[prefix] = value
    return out


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), BATCH):
        mlflow_client.log_batch(run_id, params=items[i : i + BATCH])


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int = 0, model_id: str | None = None,
                dataset=None) -> None:
    """Batched metrics; with `model_id` and `dataset` (an `mlflow.entities.Dataset`) they are the logged model's,
    measured on that dataset, as MLflow 3's model page shows them."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    linked: dict[str, Any] = {"model_id": model_id}
    if dataset is not None:
        linked |= {"dataset_name": dataset.name, "dataset_digest": dataset.digest}
    items = [Metric(k, float(v), ts, step, **linked) for k, v in sorted(metrics.items())]
    for i in range(0, len(items), BATCH):
        mlflow_client.log_batch(run_id, metrics=items[i : i + BATCH])


def split_dataset(recipe: Recipe, run: RunDir, split: str):
    """A prep split as an MLflow dataset (name, digest of its file, where it is, its row count): what a run used,
    linked as its input so the UI shows which data each number was measured on. Only the path is logged, never
    the rows."""
    from mlflow.entities import Dataset

    from pipeline.files import file_hash

    path = run.path / "prep" / f"{split}.jsonl"
    with path.open("rb") as rows:
        count = sum(1 for line in rows if line.strip())
    return Dataset(name=f"{recipe.name}.{split}", digest=file_hash(path)[:12], source_type="local",
                   source=json.dumps({"uri": str(path)}),
                   schema=json.dumps({"mlflow_colspec": [{"name": c, "type": "string"}
                                                          for c in ("id", "text", "target", "prompt", "completion")]}),
                   profile=json.dumps({"num_rows": count}))


def log_split_inputs(mlflow_client, run_id: str, recipe: Recipe, run: RunDir, splits: list[str],
                     model_id: str | None = None) -> dict[str, Any]:
    """Link the prep splits a stage read (and the logged model it evaluated) as the MLflow run's inputs; returns
    the datasets by split."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

    datasets = {split: split_dataset(recipe, run, split) for split in splits}
    mlflow_client.log_inputs(
        run_id, datasets=[DatasetInput(d, tags=[InputTag("mlflow.data.context", s)]) for s, d in datasets.items()],
        models=[LoggedModelInput(model_id)] if model_id else None)
    return datasets


def log_adapter_model(mlflow_client, run_id: str, adapter_dir: Path, name: str, params: dict[str, str],
                      into: dict[str, str], tags: dict[str, str] | None = None) -> None:
    """The trained adapter as an MLflow 3 logged model, an output of its train run; `into["model_id"]` gets its
    id. Eval logs its metrics against it; push adds the rest of the pyfunc model around the adapter and registers
    the version from it (`models:/<model_id>`, the only source MLflow's UI links back to its model). The adapter
    goes where the pyfunc bundle reads it (`ADAPTER_PATH`), so it is stored once."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    experiment = mlflow_client.get_run(run_id).info.experiment_id
    model = mlflow_client.create_logged_model(experiment, name=name, source_run_id=run_id, params=params, tags=tags,
                                              model_type="LoRA adapter")
    mlflow_client.log_model_artifacts(model.model_id, str(adapter_dir), ADAPTER_PATH)
    mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    mlflow_client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    into["model_id"] = model.model_id


def link_version_to_model(mlflow_client, model_id: str, name: str, version: str) -> None:
    """Name the registered version on its logged model (the `mlflow.modelVersions` tag, as
    `mlflow.register_model` sets it), so the model's page links to the version as the version's links to it."""
    tag = "mlflow.modelVersions"
    existing = json.loads(mlflow_client.get_logged_model(model_id).tags.get(tag) or "[]")
    mlflow_client.set_logged_model_tags(model_id, {tag: json.dumps(existing + [{"name": name, "version": version}])})


def set_description(mlflow_client, run_id: str, markdown: str) -> None:
    """The run's description in the UI (MLflow keeps it in the `mlflow.note.content` tag)."""
    mlflow_client.set_tag(run_id, "mlflow.note.content", markdown)


def _epoch_ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


@contextmanager
def stage_run(experiment: str, stage: str, run: RunDir, tags: dict[str, str]) -> Iterator[tuple[Any, str]]:
    """An MLflow run for one stage of one run directory, ended FAILED if the body raises. It is created when the
    stage's work is done (nothing reaches MLflow before there is something to log) but starts when the stage
    started (the manifest's `started`), so the UI shows how long the stage really took."""
    mlflow_client = client()
    close_interrupted_run(mlflow_client, run, stage)
    exp_id = experiment_id(mlflow_client, experiment)
    all_tags = {"expert.stage": stage, "expert.run_dir_id": run.path.name, **tags}
    started = run.stage_record(stage).get("started")
    created = mlflow_client.create_run(exp_id, run_name=f"{stage} · {experiment} · {run.path.name}", tags=all_tags,
                                       start_time=_epoch_ms(started) if started else None)
    run_id = created.info.run_id
    run.set_open_mlflow_run(stage, run_id)  # until it ends: a process killed meanwhile leaves it for the next one
    try:
        yield mlflow_client, run_id
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        run.set_open_mlflow_run(stage, None)
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
    run.set_open_mlflow_run(stage, None)


def close_interrupted_run(mlflow_client, run: RunDir, stage: str) -> None:
    """The MLflow run a killed process left open for this stage of this run directory (which the caller now holds)
    is marked KILLED, so the UI does not show it running for good."""
    from mlflow.exceptions import MlflowException

    left = run.open_mlflow_run(stage)
    if left is None:
        return
    try:
        status = mlflow_client.get_run(left).info.status
    except MlflowException:  # deleted since, or on another tracking server: nothing to close here
        status = None
    if status == "RUNNING":
        mlflow_client.set_terminated(left, "KILLED")
        console.print(f"[yellow]{stage}[/]: MLflow run {left}, left running by an interrupted {stage}, marked KILLED")
    run.set_open_mlflow_run(stage, None)


class Tracker:
    """MLflow calls queued to one background thread, so the tracking server never stalls training.

    The first failure (server gone, timeouts) is reported once; later calls are dropped and the
    run keeps its `expert.logging: incomplete` tag, which only a fully logged run replaces.
    """

    STAGE = "train"  # one MLflow run per training, continued when the training resumes

    def __init__(self, mlflow_client, run_id: str | None):
        self.client = mlflow_client
        self.run_id = run_id
        self.problem: str | None = None
        self.dropped = 0
        self.queue: queue.Queue = queue.Queue()
        self.monitor = None
        self.thread = threading.Thread(target=self._work, name="expert-mlflow", daemon=True)
        if run_id is not None:
            self.thread.start()

    @classmethod
    def disabled(cls) -> Tracker:
        return cls(None, None)

    @classmethod
    def open(cls, recipe: Recipe, run: RunDir, previous_run_id: str | None) -> Tracker:
        """Continue the interrupted training's MLflow run, or create one: one MLflow run per training."""
        mlflow_client = client()
        run_id = None
        if previous_run_id:
            try:
                mlflow_client.update_run(previous_run_id, status="RUNNING")
                run_id = previous_run_id
            except Exception as err:  # deleted or from another server: start a fresh MLflow run
                console.print(f"[yellow]warning[/]: cannot continue MLflow run {previous_run_id} ({err}); new run")
        if run_id is None:
            exp_id = experiment_id(mlflow_client, recipe.name)
            tags = {
                "expert.stage": cls.STAGE,
                "expert.run_dir_id": run.path.name,
                "expert.recipe": recipe.name,
                "expert.base_model": recipe.model.base,
                "expert.logging": "incomplete",
            }
            created = mlflow_client.create_run(exp_id, run_name=f"{cls.STAGE} · {recipe.name} · {run.path.name}", tags=tags)
            run_id = created.info.run_id
        tracker = cls(mlflow_client, run_id)
        tracker.monitor = _start_system_metrics(run_id, resumed=previous_run_id == run_id)
        return tracker

    def submit(self, fn, *args, **kwargs) -> None:
        if self.run_id is None:
            return
        self.queue.put((fn, args, kwargs))

    def _work(self) -> None:
        while True:
            fn, args, kwargs = self.queue.get()
            if fn is None:
                return
            if self.problem is not None:
                self.dropped += 1
                continue
            try:
                fn(self.client, self.run_id, *args, **kwargs)
            except Exception as err:
                self.problem = f"{type(err).__name__}: {err}"[:300]
                self.dropped += 1
                console.print(
                    f"[yellow]warning[/]: MLflow logging failed ({self.problem}); training goes on, "
                    "the MLflow run is marked incompletely logged and the run directory keeps everything"
                )

    def close(self, status: str) -> str | None:
        """Flush, tag and end the MLflow run within a bounded wait; returns what went wrong, if anything."""
        if self.run_id is None:
            return None
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # system metrics are best effort
                pass
        if status == "FINISHED":
            self.submit(lambda c, r: c.set_tag(r, "expert.logging", "complete") if self.problem is None else None)
        self.submit(lambda c, r: c.set_terminated(r, status))
        self.queue.put((None, (), {}))
        self.thread.join(MLFLOW_CLOSE_TIMEOUT_S)
        if self.thread.is_alive() and self.problem is None:
            self.problem = f"the tracking server did not answer within {MLFLOW_CLOSE_TIMEOUT_S}s"
        if self.problem is not None:
            console.print(
                f"[yellow]warning[/]: MLflow run {self.run_id} is incompletely logged "
                f"({self.dropped} call(s) dropped): {self.problem}"
            )
        return self.problem


def _start_system_metrics(run_id: str, resumed: bool):
    """MLflow's CPU/memory/GPU monitor on its own thread; training never depends on it."""
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=configure())
        monitor.start()
        return monitor
    except Exception as err:
        console.print(f"[yellow]warning[/]: no system metrics ({err})")
        return None
