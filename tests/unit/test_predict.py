"""Local inference on the tiny model: label scoring equals full-sequence scoring; constrained extraction always validates."""

import json
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.inference import answering as predict
from pipeline.inference.answering import (
    CLOSE_MARGIN,
    PackedBf16Linear,
    _private_copy,
    _score,
    _score_in_one_pass,
    _width_groups,
    classify,
    generate,
    pack_linear_weights,
    prompt_texts,
    score_labels,
    shared_prefix,
)
from pipeline.inference.models import cpu_has_native_bf16
from pipeline.tasks.extraction import check_target, parse_answer

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


def test_shared_prefix_cache_gives_the_same_scores(tiny):
    model, tokenizer = tiny
    system = "<|im_start|>system\nRoute the customer message to one support queue: billing, shipping or account.<|im_end|>\n"
    prompts = [system + f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
               for text in ("my card was charged twice", "parcel late", "I cannot log in to my account at all")]
    prefix = shared_prefix(model, tokenizer, prompts)
    assert prefix is not None and len(prefix.ids) >= 16
    with torch.inference_mode():
        expected = full_sequence_scores(model, tokenizer, prompts, LABELS)
    got, pruned = _score(model, tokenizer, prompts, LABELS, prefix)
    assert pruned == [0.0] * 3
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=1e-4)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_one_pass_scores_match_full_sequences(tiny, with_prefix):
    """Prompt tokens and packed labels in one forward pass, left-padded prompts of different lengths."""
    model, tokenizer = tiny
    system = "<|im_start|>system\nRoute the customer message to one support queue: billing, shipping or account.<|im_end|>\n"
    prompts = [system + f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
               for text in ("my card was charged twice", "parcel?", "I cannot log in to my account at all, since Monday")]
    prefix = shared_prefix(model, tokenizer, prompts) if with_prefix else None
    with torch.inference_mode():
        expected = full_sequence_scores(model, tokenizer, prompts, LABELS)
    got, pruned = _score_in_one_pass(model, tokenizer, prompts, LABELS, prefix)
    assert pruned == [0.0] * 3
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=1e-4)


