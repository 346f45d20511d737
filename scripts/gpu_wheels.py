"""Which wheels the lent GPU machine needs carried: the project's requirements resolved by pip against the image's
package list (scripts/gpu_image_packages.txt), for the image's Python 3.12 on x86-64.

The image's packages with a known version become stub distributions (name and version, no files) in an empty
virtual environment; `pip install --dry-run --report` of the project's requirements into it then lists exactly
what the image lacks or holds at a version that does not satisfy them. That list is carried, with three rules of
this project's own:

- `mlflow` is carried as `mlflow-skinny` (the same `mlflow` package without the tracking server's UI and its
  dependencies, which the check never starts): full mlflow and its server stack do not fit the 64 MiB carry limit.
- `NEWEST` names packages carried at the version users install although the image's satisfies the requirement,
  because the check exists to test that code (accelerate's FSDP2 plugin).
- A package the image holds at an unknown version is not carried (its version is checked on the machine, step
  `versions` of scripts/gpu_check.sh), except the project's own direct requirements, which are carried so the
  check tests the versions users get; `TRUST_IMAGE` names the direct requirements left to the image for size.

    python scripts/gpu_wheels.py plan              # NAME==VERSION per carried wheel
    python scripts/gpu_wheels.py download DIR      # those wheels into DIR (scripts/gpu_wheels.sh)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
IMAGE_LIST = ROOT / "scripts" / "gpu_image_packages.txt"
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64", "linux_x86_64"]
INDEX = "https://pypi.org/simple"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on the working tree plus carried paths
NEWEST = {"accelerate": ">=1.16"}  # FSDP2 through accelerate's plugin: test the code users install
TRUST_IMAGE = {"scipy", "matplotlib"}  # 35 MB and 9 MB wheels; their versions are checked on the machine
EXTRA = ["hjson"]  # DeepSpeed's one requirement the image lacks (DeepSpeed itself is built from source)
SUBSTITUTE = {"mlflow": "mlflow-skinny"}


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """name -> version (None where only the name was read), `python` included."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def project_requirements() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in pyproject["project"]["dependencies"]]


def requirements_to_resolve() -> list[str]:
    """The project's requirements as carried (mlflow as mlflow-skinny), the NEWEST floors and EXTRA."""
    out = []
    for req in project_requirements():
        name = SUBSTITUTE.get(canonicalize_name(req.name), req.name)
        out.append(f"{name}{req.specifier}{'; ' + str(req.marker) if req.marker else ''}")
    return out + [f"{name}{floor}" for name, floor in NEWEST.items()] + EXTRA


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    requires: tuple[str, ...]
    url: str


def resolve(image: dict[str, str | None], requirements: list[str], timeout: float = 600) -> list[Resolved]:
    """What pip installs for `requirements` over an environment holding the image's known versions."""
    with tempfile.TemporaryDirectory(prefix="gpu-image-") as tmp:
        env_dir = Path(tmp) / "image"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
        (site,) = env_dir.glob("lib/python*/site-packages")
        for name, version in image.items():
            if version is None or name == "python":
                continue
            dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
            dist.mkdir()
            (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (dist / "RECORD").write_text("")
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "--python",
               str(env_dir / "bin" / "python"), "install", "--dry-run", "--quiet", "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--implementation", "cp", "--index-url", INDEX,
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "--report", str(report), *requirements]
        if os.environ.get("PIP_CERT"):  # --isolated ignores the environment's settings; keep its CA bundle
            cmd[4:4] = ["--cert", os.environ["PIP_CERT"]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not resolve the carried set against {IMAGE_LIST.name}:\n{proc.stderr[-3000:]}")
        items = json.loads(report.read_text())["install"]
    return [Resolved(canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"],
                     tuple(i["metadata"].get("requires_dist", [])), i["download_info"]["url"]) for i in items]


def carried(resolved: list[Resolved], image: dict[str, str | None]) -> list[Resolved]:
    """The resolved packages to carry: not in the image, or in it at a version pip replaced (see the module doc)."""
    direct = {canonicalize_name(SUBSTITUTE.get(canonicalize_name(r.name), r.name)) for r in project_requirements()}
    return [r for r in resolved
            if r.name not in image or image[r.name] is not None or (r.name in direct and r.name not in TRUST_IMAGE)]


def final_versions(image: dict[str, str | None], carry: list[Resolved]) -> dict[str, str | None]:
    """name -> version on the machine once the carried wheels are first on the path."""
    return {**image, **{r.name: r.version for r in carry}}


def plan() -> list[Resolved]:
    image = image_packages()
    return carried(resolve(image, requirements_to_resolve()), image)


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0] == "plan":
        for r in plan():
            print(f"{r.name}=={r.version}")
        return 0
    if len(argv) == 2 and argv[0] == "download":
        dest = Path(argv[1])
        dest.mkdir(parents=True, exist_ok=True)
        pins = [f"{r.name}=={r.version}" for r in plan()]
        cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", "--index-url", INDEX,
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(dest), *pins]
        if os.environ.get("PIP_CERT"):
            cmd[4:4] = ["--cert", os.environ["PIP_CERT"]]
        subprocess.run(cmd, check=True)
        (dest / "CARRIED.txt").write_text("\n".join(pins) + "\n")
        return 0
    print(__doc__.strip().splitlines()[-2:], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
