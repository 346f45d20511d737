"""Triage routers: trained on the expert's own outcomes, they score how likely the expert is to be wrong on a request,
and the route's cut-offs turn that score into the tier the request starts at.

Two kinds, each a logistic regression (scikit-learn) on the router split (rows the expert did not train on and the
thresholds are not chosen on), the target being "the expert's answer is not the gold one":

- `text` runs before any tier, on cheap text features: TF-IDF of word 1-2-grams and character 2-5-grams. A request
  it sends up skips the expert (and the mid tier) entirely: no cost, no time. About a millisecond a request here.
- `probe` runs on the expert's own forward pass: its last hidden state at the answer position. It sees what the
  expert "knows" it does not know, but runs after the expert, so it can skip the tiers above the expert, not the
  expert itself. At run time it is one more forward pass over the prompt (eval's label scoring shares no pass with it).

A router is saved as `router.json` (kind, settings, vocabularies, how it was trained) and `router.safetensors` (its
arrays): no pickle, nothing executable; `load` checks every array's shape against the settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

KINDS = ("text", "probe")
FOLDER = "triage"  # eval/triage/<kind>/ and, for the router a route keeps, the version's bundle triage/<kind>/
FORMAT = 1
WEIGHTS = "router.safetensors"
SETTINGS = "router.json"
# word 1-2-grams carry the topic; character 2-5-grams (within words) carry spelling, morphology and unseen words
TEXT_ANALYZERS = ({"analyzer": "word", "ngram_range": [1, 2]}, {"analyzer": "char_wb", "ngram_range": [2, 5]})
MAX_FEATURES = 20_000  # per analyzer: bounds the version's size and the per-request work
C_GRID = (0.25, 1.0, 4.0, 16.0)  # inverse regularisation tried by shuffled 5-fold cross-validation (ROC AUC)


NEVER = 2.0  # a cut-off no router score (a probability) reaches; finite, as strict JSON wants


def start_tier(scores: np.ndarray, cutoffs: tuple[float, ...]) -> np.ndarray:
    """The tier each request starts at: how many of the route's (non-decreasing) cut-offs its score reaches. The
    one rule eval's search, `expert predict` and `expert serve` share."""
    return sum((scores >= c).astype(np.int64) for c in cutoffs) if cutoffs else np.zeros(len(scores), dtype=np.int64)


def expert_wrong(golds: list[Any], predictions: list[Any]) -> np.ndarray:
    """What a router learns: per row, the expert's answer is not the target (no answer is wrong)."""
    return np.array([p is None or p != g for g, p in zip(golds, predictions, strict=True)], dtype=bool)


@dataclass
class Router:
    """A trained router: `score(inputs)` is the probability the expert is wrong (texts for `text`, the expert's
    states for `probe`)."""

    kind: str
    model: Any  # sklearn LogisticRegression (coef_, intercept_, classes_)
    vectorizers: list[Any] = field(default_factory=list)  # `text`: fitted TfidfVectorizers
    mean: np.ndarray | None = None  # `probe`: standardisation of the states
    scale: np.ndarray | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def before_expert(self) -> bool:
        return self.kind == "text"

    def features(self, inputs) -> Any:
        if self.kind == "text":
            from scipy.sparse import hstack

            return hstack([v.transform(list(inputs)) for v in self.vectorizers]).tocsr()
        return (np.asarray(inputs, dtype=np.float64) - self.mean) / self.scale

    def score(self, inputs) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros(0)
        return self.model.predict_proba(self.features(inputs))[:, 1]


