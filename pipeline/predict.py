"""Local inference for the expert and the base model, without free-form parsing where possible.

Classification scores every label as a continuation of the prompt and takes
the best one; confidence is its probability normalised over the label set, so
the answer is always a valid label. Extraction decodes greedily under the
recipe's JSON Schema (llguidance masks every token the schema forbids), so
every answer parses and validates; confidence is the geometric mean of the
answer's token probabilities under that mask. Plain generation is batched
greedy decoding.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def prompt_texts(tokenizer, prompts: list[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def _end_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclass
class SharedPrefix:
    """The token ids every prompt starts with (system prompt, label list) and their KV cache, computed once."""

    ids: list[int]
    cache: Any


# labels whose first token is under this share of the likeliest label-first token are not scored in full
PRUNE_BELOW = 1e-3


@torch.inference_mode()
def shared_prefix(model, tokenizer, prompt_text: list[str], minimum: int = 16) -> SharedPrefix | None:
    """Run the prompts' common token prefix once; None when it is too short to be worth it."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_text]
    common = ids[0][: min(len(i) for i in ids) - 1]  # leave every prompt at least one token of its own
    for other in ids[1:]:
        n = 0
        while n < len(common) and other[n] == common[n]:
            n += 1
        common = common[:n]
    if len(common) < minimum:
        return None
    # only the cache is wanted: logits_to_keep=1 skips the vocabulary projection of every prefix position
    return SharedPrefix(common, model(input_ids=torch.tensor([common]), use_cache=True, logits_to_keep=1).cache)


@torch.inference_mode()
def score_labels(model, tokenizer, prompt_text: list[str], labels: list[str]) -> list[list[float]]:
    """Log-probability of each label (plus the end-of-turn token) after each prompt, every label in full."""
    return _score(model, tokenizer, prompt_text, labels)[0]


@torch.inference_mode()
def _score(model, tokenizer, prompt_text, labels, prefix: SharedPrefix | None = None, prune_below: float | None = None):
    """(scores, exact, pruned_mass) per prompt: label log-probabilities (None for labels not scored in full),
    whether the best label is certainly the exhaustive argmax, and an upper bound of the probability of the
    labels not scored.

    The prompts run once, after the cached shared `prefix` when given (each
    prompt's own tokens left-padded). Then the candidate labels' tokens run in
    ONE packed continuation per prompt: a block-diagonal causal 4D mask lets
    each label see the prompt and its own earlier tokens only, and positions
    restart after the prompt for each label, so the KV cache is never copied
    per label. With `prune_below`, a label whose first token is less likely
    than `prune_below` times the likeliest label-first token is not scored in
    full: labels that share a first token (BANKING77's `card_*`) stand or fall
    together, and their first token's probability bounds their total, so
    `pruned_mass` counts each pruned first token once. `exact` holds when the
    best full score beats every pruned first token (then no pruned label can
    win).
    """
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for label in labels]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_text]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_prompts, n_labels = len(prompt_ids), len(labels)
    shared = len(prefix.ids) if prefix is not None else 0
    own = [p[shared:] for p in prompt_ids]

    width = max(len(p) for p in own)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in own])
    own_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in own])
    prompt_mask = torch.cat([torch.ones(n_prompts, shared, dtype=torch.long), own_mask], dim=-1)
    positions = shared + (own_mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(n_prompts)
    out = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)  # only the last position predicts the first label token
    first_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (n_prompts, vocab)
    first = [[float(first_lp[i, ids[0]]) for ids in label_ids] for i in range(n_prompts)]
    scores: list[list[float | None]] = [list(row) for row in first]
    if prune_below is None:
        candidates = [list(range(n_labels))] * n_prompts
    else:
        floor = math.log(prune_below)
        candidates = [[j for j in range(n_labels) if row[j] >= max(row) + floor] for row in first]
    fed = [ids[:-1] for ids in label_ids]  # a label's last token is only ever predicted, never fed

    # packed continuation per prompt: slot -> (label, offset); padding slots only see themselves
    rows = []
    for cand in candidates:
        owner, offset = [], []
        for j in cand:
            owner += [j] * len(fed[j])
            offset += range(len(fed[j]))
        rows.append((owner, offset))
    total = max(len(owner) for owner, _ in rows)
    if total > 0:
        tokens = torch.full((n_prompts, total), pad)
        owners = torch.full((n_prompts, total), -1)
        offsets = torch.zeros((n_prompts, total), dtype=torch.long)
        targets = torch.zeros((n_prompts, total), dtype=torch.long)
        for i, (owner, offset) in enumerate(rows):
            n = len(owner)
            tokens[i, :n] = torch.tensor([fed[j][k] for j, k in zip(owner, offset)], dtype=torch.long)
            targets[i, :n] = torch.tensor([label_ids[j][k + 1] for j, k in zip(owner, offset)], dtype=torch.long)
            owners[i, :n] = torch.tensor(owner, dtype=torch.long)
            offsets[i, :n] = torch.tensor(offset, dtype=torch.long)
        same = (owners.unsqueeze(1) == owners.unsqueeze(2)) & (owners.unsqueeze(1) >= 0)
        causal = offsets.unsqueeze(1) <= offsets.unsqueeze(2)
        block = (same & causal) | torch.eye(total, dtype=torch.bool).unsqueeze(0)
        allowed = torch.cat([prompt_mask.bool().unsqueeze(1).expand(n_prompts, total, -1), block], dim=-1)
        dtype = out.logits.dtype if out.logits.is_floating_point() else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
        cont_positions = prompt_mask.sum(-1, keepdim=True) + offsets
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=cont_positions, cache=out.cache).logits.float()
        # each slot predicts its label's next token: logit - logsumexp, with no second vocab-sized tensor
        token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        for i, (owner, _) in enumerate(rows):
            for slot, j in enumerate(owner):
                scores[i][j] += float(token_lp[i, slot])
    exact, pruned_mass = [], []
    for i, cand in enumerate(candidates):
        pruned = set(range(n_labels)) - set(cand)
        pruned_first = {label_ids[j][0]: first[i][j] for j in pruned}  # one bound per first token
        for j in pruned:
            scores[i][j] = None
        best = max(scores[i][j] for j in cand)
        exact.append(not pruned_first or best >= max(pruned_first.values()))
        pruned_mass.append(sum(math.exp(lp) for lp in pruned_first.values()))
    return scores, exact, pruned_mass


