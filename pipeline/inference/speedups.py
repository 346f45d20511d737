"""Serving's CPU speed-ups behind one seam: each gives bit-identical answers or is not installed, and none can
stop a model from serving.

Two of them reach past public APIs: the lean Llama forward pass (`pipeline/inference/lean_forward.py`, written against
transformers' Llama internals) and oneDNN-packed bf16 weights (`answering.pack_linear_weights`, private
`torch.ops.mkldnn` ops). Here the lean pass is imported only when asked for and only within the transformers
versions it was written against; an import or install that fails is undone, and packing looks its ops up
instead of assuming them. Each checks its own outputs against the unchanged model's (`torch.equal` on a probe)
before it keeps anything. So a transformers rename or a missing op costs speed, never service: the model keeps
transformers' forward and eager `F.linear`, and the note says what was left out and why.
"""

from __future__ import annotations

import importlib

# the transformers releases `lean_forward` was written and checked against: [from, to)
LEAN_TRANSFORMERS = ((5, 20), (6, 0))
LEAN_MODULE = "pipeline.inference.lean_forward"


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a library's version string; (0, 0) when it does not parse."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        return (0, 0)
    return (release + (0, 0))[:2]


def install_lean_forward(model) -> str:
    """The lean forward pass for label scoring, where it imports, installs and probes bit-identical; says what
    happened. Any failure leaves transformers' forward in place."""
    import transformers

    low, high = LEAN_TRANSFORMERS
    if not low <= release(transformers.__version__) < high:
        return (f"lean forward pass off: transformers {transformers.__version__} is outside the releases it was "
                f"written against ({low[0]}.{low[1]} to before {high[0]}.{high[1]}); transformers' forward is used")
    try:
        lean = importlib.import_module(LEAN_MODULE)
    except (ImportError, AttributeError) as err:  # a renamed or moved transformers internal
        return (f"lean forward pass off: it does not import with transformers {transformers.__version__} "
                f"({type(err).__name__}: {err}); transformers' forward is used")
    try:
        return lean.install(model)
    except Exception as err:  # noqa: BLE001 - an internal it reads has changed: undo, serve without it
        lean.uninstall(model)
        return (f"lean forward pass off: installing it failed ({type(err).__name__}: {err}); "
                "transformers' forward is used")


def pack_weights(model) -> str | None:
    """bf16 linear layers packed for oneDNN where this CPU and torch build allow it; says what happened (None when
    there was nothing to pack)."""
    from pipeline.inference import answering

    why_not = answering.packing_unavailable()
    if why_not is not None:
        return f"weights not packed for oneDNN: {why_not}"
    packed = answering.pack_linear_weights(model)
    return f"packed {packed} bf16 linear layers for oneDNN (outputs checked bit-identical)" if packed else None


def install(model, inference: str, lean: bool = True, pack: bool = True) -> list[str]:
    """The speed-ups asked for, in order (the lean pass stacks the unpacked q/k/v weights, packing then packs the
    stacked ones); one note per speed-up tried."""
    notes = []
    if lean and inference == "label_scoring":  # the lean forward serves label scoring's passes
        notes.append(install_lean_forward(model))
    if pack:
        notes.append(pack_weights(model))
    return [note for note in notes if note]
