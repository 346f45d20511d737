"""MLflow set-up and logging helpers.

Default store: embedded SQLite (`sqlite:///mlflow.db` in the working
directory), so nothing needs to be started; `MLFLOW_TRACKING_URI` points at a
server instead. Telemetry is off. Everything goes through `MlflowClient` with
batched calls (one HTTP call per metric costs ~100 ms against a server).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_LIMIT = 6000  # MLflow's maximum param value length
BATCH = 100


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


def experiment_id(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    return exp.experiment_id if exp else mlflow_client.create_experiment(name)


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


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())]
    for i in range(0, len(items), BATCH):
        mlflow_client.log_batch(run_id, metrics=items[i : i + BATCH])


@contextmanager
def stage_run(experiment: str, stage: str, run_dir_id: str, tags: dict[str, str]) -> Iterator[tuple[Any, str]]:
    """An MLflow run for one stage of one run directory, ended FAILED if the body raises."""
    mlflow_client = client()
    exp_id = experiment_id(mlflow_client, experiment)
    all_tags = {"expert.stage": stage, "expert.run_dir_id": run_dir_id, **tags}
    run = mlflow_client.create_run(exp_id, run_name=f"{stage} · {experiment} · {run_dir_id}", tags=all_tags)
    run_id = run.info.run_id
    try:
        yield mlflow_client, run_id
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