# label sets whose tokens (all labels together) fit in this many are scored in one pass, without pruning
ONE_PASS_TOKENS = 64


@torch.inference_mode()
def _score_in_one_pass(model, tokenizer, prompt_text, labels, prefix: SharedPrefix | None = None):
    """Like `_score` without pruning, but the prompt's own tokens and every label run in ONE forward pass.

    Why: for a single request on a CPU the model is bound by reading its
    weights, so two passes cost nearly twice one. The label block follows the
    prompt's own tokens under one 4D mask: prompt tokens are causal among
    themselves and never see labels; each label slot sees the prompt and its
    own label's earlier tokens. Only the last prompt position and the label
    slots reach the vocabulary projection (`logits_to_keep`).
    """
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for label in labels]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_text]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_prompts = len(prompt_ids)
    shared = len(prefix.ids) if prefix is not None else 0
    own = [p[shared:] for p in prompt_ids]
    width = max(len(p) for p in own)
    fed = [ids[:-1] for ids in label_ids]  # a label's last token is only ever predicted, never fed
    owner = [j for j, ids in enumerate(fed) for _ in ids]
    offset = [k for ids in fed for k in range(len(ids))]
    total = len(owner)

    own_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in own], dtype=torch.bool)
    tokens = torch.tensor([[pad] * (width - len(p)) + p + [t for ids in fed for t in ids] for p in own])
    owners = torch.tensor(owner, dtype=torch.long)
    offsets = torch.tensor(offset, dtype=torch.long)
    positions = torch.cat([
        shared + (own_mask.long().cumsum(-1) - 1).clamp(min=0),
        shared + own_mask.sum(-1, keepdim=True) + offsets.unsqueeze(0),
    ], dim=-1)

    length = width + total
    allowed = torch.zeros((n_prompts, length, shared + length), dtype=torch.bool)
    allowed[:, :, :shared] = True
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed[:, :width, shared : shared + width] = causal & own_mask.unsqueeze(1)
    allowed[:, width:, shared : shared + width] = own_mask.unsqueeze(1)
    block = (owners.unsqueeze(0) == owners.unsqueeze(1)) & (offsets.unsqueeze(0) <= offsets.unsqueeze(1))
    allowed[:, width:, shared + width :] = block
    allowed[:, torch.arange(length), shared + torch.arange(length)] = True  # padding rows see themselves only
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(n_prompts)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                   logits_to_keep=total + 1).logits.float()
    log_norm = logits.logsumexp(-1)
    first = logits[:, 0].gather(-1, torch.tensor([[ids[0] for ids in label_ids]] * n_prompts)) - log_norm[:, :1]
    scores = first.tolist()
    if total:
        targets = torch.tensor([label_ids[j][k + 1] for j, k in zip(owner, offset)])
        token_lp = logits[:, 1:].gather(-1, targets.expand(n_prompts, -1).unsqueeze(-1)).squeeze(-1) - log_norm[:, 1:]
        for i in range(n_prompts):
            for slot, j in enumerate(owner):
                scores[i][j] += float(token_lp[i, slot])
    return scores, [True] * n_prompts, [0.0] * n_prompts


