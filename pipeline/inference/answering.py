"""Local inference for the expert and the base model, without free-form parsing where possible.

Classification scores every label as a continuation of the prompt and takes
the best one; confidence is its probability normalised over the label set, so
the answer is always a valid label. A task with a decoding schema (extraction's
JSON Schema, multi-label's list of labels) decodes greedily under it
(llguidance masks every token the schema forbids), so every answer is JSON of
that shape; confidence is the task's rule over the answer's token probabilities
under that mask (`answer_confidence`). Plain generation is batched greedy
decoding.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache

from pipeline.tasks.shared import mean_token_probability

try:  # a cache's layer class, for the cheap private copy of a cached prefix; without it the copy is a deepcopy
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - a transformers without it
    DynamicLayer = None


def expert_prompt(system_prompt: str, text: str) -> list[dict[str, str]]:
    """The messages the expert answers for one text: its own system prompt, then the text as the user's turn
    (the registered model's `predict` and `expert serve` both build prompts here)."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]


def prompt_texts(tokenizer, prompts: list[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


# per tokenizer object (weakly held): label token ids, and llguidance's tokenizer and the closing-token masks
# per vocabulary size (each is slow to build: it walks the whole vocabulary)
_PER_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _end_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def stop_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's eos and all of the model's `generation_config` eos ids
    (Llama-3 Instruct lists `<|eot_id|>` and `<|end_of_text|>`; stopping on one alone runs answers on)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    return list(dict.fromkeys(_end_ids(tokenizer) + [int(i) for i in configured]))


def _to_host(tensor: torch.Tensor) -> list:
    """A result tensor as Python numbers: the one device-to-host transfer (and, on a GPU, the one sync) of each
    forward pass's scores, where reading them one `float()` at a time would wait for the GPU once per number."""
    return tensor.tolist()


def _label_ids(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label's tokens and the end-of-turn token: what a label answer is. Kept per tokenizer and label set,
    as a server asks for the same labels on every request (tokenizer calls each time otherwise)."""
    cached = _PER_TOKENIZER.setdefault(tokenizer, {})
    key = ("labels", tuple(labels))
    if key not in cached:
        cached[key] = [tokenizer(label, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for label in labels]
    return cached[key]


@dataclass
class SharedPrefix:
    """The token ids every prompt starts with (system prompt, label list) and their KV cache, computed once."""

    ids: list[int]
    cache: Any
    misses: int = 0  # calls given this prefix whose prompts did not all start with its ids (they ran their own)

    def starts(self, tokenizer, prompt_text: list[str]) -> bool:
        """Whether every prompt's tokens start with this prefix's (a text whose first token merges into the
        template would not)."""
        n = len(self.ids)
        return all(tokenizer(p, add_special_tokens=False)["input_ids"][:n] == self.ids for p in prompt_text)


# labels whose first token is under this share of the likeliest label-first token are not scored in full
PRUNE_BELOW = 1e-2
# label sets whose tokens (all labels together) fit in this many are scored in one pass, without pruning
ONE_PASS_TOKENS = 64
# one extra forward pass costs about as much as this many more token slots (a read of the weights)
PASS_COST_IN_SLOTS = 32


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
    ids = torch.tensor([common], device=model.device)
    return SharedPrefix(common, model(input_ids=ids, use_cache=True, logits_to_keep=1).cache)


def system_prefix(model, tokenizer, system_prompt: str) -> SharedPrefix | None:
    """The KV cache of the tokens every `expert_prompt` with this system prompt starts with (the system turn and
    the start of the user's), computed once: a server passes it to `answer` for every request."""
    texts = prompt_texts(tokenizer, [expert_prompt(system_prompt, "a"), expert_prompt(system_prompt, "b")])
    return shared_prefix(model, tokenizer, texts)


def is_plain_dynamic_cache(cache) -> bool:
    """A `DynamicCache` of plain dynamic layers: each update replaces a layer's tensors (`torch.cat`) and never
    writes into them."""
    return (DynamicLayer is not None and type(cache) is DynamicCache
            and all(type(layer) is DynamicLayer for layer in cache.layers))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, query, key) bool mask as the (batch, 1, query, key) additive float mask attention takes."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _private_copy(cache):
    """A copy of a KV cache that the next forward pass can extend without touching the original.

    For plain dynamic layers, copying the layer objects and sharing the tensors is enough (they replace their
    tensors on update), where `deepcopy` would clone every tensor on every served request. Any other cache is
    deep-copied.
    """
    if not is_plain_dynamic_cache(cache):
        return copy.deepcopy(cache)
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in cache.layers]
    return fresh


def _prefix_cache(prefix: SharedPrefix | None, n_prompts: int):
    """A private copy of the shared prefix's cache, one row per prompt; None without a prefix."""
    if prefix is None:
        return None
    cache = _private_copy(prefix.cache)
    if n_prompts > 1:  # a repeat of 1 would copy every cached tensor for nothing
        cache.batch_repeat_interleave(n_prompts)
    return cache


def _last_positions(n: int, length: int, device) -> torch.Tensor:
    """`logits_to_keep` for the last `n` of `length` positions, as indices rather than a count.

    Why: a count slices the hidden states, which for more than one row is a
    non-contiguous view; `matmul` then cannot fold it into one matrix product
    and copies the whole (vocab x hidden) LM-head weight on every call, the
    largest single cost of a request when it was found. Index selection gives a
    contiguous copy of just the rows needed.
    """
    return torch.arange(length - n, length, device=device)


@torch.inference_mode()
def score_labels(model, tokenizer, prompt_text: list[str], labels: list[str]) -> list[list[float]]:
    """Log-probability of each label (plus the end-of-turn token) after each prompt, every label in full."""
    return _score(model, tokenizer, prompt_text, labels)[0]


@dataclass
class _LabelTrie:
    """Some labels' tokens as a trie, one node per fed token: labels that share a start share its nodes.

    A label's last token (end of turn) is only ever predicted, never fed. `targets` lists, per
    label, the (node, token) pairs whose log-probabilities add up to its score after the first token.
    """

    tokens: list[int]
    depth: list[int]
    ancestors: torch.Tensor  # (nodes, nodes) bool: node i may attend to node a (a is i or above it)
    targets: dict[int, list[tuple[int, int]]]


def _label_trie(label_ids: list[list[int]], labels: list[int]) -> _LabelTrie:
    index: dict[tuple[int, ...], int] = {}
    tokens, depth, parent = [], [], []
    targets: dict[int, list[tuple[int, int]]] = {}
    for j in labels:
        ids, above = label_ids[j], -1
        targets[j] = []
        for k in range(len(ids) - 1):
            key = tuple(ids[: k + 1])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(ids[k])
                depth.append(k)
                parent.append(above)
            above = index[key]
            targets[j].append((above, ids[k + 1]))
    ancestors = torch.eye(len(tokens), dtype=torch.bool)
    for node, up in enumerate(parent):  # parents come before their children
        if up >= 0:
            ancestors[node] |= ancestors[up]
    return _LabelTrie(tokens, depth, ancestors, targets)


def _width_groups(widths: list[int], pass_cost: int = PASS_COST_IN_SLOTS) -> list[list[int]]:
    """Rows grouped for the label passes: every row of a pass is padded to the pass's widest, so rows of
    similar width go together; a split pays for itself when the padding saved exceeds `pass_cost` slots."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    best = [0.0] + [math.inf] * len(order)  # best[k]: cost of the first k rows (in width order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + pass_cost + (end - start) * widths[order[end - 1]]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def _run_tries(model, tries: list[_LabelTrie], rows: list[int], cache, prompt_mask, pad: int) -> torch.Tensor:
    """One forward pass of the label tries of `rows` after their prompts (already in `cache`, attended
    per `prompt_mask`): log-probabilities of the next token at every node, (rows, widest trie, vocab)."""
    n, total = len(rows), max(len(tries[i].tokens) for i in rows)
    tokens = torch.full((n, total), pad)
    depth = torch.zeros((n, total), dtype=torch.long)
    block = torch.eye(total, dtype=torch.bool).repeat(n, 1, 1)  # padding nodes see themselves only
    for r, i in enumerate(rows):
        trie, m = tries[i], len(tries[i].tokens)
        tokens[r, :m] = torch.tensor(trie.tokens, dtype=torch.long)
        depth[r, :m] = torch.tensor(trie.depth, dtype=torch.long)
        block[r, :m, :m] = trie.ancestors
    device = prompt_mask.device  # built on the CPU above, moved once
    tokens, depth, block = tokens.to(device), depth.to(device), block.to(device)
    seen = prompt_mask[rows].bool()
    allowed = torch.cat([seen.unsqueeze(1).expand(n, total, -1), block], dim=-1)
    dtype = model.get_input_embeddings().weight.dtype
    mask = additive_mask(allowed, dtype)
    positions = seen.sum(-1, keepdim=True) + depth
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits.float()
    return logits - logits.logsumexp(-1, keepdim=True)


def _trie_sums(tries, rows, log_probs: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(rows, labels): each label's log-probability summed over its trie targets (0 for labels not in a row's
    trie), gathered and summed on the scores' device."""
    device = log_probs.device
    picks: list[tuple[int, int, int, int]] = []  # (row, node, token, row * n_labels + label)
    for r, i in enumerate(rows):
        for j, pairs in tries[i].targets.items():
            picks += [(r, node, tok, r * n_labels + j) for node, tok in pairs]
    sums = torch.zeros(len(rows) * n_labels, dtype=log_probs.dtype, device=device)
    if picks:
        row, node, tok, slot = torch.tensor(picks, dtype=torch.long).to(device).unbind(-1)
        sums.index_add_(0, slot, log_probs[row, node, tok])
    return sums.view(len(rows), n_labels)


@torch.inference_mode()
def _score(model, tokenizer, prompt_text, labels, prefix: SharedPrefix | None = None, prune_below: float | None = None):
    """(scores, pruned_mass) per prompt: label log-probabilities (None for labels not scored in full) and
    the probability of the labels not scored, bounded above by their first tokens'.

    The prompts run once, after the cached shared `prefix` when given (each
    prompt's own tokens left-padded). Then each prompt's candidate labels run
    as a token trie in one packed continuation (a 4D mask lets each node see
    the prompt and the nodes above it; positions continue from the prompt), so
    labels sharing a start (BANKING77's `card_*`) share its tokens and the KV
    cache is never copied per label. Rows of similar trie size share a pass
    (`_width_groups`), so one uncertain prompt does not widen every row.

    With `prune_below`, a label whose first token is less likely than
    `prune_below` times the likeliest label-first token is not scored at
    first: labels that share a first token stand or fall together, and their
    first token's probability bounds their total. Any pruned first token more
    likely than the best label's full score could still hide a better label,
    so those labels are scored in a second round; after it the best label is
    the exhaustive argmax (no unscored label can beat it). `pruned_mass`
    counts each still-pruned first token once.
    """
    label_ids = _label_ids(tokenizer, labels)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_text]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_prompts, n_labels = len(prompt_ids), len(labels)
    shared = len(prefix.ids) if prefix is not None else 0
    own = [p[shared:] for p in prompt_ids]

    width = max(len(p) for p in own)
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in own]).to(device)
    own_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in own]).to(device)
    prompt_mask = torch.cat([torch.ones(n_prompts, shared, dtype=torch.long, device=device), own_mask], dim=-1)
    positions = shared + (own_mask.cumsum(-1) - 1).clamp(min=0)
    cache = _prefix_cache(prefix, n_prompts)
    out = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=_last_positions(1, width, device))  # only the last position predicts the first label token
    first_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (n_prompts, vocab)
    first_ids = torch.tensor([ids[0] for ids in label_ids], device=device)
    first = _to_host(first_lp[:, first_ids])  # (n_prompts, n_labels)
    scores: list[list[float | None]] = [[None] * n_labels for _ in range(n_prompts)]
    if prune_below is None:
        candidates = [list(range(n_labels)) for _ in range(n_prompts)]
    else:
        floor = math.log(prune_below)
        candidates = [[j for j in range(n_labels) if row[j] >= max(row) + floor] for row in first]

    def score_round(round_candidates: list[list[int]]) -> None:
        tries = [_label_trie(label_ids, cand) for cand in round_candidates]
        for i, cand in enumerate(round_candidates):
            for j in cand:
                scores[i][j] = first[i][j]
        busy = [i for i in range(n_prompts) if tries[i].tokens]
        for rows in _width_groups([len(tries[i].tokens) for i in busy]):
            rows = [busy[r] for r in rows]
            group_cache = _private_copy(out.cache)
            group_cache.batch_select_indices(torch.tensor(rows, device=device))
            log_probs = _run_tries(model, tries, rows, group_cache, prompt_mask, pad)
            sums = _to_host(_trie_sums(tries, rows, log_probs, n_labels))
            for r, i in enumerate(rows):
                for j in tries[i].targets:
                    scores[i][j] += sums[r][j]

    score_round(candidates)
    # a pruned first token likelier than the best full score may start a better label: score those too
    extra = []
    for i in range(n_prompts):
        best = max(lp for lp in scores[i] if lp is not None)
        extra.append([j for j in range(n_labels) if scores[i][j] is None and first[i][j] > best])
    if any(extra):
        score_round(extra)
    pruned_mass = []
    for i in range(n_prompts):
        pruned_first = {label_ids[j][0]: first[i][j] for j in range(n_labels) if scores[i][j] is None}
        pruned_mass.append(sum(math.exp(lp) for lp in pruned_first.values()))
    return scores, pruned_mass


