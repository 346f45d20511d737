"""Benchmark: which JSON-Schema constraint library eval uses, by measurement.

    .venv/bin/python scripts/bench_eval_constraints.py [--examples 16] [--batch-size 8]

Same model (embedded SmolLM2-135M-Instruct base), same SNIPS prompts and the
same batched greedy `model.generate`; only the logits processor differs.
Measures the one-off set-up (tokenizer tables + schema compile), the whole
constrained decode, the time spent inside the constraint per generated token,
and how many outputs validate against the schema.

Candidates that install from PyPI on CPU / Python 3.11 without a new torch
(checked with `pip install --dry-run`): llguidance (one wheel), lm-format-enforcer
(+ interegular), outlines (+ outlines_core, diskcache, genson), xgrammar
(+ triton, apache-tvm-ffi). Candidates that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import models, predict  # noqa: E402
from pipeline.recipe import ModelSection  # noqa: E402
from pipeline.tasks import extraction  # noqa: E402
from scripts.bench_eval import ALIAS, DATA, prompts_for, snips  # noqa: E402


class Timed(LogitsProcessor):
    """Wraps a logits processor and adds up the seconds spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, input_ids, scores):
        started = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return out


def llguidance_processor(tokenizer, schema, batch, vocab, max_new_tokens):
    return predict.SchemaConstraint(tokenizer, schema, batch, vocab, max_new_tokens)


def lmfe_processor(tokenizer, schema, batch, vocab, max_new_tokens):
    # lm-format-enforcer 0.11 imports transformers.tokenization_utils, which transformers 5 removed: shim it
    import transformers

    sys.modules.setdefault("transformers.tokenization_utils", types.SimpleNamespace(
        PreTrainedTokenizerBase=transformers.PreTrainedTokenizerBase))
    from lmformatenforcer import JsonSchemaParser
    from lmformatenforcer.integrations.transformers import build_transformers_prefix_allowed_tokens_fn
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    fn = build_transformers_prefix_allowed_tokens_fn(tokenizer, JsonSchemaParser(schema))
    return PrefixConstrainedLogitsProcessor(fn, num_beams=1)


CANDIDATES = {"llguidance": llguidance_processor, "lm-format-enforcer": lmfe_processor}


@torch.inference_mode()
def run(name, build, model, tokenizer, prompts, schema, batch_size, max_new_tokens):
    vocab = model.get_output_embeddings().weight.shape[0]
    started = time.perf_counter()
    try:
        build(tokenizer, schema, 1, vocab, max_new_tokens)
    except ImportError as err:
        return f"| {name} | not installed ({err.name}) | | | |"
    setup = time.perf_counter() - started
    texts = predict.prompt_texts(tokenizer, prompts)
    tokenizer.padding_side = "left"
    valid, seconds, in_constraint, tokens = 0, 0.0, 0.0, 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        timed = Timed(build(tokenizer, schema, len(chunk), vocab, max_new_tokens))
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=LogitsProcessorList([timed]),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - started
        in_constraint += timed.seconds
        new = gen[:, enc["input_ids"].shape[1]:]
        tokens += int((new != tokenizer.pad_token_id).sum())
        for row in new:
            text = tokenizer.decode(row, skip_special_tokens=True)
            valid += extraction.parse_answer(text, schema) is not None
    n = len(prompts)
    return (f"| {name} | {setup:.2f} | {n / seconds:.2f} | {1000 * in_constraint / max(tokens, 1):.2f} | {valid}/{n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads SNIPS from ../shared/data")
    source, _ = models.resolve_base(ALIAS)
    tokenizer = models.load_tokenizer(source)
    model = models.load_base_model(ModelSection(base=ALIAS), source).eval()
    rows, schema = snips(args.examples, 13)
    prompts = prompts_for(rows, extraction.system_prompt("Extract the intent and the slots of the request.", schema))
    print(f"SNIPS, {args.examples} examples, batch {args.batch_size}, {ALIAS}, threads {torch.get_num_threads()}")
    print("| library | set-up (s) | examples/s | ms in constraint per generated token | schema-valid |")
    print("|---|---|---|---|---|")
    for name, build in CANDIDATES.items():
        print(run(name, build, model, tokenizer, prompts, schema, args.batch_size, args.max_new_tokens), flush=True)


if __name__ == "__main__":
    main()
