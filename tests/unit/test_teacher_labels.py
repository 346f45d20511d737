"""The teacher's pure parts: the Wilson interval, the cost estimate, and teacher labels kept out of test."""

from __future__ import annotations

import pytest

from pipeline.data.examples import Example
from pipeline.data.splitting import split_examples
from pipeline.data.teacher import estimate_cost
from pipeline.evaluation.stats import wilson_interval
from pipeline.recipe.schema import Recipe, TeacherSection


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_estimate_counts_four_characters_a_token():
    teacher = TeacherSection(model="m", api_key_env="K", price_per_mtok={"input": 1.0, "output": 2.0})
    prompts = [[{"role": "user", "content": "x" * 400}]] * 10
    assert estimate_cost(prompts, teacher, answer_tokens=5) == pytest.approx((10 * 100 * 1.0 + 10 * 5 * 2.0) / 1e6)
    assert estimate_cost(prompts, TeacherSection(model="m", api_key_env="K"), 5) is None


def recipe(test_labels: bool) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "task": {"type": "classification", "instruction": "i", "labels": ["a", "b"]},
        "data": {"source": "x.jsonl", "fields": {"text": "t", "target": "l"}, "split": {"validation": 0.2, "test": 0.2},
                 "teacher": {"model": "m", "api_key_env": "K", "test_labels": test_labels}},
        "model": {"base": "b"}, "registry": {"model_name": "t"}})


@pytest.mark.parametrize("test_labels", [False, True])
def test_teacher_labels_stay_out_of_test_unless_the_recipe_says_so(test_labels):
    rows = [Example(f"g{i}", i, f"gold {i}", "ab"[i % 2], "x.jsonl") for i in range(20)]
    rows += [Example(f"t{i}", 100 + i, f"taught {i}", "ab"[i % 2], "x.jsonl", provenance="teacher:m") for i in range(40)]
    splits = split_examples(rows, recipe(test_labels))
    taught_in_test = sum(e.provenance != "gold" for e in splits["test"])
    assert (taught_in_test > 0) == test_labels
    assert sum(map(len, splits.values())) == 60
    assert sum(e.provenance != "gold" for e in splits["validation"]) > 0, "teacher rows still validate"


def test_the_prompt_bound_is_never_below_a_real_tokenizers_count(tiny_model_dir):
    """The budget reserves `prompt_token_bound` before a request is sent: it must hold for a real tokenizer with
    its chat template, on text it was not trained on (accents, CJK, emoji, long numbers)."""
    from transformers import AutoTokenizer

    from pipeline.routing.frontier import prompt_token_bound

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["where is my parcel", "Grüße aus Köln, ça va?", "我的包裹在哪里", "📦🚚❓" * 5, "1234567890" * 20, ""]
    for text in texts:
        messages = [{"role": "system", "content": "Route the message."}, {"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert len(ids) <= prompt_token_bound(messages), (text, len(ids))
