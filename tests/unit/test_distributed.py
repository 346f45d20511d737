"""The pure parts of training under several processes: which launch this is, what it refuses, where a
quantized base goes, and the resume plan given from rank 0 to every rank."""

from __future__ import annotations

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
