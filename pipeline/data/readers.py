"""Reading data sources: every supported format row by row, then one source into `Example`s.

`read_rows` streams .jsonl, .csv/.tsv, .json, .parquet and `hf:` sources, each
row with its line (text files) or 1-based record number, and yields a row that
cannot be read with its problem instead of stopping; bytes that are not UTF-8
text are found here, before any tokenizer sees them, and so is JSON nested too deep to parse safely
(`json_depth`: a `too_deep` line; a .json source that deep is refused whole). `load_examples` maps rows
through `data.fields` and rejects incomplete or unusable ones with a reason code.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data import json_depth
from pipeline.data.examples import Example
from pipeline.errors import UserError
from pipeline.recipe.schema import HF_PREFIX, TRACES_PREFIX, Recipe

# which split a row belongs to when its source is a fixed split; `source` rows get split
ROLES = {"source": None, "validation_source": "validation", "test_source": "test", "router_source": "router"}
# the split of an `hf:` dataset each source reads: datasets have no `router` split, so a router source is a
# dataset (or config) of its own and gives its `train` split
HF_SPLITS = {"source": "train", "validation_source": "validation", "test_source": "test", "router_source": "train"}
TEXT_SEPARATOR = "\n\n"


def sources_of(recipe: Recipe) -> dict[str, Path | str]:
    """The recipe's data sources by YAML key (`source`, `validation_source`, `test_source`, `router_source`)."""
    return {key: getattr(recipe.data, key) for key in ROLES if getattr(recipe.data, key) is not None}


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
    if isinstance(source, str) and source.startswith(TRACES_PREFIX):
        yield from read_traces(source[len(TRACES_PREFIX):])
        return
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
                row = json_depth.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield line_no, None, f"undecodable: not UTF-8 (byte {err.start})"
                continue
            except json_depth.TooDeep as err:
                yield line_no, None, f"too_deep: {err}"
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
        data = json_depth.loads(source.read_bytes().removeprefix(UTF8_BOM).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{source} is not UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    except json_depth.TooDeep as err:
        raise UserError(f"{source}: {err}; a row is an object of fields, the file one array of rows") from None
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


def _traces(experiment: str, include_spans: bool = True) -> Iterator[Any]:
    """Every trace of an MLflow experiment, oldest first, page by page (`include_spans=False`: their info only)."""
    from mlflow import MlflowClient

    from pipeline.run.tracking import configure

    uri = configure()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"mlflow-traces:{experiment}: no such experiment on {uri}; set MLFLOW_TRACKING_URI to the "
                        "server that holds your app's traces")
    token = None
    while True:
        page = client.search_traces(experiment_ids=[found.experiment_id], max_results=500, page_token=token,
                                    order_by=["timestamp_ms ASC"], include_spans=include_spans)
        yield from page
        token = page.token
        if not token:
            return


def traces_digest(experiment: str) -> str:
    """What a traces source holds now (its trace ids, in order): new traces make prep run again."""
    import hashlib

    h = hashlib.sha256()
    for trace in _traces(experiment, include_spans=False):  # ids only: the spans are read when prep runs
        h.update(trace.info.trace_id.encode() + b"\0")
    return h.hexdigest()


