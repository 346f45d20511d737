"""Stage 1, prep: load the user's data, reject bad rows loudly, split, render chat prompts.

Outputs (under `prep/`): `train.jsonl`, `validation.jsonl`, `test.jsonl` (each
row: id, text, target, and the TRL prompt/completion chat messages),
`spec.json` (the label set or JSON Schema), `fewshot.json` (examples drawn from
train for prompted baselines), `rejected.jsonl` (every rejected row with its
source location and reason code), `truncated.jsonl`, `stats.json`,
`report.md` and, for classification, `class_distribution.png`.

Rows stream from the source and are kept as compact `Example`s (the split and
the duplicate checks need all of them); token lengths are measured in batches
and split files are written row by row, so memory grows with the number of
rows, not with the rendered or tokenised size of the data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline import models, tasks, tracking
from pipeline.errors import UserError
from pipeline.recipe import HF_PREFIX, Recipe
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text, file_hash
from pipeline.tasks.classification import normalize_label
from pipeline.ui import console

STAGE = "prep"
SPLITS = ("train", "validation", "test")
# which split a row belongs to when its source is a fixed split; `source` rows get split
ROLES = {"source": None, "validation_source": "validation", "test_source": "test"}
# when the same text is in two splits, the copy in the later split of this order wins
PROTECTED_ORDER = ("train", "validation", "test")
TEXT_SEPARATOR = "\n\n"
TOKEN_BATCH = 2048
# rows within this many tokens of data.max_tokens are re-measured by rendering them in full
NEAR_LIMIT = 16
REPORT_EXAMPLES = 5


@dataclass(slots=True)
class Example:
    id: str
    line: int
    text: str
    target: Any
    source: str = ""
    fixed_split: str | None = None  # "validation"/"test" when it came from that split's own source
    prompt_tokens: int = 0
    answer_tokens: int = 0

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"


def outputs_of(recipe: Recipe) -> list[str]:
    names = [f"{s}.jsonl" for s in SPLITS]
    names += ["spec.json", "fewshot.json", "stats.json", "report.md", "rejected.jsonl", "truncated.jsonl"]
    if recipe.task.type == "classification":
        names.append("class_distribution.png")
    return [f"{STAGE}/{n}" for n in names]


def sources_of(recipe: Recipe) -> dict[str, Path | str]:
    """The recipe's data sources by YAML key (`source`, `validation_source`, `test_source`)."""
    return {key: getattr(recipe.data, key) for key in ROLES if getattr(recipe.data, key) is not None}


def inputs_of(recipe: Recipe) -> dict[str, str]:
    inputs = {"recipe:task,data,model.base": recipe.section_hash("task", "data") + ":" + recipe.model.base}
    for key, source in sources_of(recipe).items():
        if isinstance(source, str):  # hf: a dataset id names its content
            inputs[f"data.{key}"] = source
        elif not source.is_file():
            raise UserError(f"data.{key}: {source} {_not_a_file(source)}; point it at a data file "
                            "(relative paths start at the recipe's folder)")
        else:
            inputs[f"data.{key}"] = file_hash(source)
    return inputs