@torch.inference_mode()
def _score_in_one_pass(model, tokenizer, prompt_text, labels, prefix: SharedPrefix | None = None):
    """Like `_score` without pruning, but the prompt's own tokens and the label trie run in ONE forward pass.

    Why: for a single request on a CPU the model is bound by reading its
    weights, so two passes cost nearly twice one. The label trie follows the
    prompt's own tokens under one 4D mask: prompt tokens are causal among
    themselves and never see labels; each trie node sees the prompt and the
    nodes above it. Only the last prompt position and the trie nodes reach the
    vocabulary projection (`logits_to_keep`).
    """
    label_ids = _label_ids(tokenizer, labels)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_text]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_prompts = len(prompt_ids)
    shared = len(prefix.ids) if prefix is not None else 0
    own = [p[shared:] for p in prompt_ids]
    width = max(len(p) for p in own)
    trie = _label_trie(label_ids, list(range(len(labels))))
    total = len(trie.tokens)

    own_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in own], dtype=torch.bool)
    tokens = torch.tensor([[pad] * (width - len(p)) + p + trie.tokens for p in own])
    depth = torch.tensor(trie.depth, dtype=torch.long)
    positions = torch.cat([
        shared + (own_mask.long().cumsum(-1) - 1).clamp(min=0),
        shared + own_mask.sum(-1, keepdim=True) + depth.unsqueeze(0),
    ], dim=-1)

    length = width + total
    device = model.device
    allowed = torch.zeros((n_prompts, length, shared + length), dtype=torch.bool)
    allowed[:, :, :shared] = True
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed[:, :width, shared : shared + width] = causal & own_mask.unsqueeze(1)
    allowed[:, width:, shared : shared + width] = own_mask.unsqueeze(1)
    allowed[:, width:, shared + width :] = trie.ancestors
    allowed[:, torch.arange(length), shared + torch.arange(length)] = True  # padding rows see themselves only
    dtype = model.get_input_embeddings().weight.dtype
    mask = additive_mask(allowed.to(device), dtype)  # the masks and ids are built on the CPU and moved once

    cache = _prefix_cache(prefix, n_prompts)
    logits = model(input_ids=tokens.to(device), attention_mask=mask, position_ids=positions.to(device), cache=cache,
                   logits_to_keep=_last_positions(total + 1, length, device)).logits.float()
    log_probs = logits - logits.logsumexp(-1, keepdim=True)
    first = log_probs[:, 0, torch.tensor([ids[0] for ids in label_ids], device=device)]  # (n_prompts, n_labels)
    rest = _trie_sums([trie] * n_prompts, list(range(n_prompts)), log_probs[:, 1:], len(labels))
    first_host, rest_host = _to_host(torch.stack([first, rest]))  # summed on the host in float64, as before
    return [[a + b for a, b in zip(f, r)] for f, r in zip(first_host, rest_host)], [0.0] * n_prompts