@contextmanager
def preferring(model, boosts: dict[int, float]):
    """Fault injection: every position's logits favour some tokens, as a trained expert favours its labels."""
    ids, values = list(boosts), torch.tensor(list(boosts.values()))

    def hook(module, args, output):
        output.logits[..., ids] += values.to(output.logits.dtype)

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_pruning_keeps_the_exhaustive_answer_and_bounds_confidence(tiny):
    model, tokenizer = tiny
    labels = LABELS + ["refund", "returns", "delivery", "technical", "billing address", "shipping cost"]
    prompts = [[{"role": "system", "content": "Route the message. Labels: " + ", ".join(labels)},
                {"role": "user", "content": text}] for text in ("refund please", "app crashes", "hi", "parcel?", "x y z")]
    texts = prompt_texts(tokenizer, prompts)
    first_tokens = {tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels}
    assert len(first_tokens) < len(labels)  # shared first tokens are exercised
    # random model (flat: pruned first tokens often beat the best full score, so the second round runs),
    # then one that favours one label's tokens (peaked, like a trained expert: most labels stay pruned)
    favoured = tokenizer("technical support", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for boost in (0.0, 15.0):
        with preferring(model, dict.fromkeys(favoured, boost)):
            full = classify(model, tokenizer, prompts, labels, batch_size=5, prune_below=None, one_pass_tokens=0)
            for threshold in (0.9, 0.3, 1e-2):
                pruned = classify(model, tokenizer, prompts, labels, batch_size=5, prune_below=threshold,
                                  one_pass_tokens=0)
                assert [r["prediction"] for r in pruned] == [r["prediction"] for r in full]
                assert all(p["confidence"] <= f["confidence"] + 1e-6 for p, f in zip(pruned, full))
            scores, mass = _score(model, tokenizer, texts, labels, None, prune_below=0.9)
            assert all(0 <= m <= 1 for m in mass)
    assert any(None in row for row in scores), "with a peaked model a high threshold must leave labels unscored"


def test_a_pruned_label_that_could_win_is_scored_after_all(tiny):
    """The likeliest first token starts a label whose rest is improbable; a pruned label's first token
    beats that label's full score, so the pruned label must be scored, and it wins."""
    model, tokenizer = tiny
    labels = ["technical support", "refund"]
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    boosts = {ids[0][0]: 12.0, tokenizer.eos_token_id: 12.0, ids[1][0]: 9.0}  # "refund" first token: ~e^-3 of top
    boosts.update({t: 12.0 for t in ids[1][1:]})
    texts = prompt_texts(tokenizer, [[{"role": "user", "content": "money back please"}]])
    with preferring(model, boosts):
        full = score_labels(model, tokenizer, texts, labels)[0]
        scores, mass = _score(model, tokenizer, texts, labels, None, prune_below=0.5)
    assert full[1] > full[0], "the set-up: the label with the less likely first token is the exhaustive answer"
    assert scores[0] == pytest.approx(full, abs=1e-4) and mass == [0.0]


def test_pruning_groups_labels_by_first_token(tiny):
    """Labels sharing a first token are scored together: with one first token likely, all of its labels are."""
    model, tokenizer = tiny
    labels = ["billing", "billing address", "billing cycle", "shipping", "shipping cost"]
    texts = prompt_texts(tokenizer, [[{"role": "user", "content": "invoice"}]])
    favoured = tokenizer("billing", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with preferring(model, dict.fromkeys(favoured, 8.0)):
        scores, _ = _score(model, tokenizer, texts, labels, None, prune_below=0.5)
    first = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    scored_first = {first[j] for j, lp in enumerate(scores[0]) if lp is not None}
    assert scored_first == {first[0]}
    assert [lp is not None for lp in scores[0]] == [f in scored_first for f in first]


def test_classify_returns_valid_label_and_normalised_confidence(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": "refund please"}], [{"role": "user", "content": "app crashes"}]]
    rows = classify(model, tokenizer, prompts, LABELS, batch_size=1)
    assert [r["prediction"] in LABELS for r in rows] == [True, True]
    assert all(1 / len(LABELS) <= r["confidence"] <= 1 for r in rows)


def test_batched_classification_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": text}] for text in ("refund please", "app crashes on start", "hi", "parcel?")]
    batched = classify(model, tokenizer, prompts, LABELS, batch_size=4)
    single = classify(model, tokenizer, prompts, LABELS, batch_size=1)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert [r["confidence"] for r in batched] == pytest.approx([r["confidence"] for r in single], abs=1e-4)


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": ["string", "null"], "pattern": "^[A-Z][0-9]{5}$"},
        "product": {"type": "string", "minLength": 1},
        "quantity": {"type": "integer", "minimum": 1},
        "issue": {"type": "string", "enum": ["damaged", "missing", "late", "wrong_item", "other"]},
    },
    "required": ["order_id", "product", "quantity", "issue"],
    "additionalProperties": False,
}


def test_constrained_extraction_is_always_schema_valid_even_for_a_random_model(tiny):
    model, tokenizer = tiny
    texts = ["two blue mugs arrived broken, order A12345", "where is my lamp", "wrong size shoes", "x", "refund R99999 now",
             "the parcel never came and nobody answers the phone, this is the third time I write"]
    prompts = [[{"role": "system", "content": "Extract the order."}, {"role": "user", "content": t}] for t in texts]
    rows = generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=3, schema=ORDER_SCHEMA)
    for row in rows:
        obj = json.loads(row["raw"])  # parses...
        assert check_target(obj, ORDER_SCHEMA) is None, row["raw"]  # ...and validates
        assert 0 < row["confidence"] <= 1
    free = generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=3)
    assert sum(parse_answer(r["raw"], ORDER_SCHEMA) is not None for r in free) < len(free), (
        "the random model does not produce valid JSON unconstrained, so the constraint is what makes it valid"
    )


# SNIPS-shaped: open-ended slot names and string-or-list values give a rambling model room to loop
SLOTS_SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["PlayMusic", "GetWeather"]},
        "slots": {
            "type": "object",
            "additionalProperties": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 2},
                ]
            },
        },
    },
    "required": ["intent", "slots"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("max_new_tokens", [24, 48])
def test_a_model_that_keeps_opening_members_still_closes_within_the_budget(tiny, max_new_tokens):
    """Fault injection: a model that always prefers `,` and `"` (a new member) to `}` would loop to
    the budget and leave an unfinished object, unless closing prefers ending over opening."""
    model, tokenizer = tiny
    openers = [i for i in range(len(tokenizer)) if (t := tokenizer.decode([i]).strip()) and set(t) <= set(',"')]

    def prefer_openers(module, args, output):
        output.logits[..., openers] += 30.0

    texts = ["play some jazz by miles davis", "weather in paris tomorrow", "x", "add this to my road trip playlist"]
    prompts = [[{"role": "system", "content": "Extract intent and slots."}, {"role": "user", "content": t}] for t in texts]
    hook = model.register_forward_hook(prefer_openers)
    try:
        rows = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=4, schema=SLOTS_SCHEMA)
    finally:
        hook.remove()
    for row in rows:
        assert check_target(json.loads(row["raw"]), SLOTS_SCHEMA) is None, row["raw"]


def test_label_passes_group_rows_of_similar_width():
    # one wide row would pad the narrow ones to 80 slots: 3 x 80 + 32 > (2 x 3 + 32) + (80 + 32)
    assert _width_groups([3, 80, 2], pass_cost=32) == [[2, 0], [1]]
    # similar widths: a second pass costs more than the padding it saves
    assert _width_groups([10, 12, 11], pass_cost=32) == [[0, 2, 1]]
    assert _width_groups([], pass_cost=32) == []


