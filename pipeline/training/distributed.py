"""Training under several processes (`accelerate launch` with a config from `pipeline/launch/`, or torchrun).

What differs from one process: a quantized base must be placed on each rank's own device (bitsandbytes
quantizes where the weights land, so without a placement every rank would quantize onto GPU 0); sharded
launches (FSDP, ZeRO-3) need 4-bit weights stored in the compute dtype so they can be sharded with the rest;
the resume plan is made once, on rank 0, and given to every rank, so all start from the same step; and the
final adapter is gathered by every rank together before rank 0 writes it (a rank-0-only `save_pretrained`
under ZeRO-3 or FSDP writes shards or empty tensors, or waits forever for the other ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import UserError
from pipeline.recipe.schema import ModelSection

LAUNCH_CONFIGS = {
    "ddp": "pipeline/launch/ddp.yaml",
    "fsdp": "pipeline/launch/fsdp.yaml",
    "zero2": "pipeline/launch/deepspeed-zero2.yaml",
    "zero3": "pipeline/launch/deepspeed-zero3.yaml",
}
SHARDED = ("fsdp", "zero3")  # launches that split the base's weights over the ranks

T = TypeVar("T")


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def launch_of(env: Mapping[str, str]) -> str:
    """Which kind of launch this process is part of, from the variables `accelerate launch`/torchrun set:
    `single`, `ddp`, `fsdp`, `zero2` or `zero3` (ZeRO stages 0 and 1 count as `zero2`: nothing is sharded)."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "zero3" if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip() == "3" else "zero2"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if int(env.get("WORLD_SIZE", "1") or 1) > 1 else "single"


def effective_launch(launch: str, device) -> str:
    """The launch as it will run: accelerate applies FSDP and DeepSpeed only on accelerators; on CPUs
    (gloo) it trains plain data-parallel, so a sharded launch there is DDP and is reported as such."""
    if launch in ("fsdp", "zero2", "zero3") and (device is None or str(device) == "cpu"):
        return "ddp"
    return launch


def check_launch(model: ModelSection, launch: str) -> None:
    """Refuse, before anything loads, a base the launch cannot shard (exit 2, naming the key and the config)."""
    if model.quantization == "8bit" and launch in SHARDED:
        raise UserError(
            f"model.quantization: 8bit cannot be sharded by {LAUNCH_CONFIGS[launch]} (LLM.int8 weights keep their "
            f"int8 storage, which {launch} cannot split with the rest); use model.quantization: 4bit (QLoRA) or none, "
            f"or launch with {LAUNCH_CONFIGS['ddp']} or {LAUNCH_CONFIGS['zero2']}"
        )


def device_map_for(model: ModelSection, launch: str, device) -> dict[str, Any] | None:
    """Where `from_pretrained` puts the base: a quantized base on this rank's own accelerator (`device`, e.g.
    cuda:LOCAL_RANK), since bitsandbytes quantizes where it loads; None otherwise (the Trainer places a
    full-precision base, FSDP/ZeRO-3 shard it while loading, and a CPU needs no placement)."""
    if model.quantization == "none" or launch in SHARDED or device is None or str(device) == "cpu":
        return None
    return {"": device}


def shard_quantized(launch: str) -> bool:
    """Whether 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`), which lets FSDP and
    ZeRO-3 shard them like every other weight; their uint8 storage otherwise stays whole on each rank."""
    return launch in SHARDED


def on_every_rank(decide: Callable[[], T], main_process: bool) -> T:
    """`decide()` run on rank 0 alone (it may delete files), its result, or its error, given to every rank:
    all ranks then resume from the same checkpoint, or all stop with the same message."""
    import torch.distributed as dist

    outcome: tuple[str, Any] | None = None
    if main_process:
        try:
            outcome = ("result", decide())
        except Exception as err:  # the other ranks must not wait for a broadcast that never comes
            outcome = ("error", err)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome is None:
        raise RuntimeError("no rank 0 in this launch: the resume plan is made there")
    kind, value = outcome
    if kind == "error":
        raise value
    return value


def save_adapter(trainer, out_dir: Path) -> None:
    """The trained adapter (safetensors) and tokenizer in `out_dir`, called on every rank: under FSDP and ZeRO-3
    the full LoRA weights are gathered from all ranks first, then rank 0 writes them. The Trainer's pickled
    `training_args.bin` is removed: a version holds safetensors and JSON only."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out_dir))
    if trainer.args.should_save:
        (out_dir / "training_args.bin").unlink(missing_ok=True)
