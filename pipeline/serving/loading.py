"""Loading a version for `expert serve`: on a short-lived thread, prepared as it was evaluated
(`pipeline/inference/runtime.py`)."""

from __future__ import annotations

import threading
from typing import Any

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.inference import runtime
from pipeline.registry import versions as registry
from pipeline.registry.versions import registered_name_version  # noqa: F401 - part of this package's names
from pipeline.serving.options import ServeOptions


def load_service(model_uri: str, options: ServeOptions):
    """Load a version and start its worker.

    The loading runs on a short-lived thread so that the model worker is the only thread that ever runs torch's
    OpenMP parallel regions: with a second team alive (the loading thread's, kept by libgomp for as long as that
    thread lives), libgomp counts more threads than cores and makes idle workers sleep after every parallel
    region instead of spinning: a context switch storm on every served request (docs/BENCHMARKS.md, "Serve").
    The thread is a daemon so that Ctrl-C during a long load ends the command at once.
    """
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["service"] = _load_service(model_uri, options)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = err

    loader = threading.Thread(target=load, name="expert-load", daemon=True)
    loader.start()
    loader.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["service"]


def _load_service(model_uri: str, options: ServeOptions):
    from pipeline.serving.service import Service

    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    _, expert = registry.load_version(model_uri)
    prepare(expert, options)
    name, version = registry.registered_name_version(model_uri)
    service = Service(expert, name or expert.recipe.registry.model_name, version, model_uri, options)
    return probed(service)


def probed(service):
    """The service, once its model has answered a probe question; a model that cannot (a confidence that is no
    probability: corrupted weights) is refused before it takes requests, rather than serving errors."""
    problem = service.probe()
    if problem is not None:
        service.close()
        raise UserError(f"{service.model_uri}: not serving it: {problem}. Serve another version, or push a retrained "
                        "one")
    return service


def prepare(expert, options: ServeOptions) -> None:
    """A loaded version made ready to serve as it was evaluated (`pipeline/inference/runtime.py`): the adapter merged or
    separate as eval ran it (other options refused unless allowed), then the bit-identical speed-ups asked for."""
    notes = runtime.prepare_expert(expert, options.merge, options.lean_forward, options.pack,
                                   options.allow_unevaluated_runtime)
    evaluated = getattr(expert, "evaluated_runtime", None)
    if evaluated is None:
        how = ""  # a model without an eval record (tests build such)
    elif evaluated.adapter == expert.runtime.adapter:
        how = ", as evaluated"
    else:
        how = f", NOT as evaluated (adapter {evaluated.adapter}; --allow-unevaluated-runtime)"
    console.print(f"serving with the adapter {expert.runtime.adapter}{how}")
    for note in notes:
        console.print(note)
