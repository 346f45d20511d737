"""Token counting with the base model's tokenizer, and `data.max_tokens` (reject or truncate) applied to every row.

Counts are of the rendered chat: the prompt with the chat template and the
generation prompt, and the answer part of the full conversation.
"""

from __future__ import annotations

from typing import Any

from pipeline.console import console
from pipeline.data.examples import Example, chat_messages, rejection
from pipeline.errors import UserError
from pipeline.recipe.schema import Recipe

TOKEN_BATCH = 2048
# rows within this many tokens of data.max_tokens are re-measured by rendering them in full
NEAR_LIMIT = 16


def measure_tokens(tokenizer, system: str, texts: list[str], answers: list[str]) -> tuple[list[int], list[int]]:
    """Token counts of the rendered prompt (chat template, generation prompt) and of the answer part."""
    prompts = [tokenizer.apply_chat_template(chat_messages(system, t), tokenize=False, add_generation_prompt=True) for t in texts]
    fulls = [tokenizer.apply_chat_template(chat_messages(system, t, a), tokenize=False) for t, a in zip(texts, answers)]
    encoded = tokenizer(prompts + fulls, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(texts)
    prompt_lens = [len(ids) for ids in encoded[:n]]
    return prompt_lens, [len(full) - p for full, p in zip(encoded[n:], prompt_lens)]


def truncate_text(tokenizer, text: str, drop_tokens: int) -> str:
    """The text without its last `drop_tokens` tokens (cut at a token boundary)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(offsets) - drop_tokens
    return text[: offsets[keep - 1][1]].rstrip() if keep > 0 else ""


def template_segments(tokenizer, system: str) -> tuple[list[int], list[int]] | None:
    """Token counts of the constant parts of the rendered prompt and of the rendered conversation.

    The chat template is rendered once with marker strings in place of the
    user text and the answer; what lies around the markers is the same for
    every row. None when the template does not place the content verbatim.
    """
    text_mark, answer_mark = "\x00expert-text\x00", "\x00expert-answer\x00"
    prompt = tokenizer.apply_chat_template(chat_messages(system, text_mark), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat_messages(system, text_mark, answer_mark), tokenize=False)
    if prompt.count(text_mark) != 1 or full.count(text_mark) != 1 or full.count(answer_mark) != 1:
        return None
    head, tail = full.split(text_mark)
    if answer_mark not in tail:
        return None
    parts = [*prompt.split(text_mark), head, *tail.split(answer_mark)]
    counts = [len(ids) for ids in tokenizer(parts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]
    return counts[:2], counts[2:]


def count_by_segments(tokenizer, segments, texts: list[str], answers: list[str]) -> tuple[list[int], list[int]]:
    """Prompt and answer token counts from the constant segments plus the tokens of each text and answer."""
    (p0, p1), (f0, f1, f2) = segments
    encoded = tokenizer(texts + answers, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(texts)
    prompt_lens = [p0 + len(ids) + p1 for ids in encoded[:n]]
    full_lens = [f0 + len(t) + f1 + len(a) + f2 for t, a in zip(encoded[:n], encoded[n:])]
    return prompt_lens, [f - p for f, p in zip(full_lens, prompt_lens)]


def enforce_max_tokens(examples, rejected, tokenizer, system, task, spec, recipe: Recipe):
    """Measure every row; rows over data.max_tokens are rejected or, with `truncate`, have their input cut.

    Rendering and tokenising the whole conversation for every row repeats the
    instruction's tokens each time, so counts come from `template_segments`
    plus each row's own text and answer tokens. That shortcut is used only
    when it gives exactly the full rendering's counts on the first batch, and
    every row near or over the limit is re-measured by full rendering, so
    reject/truncate decisions are always exact. Returns the kept examples
    (lengths filled in) and one record per truncated row.
    """
    limit = recipe.data.max_tokens
    (overhead,), (answer_overhead,) = measure_tokens(tokenizer, system, [""], [""])
    if overhead + answer_overhead >= limit:
        raise UserError(
            f"data.max_tokens={limit}: the chat template, instruction and "
            f"{'label list' if isinstance(spec, list) else 'schema' if spec else 'prompt'} alone take "
            f"{overhead + answer_overhead} tokens, so no row fits; raise data.max_tokens"
        )
    segments = template_segments(tokenizer, system)
    kept: list[Example] = []
    truncated: list[dict[str, Any]] = []
    report_every = max(TOKEN_BATCH, len(examples) // 10)
    for start in range(0, len(examples), TOKEN_BATCH):
        batch = examples[start : start + TOKEN_BATCH]
        texts, answers = [e.text for e in batch], [task.target_text(e.target, spec) for e in batch]
        if start == 0 or segments is None:
            prompt_lens, answer_lens = measure_tokens(tokenizer, system, texts, answers)
            if segments is not None and count_by_segments(tokenizer, segments, texts, answers) != (prompt_lens, answer_lens):
                segments = None  # the template's tokens interact with the content: measure every row in full
        else:
            prompt_lens, answer_lens = count_by_segments(tokenizer, segments, texts, answers)
            near = [i for i, (p, a) in enumerate(zip(prompt_lens, answer_lens)) if p + a > limit - NEAR_LIMIT]
            if near:
                exact = measure_tokens(tokenizer, system, [texts[i] for i in near], [answers[i] for i in near])
                for i, p, a in zip(near, *exact):
                    prompt_lens[i], answer_lens[i] = p, a
        for e, answer, p, a in zip(batch, answers, prompt_lens, answer_lens):
            e.prompt_tokens, e.answer_tokens = p, a
            if p + a <= limit:
                kept.append(e)
            elif recipe.data.max_tokens_policy == "truncate" and _truncate(e, answer, tokenizer, system, limit):
                truncated.append({"source": e.source, "line": e.line, "id": e.id, "tokens_before": p + a,
                                  "tokens_after": e.prompt_tokens + e.answer_tokens})
                kept.append(e)
            else:
                cause = "" if recipe.data.max_tokens_policy == "reject" else " (the answer and instruction alone do not fit)"
                rejected.append(rejection(e, "too_long", f"{p + a} tokens > data.max_tokens={limit}{cause}"))
        done = min(start + TOKEN_BATCH, len(examples))
        if done == len(examples) or done // report_every != start // report_every:
            console.print(f"  measured {done:,}/{len(examples):,} rows", highlight=False)
    return kept, truncated


def _truncate(e: Example, answer: str, tokenizer, system: str, limit: int) -> bool:
    """Cut e.text until prompt + answer fit in `limit` tokens; False when even an empty text would not fit."""
    text = e.text
    for _ in range(4):  # re-tokenising a cut text can merge differently; a few rounds converge
        (p,), (a,) = measure_tokens(tokenizer, system, [text], [answer])
        if p + a <= limit:
            e.text, e.prompt_tokens, e.answer_tokens = text, p, a
            return True
        text = truncate_text(tokenizer, text, p + a - limit)
        if not text:
            return False
    return False
