"""The GPU path (marked `gpu`; skipped without CUDA): bf16 is chosen, QLoRA trains, padding-free batches keep
examples apart with the attention kernel training picks. Run on a lent GPU by scripts/gpu_check.sh.

They use the pipeline's own functions and TRL's collator on the tiny model, not the whole stage, so that the
GPU image needs no MLflow server.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import models
from pipeline.recipe import AdapterSection, ModelSection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)"),
]


def test_auto_settings_on_a_gpu():
    assert models.resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    attention = models.resolve_attention("auto", 128)
    assert attention in (*models.VARLEN_ATTENTION, "sdpa")
    assert models.choose_padding_free("auto", False, attention)[0] == (attention in models.VARLEN_ATTENTION)


def test_qlora_trains_the_adapter_and_leaves_4bit_base_weights(tiny_model_dir):
    import bitsandbytes as bnb
    from peft import get_peft_model

    section = ModelSection(base=str(tiny_model_dir), quantization="4bit")
    model = models.load_base_model(section, tiny_model_dir, "bf16")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "no 4-bit layers"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = get_peft_model(model, models.to_lora_config(AdapterSection()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 250, (4, 24), device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed, "the adapter did not move"
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        original = before[name.replace("base_model.model.", "").replace(".base_layer", "")]
        assert torch.equal(param.detach(), original), f"{name} changed"


def test_padding_free_batches_keep_examples_apart_with_the_chosen_attention(tiny_model_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    attention = models.resolve_attention("auto", 128)
    model = models.load_base_model(ModelSection(base=str(tiny_model_dir)), tiny_model_dir, "bf16", attention)
    model = model.cuda().eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (7, 12, 4, 30):
        ids = torch.randint(5, 250, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})

    def summed_loss(batch):
        labels = batch.pop("labels").cuda()
        keep = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "seq_idx"}
        if "attention_mask" in keep:
            keep = {k: keep[k] for k in ("input_ids", "attention_mask")}
        logits = model(**keep, use_cache=False).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )

    with torch.no_grad():
        padded = summed_loss(DataCollatorForLanguageModeling(pad_token_id=0)(examples))
        flat = summed_loss(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples))
    assert float(flat) == pytest.approx(float(padded), rel=2e-2)  # bf16 kernels differ in rounding only
