"""A registered version edited in the artifact store after push is refused at load (exit 2, naming the file), the
code stored with it never runs, and with a signing key only versions signed with that key load.

Against the session's real `mlflow server`; the tampering goes through MLflow's own artifact upload, as anyone
who can write the artifact store could do it."""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.registry.digest import (
    DIGEST_TAG,
    MANIFEST_FILE,
    MIN_KEY_CHARS,
    SIGNATURE_TAG,
    SIGNING_KEY_ENV,
)
from tests.conftest import registry_recipe

pytestmark = pytest.mark.smoke

ENTRY = "expert_model_entry.py"
RECIPE = "artifacts/bundle/recipe.yaml"
WEIGHTS = "artifacts/bundle/adapter/adapter_model.safetensors"


def pushed_version(tiny_model_dir, tmp_path: Path, model: str) -> tuple[Path, Path]:
    """A tiny expert run through every stage and pushed as version 1 of `model`: (recipe path, run directory)."""
    recipe_path, run_dir = registry_recipe(tiny_model_dir, tmp_path, model), tmp_path / "run"
    cli("run", str(recipe_path), "--run-dir", str(run_dir))
    return recipe_path, run_dir


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result


def upload(client: MlflowClient, model_id: str, rel: str, data: bytes, scratch: Path) -> None:
    """Write `data` at `rel` in the logged model's files, as an attacker with write access to the store would."""
    scratch = scratch / hashlib.sha256(rel.encode() + data).hexdigest()[:12]
    (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
    (scratch / rel).write_bytes(data)
    client.log_model_artifacts(model_id, str(scratch))


def test_a_version_changed_in_the_artifact_store_is_refused(tiny_model_dir, tracking_env, tmp_path, clean_secret_env,
                                                            monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    model = "tamper"
    pushed_version(tiny_model_dir, tmp_path, model)
    client = MlflowClient(tracking_env)
    version = client.get_model_version(model, "1")
    model_id = version.source.removeprefix("models:/")
    assert len(version.tags[DIGEST_TAG]) == 64 and SIGNATURE_TAG not in version.tags
    assert client.get_logged_model(model_id).tags[DIGEST_TAG] == version.tags[DIGEST_TAG]
    original = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "original")))
    manifest = json.loads((original / MANIFEST_FILE).read_text())
    assert {ENTRY, "MLmodel", "requirements.txt", RECIPE, WEIGHTS} <= manifest.keys()
    assert set(manifest) | {MANIFEST_FILE} == {p.relative_to(original).as_posix()
                                               for p in original.rglob("*") if p.is_file()}, "every file, no other"

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "I was charged twice this month"}\n')
    uri = f"models:/{model}/1"
    answered = cli("predict", uri, "--input", str(inputs))
    assert json.loads(answered.stdout.splitlines()[-1])["answer"]

    marker = tmp_path / "planted-code-ran"
    planted = f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n".encode()
    recipe_text = (original / RECIPE).read_text()
    weights = bytearray((original / WEIGHTS).read_bytes())
    weights[-1] ^= 1
    edits = {
        RECIPE: recipe_text.replace("name: tamper", "name: tampered", 1).encode(),
        ENTRY: (original / ENTRY).read_bytes() + planted,
        WEIGHTS: bytes(weights),
    }
    assert edits[RECIPE] != recipe_text.encode()
    for rel, changed in edits.items():
        upload(client, model_id, rel, changed, tmp_path / "attack")
        refused = cli("predict", uri, "--input", str(inputs), code=2)
        assert f"changed {rel}" in refused.output, refused.output
        assert not marker.exists(), "the planted code ran"
        upload(client, model_id, rel, (original / rel).read_bytes(), tmp_path / "restore")  # as pushed again
        cli("predict", uri, "--input", str(inputs))

    # the manifest itself, rewritten to match the planted entry file: its digest is not the one the registry holds
    forged = dict(manifest, **{ENTRY: hashlib.sha256(edits[ENTRY]).hexdigest()})
    forged_bytes = (json.dumps(forged, indent=1) + "\n").encode()
    upload(client, model_id, ENTRY, edits[ENTRY], tmp_path / "attack")
    upload(client, model_id, MANIFEST_FILE, forged_bytes, tmp_path / "attack")
    refused = cli("predict", uri, "--input", str(inputs), code=2)
    assert f"{MANIFEST_FILE} was changed after push" in refused.output and not marker.exists()

    # whoever also rewrites the registry's tag gets the planted file past the digest (what signing is for), yet the
    # file is never executed: the code that runs is this package's
    client.set_model_version_tag(model, "1", DIGEST_TAG, hashlib.sha256(forged_bytes).hexdigest())
    cli("predict", uri, "--input", str(inputs))
    assert not marker.exists(), "the loader executed the entry file stored with the version"

    upload(client, model_id, "artifacts/bundle/extra.py", b"print('extra')\n", tmp_path / "attack")
    refused = cli("predict", uri, "--input", str(inputs), code=2)
    assert "extra artifacts/bundle/extra.py" in refused.output

    client.delete_model_version_tag(model, "1", DIGEST_TAG)  # as every version pushed before digests were recorded
    refused = cli("predict", uri, "--input", str(inputs), code=2)
    assert "no content digest is recorded" in refused.output and "--force push" in refused.output
    assert not marker.exists()


