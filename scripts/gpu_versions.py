"""Step `versions` of scripts/gpu_check.sh: import everything the check needs, print the versions it will test,
and fail (exit 1) where an installed version does not satisfy the project's requirements or a carried wheel's,
or (exit 3) where no CUDA device is visible, unless `--cpu-dry-run`."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_wheels import SUBSTITUTE, project_requirements  # noqa: E402

MODULES = ["torch", "transformers", "huggingface_hub", "accelerate", "peft", "trl", "datasets", "bitsandbytes",
           "deepspeed", "mlflow", "phonenumbers", "tokenizers", "safetensors", "llguidance", "pytest",
           "pipeline.cli", "pipeline.stages.prep", "pipeline.stages.train", "pipeline.serving.app"]
NOT_ON_CPU = {"deepspeed"}  # carried for the GPU's ZeRO-3 test; the CPU dry run has no sharded DeepSpeed case


def unmet(requirements: list[Requirement], who: str) -> list[str]:
    problems = []
    for req in requirements:
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = SUBSTITUTE.get(req.name.lower(), req.name)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{who} needs {req}: {name} is not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{who} needs {req}: {name} {version} is installed")
    return problems


def main(argv: list[str]) -> int:
    dry_run = "--cpu-dry-run" in argv
    carried = Path(argv[argv.index("--carried") + 1]) if "--carried" in argv else None
    failed = []
    for module in MODULES:
        if dry_run and module in NOT_ON_CPU:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import error is the finding
            failed.append(f"import {module}: {type(exc).__name__}: {exc}")
    problems = unmet(project_requirements(), "expert-pipeline")
    for line in carried.read_text().split() if carried and carried.exists() else []:
        name = line.split("==")[0]
        problems += unmet([Requirement(r) for r in metadata.requires(name) or []], name)
    import torch

    cuda = torch.cuda.is_available()
    names = ["torch", "transformers", "huggingface-hub", "accelerate", "peft", "trl", "datasets", "bitsandbytes",
             "deepspeed", "mlflow-skinny", "tokenizers", "phonenumbers"]
    print("python", sys.version.split()[0], "cuda", torch.version.cuda, "device",
          torch.cuda.get_device_name() if cuda else "none")
    for name in names:
        try:
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} not installed")
    for line in failed + problems:
        print("gpu_check: " + line, file=sys.stderr)
    if not cuda and not dry_run:  # first: whatever else is wrong, this was not a GPU run
        print("gpu_check: no GPU was visible (torch.cuda.is_available() is False); --cpu-dry-run runs the check's "
              "code on the CPU instead", file=sys.stderr)
        return 3
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
