"""Training under several processes: which launch this is, what it refuses, where a quantized base goes, the
resume plan given from rank 0 to every rank; and, in two real gloo processes, the 4-bit cache written once and
checkpoints sealed after every rank wrote its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.inference import models
from pipeline.recipe.schema import ModelSection
from pipeline.training import distributed


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "single"), ({"WORLD_SIZE": "1"}, "single"), ({"WORLD_SIZE": "2", "RANK": "1"}, "ddp"),
     ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "8"}, "fsdp"),
     ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "zero2"),
     ({"ACCELERATE_USE_DEEPSPEED": "True", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "zero3")],
)
def test_launch_of_reads_what_accelerate_and_torchrun_set(env, expected):
    assert distributed.launch_of(env) == expected


def test_sharded_launches_on_a_cpu_are_data_parallel():
    """accelerate applies FSDP/DeepSpeed only on accelerators; on gloo CPUs it runs DDP, and training says so."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [distributed.effective_launch(k, cpu) for k in ("fsdp", "zero2", "zero3", "ddp")] == ["ddp"] * 4
    assert [distributed.effective_launch(k, gpu) for k in ("fsdp", "zero3", "single")] == ["fsdp", "zero3", "single"]


@pytest.mark.parametrize("launch", ["fsdp", "zero3"])
def test_an_8bit_base_under_a_sharded_launch_is_refused_naming_the_key_and_config(launch):
    with pytest.raises(UserError, match=rf"model.quantization: 8bit cannot be sharded by pipeline/launch/.*{launch[:4]}"):
        distributed.check_launch(ModelSection(base="x", quantization="8bit"), launch)


@pytest.mark.parametrize("launch", ["single", "ddp", "zero2", "fsdp", "zero3"])
def test_4bit_and_full_precision_bases_are_allowed_under_every_shipped_launch(launch):
    for quantization in ("none", "4bit"):
        distributed.check_launch(ModelSection(base="x", quantization=quantization), launch)


def test_a_quantized_base_goes_to_its_own_ranks_gpu():
    """bitsandbytes quantizes where the weights land: without a placement every rank quantizes onto GPU 0."""
    qlora, lora = ModelSection(base="x", quantization="4bit"), ModelSection(base="x")
    rank1 = torch.device("cuda", 1)
    assert distributed.device_map_for(qlora, "ddp", rank1) == {"": rank1}
    assert distributed.device_map_for(qlora, "zero2", rank1) == {"": rank1}
    assert distributed.device_map_for(qlora, "fsdp", rank1) is None, "FSDP shards it while loading"
    assert distributed.device_map_for(lora, "ddp", rank1) is None, "the Trainer places a full-precision base"
    assert distributed.device_map_for(qlora, "single", torch.device("cpu")) is None


def test_sharded_launches_store_4bit_weights_in_the_compute_dtype():
    assert distributed.shard_quantized("fsdp") and distributed.shard_quantized("zero3")
    assert not distributed.shard_quantized("ddp") and not distributed.shard_quantized("zero2")
    assert models.to_bnb_config("4bit", torch.bfloat16, shard_quantized=True).bnb_4bit_quant_storage == torch.bfloat16
    assert models.to_bnb_config("4bit", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_the_rank0_decision_or_its_error_reaches_the_caller():
    assert distributed.on_every_rank(lambda: ("checkpoint-6", "run-1"), main_process=True) == ("checkpoint-6", "run-1")

    def refuse():
        raise UserError("pass --resume or --restart")

    with pytest.raises(UserError, match="pass --resume"):
        distributed.on_every_rank(refuse, main_process=True)


def in_two_processes(body, tmp_path: Path, *args) -> None:
    """`body(rank, *args)` in two real processes joined by a gloo process group (LOCAL_RANK set as torchrun does)."""
    import torch.multiprocessing as mp

    mp.spawn(_joined, args=(body, str(tmp_path / "rendezvous"), args), nprocs=2, join=True)


def _joined(rank: int, body, rendezvous: str, args) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        body(rank, *args)
    finally:
        dist.destroy_process_group()


def _load_4bit(rank: int, base: str, cache: str, log: str) -> None:
    import os

    os.environ["EXPERT_CACHE"] = cache
    write = models.write_cache_dir

    def logged_write(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        return write(*args, **kwargs)

    models.write_cache_dir = logged_write
    model = models.load_base_model(ModelSection(base=base, quantization="4bit"), Path(base), "fp32")
    with open(f"{log}.{rank}", "w") as f:
        f.write(str(sum(float(p.float().sum()) for p in model.parameters())))


def test_the_4bit_cache_is_written_once_by_the_local_main_process_and_read_by_the_other(tiny_model_dir, tmp_path):
    """Every rank wrote its own 4-bit copy on the first QLoRA launch (8 x 5.7 GB for an 8B): rank 0 writes it, the
    other waits at a barrier and loads what it wrote."""
    log = tmp_path / "writes.log"
    in_two_processes(_load_4bit, tmp_path, str(tiny_model_dir), str(tmp_path / "cache"), str(log))
    assert log.read_text().split() == ["0"], "one write, by the local main process"
    copies = list((tmp_path / "cache" / "quantized").iterdir())
    assert len(copies) == 1 and (copies[0] / models.QUANTIZED_MARKER).is_file()
    sums = [float((tmp_path / f"writes.log.{rank}").read_text()) for rank in (0, 1)]
    assert sums[0] == pytest.approx(sums[1], rel=1e-5), "both ranks hold the same weights"


def _save_and_seal(rank: int, checkpoint: str) -> None:
    import time
    from types import SimpleNamespace

    from pipeline.training import checkpoints

    folder = Path(checkpoint)
    if rank == 0:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    else:
        time.sleep(1.0)  # this rank is still writing its RNG state when rank 0 is done
    # the Trainer writes every rank's RNG state, then calls on_save on every rank
    (folder / f"rng_state_{rank}.pth").write_bytes(bytes([rank]) * 1000)
    state = SimpleNamespace(is_world_process_zero=rank == 0, global_step=4)
    checkpoints.SealCheckpoints().on_save(SimpleNamespace(output_dir=str(folder.parent)), state, None)


def test_a_checkpoint_is_sealed_after_every_rank_wrote_its_files(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    in_two_processes(_save_and_seal, tmp_path, str(checkpoint))
    from pipeline.training import checkpoints

    sealed = json.loads((checkpoint / checkpoints.SEAL).read_text())["files"]
    assert set(sealed) == {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"}
    assert checkpoints.checkpoint_problem(checkpoint) is None
