"""Training's speed-ups that change no number: the LM head scores only the answer's positions on a CPU, and LoRA
layers under autocast stop casting their input to fp32 and back.

TRL's SFTTrainer takes its loss from a fused LM head (`trl.trainer.utils.add_fused_lm_head`): the vocabulary is
projected in tiles and folded into log-probabilities without building the logits. On CUDA and XPU it projects
only the positions whose label is not -100; elsewhere it projects every position and masks afterwards, because
on compiled backends (Neuron) a row count that changes per batch recompiles the graph. A CPU runs eagerly and
never recompiles. With the loss on the completion only, a classification row's answer is ~4 of its ~45 tokens,
so on a CPU most of the LM head's work (SmolLM2's 49,152-token vocabulary: the projection, its recomputation in
the backward pass and the gradient) went to positions whose loss is masked to zero.

`compact_lm_head_on_cpu` makes TRL's one choice (`_use_triton` as `trl.trainer.utils` imported it, asked only
there) say yes on a CPU too. The kernels are unchanged: TRL's kernel module keeps its own `_use_triton` and runs
torch ops on a CPU. Each scored position gets the same ops over the same vocabulary; only the rows that enter
the product change, so the loss and gradients agree with TRL's to rounding (`tests/unit/test_train_speedups.py`).
Within the TRL releases it was checked against; outside them, or where the name has gone, training keeps TRL's
behaviour and the note says so.
"""

from __future__ import annotations

from pipeline.inference.speedups import release

# the TRL releases the fused head's `_use_triton` choice was read in and checked against: [from, to)
TRL_RELEASES = ((1, 10), (2, 0))
ANSWER_ONLY = "answer positions"
EVERY_POSITION = "every position"


def compact_lm_head_on_cpu() -> str | None:
    """Makes TRL's fused LM head score only the answer's positions on a CPU; None when it now does, else why not.
    Idempotent; leaves TRL as it is where its choice cannot be found or its release was not checked."""
    import trl
    from trl.trainer import utils

    low, high = TRL_RELEASES
    if not low <= release(trl.__version__) < high:
        return (f"TRL {trl.__version__} is outside the releases the answer-only LM head was checked against "
                f"({low[0]}.{low[1]} to before {high[0]}.{high[1]}); it scores every position")
    chooses_compact = getattr(utils, "_use_triton", None)
    if chooses_compact is None:
        return f"TRL {trl.__version__} has no `_use_triton` choice to extend; it scores every position"
    if not getattr(chooses_compact, "compacts_on_cpu", False):
        def compact_on_cpu_too(device) -> bool:
            return device.type == "cpu" or chooses_compact(device)

        compact_on_cpu_too.compacts_on_cpu = True
        utils._use_triton = compact_on_cpu_too
    return None


def lm_head_positions(device) -> str:
    """Which positions TRL's fused LM head scores on `device` in this process, after the CPU's is made compact."""
    from trl.trainer import utils

    from pipeline.console import console

    if device.type == "cpu" and (why_not := compact_lm_head_on_cpu()) is not None:
        console.print(f"[yellow]train[/]: {why_not}")
    chooses_compact = getattr(utils, "_use_triton", None)
    return ANSWER_ONLY if chooses_compact is not None and chooses_compact(device) else EVERY_POSITION


def skip_lora_input_casts(model) -> int:
    """Under bf16/fp16 autocast, a LoRA layer casts its half-precision input to its fp32 weights' dtype before the
    adapter's products, and autocast casts it straight back to half precision for them: two copies of every
    adapted layer's input (and of its gradient) for the same numbers, since half -> fp32 -> half is exact. PEFT's
    `cast_input_dtype_enabled` (public, set by `peft.helpers.disable_input_dtype_casting`) turns that cast off.
    Plain LoRA on a full-precision base only: DoRA's and the quantized layers' forwards do more with the input.
    Returns how many layers were changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and not module.lora_variant and module.cast_input_dtype_enabled:
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