def _not_a_file(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def run(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    inputs = inputs_of(recipe)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]prep[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs):
        task = tasks.for_type(recipe.task.type)
        out = run.stage_dir(STAGE)
        rejected: list[dict[str, Any]] = []
        examples: list[Example] = []
        for key, source in sources_of(recipe).items():
            console.print(f"[bold]prep[/]: reading data.{key} {source}")
            before = len(rejected)
            loaded = load_examples(recipe, task, key, source, rejected)
            console.print(f"  {len(loaded):,} rows read, {len(rejected) - before:,} unreadable or incomplete", highlight=False)
            examples += loaded
        if not examples and not rejected:
            raise UserError(f"data: {', '.join(map(str, sources_of(recipe).values()))} holds no rows; check data.source")
        spec = spec_of(recipe, examples)
        examples = check_targets(examples, rejected, task, spec)
        examples = check_duplicates(examples, rejected, task, spec)
        tokenizer = models.load_tokenizer(*_tokenizer_source(recipe))
        baseline_system = task.system_prompt(recipe.task.instruction, spec)
        system = baseline_system if recipe.task.spec_in_expert_prompt else recipe.task.instruction
        console.print(f"[bold]prep[/]: measuring {len(examples):,} rows with the base model's tokenizer")
        examples, truncated = enforce_max_tokens(examples, rejected, tokenizer, system, task, spec, recipe)
        rejected.sort(key=lambda r: (r["source"], r["line"]))
        atomic_write_jsonl(out / "rejected.jsonl", rejected)
        atomic_write_jsonl(out / "truncated.jsonl", truncated)
        total = len(examples) + len(rejected)
        check_rejected_fraction(rejected, total, recipe.data.max_rejected_fraction, out / "rejected.jsonl")
        check_class_counts(examples, recipe, spec)
        splits = split_examples(examples, recipe)
        for name, rows in splits.items():
            if not rows:
                raise UserError(f"data.split: the {name} split is empty ({len(examples)} usable rows); add data or change the split fractions")
        for name, rows in splits.items():
            atomic_write_jsonl(out / f"{name}.jsonl", (render(e, system, task, spec) for e in rows))
        atomic_write_json(out / "spec.json", {"task": recipe.task.type, "spec": spec, "system_prompt": system,
                                               "baseline_system_prompt": baseline_system})
        atomic_write_json(out / "fewshot.json", fewshot_examples(splits["train"], recipe, task, spec))
        fingerprint = data_fingerprint(recipe, [out / f"{s}.jsonl" for s in SPLITS])
        stats = build_stats(splits, rejected, truncated, recipe, fingerprint)
        atomic_write_json(out / "stats.json", stats)
        if recipe.task.type == "classification":
            plot_class_distribution(stats["classes"], out / "class_distribution.png")
        atomic_write_text(out / "report.md", render_report(recipe, stats, rejected, truncated))
        print_stats(stats)
        mlflow_run_id = log_to_mlflow(recipe, run, stats, out)
        run.finish_stage(STAGE, outputs_of(recipe), fingerprint=fingerprint, mlflow_run_id=mlflow_run_id)
    return run.stage_record(STAGE)


def _tokenizer_source(recipe: Recipe) -> tuple[Path | str, bool]:
    source, _ = models.resolve_base(recipe.model.base)
    return source, recipe.model.trust_remote_code


# ---------------------------------------------------------------- reading


def get_field(row: dict[str, Any], path: str) -> Any:
    """Look up a dotted field path (`meta.subject`); KeyError names the missing part."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


# a UTF-16 surrogate in a str: an undecodable byte kept by `surrogateescape` (CSV), or a lone `\ud800`-style JSON
# escape; either way not Unicode text, which tokenizers refuse
SURROGATE = re.compile("[\ud800-\udfff]")
UTF8_BOM = b"\xef\xbb\xbf"


def max_row_bytes(max_tokens: int) -> int:
    """The longest JSONL line worth parsing: far more bytes than `max_tokens` tokens ever take (a token is a few
    bytes; 64 per token leaves room for JSON escapes and other fields), and at least 1 MiB."""
    return max(2**20, 64 * max_tokens)


def read_rows(source: Path | str, split: str = "train",
              max_line_bytes: int = 2**20) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line or record number, row or None, problem) for every data row of a source.

    Text files (.jsonl, .csv, .tsv) number rows by the line they start on;
    .json, .parquet and hf: sources by 1-based record number. A row that cannot
    be read is yielded with its problem (`reason: detail`) instead of stopping.
    A JSONL line over `max_line_bytes` is rejected as `too_long` unread: parsing and tokenizing a 10 MB line
    to find it is too long cost gigabytes.
    """
    if isinstance(source, str):
        yield from _read_hf(source, split)
        return
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(source, max_line_bytes)
    elif suffix in (".csv", ".tsv"):
        yield from _read_delimited(source, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        yield from _read_json(source)
    elif suffix == ".parquet":
        yield from _read_parquet(source)
    else:  # the recipe validator already limits file types
        raise UserError(f"{source}: unsupported file type `{suffix}`")


def _read_jsonl(source: Path, max_line_bytes: int) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with source.open("rb") as f:
        for line_no, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), start=1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while (rest := f.readline(max_line_bytes)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the line in bounded pieces
                yield line_no, None, (f"too_long: the line is over {max_line_bytes:,} bytes, more than "
                                      "data.max_tokens could ever hold; it was not read")
                continue
            if line_no == 1:
                raw = raw.removeprefix(UTF8_BOM)  # what spreadsheet programs write first for "UTF-8"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield line_no, None, f"undecodable: not UTF-8 (byte {err.start})"
                continue
            except json.JSONDecodeError as err:
                yield line_no, None, f"unparsable: {err.msg} (column {err.colno})"
                continue
            if not isinstance(row, dict):
                yield line_no, None, f"unparsable: line is a JSON {type(row).__name__}, not an object"
                continue
            yield line_no, row, None


def _read_delimited(source: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    # surrogateescape keeps undecodable bytes as markers, so one bad row does not stop the file
    with source.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:  # -sig: a leading BOM goes
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise UserError(f"{source}: cannot read the header line: {err}") from None
        if any(SURROGATE.search(h) for h in header):
            raise UserError(f"{source}: the header line is not UTF-8; re-encode the file as UTF-8")
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield start, None, f"unparsable: {err}"
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            if len(values) != len(header):
                yield line, None, f"unparsable: {len(values)} fields, the header has {len(header)}"
            elif any(SURROGATE.search(v) for v in values):
                yield line, None, "undecodable: not UTF-8"
            else:
                yield line, dict(zip(header, values)), None


def _read_json(source: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    try:
        data = json.loads(source.read_bytes().removeprefix(UTF8_BOM).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{source} is not UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{source}: a .json source is one array of row objects; use .jsonl for one object a line")
    for i, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield i, row, None
        else:
            yield i, None, f"unparsable: record is a JSON {type(row).__name__}, not an object"


def _read_parquet(source: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{source}: not a readable Parquet file ({err})") from None
    n = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield n, row, None


def parse_hf(source: str) -> tuple[str, str | None]:
    """`hf:<dataset id>[:<config>]` -> (dataset id, config or None)."""
    dataset_id, _, config = source[len(HF_PREFIX) :].partition(":")
    return dataset_id, config or None


def _read_hf(source: str, split: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    import datasets

    dataset_id, config = parse_hf(source)
    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as err:  # the hub, the network and the builders raise many types
        raise UserError(f"{source}: cannot load split `{split}` with the `datasets` library: {err}") from None
    for i, row in enumerate(dataset, start=1):
        yield i, row, None


def _source_name(source: Path | str) -> str:
    return source if isinstance(source, str) else source.name


def load_examples(recipe: Recipe, task, key: str, source: Path | str, rejected: list[dict[str, Any]]) -> list[Example]:
    """Read one source into Examples; every unusable row goes to `rejected` with its location and reason."""
    fields = recipe.data.fields
    text_fields = fields.text_fields()
    fixed_split = ROLES[key]
    name = _source_name(source)
    id_prefix = f"{fixed_split}:" if fixed_split else ""
    examples: list[Example] = []
    missing: Counter[str] = Counter()
    seen_keys: set[str] = set()
    rows = 0  # readable rows, to tell a wrong mapping from a few incomplete rows
    labels: dict[str, str] = {}  # one string object per label keeps a million rows small
    label_kinds: dict[str, dict[str, int]] = {}  # label -> JSON type it came as -> first line

    def reject(line: int, reason: str, detail: str) -> None:
        rejected.append({"source": name, "line": line, "reason": reason, "detail": detail})

    rows_read = read_rows(source, fixed_split or "train", max_row_bytes(recipe.data.max_tokens))
    try:
        for line, row, problem in rows_read:
            if row is None:
                reject(line, problem.split(":")[0], problem)
                continue
            rows += 1
            if len(seen_keys) < 200:
                seen_keys.update(row)
            try:
                parts = [get_field(row, f) for f in text_fields]
                if isinstance(fields.target, dict):
                    target = {k: get_field(row, path) for k, path in fields.target.items()}
                else:
                    target = get_field(row, fields.target)
                row_id = str(get_field(row, fields.id)) if fields.id else f"{id_prefix}{Path(name).stem}:{line}"
            except KeyError as err:
                missing[err.args[0]] += 1
                reject(line, "missing_field", f"field `{err.args[0]}` is missing")
                continue
            bad = [f for f, v in zip(text_fields, parts) if not isinstance(v, str)]
            if bad:
                reject(line, "non_text", ", ".join(f"`{f}` is {type(get_field(row, f)).__name__}, not text" for f in bad))
                continue
            text = TEXT_SEPARATOR.join(p.strip() for p in parts if p.strip())
            if _has_lone_surrogate([text, target]):
                reject(line, "undecodable", "holds a lone UTF-16 surrogate (a `\\ud800`-style escape): not valid "
                                            "Unicode text; fix or drop the character")
                continue
            if not text:
                reject(line, "empty_text", f"`{'`, `'.join(text_fields)}` {'is' if len(parts) == 1 else 'are'} empty or whitespace")
                continue
            raw_kind = type(target).__name__
            try:
                target = task.normalize_target(target)
            except ValueError as err:
                reject(line, "bad_target", str(err))
                continue
            if isinstance(target, str):
                label_kinds.setdefault(target, {}).setdefault(raw_kind, line)
                target = labels.setdefault(target, target)
            examples.append(Example(row_id, line, text, target, name, fixed_split))
    except UserError as err:  # a source that cannot be read at all: say which recipe key names it
        raise UserError(f"data.{key}: {err}") from None
    mixed = {label: kinds for label, kinds in label_kinds.items() if len(kinds) > 1}
    if mixed:
        label, kinds = next(iter(mixed.items()))
        where = " and ".join(f"{'a number' if k == 'int' else 'text'} on line {n}" for k, n in sorted(kinds.items()))
        raise UserError(
            f"data.{key} ({name}): label `{label}` comes as {where}"
            + (f" ({len(mixed) - 1} more labels too)" if len(mixed) > 1 else "")
            + f"; they would merge into one class without a word. Make `{fields.target}` one type in every row "
            "(quote the numbers, or write them all as numbers)"
        )
    for field, n in missing.items():
        if rows and n == rows:
            raise UserError(
                f"data.fields: field `{field}` is in no row of data.{key} ({name}); "
                f"fields seen: {', '.join(sorted(map(str, seen_keys))) or 'none'}. Fix the mapping in data.fields"
            )
    return examples


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def spec_of(recipe: Recipe, examples: list[Example]) -> Any:
    """The label set (recipe's, normalised, or the data's sorted labels), the JSON Schema, or None."""
    if recipe.task.type == "classification":
        if recipe.task.labels:
            return [normalize_label(label) for label in recipe.task.labels]
        return sorted({e.target for e in examples})
    return recipe.task.json_schema


# ---------------------------------------------------------------- checks


def _rejection(e: Example, reason: str, detail: str) -> dict[str, Any]:
    return {"source": e.source, "line": e.line, "id": e.id, "reason": reason, "detail": detail}


def check_targets(examples: list[Example], rejected: list[dict[str, Any]], task, spec) -> list[Example]:
    """Reject labels outside the set and targets that fail the schema (with the failing JSON path)."""
    if spec is None:
        return examples
    reason = "label_outside_set" if isinstance(spec, list) else "schema_invalid"
    kept = []
    for e in examples:
        problem = task.check_target(e.target, spec)
        if problem:
            rejected.append(_rejection(e, reason, problem))
        else:
            kept.append(e)
    return kept


def normalize_text(text: str) -> str:
    """The duplicate rule: Unicode NFKC, case-folded, runs of whitespace collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _split_rank(e: Example) -> int:
    return PROTECTED_ORDER.index(e.fixed_split or "train")


def check_duplicates(examples: list[Example], rejected: list[dict[str, Any]], task, spec) -> list[Example]:
    """Reject repeated ids, conflicting targets, duplicates, and texts that leak across splits.

    Texts are compared by `normalize_text`. A text seen with two different
    targets is ambiguous, so every copy is rejected (`conflicting_target`).
    Otherwise one copy is kept: the one in the most protected split (test, then
    validation, then train), earliest first; a copy in another split is
    `leakage`, a copy in the same split `duplicate_exact` (identical text) or
    `duplicate_normalized` (identical after normalisation).
    """
    keys = [_digest(normalize_text(e.text)) for e in examples]
    best: dict[bytes, int] = {}
    first_target: dict[bytes, str] = {}
    conflicts: set[bytes] = set()
    for i, (e, key) in enumerate(zip(examples, keys)):
        target = task.target_text(e.target, spec)
        if key not in best:
            best[key], first_target[key] = i, target
            continue
        if target != first_target[key]:
            conflicts.add(key)
        if _split_rank(e) > _split_rank(examples[best[key]]):
            best[key] = i
    del first_target
    kept: list[Example] = []
    seen_ids: dict[str, str] = {}
    first_loc: dict[bytes, str] = {}
    for i, (e, key) in enumerate(zip(examples, keys)):
        if key in conflicts:
            where = first_loc.setdefault(key, e.location)
            other = f"the same text at {where} has another target" if where != e.location else "the same text appears later with another target"
            rejected.append(_rejection(e, "conflicting_target", other))
            continue
        keeper = examples[best[key]]
        if best[key] != i:
            if (keeper.fixed_split or "train") != (e.fixed_split or "train"):
                rejected.append(_rejection(
                    e, "leakage", f"same text as {keeper.location} in the {keeper.fixed_split} split; removed from {e.fixed_split or 'train'}"
                ))
            elif keeper.text == e.text:
                rejected.append(_rejection(e, "duplicate_exact", f"same text as {keeper.location}"))
            else:
                rejected.append(_rejection(e, "duplicate_normalized", f"same text as {keeper.location} after normalising case, whitespace and Unicode"))
            continue
        if e.id in seen_ids:
            rejected.append(_rejection(e, "duplicate_id", f"id `{e.id}` is already used at {seen_ids[e.id]}"))
            continue
        seen_ids[e.id] = e.location
        kept.append(e)
    return kept


def _messages(system: str, text: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def measure_tokens(tokenizer, system: str, texts: list[str], answers: list[str]) -> tuple[list[int], list[int]]:
    """Token counts of the rendered prompt (chat template, generation prompt) and of the answer part."""
    prompts = [tokenizer.apply_chat_template(_messages(system, t), tokenize=False, add_generation_prompt=True) for t in texts]
    fulls = [tokenizer.apply_chat_template(_messages(system, t, a), tokenize=False) for t, a in zip(texts, answers)]
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
    prompt = tokenizer.apply_chat_template(_messages(system, text_mark), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(_messages(system, text_mark, answer_mark), tokenize=False)
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
                rejected.append(_rejection(e, "too_long", f"{p + a} tokens > data.max_tokens={limit}{cause}"))
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


def check_rejected_fraction(rejected: list[dict[str, Any]], total: int, limit: float, path: Path) -> None:
    if total and len(rejected) / total > limit:
        by_reason = Counter(r["reason"] for r in rejected)
        summary = ", ".join(f"{reason}: {n}" for reason, n in by_reason.most_common())
        raise UserError(
            f"data: {len(rejected)} of {total} rows rejected ({len(rejected) / total:.1%}), above "
            f"data.max_rejected_fraction={limit}. By reason: {summary}. Each row is listed in {path}; "
            "fix the data or raise the limit."
        )


def check_class_counts(examples: list[Example], recipe: Recipe, spec) -> None:
    """Every class of a classification task needs task.min_examples_per_class usable rows."""
    if recipe.task.type != "classification":
        return
    minimum = recipe.task.min_examples_per_class
    counts = Counter(e.target for e in examples)
    short = [(label, counts.get(label, 0)) for label in spec if counts.get(label, 0) < minimum]
    if short:
        listed = ", ".join(f"`{label}` has {n}" for label, n in short)
        raise UserError(
            f"task.min_examples_per_class={minimum}: {len(short)} class(es) have too few usable rows: {listed}. "
            "Add examples, remove the class from task.labels (or the data), or lower task.min_examples_per_class."
        )


# ---------------------------------------------------------------- split and render


def split_examples(examples: list[Example], recipe: Recipe) -> dict[str, list[Example]]:
    """Seeded, deterministic split of the rows from `data.source`; stratified by target for classification.

    Rows from validation_source/test_source go to their split as they are, and
    that split is not carved from `data.source`. Each split keeps source order.
    """
    split = recipe.data.split
    fractions = {
        "test": 0.0 if recipe.data.test_source is not None else split.test,
        "validation": 0.0 if recipe.data.validation_source is not None else split.validation,
    }
    rng = random.Random(split.seed)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        if e.fixed_split:
            out[e.fixed_split].append(e)
        elif split.stratify and recipe.task.type == "classification":
            groups[e.target].append(e)
        else:
            groups[""].append(e)
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda e: (e.source, e.line))
        rng.shuffle(members)
        n = len(members)
        n_test, n_val = round(n * fractions["test"]), round(n * fractions["validation"])
        if n >= 3:  # every split gets each class where its count allows
            n_test = max(n_test, 1 if fractions["test"] else 0)
            n_val = max(n_val, 1 if fractions["validation"] else 0)
        out["test"] += members[:n_test]
        out["validation"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    for rows in out.values():
        rows.sort(key=lambda e: (e.source, e.line))
    return out


def render(e: Example, system: str, task, spec) -> dict[str, Any]:
    return {
        "id": e.id,
        "text": e.text,
        "target": e.target,
        "prompt": _messages(system, e.text),
        "completion": [{"role": "assistant", "content": task.target_text(e.target, spec)}],
    }


def fewshot_examples(train: list[Example], recipe: Recipe, task, spec) -> dict[str, Any]:
    """`data.fewshot` examples drawn from train (seeded by data.split.seed) for prompted baselines.

    Classification takes them round-robin over the classes (sorted), so k >=
    number of classes shows every class once before any twice.
    """
    k = min(recipe.data.fewshot, len(train))
    rng = random.Random(recipe.data.split.seed)
    pools: dict[str, list[Example]] = defaultdict(list)
    for e in train:
        pools[e.target if recipe.task.type == "classification" else ""].append(e)
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: list[Example] = []
    while len(chosen) < k:
        for key in sorted(pools):
            if pools[key] and len(chosen) < k:
                chosen.append(pools[key].pop())
    return {
        "k": k,
        "seed": recipe.data.split.seed,
        "examples": [{"id": e.id, "text": e.text, "target": e.target, "completion": task.target_text(e.target, spec)} for e in chosen],
    }


def data_fingerprint(recipe: Recipe, split_files: list[Path]) -> str:
    h = hashlib.sha256(recipe.section_hash("data", "task").encode())
    for p in split_files:
        h.update(file_hash(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- report


def percentiles(values: list[int]) -> dict[str, int]:
    """p50, p95 (nearest rank) and max of token counts; zeros for no rows."""
    if not values:
        return {"p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(len(ordered) * q) - 1)]

    return {"p50": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


def build_stats(splits, rejected, truncated, recipe: Recipe, fingerprint: str) -> dict[str, Any]:
    by_reason = Counter(r["reason"] for r in rejected)
    everything = [e for rows in splits.values() for e in rows]
    stats: dict[str, Any] = {
        "rows": {s: len(rows) for s, rows in splits.items()},
        "rejected": dict(sorted(by_reason.items())),
        "rejected_total": len(rejected),
        "duplicates_removed": by_reason["duplicate_exact"] + by_reason["duplicate_normalized"],
        "leakage_removed": by_reason["leakage"],
        "truncated": len(truncated),
        "max_tokens": recipe.data.max_tokens,
        "max_tokens_policy": recipe.data.max_tokens_policy,
        "tokens": {
            name: {"prompt": percentiles([e.prompt_tokens for e in rows]), "answer": percentiles([e.answer_tokens for e in rows])}
            for name, rows in [("all", everything), *splits.items()]
        },
        "fingerprint": fingerprint,
    }
    if recipe.task.type == "classification":
        stats["classes"] = {s: dict(sorted(Counter(e.target for e in rows).items())) for s, rows in splits.items()}
    return stats


def plot_class_distribution(classes: dict[str, dict[str, int]], path: Path) -> None:
    """Horizontal stacked bars: rows per class, coloured by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for counts in classes.values() for label in counts})
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(labels) + 1)))
    left = [0] * len(labels)
    for split in SPLITS:
        values = [classes[split].get(label, 0) for label in labels]
        ax.barh(labels, values, left=left, label=split)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title("rows per class and split")
    ax.tick_params(axis="y", labelsize=7 if len(labels) > 30 else 9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    # fixed metadata so identical data gives an identical file
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def render_report(recipe: Recipe, stats: dict[str, Any], rejected, truncated) -> str:
    lines = [f"# prep report: {recipe.name}", "", f"Fingerprint: `{stats['fingerprint']}`", ""]
    lines += ["## Rows", "", "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in stats["rows"].items()]
    lines += [f"| rejected | {stats['rejected_total']} |", ""]
    lines += [
        f"Duplicates removed: {stats['duplicates_removed']}; leakage removed: {stats['leakage_removed']}; "
        f"truncated to data.max_tokens={stats['max_tokens']}: {stats['truncated']} (policy `{stats['max_tokens_policy']}`).",
        "",
        "## Token lengths (base model tokenizer, chat template applied)",
        "",
        "| split | prompt p50 | prompt p95 | prompt max | answer p50 | answer p95 | answer max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in stats["tokens"].items():
        p, a = t["prompt"], t["answer"]
        lines.append(f"| {name} | {p['p50']} | {p['p95']} | {p['max']} | {a['p50']} | {a['p95']} | {a['max']} |")
    lines.append("")
    if "classes" in stats:
        lines += ["## Classes", "", "![rows per class](class_distribution.png)", "", "| class | " + " | ".join(SPLITS) + " |"]
        lines.append("|---" * (len(SPLITS) + 1) + "|")
        labels = sorted({label for counts in stats["classes"].values() for label in counts})
        lines += [f"| {label} | " + " | ".join(str(stats["classes"][s].get(label, 0)) for s in SPLITS) + " |" for label in labels]
        lines.append("")
    lines += ["## Rejected rows", ""]
    if not rejected:
        lines += ["None.", ""]
    by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rejected:
        by_reason[r["reason"]].append(r)
    for reason in sorted(by_reason):
        rows = by_reason[reason]
        lines.append(f"- **{reason}**: {len(rows)}; e.g. " + "; ".join(f"{r['source']}:{r['line']} ({r['detail']})" for r in rows[:REPORT_EXAMPLES]))
    if rejected:
        lines += ["", "Every rejected row is listed in `rejected.jsonl`.", ""]
    if truncated:
        lines += ["## Truncated rows", "", f"{len(truncated)} rows had their input cut to fit; all are listed in `truncated.jsonl`.", ""]
    return "\n".join(lines)


def print_stats(stats: dict[str, Any]) -> None:
    table = Table(title="prep: rows and token lengths (prompt / answer, p50 · p95 · max)")
    for col in ("split", "rows", "prompt tokens", "answer tokens"):
        table.add_column(col)
    for split, n in stats["rows"].items():
        t = stats["tokens"][split]
        table.add_row(split, f"{n:,}", _fmt(t["prompt"]), _fmt(t["answer"]))
    table.add_row("rejected", f"{stats['rejected_total']:,}", "", "")
    console.print(table)
    if stats["rejected"]:
        console.print("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in stats["rejected"].items()))
    if stats["truncated"]:
        console.print(f"[yellow]truncated[/] {stats['truncated']} rows to data.max_tokens={stats['max_tokens']} (see prep/truncated.jsonl)")


def _fmt(p: dict[str, int]) -> str:
    return f"{p['p50']} · {p['p95']} · {p['max']}"


def log_to_mlflow(recipe: Recipe, run: RunDir, stats: dict[str, Any], out: Path) -> str:
    """A prep MLflow run: data/task params, row and token metrics, the fingerprint as tag and dataset input."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    fingerprint = stats["fingerprint"]
    tags = {"expert.recipe": recipe.name, "expert.data_fingerprint": fingerprint}
    with tracking.stage_run(recipe.name, STAGE, run.path.name, tags) as (mlflow_client, mlflow_run_id):
        dump = recipe.model_dump(mode="json", by_alias=True)
        tracking.log_params(mlflow_client, mlflow_run_id, tracking.flatten({"task": dump["task"], "data": dump["data"]}))
        metrics = {f"rows.{s}": n for s, n in stats["rows"].items()}
        metrics |= {f"rejected.{reason}": n for reason, n in stats["rejected"].items()}
        metrics |= {k: stats[k] for k in ("rejected_total", "duplicates_removed", "leakage_removed", "truncated")}
        for part in ("prompt", "answer"):
            metrics |= {f"tokens.{part}.{q}": v for q, v in stats["tokens"]["all"][part].items()}
        tracking.log_metrics(mlflow_client, mlflow_run_id, metrics)
        sources = {k: str(v) for k, v in sources_of(recipe).items()}
        inputs = [
            DatasetInput(
                Dataset(
                    name=f"{recipe.name}.{split}",
                    digest=fingerprint[:32],
                    source_type="hf" if str(recipe.data.source).startswith(HF_PREFIX) else "local",
                    source=json.dumps({"uri": str(run.path / STAGE / f"{split}.jsonl"), "sources": sources}),
                    schema=json.dumps({"columns": ["id", "text", "target", "prompt", "completion"]}),
                    profile=json.dumps({"rows": stats["rows"][split], "fingerprint": fingerprint}),
                ),
                tags=[InputTag("mlflow.data.context", split)],
            )
            for split in SPLITS
        ]
        mlflow_client.log_inputs(mlflow_run_id, datasets=inputs)
        for name in ("stats.json", "report.md", "spec.json", "fewshot.json", "rejected.jsonl", "truncated.jsonl", "class_distribution.png"):
            if (out / name).is_file():
                mlflow_client.log_artifact(mlflow_run_id, str(out / name), STAGE)
    return mlflow_run_id
