"""The typed recipe: one pydantic model, validated once at load.

Every stage receives a `Recipe`, never a dict. Unknown keys are errors and all
problems are reported together, each with its YAML path, so a user fixes a
recipe in one pass instead of one error per run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from pipeline.errors import UserError

# counts are bounded so that a typo (1e30) is a recipe error naming its key, not a crash deep in a library
PositiveInt = Annotated[int, Field(gt=0, le=1_000_000_000)]
BatchSize = Annotated[int, Field(gt=0, le=65_536)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def _shown(text: str) -> dict[str, str]:
    """A default as the key table shows it, where the literal default (None) says less than what it stands for.

    A field's `description` is the one place its key is documented: docs/RECIPE_KEYS.md and
    `expert validate --explain` are generated from them (pipeline/recipe/keys_doc.py)."""
    return {"shown_default": text}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSection(Strict):
    type: Literal["classification", "extraction", "generation", "multilabel"] = Field(
        description="`classification` (one label per input), `extraction` (a JSON object that satisfies "
        "`task.schema`), `generation` (a free-text answer) or `multilabel` (a set of labels per input, e.g. tags)")
    instruction: str = Field(min_length=1, description="the system instruction the model sees")
    labels: list[str] | None = Field(
        None, json_schema_extra=_shown("from the data"),
        description="classification: the label set; omitted, the sorted unique labels of the data. Labels are "
        "normalised (Unicode NFC, surrounding whitespace stripped) and then compared exactly")
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", json_schema_extra=_shown("required for extraction"),
        description="extraction: the JSON Schema (draft 2020-12) every target and every prediction must satisfy")
    min_examples_per_class: PositiveInt = Field(
        3, description="classification: a class with fewer usable rows than this is an error that names it "
        "(3: one per split)")
    spec_in_expert_prompt: bool = Field(
        False, description="also put the label list / schema in the expert's prompt. The untuned baselines always "
        "get it; the expert learns it in training (and label scoring / constrained decoding enforce it), so by "
        "default its prompt is the instruction alone: a long label list would add its tokens to every training "
        "step and request")

    @model_validator(mode="after")
    def _check_type_fields(self) -> TaskSection:
        from pipeline import tasks

        tasks.for_type(self.type).check_section(self)
        return self

FieldPath = Annotated[str, Field(min_length=1)]


class FieldsSection(Strict):
    text: FieldPath | Annotated[list[FieldPath], Field(min_length=1)] = Field(
        description="the field holding the input text (dotted paths reach nested fields), or a list of fields "
        "joined by a blank line into the input, e.g. `[subject, body]`")
    target: FieldPath | Annotated[dict[str, FieldPath], Field(min_length=1)] = Field(
        description="classification: the field holding the label; generation: the field holding the answer "
        "text; extraction: the field holding the target object (an object or a JSON string), or a mapping "
        "`{key: field}` that builds it, e.g. `{intent: intent, slots: slots}`")
    id: str | None = Field(
        None, json_schema_extra=_shown("`<file stem>:<line>`"),
        description="the field holding a stable example id (ids must be unique)")

    def text_fields(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class SplitSection(Strict):
    validation: Fraction = Field(
        0.1, description="share of `data.source` held out for validation (ignored with `data.validation_source`)")
    test: Fraction = Field(
        0.2, description="share of `data.source` held out for test (ignored with `data.test_source`)")
    router: Fraction = Field(
        0.0, description="share of `data.source` held out as the router split (`prep/router.jsonl`; ignored with "
        "`data.router_source`): the expert does not train on it, thresholds are not chosen on it, and eval asks "
        "every routing tier on it so the triage router learns from their outcomes. Carved after test and "
        "validation within each stratum, so those two keep the rows they have without it")
    seed: Seed = Field(13, description="seed of the split and of the few-shot draw (`data.fewshot`)")
    stratify: bool = Field(True, description="classification: split each label's rows in the same proportions "
                             "(multilabel: each label set's)")

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitSection:
        if self.validation + self.test + self.router >= 0.9:
            raise ValueError(f"validation + test + router ({self.validation} + {self.test} + {self.router}) must "
                             "leave at least 10% of rows for training; lower one of them")
        return self

HF_PREFIX = "hf:"
TRACES_PREFIX = "mlflow-traces:"  # the traces of an MLflow experiment on the configured tracking URI
FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _check_source(value: Path | str) -> Path | str:
    """A file path (as Path) or `hf:<dataset id>[:<config>]` (kept as str)."""
    text = str(value)
    if text.startswith(TRACES_PREFIX):
        if not text[len(TRACES_PREFIX):]:
            raise ValueError(f"`{text}`: write mlflow-traces:<experiment name>")
        return text
    if text.startswith(HF_PREFIX):
        dataset_id, _, config = text[len(HF_PREFIX) :].partition(":")
        if not dataset_id or (":" in text[len(HF_PREFIX) :] and not config):
            raise ValueError(f"`{text}`: write hf:<dataset id> or hf:<dataset id>:<config>")
        return text
    path = Path(text)
    if path.suffix.lower() not in FILE_TYPES:
        raise ValueError(f"`{text}`: unsupported file type; use one of {', '.join(FILE_TYPES)} or hf:<dataset id>")
    return path


DataSource = Annotated[Path | str, AfterValidator(_check_source)]


class Price(Strict):
    input: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(description="USD per million input (prompt) tokens")
    output: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        description="USD per million output (completion) tokens")


PricePerMtok = Annotated[Price | None, Field(
    description="USD per million tokens, `{input, output}`, for the cost per 1,000 requests (recorded "
    "predictions: from the token counts their file records)")]
_KIND = "which system the baseline is; it decides which other keys apply"

# Every baseline carried every kind's keys before baselines were split by kind, and a dumped recipe (a run
# directory's recipe.yaml, a registered version's bundle) wrote them all out. Such a key, at the value it was
# written with there, is dropped from a kind it does not belong to, so those recipes still load; at any other
# value it is an unknown key of that kind.
_UNSET_KEYS_OF_OTHER_KINDS: dict[str, Any] = {
    "model": None, "base_url": None, "api_key_env": None, "required": False, "max_concurrency": 4,
    "timeout_s": 60, "max_retries": 4, "json_schema_response": False, "price_per_mtok": None, "shots": 0,
    "path": None, "logprobs": False, "run_dir": None, "version": None, "samples": 1, "sample_temperature": 1.0,
}


class TeacherSection(Strict):
    """An OpenAI-compatible endpoint (a hosted model, or a registered expert behind `expert serve`) that labels the
    rows whose target is missing, through the frontier baselines' client: retries, concurrency, the response
    cache, the key read from the environment and never written."""

    model: str = Field(min_length=1, description="the model name the endpoint serves")
    base_url: str | None = Field(None, description="the endpoint; default OpenAI's")
    api_key_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the NAME of the environment "
                             "variable holding the key (never the key itself; any value for `expert serve`)")
    price_per_mtok: Price | None = Field(None, description="dollars per million input and output tokens, for the "
                                         "estimate before the first call and the budget")
    max_cost_usd: Annotated[float, Field(gt=0)] | None = Field(
        None, description="the most labelling may cost, cached answers included: each request's upper-bound cost "
        "is reserved before it is sent and none is sent that could pass it; needs `price_per_mtok`")
    max_concurrency: PositiveInt = Field(4, description="requests in flight at once")
    timeout_s: Annotated[float, Field(gt=0)] = Field(60, description="seconds per attempt")
    max_retries: Annotated[int, Field(ge=0, le=20)] = Field(4, description="retries per row (429, 5xx, timeouts, "
                                                           "malformed answers), with backoff")
    max_new_tokens: PositiveInt = Field(64, description="most tokens the teacher may answer with")
    logprobs: bool = Field(False, description="ask for the answer tokens' log-probabilities (OpenAI, vLLM); the "
                           "report then gives the teacher's confidence (probability of its whole answer)")
    test_labels: bool = Field(False, description="let teacher-labelled rows into the test split (by default the "
                              "test split holds gold rows only: eval measures against gold)")

    @model_validator(mode="after")
    def _budget_has_a_price(self) -> TeacherSection:
        if self.max_cost_usd is not None and self.price_per_mtok is None:
            raise ValueError("max_cost_usd needs price_per_mtok: the budget is counted in dollars")
        return self


class DataSection(Strict):
    source: DataSource = Field(
        description="`.jsonl`, `.json` (one array of objects, read whole: use `.jsonl` for big data), `.csv`, "
        "`.tsv`, `.parquet`, or `hf:<dataset id>[:<config>]` (its `train` split, through `datasets`)")
    validation_source: DataSource | None = Field(
        None, description="a fixed validation split of your own (same formats; an `hf:` source reads its "
        "`validation` split); that split is then not carved from `data.source`")
    test_source: DataSource | None = Field(
        None, description="a fixed test split of your own (same formats; an `hf:` source reads its `test` "
        "split); that split is then not carved from `data.source`")
    router_source: DataSource | None = Field(
        None, description="a fixed router split of your own, its rows as they are (same formats, `data.format`'s "
        "logs included: the logged frontier answer is then the target, so the router learns agreement with it; an "
        "`hf:` source reads its `train` split); the router split is then not carved from `data.source`")
    format: Literal["table", "chat", "gateway", "openai_batch", "mlflow_traces"] = Field(
        "table", description="what a source's rows are: `table` (rows mapped by `data.fields`), `chat` (OpenAI "
        "fine-tuning JSONL, `{\"messages\": [...]}`: the last assistant turn is the target), `gateway` (LLM "
        "gateway logs, `{\"request\": {\"messages\"}, \"response\": {\"choices\", \"usage\", \"model\"}}`: the "
        "first choice is the target) or `openai_batch` (`data.source` an OpenAI Batch API output file, matched by "
        "`custom_id` to its input file `data.batch_requests`) or `mlflow_traces` (`data.source: mlflow-traces:<experiment>`:"
        " each trace's inputs `{messages}` and outputs, a chat completion or text, from the configured tracking "
        "URI). Logged answers are parsed like a frontier "
        "baseline's; unparsable ones are rejected with their line")
    batch_requests: Path | None = Field(
        None, description="`openai_batch`: the Batch API input file (`{\"custom_id\", \"body\": {\"messages\"}}` "
        "per line) whose requests `data.source`'s results answer; relative to the recipe's folder")
    input: Literal["last_user", "conversation"] = Field(
        "last_user", description="`chat`/`gateway` logs: the expert's input is the last user message before the "
        "answer, or the whole conversation before it rendered as `role: text` turns (system prompt left out)")
    fields: FieldsSection | None = Field(
        None, description="`table` sources: which fields of a row hold the input, the target and the id "
        "(required there; log formats have their own shape)")
    split: SplitSection = Field(
        SplitSection(), description="how `data.source` is split into train, validation, test and (with "
        "`data.split.router`) router: seeded, deterministic, each split in source order")
    teacher: TeacherSection | None = Field(
        None, description="`table` sources: rows whose target is missing, null or empty are labelled by this "
        "endpoint (`expert label` or prep); each row keeps its provenance (`gold`, `teacher:<model>`)")
    pii: Literal["keep", "redact", "reject"] = Field(
        "keep", description="personal data in the rows (`data.pii_kinds`), found before anything is written, sent "
        "or logged: `redact` replaces each find with its pseudonym (`[EMAIL_kfbmdaoc]`, one per value, keyed by "
        "`EXPERT_PII_SECRET` or a key made once in the cache) in the input, string targets and ids; `reject` rejects "
        "the row (reason `pii`, the kinds named, the content not); both pseudonymise rejection details and reject a "
        "label that holds personal data; `keep` leaves the data as it is. Counts by kind in the prep report")
    pii_kinds: Annotated[list[Literal["email", "phone", "card", "iban", "ip", "us_ssn", "uk_nino", "de_tax_id"]],
                         Field(min_length=1)] = Field(
        ["email", "phone", "card", "iban", "ip"], description="what `data.pii` looks for: `email`, `phone` "
        "(international format; national format too with `data.pii_region`), `card` (Luhn-checked), `iban` "
        "(mod-97 checked), `ip` (v4 and v6), and national ids when listed: `us_ssn`, `uk_nino`, `de_tax_id`. "
        "Names and addresses are not found (see `pipeline/data/pii.py`)")
    pii_region: str | None = Field(
        None, description="`data.pii`: the country (ISO 3166 code, e.g. `US`) whose national-format phone "
        "numbers are found as well; without it only `+...` numbers are")
    max_tokens: PositiveInt = Field(256, description="limit on the rendered prompt + answer, in base-model tokens")
    max_tokens_policy: Literal["reject", "truncate"] = Field(
        "reject", description="a row longer than `data.max_tokens` is rejected (`too_long`) or, with `truncate`, "
        "its input text is cut to fit (listed in `prep/truncated.jsonl`); counted and reported either way")
    max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.05, description="above this share of rejected rows prep fails with exit 2 and a summary by reason")
    fewshot: Annotated[int, Field(ge=0)] = Field(
        5, description="examples drawn from train into `prep/fewshot.json` for prompted baselines (`shots`)")

    @property
    def has_router_split(self) -> bool:
        """Whether prep writes a router split: carved (`split.router`) or read (`router_source`)."""
        return self.router_source is not None or self.split.router > 0


class AdapterSection(Strict):
    method: Literal["lora", "dora"] = Field(
        "lora", description="`lora`, or `dora` (weight-decomposed LoRA: a learned magnitude per output; slower, "
        "sometimes better)")
    r: PositiveInt = Field(16, description="LoRA rank")
    alpha: Annotated[float, Field(gt=0)] = Field(
        32, description="LoRA scaling: updates are scaled by alpha/r (alpha/sqrt(r) with `rslora`)")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="LoRA dropout; none by default: runs of a few epochs or less gain nothing from it, and "
        "on a CPU drawing its masks costs a share of each training step (docs/BENCHMARKS.md has it)")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules that get adapters: a list of module names, or `all-linear`")
    rslora: bool = Field(
        False, description="rank-stabilised scaling, alpha/sqrt(r) instead of alpha/r (keeps high ranks learning)")


class ModelSection(Strict):
    base: str = Field(
        min_length=1, description="a built-in alias (`smollm2-135m-instruct`), a local model directory, or a "
        "Hugging Face model id")
    adapter: AdapterSection = Field(AdapterSection(), description="the (LoRA) adapter trained on the base model")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="`none`, `4bit` (QLoRA: nf4 with double quantisation) or `8bit` (LLM.int8), through "
        "bitsandbytes")
    trust_remote_code: bool = Field(False, description="allow model code from the hub")


class TrainSection(Strict):
    epochs: Annotated[float, Field(gt=0, le=10_000)] = Field(2, description="passes over the training split")
    max_steps: PositiveInt | None = Field(
        None, description="stop after this many optimizer steps (overrides `train.epochs`)")
    batch_size: BatchSize = Field(
        8, description="examples per step, per device (with `train.packing`: packed sequences)")
    gradient_accumulation: BatchSize = Field(1, description="steps accumulated per optimizer update")
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = Field(
        2.0e-4, description="peak learning rate (cosine schedule after the warm-up)")
    warmup_ratio: Fraction = Field(0.05, description="share of the optimizer steps spent warming up")
    seed: Seed = Field(13, description="training seed (also the data order)")
    logging_steps: PositiveInt = Field(
        5, description="log loss, learning rate, grad norm and tokens/s every N steps")
    eval_steps: PositiveInt = Field(50, description="validation loss every N optimizer steps")
    save_steps: PositiveInt | None = Field(
        None, json_schema_extra=_shown("`train.eval_steps`"),
        description="a checkpoint every N optimizer steps: a multiple of `train.eval_steps`, so that every "
        "checkpoint has a validation loss to pick the best one by")
    keep_checkpoints: PositiveInt = Field(
        2, description="the last K complete checkpoints are kept (and the best one as well)")
    early_stopping_patience: PositiveInt | None = Field(
        None, description="stop after this many validations without a better validation loss")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, else fp16; on a CPU bf16 where it has "
        "AVX512-BF16 or AMX, else fp32. `fp16` needs a GPU. The choice is recorded in train/record.json; eval and "
        "the registered model load the base in it on any machine")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: more compute, much less activation memory")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="each batch flattened into one sequence without padding (examples kept apart by "
        "their position ids); `auto`: on with a flash-attention kernel (variable-length, no mask), else off "
        "(SDPA/eager would need a block-diagonal mask over the flattened batch, which costs more than "
        "length-grouped padding wastes)")
    packing: bool = Field(
        False, description="pack examples into `data.max_tokens`-long sequences (implies padding-free); "
        "`train.batch_size` then counts packed sequences")
    attention: Literal["auto", "sdpa", "flash_attention_3", "flash_attention_2", "eager"] = Field(
        "auto", description="`auto`: on a GPU `flash_attention_3` (the `flash-attn-3` package, Hopper), else "
        "`flash_attention_2` (`flash-attn`), each only when it imports and `train.precision` is bf16 or fp16 (flash "
        "kernels take no fp32), else `sdpa`; on a CPU `eager` up to `data.max_tokens` 512 (measured faster there), "
        "`sdpa` above")
    liger_kernels: bool = Field(
        False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU); needs a GPU and "
        "`pip install liger-kernel`")

    @model_validator(mode="after")
    def _checkpoints_at_validations(self) -> TrainSection:
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) "
                "so that every checkpoint has a validation loss to pick the best one by"
            )
        return self

class _Baseline(Strict):
    # what validation needs to know of a kind before anything runs (its behaviour is `pipeline/baseline_kinds/`):
    # whether it can answer a cascade's escalated requests (a system priced by its tokens, outside this machine)
    escalation_target: ClassVar[bool] = False
    # whether serving and `expert predict` can ask it at request time as a tier above the expert
    asked_live: ClassVar[bool] = False

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
        description="unique among the baselines and not `expert`; letters, digits, `_`, `.`, `-`")

    @model_validator(mode="before")
    @classmethod
    def _drop_unset_keys_of_other_kinds(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if k in cls.model_fields or k not in _UNSET_KEYS_OF_OTHER_KINDS or v != _UNSET_KEYS_OF_OTHER_KINDS[k]}

    def gives_confidence(self) -> bool:
        """Whether its answers carry a confidence, so it can be a routing tier before the last (local models
        always; recorded predictions are checked per line when eval reads them)."""
        return True


class StandIn(Strict):
    """Recorded answers that stand in for an `openai` baseline in eval when its key is not set, so a comparison
    and a route can be shown without one; every report labels them as a recorded stand-in with their rule."""

    path: Path = Field(
        description="a JSONL file of recorded answers in the format of a `predictions` baseline's `path` (`id`, "
        "`output`, optional `input_tokens`, `output_tokens`, `latency_ms`, `confidence`), one line per example; "
        "relative to the recipe's folder")
    rule: str = Field(
        min_length=1, description="how the answers were made (their accuracy, the token counts they are priced "
        "by, their latency): printed beside the system wherever it is shown")


class OpenAIBaseline(_Baseline):
    """Any OpenAI-compatible chat-completions endpoint, through the official SDK, with the baselines' prompt.
    Successful answers are cached in SQLite (`$EXPERT_CACHE/responses.sqlite`) keyed by endpoint, model, messages
    and parameters, so re-running eval makes no calls; failures are never cached. The key never reaches the
    cache, logs, MLflow or the run directory."""

    kind: Literal["openai"] = Field(description=_KIND)
    model: str = Field(min_length=1, description="the model name the endpoint serves")
    base_url: str | None = Field(None, json_schema_extra=_shown("OpenAI's"), description="the endpoint")
    api_key_env: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the NAME of the environment variable holding the API key (never the key itself)")
    required: bool = Field(
        False, description="a missing key is an error instead of skipping the baseline with a message, and so is "
        "failing on more than `eval.gate.max_baseline_failure_rate` of the test rows (eval exits 2)")
    max_concurrency: PositiveInt = Field(4, description="requests in flight at once")
    timeout_s: Annotated[float, Field(gt=0)] = Field(60, description="seconds one request may take")
    max_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        4, description="retries of a request, with exponential backoff and jitter (or the server's Retry-After), "
        "on 429, 5xx, timeouts, connection errors and malformed bodies; other 4xx are not retried")
    json_schema_response: bool = Field(
        False, description="extraction: ask the endpoint for its JSON-schema response format instead of parsing "
        "JSON out of the text")
    logprobs: bool = Field(
        False, description="ask for the answer tokens' log-probabilities: the probability of the whole answer is "
        "this baseline's confidence (needed for a routing tier before the last)")
    samples: Annotated[int, Field(ge=1, le=20)] = Field(
        1, description="k > 1: ask for k answers in one request (`n`, at `sample_temperature`); the most common "
        "parsed answer is the answer and the share of samples agreeing with it the confidence (for a routing tier "
        "whose endpoint gives no log-probabilities; output tokens cost k times)")
    sample_temperature: Annotated[float, Field(gt=0, le=2)] = Field(
        1.0, description="the sampling temperature when `samples` > 1")
    stand_in: StandIn | None = Field(
        None, description="recorded answers eval uses in place of the endpoint when `api_key_env` is not set "
        "(priced by their token counts at `price_per_mtok`; confidence and latency as recorded); with the key set "
        "the endpoint is asked. Evidence for eval only: serving and `expert predict` never escalate to a stand-in")

    escalation_target: ClassVar[bool] = True
    asked_live: ClassVar[bool] = True

    def gives_confidence(self) -> bool:
        return self.logprobs or self.samples > 1

    @model_validator(mode="after")
    def _one_confidence(self) -> OpenAIBaseline:
        if self.logprobs and self.samples > 1:
            raise ValueError("give `logprobs: true` or `samples` > 1, not both: each is a way to a confidence")
        return self
    price_per_mtok: PricePerMtok = None


class BaseModelBaseline(_Baseline):
    """The untuned base model with the baselines' prompt (which lists the labels or the schema) and the same
    inference as the expert (label scoring, or schema-constrained decoding)."""

    kind: Literal["base_model"] = Field(description=_KIND)
    shots: Annotated[int, Field(ge=0)] = Field(
        0, description="the first k examples of `prep/fewshot.json` (written by prep, see `data.fewshot`) put "
        "before each question as user/assistant turns; k > 0 without that file is an error naming the key")


class PredictionsBaseline(_Baseline):
    """Recorded outputs of a system run elsewhere, matched to the examples by id; ids of a split that have no
    line are an error listing them."""

    escalation_target: ClassVar[bool] = True

    kind: Literal["predictions"] = Field(description=_KIND)
    path: Path = Field(
        description="a JSONL file with `{\"id\", \"output\"}` per line (`output`: the raw answer text, or the "
        "object for extraction; optional `input_tokens`, `output_tokens`, `latency_ms`, and `confidence` in [0, 1] "
        "for a routing tier before the last)")
    price_per_mtok: PricePerMtok = None


class ExpertBaseline(_Baseline):
    """Another expert of this task, from its run directory (its recipe, `train/record.json` and adapter) or a
    registered version: asked with its own instruction on this run's rows, locally, so it has a confidence and
    can be a routing tier."""

    kind: Literal["expert"] = Field(description=_KIND)
    run_dir: Path | None = Field(None, description="a run directory whose train stage finished; relative to the "
                                 "recipe's folder. Its labels (or schema) must be this task's. Give this or `version`")
    version: str | None = Field(None, description="a registered version, `models:/NAME/N` or `models:/NAME@ALIAS`, "
                                "loaded from the MLflow registry as `expert predict` loads it. Give this or `run_dir`")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run_dir is None) == (self.version is None):
            raise ValueError("give exactly one of `run_dir` (a trained run directory) and `version` "
                             "(models:/NAME/N or models:/NAME@ALIAS)")
        if self.version is not None and not re.fullmatch(r"models:/[^/@]+(/\d+|@.+)", self.version):
            raise ValueError(f"version `{self.version}`: write models:/NAME/N or models:/NAME@ALIAS")
        return self


# one baseline: which class checks it is decided by its `kind`, so a key of another kind is an unknown key
BaselineSection = Annotated[OpenAIBaseline | BaseModelBaseline | PredictionsBaseline | ExpertBaseline,
                            Field(discriminator="kind")]
BASELINE_KINDS: dict[str, type[_Baseline]] = {
    get_args(cls.model_fields["kind"].annotation)[0]: cls for cls in get_args(get_args(BaselineSection)[0])
}


class GateSection(Strict):
    metric: Literal["accuracy", "macro_f1", "micro_f1", "field_exact_match", "exact_match", "valid_json_rate"] = Field(
        "macro_f1", description="classification: `accuracy`, `macro_f1`; extraction: `field_exact_match`, "
        "`exact_match`, `valid_json_rate`; generation: `exact_match`; multilabel: `micro_f1`, `macro_f1`, "
        "`exact_match` (the whole set)")
    max_drop_vs_best_baseline: Annotated[float, Field(ge=0)] = Field(
        0.02, description="the expert may be this much below the best baseline that ran")
    min_value: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="and must reach at least this")
    max_baseline_failure_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="a baseline that failed (no answer after retries) on more than this share of the test "
        "rows is no evidence: the comparison is incomplete, the gate cannot pass, the decision is `incomplete`; "
        "with `required: true` on that baseline eval exits 2. 0: any failed row")


class CascadeSection(Strict):
    target_metric: Literal["accuracy", "macro_f1", "micro_f1", "field_exact_match", "exact_match"] = Field(
        "accuracy", description="the metric the cascade must reach")
    target: Annotated[float, Field(gt=0, le=1)] = Field(
        description="the value it must reach; the confidence threshold is chosen on the validation split")
    frontier: str | None = Field(
        None, json_schema_extra=_shown("the first openai/predictions baseline"),
        description="the baseline that answers escalated requests (an openai or predictions baseline)")


class RoutingTarget(Strict):
    metric: Literal["accuracy", "macro_f1", "micro_f1", "field_exact_match", "exact_match"] = Field(
        "accuracy", description="the metric the route must reach")
    value: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="the value it must reach (give this or `below_last`)")
    below_last: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None, description="or: the last tier's own validation quality minus this, e.g. 0.01 for \"frontier "
        "quality minus 0.01\"")

    @model_validator(mode="after")
    def _one_rule(self) -> RoutingTarget:
        if (self.value is None) == (self.below_last is None):
            raise ValueError("give exactly one of `value` (a fixed target) or `below_last` (the last tier's "
                             "validation quality minus this)")
        return self


class TriageSection(Strict):
    routers: Annotated[list[Literal["text", "probe"]], Field(min_length=1)] = Field(
        ["text", "probe"], description="router kinds trained on the router split and compared: `text` (TF-IDF "
        "features, runs before any tier and can skip the expert) and `probe` (the expert's hidden state at the "
        "answer position; runs on the expert's pass and can skip the tiers above it)")
    max_candidates: Annotated[int, Field(ge=3, le=101)] = Field(
        11, description="candidate cut-offs per tier above the expert (quantiles of the router's validation "
        "scores, and \"never\"); every combination with the confidence thresholds is tried")

    @model_validator(mode="after")
    def _unique(self) -> TriageSection:
        if len(set(self.routers)) != len(self.routers):
            raise ValueError("name each router kind once")
        return self


class RoutingSection(Strict):
    tiers: Annotated[list[str], Field(min_length=2)] = Field(
        description="the chain, cheapest first: `expert`, then names of `eval.baselines`; each tier but the last "
        "answers when its confidence reaches its threshold, the last answers whatever reaches it. Tiers before "
        "the last need a confidence: local models (the expert, `expert`/`base_model` baselines) have one, an "
        "`openai` baseline needs `logprobs: true` or `samples: k`, recorded predictions a `confidence` per line")
    target: RoutingTarget = Field(description="the quality the route must reach, chosen on validation, "
                                  "checked on test")
    choose: Literal["point", "margin"] = Field(
        "point", description="`point`: the cheapest thresholds whose validation quality meets the target; "
        "`margin`: the cheapest whose bootstrap 95% lower bound of validation quality does (holds more often, "
        "costs more). Both are reported")
    max_candidates: Annotated[int, Field(ge=3, le=1000)] = Field(
        41, description="three tiers or more: candidate thresholds per tier (quantiles of its validation "
        "confidences); every combination is tried. Two tiers: every distinct confidence (exact)")
    triage: TriageSection | None = Field(
        None, description="train routers on the expert's outcomes on the router split (`data.split.router`) that "
        "decide where each request starts; their cut-offs join the threshold search, and triage is kept only "
        "where it is cheaper than confidence alone on validation at the target and holds on test")


class EvalSection(Strict):
    baselines: list[BaselineSection] = Field([], description="the systems the expert is compared with")
    gate: GateSection = Field(GateSection(), description="what the expert must reach to pass (see 'What eval decides')")
    cascade: CascadeSection | None = Field(
        None, description="expert first, the frontier (an openai or predictions baseline) when the expert's "
        "confidence is below a threshold chosen on the validation split")
    routing: RoutingSection | None = Field(
        None, description="route across tiers (expert, mid tier, frontier), thresholds chosen together on the "
        "validation split (see 'Routing across tiers'); replaces `cascade`, the two-tier case")
    batch_size: BatchSize = Field(8, description="local inference batch size")
    max_new_tokens: PositiveInt = Field(
        128, description="answer length limit, in tokens, for generated answers (generation and extraction; "
        "classification scores the labels) and frontier calls")
    constrained_decoding: bool = Field(
        True, description="extraction: decode under the JSON Schema (every answer parses and validates); "
        "false = free greedy decoding")
    bootstrap_samples: Annotated[int, Field(ge=100, le=100_000)] = Field(
        2000, description="paired bootstrap resamples for the confidence intervals of expert - baseline")
    seed: Seed = Field(13, description="bootstrap seed")
    expert_cost_per_hour: Annotated[float, Field(ge=0)] = Field(
        0.10, description="USD per hour of the machine serving local models (the expert, base_model baselines), "
        "for cost per 1,000 requests")

    @model_validator(mode="after")
    def _unique_names(self) -> EvalSection:
        names = [b.name for b in self.baselines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"baseline names must be unique; repeated: {', '.join(dupes)}")
        if "expert" in names:
            raise ValueError("`expert` is reserved for the fine-tuned model; rename that baseline")
        if self.cascade is not None:
            external = [b.name for b in self.baselines if b.escalation_target]
            wanted = self.cascade.frontier
            if wanted is not None and wanted not in external:
                raise ValueError(
                    f"cascade.frontier `{wanted}` is not an openai or predictions baseline; use one of: "
                    f"{', '.join(external) or '(none defined)'}"
                )
            if wanted is None and not external:
                raise ValueError("cascade needs an openai or predictions baseline to escalate to; add one to baselines")
        if self.routing is not None:
            self._check_tiers(self.routing.tiers)
        return self

    def _check_tiers(self, tiers: list[str]) -> None:
        if self.cascade is not None:
            raise ValueError("give `cascade` or `routing`, not both: a cascade is the two-tier route "
                             "`routing: {tiers: [expert, <frontier>]}`")
        by_name = {b.name: b for b in self.baselines}
        unknown = [t for t in tiers if t != "expert" and t not in by_name]
        if unknown:
            raise ValueError(f"routing.tiers: {', '.join(unknown)} not a baseline name; use `expert` or one of: "
                             f"{', '.join(by_name) or '(no baselines defined)'}")
        if len(set(tiers)) != len(tiers) or tiers[0] != "expert":
            raise ValueError("routing.tiers: each system once, `expert` first (the chain climbs from the expert, "
                             "cheapest first)")
        for name in tiers[:-1]:
            b = by_name.get(name)
            if b is not None and not b.gives_confidence():
                raise ValueError(f"routing.tiers: `{name}` answers before the last tier, so it needs a confidence: "
                                 "set `logprobs: true` on that baseline (when its endpoint returns log-probabilities) "
                                 "or `samples: k` (k > 1: the agreement of k sampled answers)")

    def tier_names(self) -> list[str]:
        """Systems eval also runs on the validation split (the cascade's frontier, every routing tier)."""
        if self.routing is not None:
            return list(self.routing.tiers)
        return [name for name in (self.cascade_frontier(),) if name is not None]

    def cascade_frontier(self) -> str | None:
        """Name of the baseline escalated requests go to, or None without a cascade."""
        if self.cascade is None:
            return None
        return self.cascade.frontier or next(b.name for b in self.baselines if b.escalation_target)

class RegistrySection(Strict):
    model_name: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="registered model name in MLflow: letters, digits, `_`, `.`, `-` (no path separators; MLflow "
        "puts it in URIs)")


