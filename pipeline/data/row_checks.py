"""Row checks after reading: targets against the spec, duplicates, conflicts and leakage, and the stage's limits.

Each check moves the rows it refuses to `rejected` with a reason code and
returns the rest; the limits (`data.max_rejected_fraction`,
`task.min_examples_per_class`) fail the stage with a `UserError` instead.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.data.examples import Example, rejection
from pipeline.errors import UserError
from pipeline.recipe.schema import Recipe

# when the same text is in two splits, the copy in the later split of this order wins; router ranks below
# validation, so a router source never takes a row from the split thresholds are chosen on
PROTECTED_ORDER = ("train", "router", "validation", "test")


def spec_of(recipe: Recipe, examples: list[Example]) -> Any:
    """The label set (recipe's, normalised, or the data's sorted labels), the JSON Schema, or None."""
    return tasks.for_type(recipe.task.type).spec_of(recipe.task, [e.target for e in examples])


def check_targets(examples: list[Example], rejected: list[dict[str, Any]], task, spec) -> list[Example]:
    """Reject labels outside the set and targets that fail the schema (with the failing JSON path)."""
    if spec is None:
        return examples
    reason = task.target_rejection
    kept = []
    for e in examples:
        problem = task.check_target(e.target, spec)
        if problem:
            rejected.append(rejection(e, reason, problem))
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
    validation, then router, then train), earliest first; a copy in another split is
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
            other = (f"the same text at {where} has another target" if where != e.location
                     else "the same text appears later with another target")
            rejected.append(rejection(e, "conflicting_target", other))
            continue
        keeper = examples[best[key]]
        if best[key] != i:
            if (keeper.fixed_split or "train") != (e.fixed_split or "train"):
                rejected.append(rejection(
                    e, "leakage",
                    f"same text as {keeper.location} in the {keeper.fixed_split} split; removed from {e.fixed_split or 'train'}"
                ))
            elif keeper.text == e.text:
                rejected.append(rejection(e, "duplicate_exact", f"same text as {keeper.location}"))
            else:
                rejected.append(rejection(
                    e, "duplicate_normalized", f"same text as {keeper.location} after normalising case, whitespace and Unicode"
                ))
            continue
        if e.id in seen_ids:
            rejected.append(rejection(e, "duplicate_id", f"id `{e.id}` is already used at {seen_ids[e.id]}"))
            continue
        seen_ids[e.id] = e.location
        kept.append(e)
    return kept


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
    """Every class of a label-set task needs task.min_examples_per_class usable rows (rows that hold it)."""
    task = tasks.for_type(recipe.task.type)
    if not task.label_set:
        return
    minimum = recipe.task.min_examples_per_class
    counts = Counter(label for e in examples for label in task.labels_of(e.target))
    short = [(label, counts.get(label, 0)) for label in spec if counts.get(label, 0) < minimum]
    if short:
        listed = ", ".join(f"`{label}` has {n}" for label, n in short)
        raise UserError(
            f"task.min_examples_per_class={minimum}: {len(short)} class(es) have too few usable rows: {listed}. "
            "Add examples, remove the class from task.labels (or the data), or lower task.min_examples_per_class."
        )


PII_SECRET_ENV = "EXPERT_PII_SECRET"  # ends in _SECRET: `frontier.scrub` removes its value from any text
PII_KEY_FILE = "pii.key"


def pii_key() -> bytes:
    """The key of `data.pii`'s pseudonyms: `$EXPERT_PII_SECRET` when set (share it where several machines must
    give the same person the same pseudonym), else 32 random bytes made once in the cache (`$EXPERT_CACHE/pii.key`,
    readable by its owner only). Independent of the recipe, so one person has one pseudonym across recipes and
    runs; never written to a run, a log or MLflow."""
    import os
    import secrets

    from pipeline.inference.models import cache_root

    if os.environ.get(PII_SECRET_ENV):
        return os.environ[PII_SECRET_ENV].encode("utf-8")
    path = cache_root() / PII_KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{PII_KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # never replaces a key another prep made meanwhile: pseudonyms stay one per value
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) < 16:
        raise UserError(f"{path}: the data.pii key is {len(key)} bytes, too short to keep pseudonyms unguessable; "
                        f"delete the file (a new one is made) or set {PII_SECRET_ENV}")
    return key


class PiiPolicy:
    """`data.pii` as a function on text: personal data replaced by pseudonyms (`redact` and `reject`), or kept."""

    def __init__(self, recipe: Recipe):
        from pipeline.data import pii

        self.active = recipe.data.pii != "keep"
        self.kinds, self.region = recipe.data.pii_kinds, recipe.data.pii_region
        if not self.active:
            return
        try:
            pii.check_kinds(self.kinds)
            pii.redact("", self.kinds, region=self.region)
        except ValueError as err:
            raise UserError(f"data.pii_region: {err}") from None
        self.key = pii_key()

    def redact(self, value: Any, counts: Counter | None = None) -> Any:
        """`value` (text, or the strings inside a dict or list) with its finds replaced; `counts` gets them by kind."""
        from pipeline.data import pii

        if not self.active:
            return value
        if isinstance(value, str):
            text, n = pii.redact(value, self.kinds, region=self.region, key=self.key)
            if counts is not None:
                counts.update(n)
            return text
        if isinstance(value, dict):
            return {k: self.redact(v, counts) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v, counts) for v in value]
        return value


def check_pii(examples: list[Example], rejected: list[dict[str, Any]], recipe: Recipe) -> tuple[list[Example], Counter]:
    """`data.pii` on every row before anything is written, sent or logged: `redact` replaces personal data in the
    input, the string leaves of the target and the id by pseudonyms; `reject` drops the row as `pii`, naming only
    the kinds. A classification label that holds personal data is rejected in both modes (a pseudonym is no
    class). Rejection details are scrubbed where they are written (`scrub_records`). Returns the rows and the
    finds by kind."""
    found: Counter = Counter()
    policy = PiiPolicy(recipe)
    if not policy.active:
        return examples, found
    kept: list[Example] = []
    label_set = tasks.for_type(recipe.task.type).label_set
    for e in examples:
        counts: Counter = Counter()
        text, row_id = policy.redact(e.text, counts), policy.redact(e.id, counts)
        label_counts: Counter = Counter()
        if label_set:  # labels are checked, never redacted
            policy.redact(e.target, label_counts)
            target = e.target
        else:
            target = policy.redact(e.target, counts)
        found.update(counts + label_counts)
        if label_counts or (counts and recipe.data.pii == "reject"):
            where = "the label holds " if label_counts and not counts else "holds "
            rejected.append({"source": e.source, "line": e.line, "id": row_id, "reason": "pii",
                             "detail": where + ", ".join(f"{n} {k}" for k, n in sorted((counts + label_counts).items()))})
            continue
        e.text, e.id, e.target = text, row_id, target
        kept.append(e)
    return kept, found


class DetailScrubber:
    """What a detail passes before it is written, reported or logged: every secret (the recipe's endpoint keys,
    any `*_API_KEY`/`*_TOKEN`/`*_SECRET` in the environment, key-shaped text; `frontier.scrub`) and, unless
    `data.pii: keep`, personal data by the same pseudonyms as the rows. Made once per reader or labelling run:
    the PII key and the recipe's endpoint keys are read here, not per detail."""

    def __init__(self, recipe: Recipe):
        import os

        self.keys = [os.environ.get(name) for name in _api_key_envs(recipe.model_dump(mode="json"))]
        self.policy = PiiPolicy(recipe)

    def __call__(self, value: Any) -> Any:
        from pipeline.routing.frontier import scrub

        return self.policy.redact(scrub(value, *self.keys)) if isinstance(value, str) else value

    def quote(self, text: str, limit: int = 120) -> str:
        """An answer as a detail quotes it: scrubbed while whole (a key or card cut in half by the limit would no
        longer be recognised), then on one line, cut to `limit` characters and quoted."""
        shown = " ".join(self(text).split())
        return repr(shown[:limit]) + ("..." if len(shown) > limit else "")


def scrub_records(records: list[dict[str, Any]], recipe: Recipe) -> list[dict[str, Any]]:
    """Rejected or truncated rows as they may be written, reported and logged, every string field through
    `DetailScrubber`. Whoever made a detail (a reader quoting a line, the teacher quoting its answer, a label check
    quoting the label), it passes here before it leaves prep."""
    clean = DetailScrubber(recipe)
    return [{field: clean(value) for field, value in r.items()} for r in records]


def _api_key_envs(section: Any) -> set[str]:
    """Every `api_key_env` a recipe names (the teacher's, the baselines', the tiers')."""
    if isinstance(section, dict):
        found = {section["api_key_env"]} if isinstance(section.get("api_key_env"), str) else set()
        return found.union(*(_api_key_envs(v) for v in section.values()))
    if isinstance(section, list):
        return set().union(*(_api_key_envs(v) for v in section))
    return set()