# oneDNN's linear ops that packing uses: private to torch (`torch.ops.mkldnn`), so looked up, never assumed
PACKING_OPS = ("_reorder_linear_weight", "_linear_pointwise")


def _packing_ops():
    """(reorder, linear) from `torch.ops.mkldnn`; raises AttributeError where this torch build lacks one."""
    return tuple(getattr(torch.ops.mkldnn, name) for name in PACKING_OPS)


def packing_unavailable() -> str | None:
    """Why `pack_linear_weights` can pack nothing here (no oneDNN, no native bf16, a private op gone); None when
    it can."""
    from pipeline.inference.models import cpu_has_native_bf16

    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not cpu_has_native_bf16():
        return "this CPU has no native bf16"
    try:
        _packing_ops()
    except (AttributeError, RuntimeError) as err:
        return f"this torch build lacks oneDNN's private linear ops ({type(err).__name__}: {err})"
    return None


class PackedBf16Linear(torch.nn.Module):
    """An inference-only `nn.Linear` whose bf16 weight is stored in oneDNN's blocked layout (no `.weight`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        reorder, self._linear = _packing_ops()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = reorder(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed_weight, self.bias, "none", [], "")


@torch.inference_mode()
def pack_linear_weights(model) -> int:
    """Pack each bf16 `nn.Linear` of an inference model for oneDNN, once, so that serving stops re-packing them.

    On a CPU with native bf16, eager `F.linear` already runs oneDNN's kernel but lays the weight out again on every
    call, a large share of the matrix time at serving's few-row shapes. The packed product is the same kernel, so
    the outputs are bit-for-bit the evaluated model's: each layer is compared with `F.linear` on a probe input as it
    is packed and left as it was if they differ. The LM head is packed too (the largest product at a large
    vocabulary); where it shares its weight with the input embedding, that costs one more copy of it
    (docs/BENCHMARKS.md, "Bit-identical speed-ups", has both). Returns the number of layers packed: 0 where the CPU,
    build or dtype does not allow it (`packing_unavailable` says why); a layer the private ops fail on is left as it
    was.
    """
    if packing_unavailable() is not None:
        return 0
    probe = torch.Generator().manual_seed(0)
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if child.weight.dtype != torch.bfloat16 or child.weight.device.type != "cpu":
                continue
            x = torch.randn(3, child.in_features, generator=probe).to(torch.bfloat16)
            try:
                layer = PackedBf16Linear(child)
                same = torch.equal(layer(x), torch.nn.functional.linear(x, child.weight, child.bias))
            except (RuntimeError, TypeError, AttributeError):  # a private op that changed its signature
                continue
            if same:
                setattr(parent, name, layer)
                packed += 1
    return packed


def _shortest_first(texts: list[str]) -> list[int]:
    """Batch order: prompts of similar length share a batch, so left padding wastes little compute.
    Callers put the answers back in input order."""
    return sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))


def classify(
    model, tokenizer, prompts, labels: list[str], batch_size: int, on_batch: Callable[[int], None] | None = None,
    prune_below: float | None = PRUNE_BELOW, prefix: SharedPrefix | None = None, one_pass_tokens: int = ONE_PASS_TOKENS,
):
    """(label, confidence, seconds per example) for every prompt.

    The prompts' shared start (the system prompt, for baselines with the label
    list) runs once for the whole call. Labels whose first token is less than
    `prune_below` times as likely as the likeliest label-first token are not
    scored unless they could beat the best scored label (`_score`), so the
    answer is always the exhaustive argmax. Confidence counts each pruned
    first token's probability (an upper bound of its labels' total) in the
    normaliser, so it is never above the exhaustive confidence and below it by
    at most that mass. `prune_below=None` scores every label in full. Label
    sets of at most `one_pass_tokens` tokens are scored in full in one forward
    pass with the prompt (`_score_in_one_pass`): nothing to prune, one weight
    read. A server passes the `prefix` it computed once at start-up
    (`system_prefix`); a call whose prompts do not all start with its tokens
    counts a miss on it and runs its own. Otherwise the prompts' common start
    is found and run here.
    """
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    texts = prompt_texts(tokenizer, prompts)
    if prefix is not None and not prefix.starts(tokenizer, texts):
        prefix.misses += 1
        prefix = None
    prefix = prefix or shared_prefix(model, tokenizer, texts)
    order = _shortest_first(texts)
    label_tokens = sum(len(ids) - len(_end_ids(tokenizer)) for ids in _label_ids(tokenizer, labels))
    one_pass = label_tokens <= one_pass_tokens
    for i in range(0, len(texts), batch_size):
        rows = order[i : i + batch_size]
        chunk = [texts[k] for k in rows]
        started = time.perf_counter()
        if one_pass:
            scores, pruned_mass = _score_in_one_pass(model, tokenizer, chunk, labels, prefix)
        else:
            scores, pruned_mass = _score(model, tokenizer, chunk, labels, prefix, prune_below)
        per_example = (time.perf_counter() - started) / len(chunk)
        for k, row, mass in zip(rows, scores, pruned_mass):
            scored = [(lp, j) for j, lp in enumerate(row) if lp is not None]
            top = max(lp for lp, _ in scored)
            total = sum(math.exp(lp - top) for lp, _ in scored) + mass * math.exp(-top)
            best_lp, best = max(scored)
            out[k] = {"prediction": labels[best], "confidence": math.exp(best_lp - top) / total,
                      "latency_s": per_example}
        if on_batch:
            on_batch(len(chunk))
    return out


@torch.inference_mode()
def generate(
    model, tokenizer, prompts, max_new_tokens: int, batch_size: int,
    on_batch: Callable[[int], None] | None = None, schema: dict[str, Any] | None = None,
    confidence: Callable[[list[float]], float] = mean_token_probability,
):
    """Greedy answers with a confidence from their token log-probabilities (`confidence`, the task's rule; by
    default their geometric mean), and seconds per example.

    With a `schema`, decoding is constrained to JSON that satisfies it.
    """
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    texts = prompt_texts(tokenizer, prompts)
    order = _shortest_first(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(texts), batch_size):
            rows = order[i : i + batch_size]
            chunk = [texts[k] for k in rows]
            started = time.perf_counter()
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            processors = None
            if schema is not None:
                vocab = model.get_output_embeddings().out_features
                processors = LogitsProcessorList([SchemaConstraint(tokenizer, schema, len(chunk), vocab, max_new_tokens)])
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                output_scores=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(model, tokenizer) or None,
                logits_processor=processors,
            )
            new_tokens = gen.sequences[:, enc["input_ids"].shape[1] :]
            steps = torch.stack(gen.scores, dim=1).float().log_softmax(-1)
            token_lp = steps.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
            tokens_host, lp_host = _to_host(new_tokens), _to_host(token_lp)  # one transfer each per batch
            per_example = (time.perf_counter() - started) / len(chunk)
            for row, k in enumerate(rows):
                kept = [(t, lp) for t, lp in zip(tokens_host[row], lp_host[row]) if t != tokenizer.pad_token_id]
                text = tokenizer.decode([t for t, _ in kept], skip_special_tokens=True)
                logprobs = [lp for _, lp in kept]
                out[k] = {"raw": text, "confidence": confidence(logprobs),
                          "latency_s": per_example}
            if on_batch:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return out


def parse_generated(rows: list[dict[str, Any]], parse: Callable[[str], Any]) -> list[dict[str, Any]]:
    return [{**r, "prediction": parse(r["raw"])} for r in rows]


def answer(model, tokenizer, prompts, recipe, spec, on_batch: Callable[[int], None] | None = None,
           prefix: SharedPrefix | None = None, batch_size: int | None = None) -> list[dict[str, Any]]:
    """The expert's answers as eval measures them, the registered model answers them and `expert serve` serves
    them: one code path for all three.

    A server passes the cached `prefix` of its system prompt (`system_prefix`; label scoring only) and its
    micro-batch as `batch_size`; eval and the registered model use `eval.batch_size` and find the prompts'
    shared prefix per call.
    """
    from pipeline import tasks

    batch_size = batch_size or recipe.eval.batch_size
    task = tasks.for_type(recipe.task.type)
    if task.inference == "label_scoring":
        return classify(model, tokenizer, prompts, spec, batch_size, on_batch, prefix=prefix)
    schema = task.decoding_schema(spec) if recipe.eval.constrained_decoding else None
    generated = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens, batch_size, on_batch, schema=schema,
                         confidence=task.answer_confidence)
    return parse_generated(generated, lambda text: task.parse_answer(text, spec))


# steps kept for closing an answer, besides two per open object or array (see SchemaConstraint)
CLOSE_MARGIN = 8


class SchemaConstraint(LogitsProcessor):
    """Masks, per row of a batch, every token that would leave the JSON Schema's language.

    One llguidance matcher per row consumes the row's last token and fills its
    row of a token bitmask. Keys, separators and whitespace follow
    `extraction.target_text` (", " and ": "), the spelling the expert was
    trained on. When a row's remaining budget gets down to what closing its
    open strings and containers may take (`CLOSE_MARGIN` plus two tokens per
    open level), its mask narrows further towards the end of the object, so
    even a model that would ramble (a random one) ends with a complete object
    within `max_new_tokens`, while answers that fit are never cut short:
    inside a string, tokens that close it; outside, end-of-sequence, then
    `}`/`]`, then other punctuation. `,` and an opening `"` come last because
    each starts a new member (a model that prefers them would otherwise loop
    to the budget).
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
        self.depth = [0] * batch  # open objects and arrays
        self.eos = tokenizer.eos_token_id
        self.step = 0
        self.max_new_tokens = max_new_tokens
        self.prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        bitmask = torch.zeros((len(self.matchers), self.words), dtype=torch.int32)  # llguidance fills host memory
        last = _to_host(input_ids[:, -1]) if input_ids.shape[1] > self.prompt_width else None  # one read per step
        for row, matcher in enumerate(self.matchers):
            if last is not None and not matcher.is_stopped():
                token = last[row]
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
        left = self.max_new_tokens - self.step
        for row in range(len(self.matchers)):
            if left <= CLOSE_MARGIN + 2 * self.depth[row]:
                allowed[row] = self._towards_end(row, allowed[row])
        self.step += 1
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    def _track_strings(self, row: int, token: int) -> None:
        """Follows whether the row's answer is inside a JSON string, and how deeply nested (the mask
        alone cannot tell)."""
        for char in self.tokenizer.decode([token]):
            if self.escaped[row]:
                self.escaped[row] = False
            elif self.in_string[row]:
                self.escaped[row] = char == "\\"
                self.in_string[row] = char != '"'
            elif char == '"':
                self.in_string[row] = True
            elif char in "{[":
                self.depth[row] += 1
            elif char in "}]":
                self.depth[row] -= 1

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
            raw = tokenizer.decode([token_id])
            text = raw.strip()
            if not text or not set(text) <= set('"}],'):
                continue
            masks["any"][token_id] = True
            # inside a string a leading space is content: ` "` would close `"` as `" "`
            masks["string"][token_id] = raw.startswith('"') and set(text[1:]) <= set("}]")
            masks["container"][token_id] = set(text) <= set("}]")
        cached[("closing", vocab)] = masks
    return cached[("closing", vocab)]
