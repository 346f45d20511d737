"""Tamper-evident registered versions: every file a version's loading reads, digested at push, checked at load.

Push writes `expert_manifest.json` into the logged model (sha256 of every other file in it, by relative path:
the bundle, the adapter, MLmodel, the entry file, the requirements) and records the manifest's own sha256 in the
registry's metadata (the version's tags and the logged model's), which lives in the tracking database, not in
the artifact store. Loading downloads the files, checks the manifest against the recorded digest and every file
against the manifest (changed, missing and extra files), and refuses (exit 2) naming them.

Whoever can write the artifact store but not the tracking database can therefore not change a version unseen.
Whoever can write both could rewrite the manifest and its tag; against them, the opt-in signature: with
`EXPERT_VERSION_SIGNING_KEY` set, push records an HMAC-SHA256 of the digest, and a loader holding the key refuses
any version without a valid one. The key itself is never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import file_hash

MANIFEST_FILE = "expert_manifest.json"  # at the logged model's root: {relative path: sha256} of every other file
DIGEST_TAG = "expert.content_sha256"  # version and logged-model tag: sha256 of the manifest file's bytes
SIGNATURE_TAG = "expert.content_hmac"  # version and logged-model tag: HMAC-SHA256 of the digest (opt-in)
SIGNING_KEY_ENV = "EXPERT_VERSION_SIGNING_KEY"
MIN_KEY_CHARS = 32  # a shorter secret is guessable offline from any signed digest
SHOWN = 5  # files named in a refusal; the count says how many more


def file_digests(root: Path, under: str = "") -> dict[str, str]:
    """sha256 of every file below `root`, by its path relative to `root` (prefixed with `under`)."""
    prefix = f"{under}/" if under else ""
    return {prefix + p.relative_to(root).as_posix(): file_hash(p) for p in sorted(root.rglob("*")) if p.is_file()}


def write_manifest(model_dir: Path, digests: dict[str, str]) -> str:
    """Write the manifest into `model_dir`; returns its digest (what the registry records)."""
    data = (json.dumps(dict(sorted(digests.items())), indent=1) + "\n").encode("utf-8")
    (model_dir / MANIFEST_FILE).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def signing_key() -> bytes | None:
    """The HMAC key from the environment; None when signing is not in use."""
    key = os.environ.get(SIGNING_KEY_ENV)
    if key is None:
        return None
    if len(key) < MIN_KEY_CHARS:
        raise UserError(f"{SIGNING_KEY_ENV} is set but has {len(key)} characters; use a random secret of at least "
                        f"{MIN_KEY_CHARS} (e.g. `openssl rand -hex 32`), or unset it to turn signing off")
    return key.encode("utf-8")


def sign(digest: str, key: bytes) -> str:
    return hmac.new(key, f"expert-version-content:{digest}".encode(), hashlib.sha256).hexdigest()


def check_signature(digest: str, signature: str | None, where: str) -> None:
    """With a signing key set, refuse a version whose recorded digest has no valid signature."""
    key = signing_key()
    if key is None:
        return
    if not signature:
        raise UserError(f"{where}: the version is not signed, and {SIGNING_KEY_ENV} is set, so only signed versions "
                        "load; push it again with the key set")
    if not hmac.compare_digest(sign(digest, key), signature):
        raise UserError(f"{where}: the version's signature does not match {SIGNING_KEY_ENV}: it was signed with "
                        "another key, or its recorded digest was changed after push. Refusing to load it")


def verify(local: Path, digest: str, where: str) -> int:
    """Check the downloaded files in `local` against the manifest whose digest the registry recorded; returns how
    many files were checked. Refuses (UserError) naming every changed, missing or extra file."""
    manifest_path = local / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{where}: {MANIFEST_FILE} is missing from the version's files; refusing to load it")
    if hashlib.sha256(manifest_path.read_bytes()).hexdigest() != digest:
        raise UserError(f"{where}: {MANIFEST_FILE} was changed after push (its sha256 is not the one the registry "
                        "recorded); refusing to load the version")
    recorded = json.loads(manifest_path.read_text(encoding="utf-8"))
    actual = file_digests(local)
    del actual[MANIFEST_FILE]
    problems = [f"changed {rel}" for rel in sorted(recorded.keys() & actual.keys()) if recorded[rel] != actual[rel]]
    problems += [f"missing {rel}" for rel in sorted(recorded.keys() - actual.keys())]
    problems += [f"extra {rel}" for rel in sorted(actual.keys() - recorded.keys())]
    if problems:
        more = f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise UserError(f"{where}: the version's files are not the ones push recorded: {'; '.join(problems[:SHOWN])}"
                        f"{more}. Refusing to load it; restore the artifact store or push the run again")
    return len(actual)


def is_digest(value: str | None) -> bool:
    return value is not None and re.fullmatch(r"[0-9a-f]{64}", value) is not None
