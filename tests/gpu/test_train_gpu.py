"""The GPU's kernel choices (marked `gpu`; skipped without CUDA): bf16 and the attention kernel are chosen,
padding-free `auto` follows the kernel, and padding-free batches keep examples apart with the kernel training
picks. The stages themselves on a GPU are in test_stages_gpu.py. Run on a lent GPU by scripts/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.inference import models
from pipeline.recipe.schema import ModelSection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)"),
]


def test_auto_settings_on_a_gpu():
    assert models.resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    attention = models.resolve_attention("auto", 128, "bf16")[0]
    assert attention in (*models.VARLEN_ATTENTION, "sdpa")
    assert models.choose_padding_free("auto", False, attention)[0] == (attention in models.VARLEN_ATTENTION)


def test_padding_free_batches_keep_examples_apart_with_the_chosen_attention(tiny_model_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    attention = models.resolve_attention("auto", 128, "bf16")[0]
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