def train(kind: str, inputs, wrong: np.ndarray, seed: int) -> Router:
    """A router of `kind` fitted on the router split: `inputs` (texts or states) and whether the expert was wrong.
    Needs both outcomes at least 5 times (5-fold cross-validation chooses the regularisation)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    if kind not in KINDS:
        raise ValueError(f"unknown router kind {kind!r}; one of {', '.join(KINDS)}")
    wrong = np.asarray(wrong, dtype=bool)
    counts = {"rows": int(len(wrong)), "expert_wrong": int(wrong.sum())}
    if min(counts["expert_wrong"], counts["rows"] - counts["expert_wrong"]) < 5:
        raise ValueError(f"the router split has {counts['expert_wrong']} rows the expert got wrong of {counts['rows']}: "
                         "a router needs at least 5 of each outcome (a larger data.split.router)")
    router = Router(kind, None)
    if kind == "text":
        router.vectorizers = [TfidfVectorizer(analyzer=a["analyzer"], ngram_range=tuple(a["ngram_range"]),
                                              sublinear_tf=True, lowercase=True, min_df=2, max_features=MAX_FEATURES)
                              for a in TEXT_ANALYZERS]
        for v in router.vectorizers:
            v.fit(list(inputs))
    else:
        states = np.asarray(inputs, dtype=np.float64)
        router.mean, router.scale = states.mean(axis=0), states.std(axis=0) + 1e-6
    # shuffled folds: a router split in source order (by intent, by day of a log) would otherwise hold out whole
    # blocks, score near chance and choose the strongest regularisation
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    model = LogisticRegressionCV(Cs=list(C_GRID), cv=folds, scoring="roc_auc", class_weight="balanced", max_iter=2000,
                                 random_state=seed, l1_ratios=(0.0,), use_legacy_attributes=False)
    model.fit(router.features(inputs), wrong.astype(int))
    router.model = model
    # scores_: folds x l1 ratios x Cs; the chosen C's mean over the folds
    router.training = {**counts, "C": float(model.C_),
                       "cv_roc_auc": float(np.max(np.asarray(model.scores_).mean(axis=0)))}
    return router


def save(router: Router, folder: Path) -> None:
    from safetensors.numpy import save_file

    from pipeline.files import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"coef": router.model.coef_.astype(np.float64), "intercept": router.model.intercept_.astype(np.float64)}
    settings: dict[str, Any] = {"format": FORMAT, "kind": router.kind, "features": int(arrays["coef"].shape[1]),
                                "training": router.training}
    if router.kind == "text":
        settings["analyzers"] = [{**spec, "vocabulary": {t: int(i) for t, i in v.vocabulary_.items()}}
                                 for spec, v in zip(TEXT_ANALYZERS, router.vectorizers)]
        for i, v in enumerate(router.vectorizers):
            arrays[f"idf_{i}"] = v.idf_.astype(np.float64)
    else:
        arrays.update(mean=router.mean, scale=router.scale)
    save_file(arrays, str(folder / WEIGHTS))
    atomic_write_json(folder / SETTINGS, settings)


def load(folder: Path) -> Router:
    """The router saved in `folder`; a missing file, another format or arrays that do not fit are errors naming
    the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    try:
        settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
        arrays = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"{folder}: the triage router cannot be read ({err}); redo `expert eval`") from None
    if settings.get("format") != FORMAT or settings.get("kind") not in KINDS:
        raise UserError(f"{folder / SETTINGS}: not a triage router of format {FORMAT}; redo `expert eval`")
    width = settings["features"]
    model = LogisticRegression()
    model.coef_, model.intercept_, model.classes_ = arrays["coef"], arrays["intercept"], np.array([0, 1])
    router = Router(settings["kind"], model, training=settings.get("training", {}))
    if router.kind == "text":
        for i, spec in enumerate(settings["analyzers"]):
            v = TfidfVectorizer(analyzer=spec["analyzer"], ngram_range=tuple(spec["ngram_range"]), sublinear_tf=True,
                                lowercase=True, vocabulary=spec["vocabulary"])
            v.idf_ = arrays[f"idf_{i}"]
            router.vectorizers.append(v)
        widths = sum(len(spec["vocabulary"]) for spec in settings["analyzers"])
    else:
        router.mean, router.scale = arrays["mean"], arrays["scale"]
        widths = len(router.mean)
    if model.coef_.shape != (1, width) or widths != width:
        raise UserError(f"{folder / WEIGHTS}: its arrays do not fit the router's {width} features; redo `expert eval`")
    return router


def expert_states(model, tokenizer, prompts: list[list[dict[str, str]]], batch_size: int) -> np.ndarray:
    """The expert's last hidden state at the answer position (the prompt's last token, where its answer begins)
    for each prompt (its messages): what the `probe` router reads."""
    import torch

    from pipeline.inference.answering import prompt_texts

    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(prompts), batch_size):
            texts = prompt_texts(tokenizer, prompts[start:start + batch_size])
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1]
            last = batch["attention_mask"].sum(dim=1) - 1
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu().numpy())
    finally:
        tokenizer.padding_side = side
    return np.concatenate(out) if out else np.zeros((0, 0))


def timed_score(router: Router, inputs) -> tuple[np.ndarray, float]:
    """Scores and the seconds per request scoring took (one request at a time, as serving runs it; on up to 200
    requests)."""
    scores = router.score(inputs)
    sample = list(inputs[:200]) if router.kind == "text" else np.asarray(inputs)[:200]
    started = time.perf_counter()
    for one in sample:
        router.score([one] if router.kind == "text" else np.asarray(one)[None, :])
    return scores, (time.perf_counter() - started) / max(len(sample), 1)
