"""Label scoring with a shared prompt cache gives the same scores as scoring every full sequence."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.predict import classify, score_labels

LABELS = ["billing", "shipping", "technical support", "account"]


def full_sequence_scores(model, tokenizer, prompt_text, labels):
    """Reference: score each prompt+label sequence on its own, no padding, no cache."""
    out = []
    for p in prompt_text:
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        row = []
        for label in labels:
            l_ids = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([p_ids + l_ids])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            row.append(float(sum(lp[len(p_ids) - 1 + i, t] for i, t in enumerate(l_ids))))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_cached_scores_match_full_sequences(tiny):
    model, tokenizer = tiny
    prompts = ["<|im_start|>user\nmy card was charged twice<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nwhere is my parcel? it is late and I am worried<|im_end|>\n<|im_start|>assistant\n",
               "hi"]
    with torch.inference_mode():
        expected = full_sequence_scores(model, tokenizer, prompts, LABELS)
    got = score_labels(model, tokenizer, prompts, LABELS)
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=1e-4)


def test_classify_returns_valid_label_and_normalised_confidence(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": "refund please"}], [{"role": "user", "content": "app crashes"}]]
    rows = classify(model, tokenizer, prompts, LABELS, batch_size=1)
    assert [r["prediction"] in LABELS for r in rows] == [True, True]
    assert all(1 / len(LABELS) <= r["confidence"] <= 1 for r in rows)
