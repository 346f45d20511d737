"""The lean Llama forward pass used by `expert serve` gives transformers' logits bit for bit, or stays off."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import lean_forward
from pipeline.predict import _score_in_one_pass, classify, generate, shared_prefix

LABELS = ["billing", "shipping", "technical support", "account"]
SYSTEM = "<|im_start|>system\nRoute the customer message to one support queue: billing, shipping or account.<|im_end|>\n"
TEXTS = ["my card was charged twice", "parcel late", "I cannot log in to my account at all"]


def prompts(texts):
    return [SYSTEM + f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for t in texts]


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_scores_are_bit_identical_and_other_calls_still_work(tiny_model_dir, dtype):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference, lean = load(tiny_model_dir, dtype=dtype), load(tiny_model_dir, dtype=dtype)
    assert lean_forward.install(lean).startswith("lean forward pass on")
    assert isinstance(lean.forward, lean_forward.LeanForward)
    calls = []
    real = lean_forward.lean_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lean_forward, "lean_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
        for texts in (TEXTS[:1], TEXTS):  # one request, and a micro-batch of different lengths
            for with_prefix in (True, False):
                prefix = shared_prefix(lean, tokenizer, prompts(TEXTS)) if with_prefix else None
                ref_prefix = shared_prefix(reference, tokenizer, prompts(TEXTS)) if with_prefix else None
                assert _score_in_one_pass(lean, tokenizer, prompts(texts), LABELS, prefix) == \
                    _score_in_one_pass(reference, tokenizer, prompts(texts), LABELS, ref_prefix)
    assert len(calls) == 4, "every label-scoring pass took the lean path"
    # calls of other shapes (two-pass scoring's 2D masks, generation) go to transformers' forward, as before
    messages = [[{"role": "user", "content": t}] for t in TEXTS]

    def answers(rows, key):
        return [(row[key], row["confidence"]) for row in rows]

    assert answers(classify(lean, tokenizer, messages, LABELS, 2, one_pass_tokens=0), "prediction") == \
        answers(classify(reference, tokenizer, messages, LABELS, 2, one_pass_tokens=0), "prediction")
    assert answers(generate(lean, tokenizer, messages, 4, 2), "raw") == answers(generate(reference, tokenizer, messages, 4, 2), "raw")
    assert len(calls) == 4


def test_it_stays_off_where_it_cannot_stand_in(tiny_model_dir):
    eager = load(tiny_model_dir).eval()
    eager.config._attn_implementation = "eager"
    assert lean_forward.install(eager) == "lean forward pass off: attention is `eager`, not sdpa"
    training = load(tiny_model_dir).train()
    assert "training mode" in lean_forward.install(training)
    assert not isinstance(eager.forward, lean_forward.LeanForward)


def test_a_forward_that_differs_from_transformers_is_not_installed(tiny_model_dir, monkeypatch):
    """Fault injection: a rotary embedding off by one rounding step must be caught by the install probe."""
    real = lean_forward.apply_rotary_pos_emb

    def drifting(q, k, cos, sin):
        q, k = real(q, k, cos, sin)
        return torch.nextafter(q, torch.full_like(q, float("inf"))), k

    monkeypatch.setattr(lean_forward, "apply_rotary_pos_emb", drifting)
    model = load(tiny_model_dir)
    assert lean_forward.install(model) == "lean forward pass off: its logits differ from transformers' on a probe"
    assert not isinstance(model.forward, lean_forward.LeanForward)
