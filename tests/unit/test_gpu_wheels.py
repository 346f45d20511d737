"""The carried wheels against the lent GPU image's package list (scripts/gpu_image_packages.txt): pip resolves
the project's requirements over the image's known versions, and what would run there must import. Needs PyPI
(pip's index); skipped with that reason where it cannot be reached."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.request
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
gpu_wheels = sys.modules["gpu_wheels"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen(gpu_wheels.INDEX + "/pip/", timeout=10)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def plan():
    if not pypi_reachable():
        pytest.skip(f"{gpu_wheels.INDEX} cannot be reached: pip cannot resolve the carried set here")
    image = gpu_wheels.image_packages()
    carry = gpu_wheels.carried(gpu_wheels.resolve(image, gpu_wheels.requirements_to_resolve(), timeout=300), image)
    return image, carry, gpu_wheels.final_versions(image, carry)


def transformers_runtime_checks(tmp_path, version: str) -> tuple[dict[str, str], list[str]]:
    """transformers' own import-time check (dependency_versions_check.py): its table and the packages it checks."""
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--index-url", gpu_wheels.INDEX, "-d", str(tmp_path), f"transformers=={version}"],
                   check=True, timeout=300)
    (wheel,) = tmp_path.glob("transformers-*.whl")
    with zipfile.ZipFile(wheel) as z:
        table, check = {}, {}
        exec(z.read("transformers/dependency_versions_table.py").decode(), table)
        source = z.read("transformers/dependency_versions_check.py").decode()
    exec(source[source.index("pkgs_to_check_at_runtime"):source.index("]", source.index("pkgs_to_check_at_runtime")) + 1],
         check)
    return table["deps"], check["pkgs_to_check_at_runtime"]


def unmet_at_import(deps: dict[str, str], checked: list[str], versions: dict[str, str | None]) -> list[str]:
    """What transformers' import would refuse, for the packages whose version on the machine is known."""
    unmet = []
    for pkg in checked:
        if pkg not in deps:
            continue
        req = Requirement(deps[pkg])
        version = versions.get(canonicalize_name(req.name))
        if version is not None and not req.specifier.contains(Version(version), prereleases=True):
            unmet.append(f"{req} with {version}")
    return unmet


def test_the_carried_set_resolves_against_the_image_and_carries_what_it_lacks(plan):
    image, carry, final = plan
    carried = {r.name: r.version for r in carry}
    assert "phonenumbers" in carried  # prep imports it even with data.pii: keep
    assert Version(carried["accelerate"]) >= Version("1.16")  # the FSDP2 code users install
    assert image["transformers"] == "5.17.0" and Version(carried["transformers"]) >= Version("5.20")
    for req in gpu_wheels.project_requirements():
        name = canonicalize_name(gpu_wheels.SUBSTITUTE.get(canonicalize_name(req.name), req.name))
        version = final.get(name)
        if version is None:  # in the image at an unread version: the check's `versions` step verifies it there
            assert name in gpu_wheels.TRUST_IMAGE, f"{name} is neither carried nor at a known version in the image"
        else:
            assert req.specifier.contains(Version(version), prereleases=True), f"{req}: {version} there"
    for r in carry:  # every carried wheel's own requirements hold there, where the version is known
        for line in r.requires:
            dep = Requirement(line)
            env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
            version = final.get(canonicalize_name(dep.name))
            if (dep.marker is None or dep.marker.evaluate(env)) and version is not None:
                assert dep.specifier.contains(Version(version), prereleases=True), f"{r.name} needs {dep}: {version}"


def test_transformers_imports_there_with_the_carried_hub(plan, tmp_path):
    image, carry, final = plan
    deps, checked = transformers_runtime_checks(tmp_path, final["transformers"])
    assert "huggingface-hub" in checked and "tokenizers" in checked
    assert unmet_at_import(deps, checked, final) == []
    # the same check fails where the carried transformers meets the image's own hub (issue 35's break)
    assert any(u.startswith("huggingface-hub") for u in unmet_at_import(deps, checked, {**final, "huggingface-hub": "1.33.0"}))
