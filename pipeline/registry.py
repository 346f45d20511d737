"""The MLflow model registry as the pipeline reads it: a registered version loaded, a registry URI's name and number.

`expert predict` (`pipeline/batch_predict.py`), `expert serve` (`pipeline/serving/`) and `expert export` load
versions through `load_version`; push (`pipeline/push.py`) writes them; `expert compare` (`pipeline/compare.py`)
summarises them.
"""

from __future__ import annotations

import re

from pipeline import tracking
from pipeline.errors import UserError


def load_version(model_uri: str):
    """The pyfunc model and its ExpertModel (for the recipe and threshold)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    tracking.configure()
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"{model_uri}: cannot load ({err.message}); check the name, version or alias") from None
    return loaded, loaded.unwrap_python_model()


def registered_name_version(model_uri: str) -> tuple[str | None, str | None]:
    """(name, version) of a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI; Nones for other URIs."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", model_uri)
    if not match:
        return None, None
    name, number, alias = match.groups()
    if number:
        return name, number
    try:
        return name, tracking.client().get_model_version_by_alias(name, alias).version
    except Exception:  # noqa: BLE001 - the version number is informative only
        return name, None
