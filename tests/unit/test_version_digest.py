"""The manifest check on real files: changed, missing and extra files are named; the count of the rest is told."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.registry.digest import (
    MANIFEST_FILE,
    SHOWN,
    file_digests,
    verify,
    write_manifest,
)


def version_files(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"content of {name}")
    return write_manifest(root, file_digests(root))


def test_every_kind_of_difference_is_named(tmp_path):
    digest = version_files(tmp_path, ["MLmodel", "artifacts/bundle/recipe.yaml", "artifacts/bundle/adapter/w.bin"])
    assert verify(tmp_path, digest, "models:/x/1") == 3
    (tmp_path / "artifacts/bundle/recipe.yaml").write_text("base_url: http://elsewhere")
    (tmp_path / "MLmodel").unlink()
    (tmp_path / "artifacts/bundle/extra.py").write_text("print()")
    with pytest.raises(UserError) as refused:
        verify(tmp_path, digest, "models:/x/1")
    assert str(refused.value).startswith("models:/x/1: the version's files are not the ones push recorded: "
                                         "changed artifacts/bundle/recipe.yaml; missing MLmodel; "
                                         "extra artifacts/bundle/extra.py. Refusing")


def test_a_manifest_not_the_recorded_one_is_refused(tmp_path):
    digest = version_files(tmp_path, ["MLmodel"])
    (tmp_path / MANIFEST_FILE).write_text((tmp_path / MANIFEST_FILE).read_text() + " ")
    with pytest.raises(UserError, match=f"{MANIFEST_FILE} was changed after push"):
        verify(tmp_path, digest, "models:/x/1")
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(UserError, match=f"{MANIFEST_FILE} is missing"):
        verify(tmp_path, digest, "models:/x/1")


@pytest.mark.parametrize("extra", [SHOWN, SHOWN + 2])
def test_at_most_shown_files_are_named_and_the_rest_counted(tmp_path, extra):
    digest = version_files(tmp_path, ["MLmodel"])
    for i in range(extra):
        (tmp_path / f"planted{i}.py").write_text("x")
    with pytest.raises(UserError) as refused:
        verify(tmp_path, digest, "models:/x/1")
    message = str(refused.value)
    assert message.count("extra planted") == SHOWN
    assert ("and 2 more" in message) == (extra > SHOWN)