def classify(
    model, tokenizer, prompts, labels: list[str], batch_size: int, on_batch: Callable[[int], None] | None = None,
    prune_below: float | None = PRUNE_BELOW, prefix: SharedPrefix | None = None,
):
    """(label, confidence, seconds per example) for every prompt.

    The prompts' shared start (the system prompt, for baselines with the label
    list) runs once for the whole call. Labels whose first token is less than
    `prune_below` times as likely as the likeliest label-first token are not
    scored in full; a prompt whose best full score does not beat every pruned
    first token is re-scored with all labels, so the answer is always the
    exhaustive argmax. Confidence counts each pruned first token's probability
    (an upper bound of its labels' total) in the normaliser, so it is never
    above the exhaustive confidence and below it by at most that mass
    (< `prune_below` x number of first tokens). `prune_below=None` scores
    every label in full. Label sets of at most `ONE_PASS_TOKENS` tokens are scored in full in one forward
    pass with the prompt (`_score_in_one_pass`): nothing to prune, one weight read. A server passes the `prefix` it computed once at start-up (every prompt must start with
    its tokens); otherwise the prompts' common start is found and run here.
    """
    out = []
    texts = prompt_texts(tokenizer, prompts)
    prefix = prefix or shared_prefix(model, tokenizer, texts)
    label_tokens = sum(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
    one_pass = label_tokens <= ONE_PASS_TOKENS
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        started = time.perf_counter()
        if one_pass:
            scores, exact, pruned_mass = _score_in_one_pass(model, tokenizer, chunk, labels, prefix)
        else:
            scores, exact, pruned_mass = _score(model, tokenizer, chunk, labels, prefix, prune_below)
        redo = [k for k, ok in enumerate(exact) if not ok]
        if redo:
            full, _, _ = _score(model, tokenizer, [chunk[k] for k in redo], labels, prefix)
            for k, row in zip(redo, full):
                scores[k], pruned_mass[k] = row, 0.0
        per_example = (time.perf_counter() - started) / len(chunk)
        for row, mass in zip(scores, pruned_mass):
            scored = [(lp, j) for j, lp in enumerate(row) if lp is not None]
            top = max(lp for lp, _ in scored)
            total = sum(math.exp(lp - top) for lp, _ in scored) + mass * math.exp(-top)
            best_lp, best = max(scored)
            out.append({"prediction": labels[best], "confidence": math.exp(best_lp - top) / total,
                        "latency_s": per_example})
        if on_batch:
            on_batch(len(chunk))
    return out


@torch.inference_mode()
def generate(
    model, tokenizer, prompts, max_new_tokens: int, batch_size: int,
    on_batch: Callable[[int], None] | None = None, schema: dict[str, Any] | None = None,
):
    """Greedy answers with a confidence from their token probabilities, and seconds per example.

    With a `schema`, decoding is constrained to JSON objects that satisfy it.
    """
    out = []
    texts = prompt_texts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            started = time.perf_counter()
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            processors = None
            if schema is not None:
                vocab = model.get_output_embeddings().weight.shape[0]
                processors = LogitsProcessorList([SchemaConstraint(tokenizer, schema, len(chunk), vocab, max_new_tokens)])
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                output_scores=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=_end_ids(tokenizer) or None,
                logits_processor=processors,
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


def answer(model, tokenizer, prompts, recipe, spec, on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The expert's answers as eval measures them and the registered model serves them: one code path for both."""
    from pipeline import tasks

    if recipe.task.type == "classification":
        return classify(model, tokenizer, prompts, spec, recipe.eval.batch_size, on_batch)
    task = tasks.for_type(recipe.task.type)
    schema = spec if recipe.task.type == "extraction" and recipe.eval.constrained_decoding else None
    generated = generate(
        model, tokenizer, prompts, recipe.eval.max_new_tokens, recipe.eval.batch_size, on_batch, schema=schema
    )
    return parse_generated(generated, lambda text: task.parse_answer(text, spec))


class SchemaConstraint(LogitsProcessor):
    """Masks, per row of a batch, every token that would leave the JSON Schema's language.

    One llguidance matcher per row consumes the row's last token and fills its
    row of a token bitmask. Keys, separators and whitespace follow
    `extraction.target_text` (", " and ": "), the spelling the expert was
    trained on. In the last `reserve` steps the mask narrows further towards
    the end of the object, so even a model that would ramble (a random one)
    ends with a complete object within `max_new_tokens`: inside a string,
    tokens that close it; outside, end-of-sequence, then `}`/`]`, then other
    punctuation. `,` and an opening `"` come last because each starts a new
    member (a model that prefers them would otherwise loop to the budget).
    """

    def __init__(self, tokenizer, schema: dict[str, Any], batch: int, vocab: int, max_new_tokens: int):
        import llguidance
        import llguidance.hf

        lltok = _lltokenizer(tokenizer, vocab)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        self.matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(batch)]
        if self.matchers[0].is_error():
            raise ValueError(f"the JSON Schema cannot be used for constrained decoding: {self.matchers[0].get_error()}")
        self.words = (vocab + 31) // 32
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.closing = _closing_tokens(tokenizer, vocab)
        self.in_string = [False] * batch
        self.escaped = [False] * batch
        self.eos = tokenizer.eos_token_id
        self.step = 0
        self.max_new_tokens = max_new_tokens
        self.reserve = max_new_tokens // 2
        self.prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        bitmask = torch.zeros((len(self.matchers), self.words), dtype=torch.int32)
        for row, matcher in enumerate(self.matchers):
            if input_ids.shape[1] > self.prompt_width and not matcher.is_stopped():
                token = int(input_ids[row, -1])
                matcher.consume_token(token)
                self._track_strings(row, token)
            if matcher.is_stopped() or matcher.is_error():
                continue  # finished rows only receive padding; mask everything but end-of-sequence below
            v = bitmask[row]
            matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
        allowed = _unpack(bitmask, self.vocab)
        for row, matcher in enumerate(self.matchers):
            if matcher.is_stopped() or matcher.is_error():
                allowed[row, self.eos] = True
        if self.max_new_tokens - self.step <= self.reserve:
            allowed = torch.stack([self._towards_end(row, allowed[row]) for row in range(len(self.matchers))])
        self.step += 1
        return scores.masked_fill(~allowed, float("-inf"))

    def _track_strings(self, row: int, token: int) -> None:
        """Follows whether the row's answer is inside a JSON string (the mask alone cannot tell)."""
        for char in self.tokenizer.decode([token]):
            if self.escaped[row]:
                self.escaped[row] = False
            elif char == "\\" and self.in_string[row]:
                self.escaped[row] = True
            elif char == '"':
                self.in_string[row] = not self.in_string[row]

    def _towards_end(self, row: int, allowed: torch.Tensor) -> torch.Tensor:
        """The first non-empty tier of tokens that bring the row nearer to a complete object."""
        if allowed[self.eos]:
            tiers = [torch.nn.functional.one_hot(torch.tensor(self.eos), self.vocab).bool()]
        elif self.in_string[row]:
            tiers = [self.closing["string"]]
        else:
            tiers = [self.closing["container"], self.closing["any"]]
        for tier in tiers:
            narrowed = allowed & tier
            if narrowed.any():
                return narrowed
        return allowed


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


# per tokenizer object (weakly held) and vocabulary size: building these takes ~1 s each
_PER_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lltokenizer(tokenizer, vocab: int):
    """llguidance's view of the tokenizer."""
    import llguidance.hf

    cached = _PER_TOKENIZER.setdefault(tokenizer, {})
    if ("ll", vocab) not in cached:
        cached[("ll", vocab)] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    return cached[("ll", vocab)]


def _closing_tokens(tokenizer, vocab: int) -> dict[str, torch.Tensor]:
    """Token masks by what they close: a string (`"`, perhaps followed by `}`/`]`), a container
    (only `}`/`]`), or anything (only JSON punctuation). Spaces around them are allowed."""
    cached = _PER_TOKENIZER.setdefault(tokenizer, {})
    if ("closing", vocab) not in cached:
        masks = {name: torch.zeros(vocab, dtype=torch.bool) for name in ("string", "container", "any")}
        for token_id in range(min(vocab, len(tokenizer))):
            text = tokenizer.decode([token_id]).strip()
            if not text or not set(text) <= set('"}],'):
                continue
            masks["any"][token_id] = True
            masks["string"][token_id] = text.startswith('"') and set(text[1:]) <= set("}]")
            masks["container"][token_id] = set(text) <= set("}]")
        cached[("closing", vocab)] = masks
    return cached[("closing", vocab)]
