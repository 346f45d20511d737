"""Benchmark: `expert eval`'s local inference against naive per-example generation, side by side in one run.

    .venv/bin/python benchmarks/bench_eval.py [--classify 64] [--extract 32] [--batch-size 8]
    .venv/bin/python benchmarks/bench_eval.py --classify-run runs/banking77 --extract-run runs/snips --batch-size 16

Model: by default the embedded SmolLM2-135M-Instruct base (no adapter, so no
training is needed to reproduce it), on BANKING77 (77 intents) and SNIPS
(intent + slots as JSON) from ../shared/data, a fixed seeded sample. With
`--classify-run` / `--extract-run RUN_DIR` (a finished `expert run` of
recipes/banking77.yaml / snips.yaml), that run's trained expert
(`train/adapter`), its own prompt and labels or schema (`prep/spec.json`) and
the first examples of its held-out test split: the case eval actually meets,
where the naive answers are mostly valid, so agreement is measurable.

- classification: naive = `model.generate` one example at a time (greedy, 16
  new tokens) + `classification.parse_answer`; ours = `answering.classify`
  (label scoring, shared prompt KV cache, batched). Agreement is measured on
  the examples where the naive answer parsed to a valid label.
- extraction: naive = `model.generate` one example at a time (greedy) +
  `extraction.parse_answer`; ours = `answering.generate` with the JSON Schema
  (llguidance-constrained, batched). Schema-valid rate for both.

Issue targets: classification >= 5x examples/s with >= 99% agreement;
extraction >= 3x examples/s with 100% schema-valid outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inference import (
    answering,  # noqa: E402
    models,
)
from pipeline.recipe.schema import ModelSection  # noqa: E402
from pipeline.tasks import classification, extraction  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALIAS = "smollm2-135m-instruct"


def banking77(n: int, seed: int) -> tuple[list[dict], list[str]]:
    with open(DATA / "banking77/train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["category"] for r in rows})
    random.Random(seed).shuffle(rows)
    return [{"text": r["text"], "target": r["category"]} for r in rows[:n]], labels


def snips(n: int, seed: int) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (DATA / "snips/train.jsonl").read_text(encoding="utf-8").splitlines()]
    intents = sorted({r["intent"] for r in rows})
    slots = sorted({s for r in rows for s in r["slots"]})
    value = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    schema = {
        "type": "object",
        "properties": {
            "intent": {"type": "string", "enum": intents},
            "slots": {"type": "object", "properties": {s: value for s in slots}, "additionalProperties": False},
        },
        "required": ["intent", "slots"],
        "additionalProperties": False,
    }
    random.Random(seed).shuffle(rows)
    # slots in schema order: the one spelling a schema-constrained decoder (and a trained expert) produces
    ordered = [{s: r["slots"][s] for s in slots if s in r["slots"]} for r in rows[:n]]
    return [{"text": r["text"], "target": {"intent": r["intent"], "slots": o}} for r, o in zip(rows[:n], ordered)], schema


def prompts_for(rows: list[dict], system: str) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": system}, {"role": "user", "content": r["text"]}] for r in rows]


def from_run(base, run_dir: Path, n: int):
    """(expert, prompts, rows, labels or schema) from a finished run: what its eval stage meets on the test split."""
    from peft import PeftModel

    spec = json.loads((run_dir / "prep/spec.json").read_text(encoding="utf-8"))
    lines = (run_dir / "prep/test.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    model = PeftModel.from_pretrained(base, run_dir / "train/adapter").eval()
    print(f"{spec['task']}: the expert in {run_dir}, its own prompt, the first {len(rows)} test examples")
    return model, [r["prompt"] for r in rows], rows, spec["spec"]


@torch.inference_mode()
def naive(model, tokenizer, prompts, max_new_tokens: int) -> tuple[list[str], float]:
    """One `model.generate` per example, as a quick script would do it."""
    started = time.perf_counter()
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classify", type=int, default=64, help="BANKING77 examples")
    parser.add_argument("--extract", type=int, default=32, help="SNIPS examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="extraction budget (both sides)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--classify-run", type=Path,
                        help="run directory of a trained BANKING77 expert: its adapter, prompt and test split; "
                             "default: the untuned base with the label list in the prompt")
    parser.add_argument("--extract-run", type=Path, help="run directory of a trained SNIPS expert, likewise")
    parser.add_argument("--classify-instruction", default="Classify the online-banking customer query into one intent.")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads BANKING77 and SNIPS from ../shared/data")
    torch.manual_seed(0)
    source, _ = models.resolve_base(ALIAS)
    tokenizer = models.load_tokenizer(source)
    precision = models.resolve_precision("auto")  # as eval loads it: bf16 on CPUs with AVX512-BF16/AMX
    base = models.load_base_model(ModelSection(base=ALIAS), source, precision).eval()
    print(f"model: {ALIAS} ({precision})  threads: {torch.get_num_threads()}  batch size: {args.batch_size}")

    if args.classify_run:
        model, prompts, rows, labels = from_run(base, args.classify_run, args.classify)
    else:
        rows, labels = banking77(args.classify, args.seed)
        model = base
        prompts = prompts_for(rows, classification.system_prompt(args.classify_instruction, labels))
    raw, naive_s = naive(model, tokenizer, prompts, max_new_tokens=16)
    naive_labels = [classification.parse_answer(t, labels) for t in raw]
    answering.classify(model, tokenizer, prompts[: args.batch_size], labels, args.batch_size)  # warm-up
    started = time.perf_counter()
    ours = answering.classify(model, tokenizer, prompts, labels, args.batch_size)
    ours_s = time.perf_counter() - started
    valid = [(n, o["prediction"]) for n, o in zip(naive_labels, ours) if n is not None]
    agreement = sum(n == o for n, o in valid) / len(valid) if valid else float("nan")
    n = len(rows)
    print("\n## classification: BANKING77, 77 labels")
    print("| method | examples/s | accuracy | answers that are a valid label |\n|---|---|---|---|")
    print(f"| naive generate + parse | {n / naive_s:.2f} | {sum(a == r['target'] for a, r in zip(naive_labels, rows)) / n:.3f} "
          f"| {len(valid)}/{n} |")
    print(f"| expert eval (label scoring) | {n / ours_s:.2f} | "
          f"{sum(o['prediction'] == r['target'] for o, r in zip(ours, rows)) / n:.3f} | {n}/{n} |")
    print(f"speed-up: {naive_s / ours_s:.1f}x; agreement where naive was a valid label: {agreement:.1%} ({len(valid)} examples)")

    if args.classify_run:
        base = model.unload()
    if args.extract_run:
        model, prompts, rows, schema = from_run(base, args.extract_run, args.extract)
    else:
        model = base
        rows, schema = snips(args.extract, args.seed)
        prompts = prompts_for(rows, extraction.system_prompt("Extract the intent and the slots of the request.", schema))
    raw, naive_s = naive(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    naive_objs = [extraction.parse_answer(t, schema) for t in raw]
    answering.generate(model, tokenizer, prompts[:2], 8, 2, schema=schema)  # warm-up (builds the token masks once)
    started = time.perf_counter()
    ours = answering.generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, schema=schema)
    ours_s = time.perf_counter() - started
    ours_objs = [extraction.parse_answer(o["raw"], schema) for o in ours]
    n = len(rows)

    def intent_acc(objs):
        return sum(o is not None and o["intent"] == r["target"]["intent"] for o, r in zip(objs, rows)) / n

    print("\n## extraction: SNIPS intent + slots, JSON Schema")
    print("| method | examples/s | schema-valid | intent accuracy |\n|---|---|---|---|")
    print(f"| naive generate + parse | {n / naive_s:.2f} | {sum(o is not None for o in naive_objs)}/{n} | "
          f"{intent_acc(naive_objs):.3f} |")
    print(f"| expert eval (constrained, batched) | {n / ours_s:.2f} | {sum(o is not None for o in ours_objs)}/{n} | "
          f"{intent_acc(ours_objs):.3f} |")
    print(f"speed-up: {naive_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
