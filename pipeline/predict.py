"""Local inference for the expert and the base model, without free-form parsing where possible.

Classification scores every label as a continuation of the prompt and takes
the best one; confidence is its probability normalised over the label set, so
the answer is always a valid label. Extraction decodes greedily and parses the
first JSON object; confidence is the geometric mean of the answer's token
probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch


def prompt_texts(tokenizer, prompts: list[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def _end_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@torch.inference_mode()
def score_labels(model, tokenizer, prompt_text: list[str], labels: list[str]) -> list[list[float]]:
    """Log-probability of each label (plus the end-of-turn token) after each prompt.

    The prompts run once (left-padded, KV cache kept); the cache is then
    repeated per label and only the label tokens run, so the cost grows with
    label length, not prompt length x number of labels.
    """
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for label in labels]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_text]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_prompts, n_labels = len(prompt_ids), len(labels)

    width = max(len(p) for p in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    first_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (n_prompts, vocab)
    cache = out.cache
    cache.batch_repeat_interleave(n_labels)

    label_width = max(len(ids) for ids in label_ids)
    cont = torch.tensor([ids + [pad] * (label_width - len(ids)) for ids in label_ids] * n_prompts)
    cont_mask = torch.tensor([[1] * len(ids) + [0] * (label_width - len(ids)) for ids in label_ids] * n_prompts)
    lengths = prompt_mask.sum(-1).repeat_interleave(n_labels)
    cont_positions = lengths.unsqueeze(-1) + torch.arange(label_width)
    mask = torch.cat([prompt_mask.repeat_interleave(n_labels, dim=0), cont_mask], dim=-1)
    cont_lp = torch.log_softmax(
        model(input_ids=cont, attention_mask=mask, position_ids=cont_positions, cache=cache).logits.float(),
        dim=-1,
    )
    scores = []
    for i in range(n_prompts):
        row = []
        for j, ids in enumerate(label_ids):
            k = i * n_labels + j
            total = first_lp[i, ids[0]]
            if len(ids) > 1:
                total = total + cont_lp[k, : len(ids) - 1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum()
            row.append(float(total))
        scores.append(row)
    return scores


def classify(model, tokenizer, prompts, labels: list[str], batch_size: int, on_batch: Callable[[int], None] | None = None):
    """(label, confidence, seconds per example) for every prompt."""
    out = []
    texts = prompt_texts(tokenizer, prompts)
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        started = time.perf_counter()
        scores = score_labels(model, tokenizer, chunk, labels)
        per_example = (time.perf_counter() - started) / len(chunk)
        for row in scores:
            probs = torch.softmax(torch.tensor(row), dim=0)
            best = int(torch.argmax(probs))
            out.append({"prediction": labels[best], "confidence": float(probs[best]), "latency_s": per_example})
        if on_batch:
            on_batch(len(chunk))
    return out


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int, on_batch: Callable[[int], None] | None = None):
    """Greedy answers with a confidence from their token probabilities, and seconds per example."""
    out = []
    texts = prompt_texts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            started = time.perf_counter()
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                output_scores=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=_end_ids(tokenizer) or None,
            )
            new_tokens = gen.sequences[:, enc["input_ids"].shape[1] :]
            steps = torch.stack(gen.scores, dim=1).float().log_softmax(-1)
            token_lp = steps.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
            per_example = (time.perf_counter() - started) / len(chunk)
            for row in range(len(chunk)):
                keep = new_tokens[row] != tokenizer.pad_token_id
                lp = token_lp[row][keep]
                text = tokenizer.decode(new_tokens[row][keep], skip_special_tokens=True)
                confidence = math.exp(float(lp.mean())) if len(lp) else 0.0
                out.append({"raw": text, "confidence": confidence, "latency_s": per_example})
            if on_batch:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return out


def parse_generated(rows: list[dict[str, Any]], parse: Callable[[str], Any]) -> list[dict[str, Any]]:
    return [{**r, "prediction": parse(r["raw"])} for r in rows]