def test_answers_that_fit_the_budget_are_not_cut_short(tiny):
    """Closing early is only for answers that would not fit: with a budget just above what the answer
    takes (plus the closing margin), a model that wants as many items as allowed gets all of them."""
    model, tokenizer = tiny
    schema = {"type": "object", "properties": {"answers": {"type": "array", "items": {"enum": ["yes", "no"]},
                                                          "maxItems": 6}},
              "required": ["answers"], "additionalProperties": False}
    openers = [i for i in range(len(tokenizer)) if (t := tokenizer.decode([i]).strip()) and set(t) <= set(',"')]
    prompts = [[{"role": "user", "content": "answer every question"}]]
    with preferring(model, dict.fromkeys(openers, 30.0)):
        roomy = generate(model, tokenizer, prompts, max_new_tokens=120, batch_size=1, schema=schema)[0]["raw"]
        assert len(json.loads(roomy)["answers"]) == 6, roomy
        used = len(tokenizer(roomy, add_special_tokens=False)["input_ids"]) + 1  # + end of turn
        tight = generate(model, tokenizer, prompts, max_new_tokens=used + CLOSE_MARGIN + 2 + 1, batch_size=1,
                         schema=schema)[0]["raw"]
    assert tight == roomy


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and cpu_has_native_bf16()),
                    reason="packing needs a CPU with native bf16 and a oneDNN build")
def test_packed_bf16_linear_layers_give_bit_identical_logits_and_scores(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    linear = [m for m in packed.modules() if type(m) is torch.nn.Linear]
    assert pack_linear_weights(packed) == len(linear), "every linear layer, the LM head included"
    assert not [m for m in packed.modules() if type(m) is torch.nn.Linear]
    assert isinstance(packed.lm_head, PackedBf16Linear)
    texts = ["my card was charged twice", "where is my parcel? it is late", "hi"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        assert torch.equal(packed(**batch).logits, eager(**batch).logits)
    prompts = [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for t in texts]
    assert _score_in_one_pass(packed, tokenizer, prompts, LABELS) == _score_in_one_pass(eager, tokenizer, prompts, LABELS)


def test_fp32_models_are_not_packed(tiny):
    model, _ = tiny
    assert model.dtype == torch.float32 and pack_linear_weights(model) == 0
    assert not any(isinstance(m, PackedBf16Linear) for m in model.modules())


def test_a_private_cache_copy_leaves_the_shared_prefix_as_it_was(tiny):
    model, tokenizer = tiny
    system = "<|im_start|>system\nRoute the customer message to one support queue: billing, shipping or account.<|im_end|>\n"
    prompts = [system + f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
               for text in ("my card was charged twice", "parcel late")]
    prefix = shared_prefix(model, tokenizer, prompts)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    first = _score_in_one_pass(model, tokenizer, prompts, LABELS, prefix)
    assert _score_in_one_pass(model, tokenizer, prompts[:1], LABELS, prefix)[0] == first[0][:1]
    assert _score_in_one_pass(model, tokenizer, prompts, LABELS, prefix) == first, "the prefix was not extended"
    for layer, (keys, values) in zip(prefix.cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    copied = _private_copy(prefix.cache)
    assert copied is not prefix.cache and all(a is not b for a, b in zip(copied.layers, prefix.cache.layers))


def test_packing_without_its_private_ops_packs_nothing_and_says_why(tiny_model_dir, monkeypatch):
    """oneDNN's linear ops are private to torch; a build without one (here: renamed) leaves every layer as it was."""
    monkeypatch.setattr(predict, "PACKING_OPS", ("_reorder_linear_weight_renamed", "_linear_pointwise"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    reason = predict.packing_unavailable()
    assert reason is not None
    if torch.backends.mkldnn.is_available() and cpu_has_native_bf16():
        assert "lacks oneDNN's private linear ops" in reason and "_reorder_linear_weight_renamed" in reason
    assert pack_linear_weights(model) == 0
    assert not any(isinstance(m, PackedBf16Linear) for m in model.modules())


def test_a_cached_prefix_the_prompts_do_not_start_with_is_a_counted_miss(tiny):
    """A server's cached system-prompt prefix is used only when every prompt starts with its tokens; otherwise the
    call runs its own prefix (the answers classify gives without one) and counts a miss."""
    model, tokenizer = tiny
    system = "Route the customer message to one support queue: billing, shipping, technical support or account."
    cached = predict.system_prefix(model, tokenizer, system)
    assert cached is not None
    messages = [[{"role": "system", "content": system}, {"role": "user", "content": t}] for t in ("parcel late", "hi")]
    with_prefix = classify(model, tokenizer, messages, LABELS, 2, prefix=cached)
    assert cached.misses == 0
    assert [r["prediction"] for r in with_prefix] == [r["prediction"] for r in classify(model, tokenizer, messages, LABELS, 2)]
    other = [[{"role": "system", "content": "Another prompt entirely."}, {"role": "user", "content": "parcel late"}]]
    assert _answers(classify(model, tokenizer, other, LABELS, 1, prefix=cached)) == \
        _answers(classify(model, tokenizer, other, LABELS, 1))
    assert cached.misses == 1


def _answers(rows):
    return [(r["prediction"], r["confidence"]) for r in rows]