def test_with_a_signing_key_only_versions_signed_with_it_load(tiny_model_dir, tracking_env, tmp_path, clean_secret_env,
                                                              monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    model = "signed"
    recipe_path, run_dir = pushed_version(tiny_model_dir, tmp_path, model)  # version 1: pushed without a key
    key, other_key = "k" * MIN_KEY_CHARS, "o" * 40
    monkeypatch.setenv(SIGNING_KEY_ENV, key)
    pushed = cli("push", str(recipe_path), "--run-dir", str(run_dir), "--force", "--reason", "signed re-push")
    client = MlflowClient(tracking_env)
    unsigned, signed = client.get_model_version(model, "1"), client.get_model_version(model, "2")
    assert signed.tags[SIGNATURE_TAG] and SIGNATURE_TAG not in unsigned.tags
    recorded = json.dumps([signed.tags, unsigned.tags, client.get_logged_model(signed.source.removeprefix("models:/")).tags,
                           client.get_run(signed.run_id).data.params])
    assert key not in recorded and key not in pushed.output, "the key never reaches MLflow or the log"

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "my parcel never came"}\n')
    cli("predict", f"models:/{model}/2", "--input", str(inputs))
    refused = cli("predict", f"models:/{model}/1", "--input", str(inputs), code=2)
    assert "not signed" in refused.output

    # whoever can write the registry's tags (and the files) cannot point a signature at other content
    client.set_model_version_tag(model, "2", DIGEST_TAG, hashlib.sha256(b"other content").hexdigest())
    refused = cli("predict", f"models:/{model}/2", "--input", str(inputs), code=2)
    assert "signature does not match" in refused.output
    client.set_model_version_tag(model, "2", DIGEST_TAG, signed.tags[DIGEST_TAG])

    monkeypatch.setenv(SIGNING_KEY_ENV, other_key)
    refused = cli("predict", f"models:/{model}/2", "--input", str(inputs), code=2)
    assert "signature does not match" in refused.output and other_key not in refused.output

    monkeypatch.setenv(SIGNING_KEY_ENV, "s" * (MIN_KEY_CHARS - 1))  # the edge: one character short
    refused = cli("predict", f"models:/{model}/2", "--input", str(inputs), code=2)
    assert f"at least {MIN_KEY_CHARS}" in refused.output
    refused = cli("push", str(recipe_path), "--run-dir", str(run_dir), "--force", "--reason", "short key", code=2)
    assert f"at least {MIN_KEY_CHARS}" in refused.output
    assert len(client.search_model_versions(f"name = '{model}'")) == 2, "a refused key registers nothing"