def read_traces(experiment: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Each trace as a gateway record: the root span's inputs as the request, its outputs as the response (a
    chat completion, or plain text taken as the answer). Failed traces are yielded with their problem."""
    for i, trace in enumerate(_traces(experiment), start=1):
        trace_id = trace.info.trace_id
        if str(getattr(trace.info.state, "value", trace.info.state)) != "OK":
            yield i, None, f"trace_failed: trace {trace_id} ended {trace.info.state}"
            continue
        try:
            request = json_depth.loads(trace.data.request or "null")
            response = json_depth.loads(trace.data.response or "null")
        except json_depth.TooDeep as err:
            yield i, None, f"too_deep: trace {trace_id}'s inputs or outputs: {err}"
            continue
        except json.JSONDecodeError as err:
            yield i, None, f"unparsable: trace {trace_id}'s inputs or outputs are not JSON ({err.msg})"
            continue
        if isinstance(response, str):
            response = {"choices": [{"message": {"role": "assistant", "content": response}}]}
        yield i, {"request": request, "response": response, "trace_id": trace_id}, None


def _source_name(source: Path | str) -> str:
    return source if isinstance(source, str) else source.name


def load_examples(recipe: Recipe, task, key: str, source: Path | str, rejected: list[dict[str, Any]]) -> list[Example]:
    """Read one source into Examples; every unusable row goes to `rejected` with its location and reason."""
    if recipe.data.format != "table":
        return load_logged(recipe, task, key, source, rejected)
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

    rows_read = read_rows(source, HF_SPLITS[key], max_row_bytes(recipe.data.max_tokens))
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
                row_id = str(get_field(row, fields.id)) if fields.id else f"{id_prefix}{Path(name).stem}:{line}"
                target = unlabeled = None
                try:
                    if isinstance(fields.target, dict):
                        target = {k: get_field(row, path) for k, path in fields.target.items()}
                    else:
                        target = get_field(row, fields.target)
                except KeyError:
                    if recipe.data.teacher is None:
                        raise
                    unlabeled = True
                if recipe.data.teacher is not None and target in (None, ""):
                    unlabeled = True  # the teacher labels it
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
                reject(line, "empty_text",
                       f"`{'`, `'.join(text_fields)}` {'is' if len(parts) == 1 else 'are'} empty or whitespace")
                continue
            if unlabeled:
                examples.append(Example(row_id, line, text, None, name, fixed_split, provenance="unlabeled"))
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


def load_logged(recipe: Recipe, task, key: str, source: Path, rejected: list[dict[str, Any]]) -> list[Example]:
    """Read one `chat` or `gateway` log into Examples: the expert's input per `data.input`, the target the logged
    answer parsed as a frontier baseline's answer is (`task.parse_answer` against the recipe's labels or schema),
    provenance `log:<model>`. A line of the wrong shape, without an answer, or whose answer does not parse is
    rejected with its line and why."""
    from pipeline.data.log_records import LogRowError, logged_call, read_batch_requests
    from pipeline.data.row_checks import DetailScrubber, spec_of

    spec = spec_of(recipe, [])
    scrubber = DetailScrubber(recipe)
    requests: dict[str, tuple[int, dict[str, Any]]] = {}
    if recipe.data.format == "openai_batch":
        requests_file = recipe.data.batch_requests
        requests, bad = read_batch_requests(read_rows(requests_file, "train", max_row_bytes(recipe.data.max_tokens)))
        for line, reason, detail in bad:
            rejected.append({"source": requests_file.name, "line": line, "reason": reason, "detail": detail})
    answered: set[str] = set()
    fixed_split = ROLES[key]
    name = _source_name(source)
    id_prefix = f"{fixed_split}:" if fixed_split else ""
    examples: list[Example] = []

    def reject(line: int, reason: str, detail: str) -> None:
        rejected.append({"source": name, "line": line, "reason": reason, "detail": detail})

    try:
        for line, row, problem in read_rows(source, HF_SPLITS[key], max_row_bytes(recipe.data.max_tokens)):
            if row is None:
                reject(line, problem.split(":")[0], problem)
                continue
            if isinstance(row.get("custom_id"), str):
                answered.add(row["custom_id"])
            try:
                call = logged_call(row, recipe.data.format, recipe.data.input, requests)
            except LogRowError as err:
                reject(line, err.reason, _traced(row, str(err)))
                continue
            if _has_lone_surrogate([call.text, call.answer]):
                reject(line, "undecodable", "holds a lone UTF-16 surrogate: not valid Unicode text")
                continue
            text = call.text.strip()
            if not text:
                reject(line, "empty_text", "the expert's input (per data.input) is empty")
                continue
            target = task.parse_answer(call.answer, spec)
            if target is None:
                reject(line, "unparsable_answer", _traced(row, f"the logged answer is not a {recipe.task.type} "
                       f"target: {scrubber.quote(call.answer)}"))
                continue
            row_id = f"{id_prefix}{Path(name).stem}:{line}"
            examples.append(Example(row_id, line, text, task.normalize_target(target), name, fixed_split,
                                    provenance=f"log:{call.model or 'unknown'}", usage=call.usage))
    except UserError as err:
        raise UserError(f"data.{key}: {err}") from None
    for custom_id, (line, _) in requests.items():  # a request the batch never answered: reported, not forgotten
        if custom_id not in answered:
            rejected.append({"source": recipe.data.batch_requests.name, "line": line, "reason": "no_result",
                             "detail": f"request {custom_id} has no result in {name}"})
    return examples


def _traced(row: dict[str, Any], detail: str) -> str:
    """A rejection detail that names the MLflow trace, where the row is one (its record number is only an order)."""
    return f"trace {row['trace_id']}: {detail}" if "trace_id" in row else detail
