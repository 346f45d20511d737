"""`expert serve`: a registered expert behind an OpenAI-compatible HTTP endpoint, with the cascade built in.

Endpoints (Starlette on uvicorn, both already installed with MLflow 3):

- `POST /v1/chat/completions`: OpenAI chat completions; the last user message
  is the input, `model` is the registered name; the answer (label, JSON object
  as text, or generated text) is the assistant message. `stream: true` gets
  the same answer as server-sent events. Extra top-level field `expert` and
  headers `X-Expert-*` carry confidence and escalation.
- `POST /v1/predict`: `{"text": ...}` -> `{"answer", "confidence", ...}`, or
  `{"texts": [...]}` -> `{"predictions": [...]}`.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

The modules, in the order a request meets them:

- `options.py`: `ServeOptions`, the one home of serve's defaults (the CLI reads them there).
- `loading.py`: `load_service` loads the version (`registry.load_version`) on a short-lived thread, merges the
  adapter and installs the CPU speed-ups through their seam (`pipeline/inference/speedups.py`).
- `app.py`: `create_app` (Starlette routes; every error an OpenAI-style body) and `run` (uvicorn; SIGTERM
  drains and exits 0).
- `service.py`: `Service.answer`, the expert's answer through the cascade (`pipeline/routing/cascade.py`): the
  version's triage router first, when it has one (a request it starts above the expert climbs from there); under the
  threshold (or with a confidence that is no probability) up the tiers, each within its deadline; flagged, or
  502, when none answers. `Service.probe`: the model's health, at start and in `/health`.
- `tiers.py`: `Lane`, a tier's slots and bounded queue: a request finding both full is shed, not queued.
- `engine.py`: `BatchingEngine`, one worker thread that owns the model and answers micro-batches through
  `predict.answer` (the path eval measured) with the system prompt's prefix cached once.
- `metrics.py`: `Metrics`, Prometheus text kept by hand.
- `errors.py`: `HTTPError`, what `service` raises and `app` answers with.

Importing this package is cheap (the CLI reads `ServeOptions` at start-up): the other names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.serving.options import ServeOptions

_HOMES = {
    "run": "app", "create_app": "app", "ENDPOINTS": "app", "MAX_TEXTS_PER_PREDICT": "app",
    "HTTPError": "errors", "Service": "service", "BatchingEngine": "engine", "Metrics": "metrics",
    "load_service": "loading", "prepare": "loading", "registered_name_version": "loading",
}

__all__ = ["ServeOptions", *_HOMES]

if TYPE_CHECKING:  # the names for type checkers; `x as x` marks each one a re-export
    from pipeline.serving.app import ENDPOINTS as ENDPOINTS
    from pipeline.serving.app import MAX_TEXTS_PER_PREDICT as MAX_TEXTS_PER_PREDICT
    from pipeline.serving.app import create_app as create_app
    from pipeline.serving.app import run as run
    from pipeline.serving.engine import BatchingEngine as BatchingEngine
    from pipeline.serving.errors import HTTPError as HTTPError
    from pipeline.serving.loading import load_service as load_service
    from pipeline.serving.loading import prepare as prepare
    from pipeline.serving.loading import registered_name_version as registered_name_version
    from pipeline.serving.metrics import Metrics as Metrics
    from pipeline.serving.service import Service as Service


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
