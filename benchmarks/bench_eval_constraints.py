"""Benchmark: which JSON-Schema constraint library eval uses, by measurement.

    .venv/bin/python benchmarks/bench_eval_constraints.py [--examples 200]

Model-free, so it isolates the constraint's own cost: with the embedded
SmolLM2 tokenizer and the SNIPS intent+slots schema, each library walks the
token sequences of real SNIPS answers (in the training spelling), computing
the allowed-token mask before every token. Reports the one-off set-up
(tokenizer tables + schema compile), milliseconds per mask, and whether every
real answer was accepted (a constraint that rejects valid answers would cost
quality).

Candidates that install from PyPI on CPU / Python 3.11 without a new torch
(`pip install --dry-run`): llguidance (one wheel), lm-format-enforcer
(+ interegular), outlines (+ outlines_core, diskcache, genson), xgrammar
(+ triton, apache-tvm-ffi). Libraries that are not installed are reported so.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_eval import ALIAS, DATA, snips  # noqa: E402
from pipeline.inference import models  # noqa: E402
from pipeline.tasks import extraction  # noqa: E402


def bench_llguidance(tokenizer, schema, sequences):
    import llguidance
    import llguidance.hf
    import torch

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    llguidance.LLMatcher(lltok, grammar, log_level=0)
    setup = time.perf_counter() - started
    words = (len(tokenizer) + 31) // 32
    mask = torch.zeros(words, dtype=torch.int32)
    masks, seconds, accepted = 0, 0.0, 0
    for seq in sequences:
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        ok = True
        for token in seq:
            started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
            seconds += time.perf_counter() - started
            masks += 1
            allowed = (int(mask[token // 32]) >> (token % 32)) & 1
            ok = ok and bool(allowed) and matcher.consume_token(token)
        accepted += ok and matcher.is_accepting()
    return setup, 1000 * seconds / masks, accepted


def bench_lmfe(tokenizer, schema, sequences):
    import transformers

    # lm-format-enforcer 0.11 imports transformers.tokenization_utils, which transformers 5 removed: shim it
    sys.modules.setdefault("transformers.tokenization_utils",
                           types.SimpleNamespace(PreTrainedTokenizerBase=transformers.PreTrainedTokenizerBase))
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.integrations.transformers import (
        build_token_enforcer_tokenizer_data,
    )

    started = time.perf_counter()
    data = build_token_enforcer_tokenizer_data(tokenizer)
    setup = time.perf_counter() - started
    masks, seconds, accepted = 0, 0.0, 0
    for seq in sequences:
        enforcer = TokenEnforcer(data, JsonSchemaParser(schema))
        ok = True
        for i, token in enumerate(seq):
            started = time.perf_counter()
            allowed = enforcer.get_allowed_tokens(seq[:i])
            seconds += time.perf_counter() - started
            masks += 1
            allowed = allowed.allowed_tokens if hasattr(allowed, "allowed_tokens") else allowed
            ok = ok and token in set(allowed)
        accepted += ok
    return setup, 1000 * seconds / masks, accepted


CANDIDATES = {"llguidance": bench_llguidance, "lm-format-enforcer": bench_lmfe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads SNIPS from ../shared/data")
    source, _ = models.resolve_base(ALIAS)
    tokenizer = models.load_tokenizer(source)
    rows, schema = snips(args.examples, 13)
    sequences = [tokenizer(extraction.target_text(r["target"], schema), add_special_tokens=False)["input_ids"]
                 for r in rows]
    print(f"SNIPS answers: {len(sequences)}, {sum(map(len, sequences))} tokens; tokenizer: {ALIAS}")
    print("| library | set-up (s) | ms per mask | real answers accepted |\n|---|---|---|---|")
    for name, bench in CANDIDATES.items():
        try:
            setup, per_mask, accepted = bench(tokenizer, schema, sequences)
        except ImportError as err:
            print(f"| {name} | not installed ({err.name}) | | |")
            continue
        print(f"| {name} | {setup:.2f} | {per_mask:.3f} | {accepted}/{len(sequences)} |", flush=True)


if __name__ == "__main__":
    main()
