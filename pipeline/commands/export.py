"""`expert export`: a registered version as files other servers load.

- `peft`: the LoRA adapter directory (adapter_config.json, adapter_model.safetensors,
  tokenizer) that vLLM serves next to the base model:
  `vllm serve BASE --enable-lora --lora-modules NAME=DIR`.
- `merged`: the base model with the adapter folded in (peft `merge_and_unload`),
  saved as safetensors with the tokenizer: a plain transformers model directory
  for any server, `vllm serve DIR` included.

Both get `expert.json`: the system prompt the expert was trained with, the label
set or JSON Schema, the cascade threshold and the base model. Other servers
generate the answer as text; label scoring, the confidence and the cascade are
what `expert serve` adds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pipeline.console import console
from pipeline.errors import UserError

FORMATS = ("peft", "merged")


def expert_card(expert, model_uri: str, fmt: str) -> dict[str, Any]:
    recipe = expert.recipe
    return {
        "model_uri": model_uri,
        "format": fmt,
        "registered_name": recipe.registry.model_name,
        "task": recipe.task.type,
        "base_model": recipe.model.base,
        "base_model_source": str(expert.base_source),  # what vLLM needs as BASE for --format peft
        "system_prompt": expert.system_prompt,
        "spec": expert.spec,  # labels (classification) or JSON Schema (extraction)
        "cascade_threshold": expert.threshold,
        "cascade_frontier": expert.frontier,
    }


def base_dtype(expert):
    """The dtype the base's config names (an 8B base ships bf16: 16 GB merged, not 32 GB in fp32); fp32 when
    the config names none."""
    import torch

    from pipeline.inference import models

    name = models.saved_dtype(expert.base_source, expert.recipe.model.trust_remote_code)
    return getattr(torch, name) if name in models.TORCH_DTYPE_NAMES.values() else torch.float32


def merged_model(expert, out: Path):
    """Base + adapter merged on the CPU: the base loaded afresh in fp32 (the served model may run in bf16, and
    folding the adapter into bf16 weights would round every merged weight), merged, then rounded once to the dtype
    the base ships in. The merge is a few additions per weight and needs no GPU; the served copy, which may be on
    the GPU, is let go first (an 8B base in fp32 beside it took 48 GB there, a 14B ran out of memory)."""
    import tempfile

    from peft import PeftModel

    from pipeline.inference import models

    with tempfile.TemporaryDirectory(dir=out) as adapter_dir:
        expert.model.save_pretrained(adapter_dir)
        release_served_model(expert)
        base = models.load_base_model(expert.recipe.model, expert.base_source, "fp32", device_map=None)  # the CPU
        fp32 = PeftModel.from_pretrained(base, adapter_dir, torch_device="cpu")  # PEFT's default: the GPU
    merged = fp32.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights
    return merged.to(base_dtype(expert))


def release_served_model(expert) -> None:
    """Drop the loaded expert's model (the export needs only its adapter, already written) and hand its GPU memory
    back, so the merge's copy is the only one held."""
    import gc

    import torch

    expert.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out}: exists and is not empty; pick another folder or pass --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export(model_uri: str, fmt: Literal["peft", "merged"], out: Path, force: bool = False) -> Path:
    from pipeline.registry import versions

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    _, expert = versions.load_version(model_uri)
    recipe = expert.recipe
    if fmt == "merged" and recipe.model.quantization != "none":
        raise UserError(
            f"--format merged: the adapter was trained on a {recipe.model.quantization} quantized base; merging into "
            "quantized weights loses precision. Export --format peft and serve it with the quantized base instead"
        )
    prepare_out(out, force)
    if fmt == "peft":
        expert.model.save_pretrained(out)
        if recipe.model.adapter.method == "dora":
            console.print("[yellow]export[/]: DoRA adapters are not loaded by vLLM's LoRA support; use --format merged")
    else:
        merged_model(expert, out).save_pretrained(out)  # safetensors (transformers 5 writes nothing else)
    expert.tokenizer.save_pretrained(out)
    (out / "expert.json").write_text(json.dumps(expert_card(expert, model_uri, fmt), indent=2, ensure_ascii=False) + "\n")
    files = sorted(p.name for p in out.iterdir())
    console.print(f"[green]export[/]: {model_uri} as {fmt} in {out} ({', '.join(files)})")
    name = recipe.registry.model_name
    if fmt == "peft":
        console.print(f"serve at scale: vllm serve {expert.base_source} --enable-lora --lora-modules {name}={out}")
    else:
        console.print(f"serve at scale: vllm serve {out} --served-model-name {name}")
    return out
