"""The MLflow model registry as the pipeline reads it: a registered version verified and loaded, a registry URI's
name and number.

`expert predict` (`pipeline/commands/batch_predict.py`), `expert serve` (`pipeline/serving/`), `expert export` and eval's
`expert` baselines load versions through `load_version`; push (`pipeline/stages/push.py`) writes them; `expert compare`
(`pipeline/commands/compare.py`) summarises them.

A version's files are checked against the digest push recorded in the registry (`pipeline/registry/digest.py`)
before anything in them is read, and the code that runs is this package's `ExpertModel`, never the entry file
stored with the version (that file is there for MLflow's own tools).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.registry import digest as version_digest
from pipeline.run import tracking

LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]+)")


@dataclass(frozen=True)
class VerifiedVersion:
    """What loading checked: the logged model's files, against the digest (and signature) the registry records."""

    model_id: str
    digest: str
    signed: bool  # a signature was checked (EXPERT_VERSION_SIGNING_KEY set)
    files: int
    local: Path  # the verified download the expert was loaded from


def load_version(model_uri: str):
    """(VerifiedVersion, ExpertModel) of a registered version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) or a
    logged model (`models:/m-...`), after every file is checked against the digest push recorded."""
    from mlflow.pyfunc import PythonModelContext

    from pipeline.expert_model import BUNDLE, ExpertModel

    tracking.configure()
    model_id, tags = recorded(model_uri)
    digest = tags.get(version_digest.DIGEST_TAG)
    if not version_digest.is_digest(digest):
        run_dir = tags.get("run_dir_id", "its run directory")
        raise UserError(f"{model_uri}: no content digest is recorded for it (pushed before versions were checked at "
                        f"load, or its `{version_digest.DIGEST_TAG}` tag was removed), so its files cannot be verified; "
                        f"push it again: `expert run RECIPE --run-dir runs/RECIPE/{run_dir} --force push`")
    signature = tags.get(version_digest.SIGNATURE_TAG)
    version_digest.check_signature(digest, signature, model_uri)
    local = download(model_id, model_uri)
    try:
        files = version_digest.verify(local, digest, model_uri)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    expert = ExpertModel()
    expert.load_context(PythonModelContext(artifacts={BUNDLE: str(local / "artifacts" / BUNDLE)}, model_config={}))
    return VerifiedVersion(model_id, digest, version_digest.signing_key() is not None, files, local), expert


def recorded(model_uri: str) -> tuple[str, dict[str, str]]:
    """(logged model id, tags) the registry holds for the URI: a version's tags, or a logged model's."""
    from mlflow.exceptions import MlflowException

    mlflow_client = tracking.client()
    logged = LOGGED_MODEL_URI.fullmatch(model_uri)
    name, number, alias = parse_version_uri(model_uri)
    if logged is None and name is None:
        raise UserError(f"{model_uri}: load a registered version (models:/NAME/VERSION or models:/NAME@ALIAS) or a "
                        "logged model (models:/m-...): only those have their content digest in the registry")
    try:
        if logged is not None:
            return logged.group(1), mlflow_client.get_logged_model(logged.group(1)).tags
        version = (mlflow_client.get_model_version(name, number) if number
                   else mlflow_client.get_model_version_by_alias(name, alias))
    except MlflowException as err:
        raise UserError(f"{model_uri}: cannot load ({err.message}); check the name, version or alias") from None
    source = LOGGED_MODEL_URI.fullmatch(version.source or "")  # push registers from `models:/<logged model id>`
    if source is None:
        raise UserError(f"{model_uri}: registered from {version.source}, not from a logged model as push registers "
                        "versions; push it again with `expert push`")
    return source.group(1), version.tags


def download(model_id: str, model_uri: str) -> Path:
    """The logged model's files in a new local folder, kept for the process (a base bundled with `--include-base`
    is read again by `expert export`)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    local = Path(tempfile.mkdtemp(prefix="expert-version-"))
    try:
        mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(local))
    except MlflowException as err:
        shutil.rmtree(local, ignore_errors=True)
        raise UserError(f"{model_uri}: cannot download its files ({err.message})") from None
    return local


def parse_version_uri(model_uri: str) -> tuple[str | None, str | None, str | None]:
    """(name, number, alias) of a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI; Nones for other URIs."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", model_uri)
    return match.groups() if match else (None, None, None)


def registered_name_version(model_uri: str) -> tuple[str | None, str | None]:
    """(name, version) of a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI; Nones for other URIs."""
    name, number, alias = parse_version_uri(model_uri)
    if name is None or number:
        return name, number
    try:
        return name, tracking.client().get_model_version_by_alias(name, alias).version
    except Exception:  # noqa: BLE001 - the version number is informative only
        return name, None
