"""The answer-only LM head on a CPU: TRL's fused head scores only the positions that carry loss, with the
loss and gradients TRL's every-position scoring gives."""

from __future__ import annotations

import pytest
import torch

from pipeline.training import speedups


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _loss_and_grads(model, batch, compact: bool, monkeypatch, original):
    from trl.trainer import utils

    monkeypatch.setattr(utils, "_use_triton", (lambda device: True) if compact else (lambda device: False))
    rows = []

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(utils._ChunkedLogProbFunction, "apply", counting)
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, rows


def test_answer_only_head_scores_only_loss_positions_with_the_same_loss_and_gradients(monkeypatch):
    from trl.trainer.utils import _ChunkedLogProbFunction, add_fused_lm_head

    apply = _ChunkedLogProbFunction.apply
    model = _tiny_causal_lm()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 512, (3, 20))
    labels = torch.full_like(ids, -100)
    labels[:, 15:] = ids[:, 15:]  # the answer: the last 5 tokens of each row
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # one row left-padded
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    full_loss, full_grads, full_rows = _loss_and_grads(model, batch, False, monkeypatch, apply)
    compact_loss, compact_grads, compact_rows = _loss_and_grads(model, batch, True, monkeypatch, apply)
    assert full_rows == [3 * 19], "TRL's CPU default scores every (shifted) position"
    assert compact_rows == [3 * 5], "only the positions whose label is an answer token"
    assert torch.allclose(compact_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == compact_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(compact_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_the_cpu_choice_is_extended_once_and_other_devices_keep_trls(monkeypatch):
    from trl.trainer import utils

    monkeypatch.setattr(utils, "_use_triton", lambda device: device.type == "cuda")
    assert speedups.compact_lm_head_on_cpu() is None
    once = utils._use_triton
    assert speedups.compact_lm_head_on_cpu() is None and utils._use_triton is once, "idempotent"
    assert once(torch.device("cpu")) and once(torch.device("cuda")) and not once(torch.device("meta"))
    assert speedups.lm_head_positions(torch.device("cpu")) == speedups.ANSWER_ONLY


@pytest.mark.parametrize("version", ["0.29.0", "2.0.0"])
def test_an_unchecked_trl_release_keeps_trls_head(monkeypatch, version):
    import trl
    from trl.trainer import utils

    monkeypatch.setattr(trl, "__version__", version)
    monkeypatch.setattr(utils, "_use_triton", lambda device: False)
    assert "outside the releases" in speedups.compact_lm_head_on_cpu()
    assert speedups.lm_head_positions(torch.device("cpu")) == speedups.EVERY_POSITION


def _bf16_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _autocast_step(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as profile:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    casts = sum(e.count for e in profile.key_averages() if e.key == "aten::_to_copy")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, casts


def test_lora_layers_under_autocast_skip_the_round_trip_casts_with_the_same_loss_and_gradients():
    model = _bf16_lora_model()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}, "PEFT's fp32 adapters"
    ids = torch.randint(0, 256, (2, 16))
    loss, grads, casts = _autocast_step(model, ids)
    assert speedups.skip_lora_input_casts(model) == 2 * 7, "every adapted linear layer of both blocks"
    fewer_loss, fewer_grads, fewer_casts = _autocast_step(model, ids)
    assert fewer_casts < casts, (fewer_casts, casts)
    assert torch.allclose(fewer_loss, loss, rtol=1e-6, atol=0), "half -> fp32 -> half is exact: the same numbers"
    for name, grad in grads.items():
        assert torch.allclose(fewer_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert speedups.skip_lora_input_casts(model) == 0, "idempotent"