class Recipe(Strict):
    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="run folder and MLflow experiment name: letters, digits, `_`, `.`, `-`")
    task: TaskSection = Field(description="what the expert does")
    data: DataSection = Field(description="the examples: where they come from, their fields, their split")
    model: ModelSection = Field(description="the base model and the adapter trained on it")
    train: TrainSection = Field(TrainSection(), description="the fine-tuning run")
    eval: EvalSection = Field(EvalSection(), description="the comparison with the baselines, and its gate")
    registry: RegistrySection = Field(description="where `expert push` registers the expert")

    @model_validator(mode="after")
    def _gate_fits_task(self) -> Recipe:
        from pipeline import tasks

        allowed = set(tasks.for_type(self.task.type).gate_metrics)
        if self.eval.gate.metric not in allowed:
            raise ValueError(
                f"eval.gate.metric `{self.eval.gate.metric}` does not apply to {self.task.type}; "
                f"use one of {', '.join(sorted(allowed))}"
            )
        cascade = self.eval.cascade
        if cascade is not None and cascade.target_metric not in allowed:
            raise ValueError(
                f"eval.cascade.target_metric `{cascade.target_metric}` does not apply to {self.task.type}; "
                f"use one of {', '.join(sorted(allowed - {'valid_json_rate'}))}"
            )
        routing = self.eval.routing
        if routing is not None and routing.target.metric not in allowed:
            raise ValueError(
                f"eval.routing.target.metric `{routing.target.metric}` does not apply to {self.task.type}; "
                f"use one of {', '.join(sorted(allowed - {'valid_json_rate'}))}"
            )
        if routing is not None and routing.triage is not None and not self.data.has_router_split:
            raise ValueError("eval.routing.triage: routers learn from rows the expert did not train on; set "
                             "data.split.router (e.g. 0.15) or data.router_source")
        return self

    @model_validator(mode="after")
    def _fields_fit_task(self) -> Recipe:
        data = self.data
        if data.format == "table" and data.fields is None:
            raise ValueError("data -> fields: required for `table` sources: name the input and target fields")
        if data.format != "table":
            if data.teacher is not None:
                raise ValueError("data -> teacher: logs already hold the frontier's answers; remove `teacher`")
            if data.fields is not None:
                raise ValueError(f"data -> fields: `{data.format}` logs have their own shape; remove `fields`")
            for key in ("source", "validation_source", "test_source", "router_source"):
                source = getattr(data, key)
                traces = isinstance(source, str) and source.startswith(TRACES_PREFIX)
                if data.format == "mlflow_traces" and source is not None and not traces:
                    raise ValueError(f"data -> {key}: `mlflow_traces` reads mlflow-traces:<experiment>")
                if data.format != "mlflow_traces" and source is not None and (
                        isinstance(source, str) or source.suffix.lower() != ".jsonl"):
                    raise ValueError(f"data -> {key}: `{data.format}` logs are read from .jsonl files")
            if (data.format == "openai_batch") != (data.batch_requests is not None):
                raise ValueError("data -> batch_requests: the Batch API input file goes with `format: openai_batch` "
                                 "(and only with it)")
            if data.format == "openai_batch" and (data.validation_source or data.test_source or data.router_source):
                raise ValueError("data: `openai_batch` reads one output/input pair from data.source and "
                                 "data.batch_requests; split it with data.split instead of fixed sources")
            return self._data_fits_task()
        for key in ("source", "validation_source", "test_source", "router_source"):
            if str(getattr(data, key)).startswith(TRACES_PREFIX):
                raise ValueError(f"data -> {key}: MLflow traces are read with `format: mlflow_traces`")
        if data.input != "last_user" or data.batch_requests is not None:
            key = "input" if data.input != "last_user" else "batch_requests"
            raise ValueError(f"data -> {key}: applies to log formats only; remove it")
        return self._data_fits_task()

    def _data_fits_task(self) -> Recipe:
        from pipeline import tasks

        tasks.for_type(self.task.type).check_data(self.task, self.data)
        return self

    def section_hash(self, *sections: str) -> str:
        """Content hash of some top-level sections: what a stage's output depends on."""
        payload = {s: self.model_dump(mode="json", by_alias=True)[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def recipe_hash(self) -> str:
        return self.section_hash(*type(self).model_fields)


def _yaml_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the YAML path a user edits: validator names dropped, and so is the tag pydantic
    puts in for a discriminated union (`eval -> baselines -> 0 -> openai -> model`), which no recipe spells."""
    parts = [str(p) for p in _without_tag(loc) if not str(p).startswith("function-")]
    return " -> ".join(parts) if parts else "(top level)"


def _checked_as(loc: tuple[Any, ...]) -> str | None:
    """The baseline kind an error location was checked as, or None outside a baseline."""
    return _tag_at(loc)[1]


def _tag_at(loc: tuple[Any, ...]) -> tuple[int | None, str | None]:
    if len(loc) > 3 and tuple(loc[:2]) == ("eval", "baselines") and isinstance(loc[2], int) \
            and loc[3] in BASELINE_KINDS:
        return 3, loc[3]
    return None, None


def _without_tag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    at, _ = _tag_at(loc)
    return loc if at is None else loc[:at] + loc[at + 1 :]


def _field_at(loc: tuple[Any, ...]):
    """The FieldInfo an error location points at (following the baseline kind it was checked as), or None."""
    model: Any = Recipe
    kind_model = BASELINE_KINDS.get(_checked_as(loc) or "")
    info = None
    for part in _without_tag(loc):
        if isinstance(part, int) and kind_model is not None:
            model = kind_model
            continue
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None:
            return None
        info = next((f for name, f in fields.items() if part in (name, f.alias)), None)
        if info is None:
            return None
        model = next((a for a in (info.annotation, *get_args(info.annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return info


def format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} problem(s) in the recipe:"]
    for e in err.errors():
        where, kind = _yaml_path(e["loc"]), _checked_as(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and kind is not None:
            keys = ", ".join(BASELINE_KINDS[kind].model_fields)
            msg = f"not a key of `kind: {kind}` baselines, which take {keys}; remove it or check its spelling"
            kind = None  # said already
        elif e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (every key: `expert validate RECIPE --keys`)"
        elif e["type"] == "missing":
            info = _field_at(e["loc"])
            msg = "required key is missing" + (f" for a `kind: {kind}` baseline" if kind is not None else "")
            msg += f": {info.description}" if info is not None and info.description else ""
            kind = None
        elif e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            key = e["ctx"]["discriminator"].strip("'")
            where = f"{where} -> {key}"
            tags = ", ".join(BASELINE_KINDS)
            msg = (f"required key is missing: one of {tags}" if e["type"] == "union_tag_not_found"
                   else f"`{e['ctx']['tag']}` is not a baseline {key}; use one of {tags}")
        if kind is not None:
            msg += f" (checked as a `kind: {kind}` baseline)"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping: YAML would keep the last silently, so a
    second `train:` block would replace the first."""


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key `{key}` is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                "YAML would keep only the last: merge them into one", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set key=value` on a recipe mapping: `key` a dotted YAML path (`train.epochs`, list items by index:
    `eval.baselines.0.model`), `value` parsed as YAML (`3`, `true`, `[a, b]`, `null`). The result is validated
    like the file, so a wrong key or value is reported with its path."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        parts = key.strip().replace("[", ".").replace("]", "").split(".")
        if not eq or not all(parts):
            raise UserError(f"--set {item}: write KEY=VALUE with KEY a dotted recipe key, e.g. --set train.epochs=3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"--set {item}: the value is not valid YAML: {err}") from None
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {item}: `{where}`: the list has {len(node)} items; index it 0-{len(node) - 1}")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise UserError(f"--set {item}: `{where}` is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise UserError(f"--set {item}: `{key}`: the list has {len(node)} items; index it 0-{len(node) - 1}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"--set {item}: `{'.'.join(parts[:-1])}` is a value, not a section")
    return out


def load_recipe(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, validate and resolve a recipe file, with `--set key=value` `overrides` applied before validation.

    Relative `data.source`, `data.validation_source`, `data.test_source` and `data.router_source`
    paths resolve against the recipe file's directory, so a recipe means the
    same thing whatever directory it is run from.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read recipe: {err}") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with keys name, task, data, model, registry")
    raw = apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        where = f"{path} with --set {' --set '.join(overrides)}" if overrides else path
        raise UserError(format_validation_error(where, err)) from None
    resolved = {}
    for key in ("source", "validation_source", "test_source", "router_source", "batch_requests"):
        source = getattr(recipe.data, key)
        if isinstance(source, Path) and not source.is_absolute():
            resolved[key] = (path.parent / source).resolve()
    data = recipe.data.model_copy(update=resolved)
    baselines = [  # recorded predictions files and other experts' runs, like data.source, are relative to the recipe
        b.model_copy(update={"path": (path.parent / b.path).resolve()})
        if isinstance(b, PredictionsBaseline) and not b.path.is_absolute() else
        b.model_copy(update={"stand_in": b.stand_in.model_copy(update={"path": (path.parent / b.stand_in.path).resolve()})})
        if isinstance(b, OpenAIBaseline) and b.stand_in is not None and not b.stand_in.path.is_absolute() else
        b.model_copy(update={"run_dir": (path.parent / b.run_dir).resolve()})
        if isinstance(b, ExpertBaseline) and b.run_dir is not None and not b.run_dir.is_absolute() else b
        for b in recipe.eval.baselines
    ]
    evaluation = recipe.eval.model_copy(update={"baselines": baselines})
    return recipe.model_copy(update={"data": data, "eval": evaluation})


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as stored in the run directory and the registry."""
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
