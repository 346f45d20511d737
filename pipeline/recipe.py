"""The typed recipe: one pydantic model, validated once at load.

Every stage receives a `Recipe`, never a dict. Unknown keys are errors and all
problems are reported together, each with its YAML path, so a user fixes a
recipe in one pass instead of one error per run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError

# counts are bounded so that a typo (1e30) is a recipe error naming its key, not a crash deep in a library
PositiveInt = Annotated[int, Field(gt=0, le=1_000_000_000)]
BatchSize = Annotated[int, Field(gt=0, le=65_536)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSection(Strict):
    type: Literal["classification", "extraction", "generation"]
    instruction: str = Field(min_length=1)
    # classification: an explicit label list, or None to take labels from the data
    labels: list[str] | None = None
    # extraction: the JSON Schema every target (and every prediction) must satisfy
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    # classification: a class with fewer usable rows than this is an error (3 = one per split)
    min_examples_per_class: PositiveInt = 3
    # Untuned baselines always get the label list / schema in their system prompt. The expert learns them in
    # training (and label scoring / constrained decoding enforce them), so by default its prompt is the
    # instruction alone: BANKING77's 77 labels would add ~570 tokens to every training step and request.
    spec_in_expert_prompt: bool = False

    @model_validator(mode="after")
    def _check_type_fields(self) -> TaskSection:
        default_minimum = type(self).model_fields["min_examples_per_class"].default
        if self.type != "classification" and self.min_examples_per_class != default_minimum:
            raise ValueError("`min_examples_per_class` applies to classification tasks only; remove it")
        if self.type == "generation" and (self.labels is not None or self.json_schema is not None):
            raise ValueError("generation tasks take a free-text target: remove `labels` and `schema`")
        if self.type == "extraction":
            if self.json_schema is None:
                raise ValueError("extraction tasks need `schema`: the JSON Schema of the target object")
            if self.labels is not None:
                raise ValueError("`labels` applies to classification tasks only; remove it")
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(self.json_schema)
            except SchemaError as err:
                raise ValueError(f"`schema` is not a valid JSON Schema: {err.message}") from None
        if self.type == "classification":
            if self.json_schema is not None:
                raise ValueError("`schema` applies to extraction tasks only; remove it")
            if self.labels is not None:
                if len(self.labels) < 2:
                    raise ValueError("`labels` needs at least two labels")
                from pipeline.tasks.classification import normalize_label

                normalized = [normalize_label(label) for label in self.labels]
                if any(not label for label in normalized):
                    raise ValueError("`labels` has an empty label")
                if len(set(normalized)) != len(normalized):
                    raise ValueError("`labels` has duplicates (after normalisation: stripped, Unicode NFC)")
        return self


FieldPath = Annotated[str, Field(min_length=1)]


class FieldsSection(Strict):
    # one field, or several joined by a blank line into the input (e.g. [subject, body])
    text: FieldPath | Annotated[list[FieldPath], Field(min_length=1)]
    # classification: the field holding the label; extraction: the field holding the target object,
    # or a mapping {key: field} that builds it; generation: the field holding the answer text
    target: FieldPath | Annotated[dict[str, FieldPath], Field(min_length=1)]
    id: str | None = None

    def text_fields(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class SplitSection(Strict):
    validation: Fraction = 0.1
    test: Fraction = 0.2
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 13
    stratify: bool = True

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitSection:
        if self.validation + self.test >= 0.9:
            raise ValueError("validation + test must leave at least 10% of rows for training")
        return self


HF_PREFIX = "hf:"
FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _check_source(value: Path | str) -> Path | str:
    """A file path (as Path) or `hf:<dataset id>[:<config>]` (kept as str)."""
    text = str(value)
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


class DataSection(Strict):
    source: DataSource
    # fixed splits the user already has; the rest is split from `source`
    validation_source: DataSource | None = None
    test_source: DataSource | None = None
    fields: FieldsSection
    split: SplitSection = SplitSection()
    max_tokens: PositiveInt = 256
    # what happens to a row longer than max_tokens: reject it, or cut its input text to fit
    max_tokens_policy: Literal["reject", "truncate"] = "reject"
    max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # examples drawn from train into prep/fewshot.json for prompted baselines
    fewshot: Annotated[int, Field(ge=0)] = 5


class AdapterSection(Strict):
    # lora, or dora (weight-decomposed LoRA: a learned magnitude per output; slower, sometimes better)
    method: Literal["lora", "dora"] = "lora"
    r: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    # no dropout by default: runs of a few epochs or less gain nothing from it, and on a CPU drawing its masks
    # costs ~20% of each training step (docs/BENCHMARKS.md)
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: str | list[str] = "all-linear"
    # rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (keeps high ranks learning)
    rslora: bool = False


class ModelSection(Strict):
    base: str = Field(min_length=1)
    adapter: AdapterSection = AdapterSection()
    quantization: Literal["none", "4bit", "8bit"] = "none"
    trust_remote_code: bool = False


class TrainSection(Strict):
    epochs: Annotated[float, Field(gt=0, le=10_000)] = 2
    max_steps: PositiveInt | None = None
    batch_size: BatchSize = 8
    gradient_accumulation: BatchSize = 1
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2.0e-4
    warmup_ratio: Fraction = 0.05
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 13
    logging_steps: PositiveInt = 5
    # validation loss every N optimizer steps; a checkpoint every save_steps (a multiple of eval_steps)
    eval_steps: PositiveInt = 50
    save_steps: PositiveInt | None = None  # default: eval_steps
    keep_checkpoints: PositiveInt = 2  # the last K complete checkpoints (the best one is kept as well)
    early_stopping_patience: PositiveInt | None = None  # validations without improvement before stopping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the GPU or CPU has it, else fp16 (GPU) / fp32
    gradient_checkpointing: bool = False  # trades ~30% more compute for much less activation memory
    # each batch flattened into one sequence without padding (examples kept apart by their position ids);
    # auto: on with a flash-attention kernel (variable-length, no mask), else off (SDPA/eager would need a
    # block-diagonal mask over the flattened batch, which costs more than length-grouped padding wastes)
    padding_free: bool | Literal["auto"] = "auto"
    packing: bool = False  # pack examples into data.max_tokens sequences: batch_size then counts packed sequences
    # auto on a GPU: flash_attention_3 (flash-attn-3, Hopper), else flash_attention_2 (flash-attn), else sdpa;
    # on a CPU eager up to data.max_tokens 512 (faster there), sdpa above
    attention: Literal["auto", "sdpa", "flash_attention_3", "flash_attention_2", "eager"] = "auto"
    liger_kernels: bool = False  # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU); a GPU and liger-kernel

    @model_validator(mode="after")
    def _checkpoints_at_validations(self) -> TrainSection:
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) "
                "so that every checkpoint has a validation loss to pick the best one by"
            )
        return self


class Price(Strict):
    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]


class BaselineSection(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["openai", "base_model", "predictions"]
    # openai only
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    required: bool = False
    max_concurrency: PositiveInt = 4
    timeout_s: Annotated[float, Field(gt=0)] = 60
    max_retries: Annotated[int, Field(ge=0, le=20)] = 4
    # extraction: ask the endpoint for its JSON-schema response format instead of parsing JSON from text
    json_schema_response: bool = False
    # openai and predictions: dollars per million tokens, for cost per 1,000 requests
    price_per_mtok: Price | None = None
    # base_model only: k examples from prep/fewshot.json put before each question
    shots: Annotated[int, Field(ge=0)] = 0
    # predictions only: a JSONL file of recorded outputs, {"id", "output"} per line
    path: Path | None = None

    @model_validator(mode="after")
    def _check_kind_fields(self) -> BaselineSection:
        allowed = {
            "openai": {"model", "base_url", "api_key_env", "price_per_mtok", "json_schema_response"},
            "base_model": {"shots"},
            "predictions": {"path", "price_per_mtok"},
        }[self.kind]
        optional = {"model", "base_url", "api_key_env", "price_per_mtok", "json_schema_response", "shots", "path"}
        # a key counts when it differs from its default, so a dumped recipe (defaults written out) reloads
        extra = sorted(k for k in optional - allowed if getattr(self, k) != type(self).model_fields[k].default)
        if extra:
            raise ValueError(f"{', '.join(extra)} do not apply to {self.kind} baselines; remove them")
        if self.kind == "openai":
            if not self.model:
                raise ValueError("openai baselines need `model` (the model name the endpoint serves)")
            if not self.api_key_env:
                raise ValueError(
                    "openai baselines need `api_key_env`: the NAME of the environment variable holding the key "
                    "(never the key itself)"
                )
        if self.kind == "predictions" and self.path is None:
            raise ValueError("predictions baselines need `path`: a JSONL file with one {\"id\", \"output\"} per line")
        return self


class GateSection(Strict):
    metric: Literal["accuracy", "macro_f1", "field_exact_match", "exact_match", "valid_json_rate"] = "macro_f1"
    max_drop_vs_best_baseline: Annotated[float, Field(ge=0)] = 0.02
    min_value: Annotated[float, Field(ge=0, le=1)] = 0.0
    # a baseline that failed (no answer after retries) on more than this share of the test rows is no evidence:
    # the comparison is incomplete and the gate cannot pass. 0: any failed row
    max_baseline_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.0


class CascadeSection(Strict):
    """Expert first, the frontier when the expert's confidence is below a threshold chosen on validation."""

    target_metric: Literal["accuracy", "macro_f1", "field_exact_match", "exact_match"] = "accuracy"
    target: Annotated[float, Field(gt=0, le=1)]
    # the baseline that answers escalated requests; default: the first openai or predictions baseline
    frontier: str | None = None


class EvalSection(Strict):
    baselines: list[BaselineSection] = []
    gate: GateSection = GateSection()
    cascade: CascadeSection | None = None
    batch_size: BatchSize = 8
    max_new_tokens: PositiveInt = 128
    # extraction: JSON-Schema-constrained decoding (every answer parses and validates); false = free greedy decoding
    constrained_decoding: bool = True
    # paired bootstrap resamples for the confidence intervals of metric differences
    bootstrap_samples: Annotated[int, Field(ge=100, le=100_000)] = 2000
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 13
    # what an hour of the machine serving the expert costs, for cost per 1,000 requests
    expert_cost_per_hour: Annotated[float, Field(ge=0)] = 0.10

    @model_validator(mode="after")
    def _unique_names(self) -> EvalSection:
        names = [b.name for b in self.baselines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"baseline names must be unique; repeated: {', '.join(dupes)}")
        if "expert" in names:
            raise ValueError("`expert` is reserved for the fine-tuned model; rename that baseline")
        if self.cascade is not None:
            external = [b.name for b in self.baselines if b.kind in ("openai", "predictions")]
            wanted = self.cascade.frontier
            if wanted is not None and wanted not in external:
                raise ValueError(
                    f"cascade.frontier `{wanted}` is not an openai or predictions baseline; use one of: "
                    f"{', '.join(external) or '(none defined)'}"
                )
            if wanted is None and not external:
                raise ValueError("cascade needs an openai or predictions baseline to escalate to; add one to baselines")
        return self

    def cascade_frontier(self) -> str | None:
        """Name of the baseline escalated requests go to, or None without a cascade."""
        if self.cascade is None:
            return None
        return self.cascade.frontier or next(b.name for b in self.baselines if b.kind in ("openai", "predictions"))


class RegistrySection(Strict):
    # a registered model's name: letters, digits, `_`, `.`, `-` (no path separators; MLflow uses it in URIs)
    model_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Recipe(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: TaskSection
    data: DataSection
    model: ModelSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    registry: RegistrySection

    @model_validator(mode="after")
    def _gate_fits_task(self) -> Recipe:
        by_task = {
            "classification": {"accuracy", "macro_f1"},
            "extraction": {"field_exact_match", "exact_match", "valid_json_rate"},
            "generation": {"exact_match"},
        }
        allowed = by_task[self.task.type]
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
        return self

    @model_validator(mode="after")
    def _fields_fit_task(self) -> Recipe:
        if isinstance(self.data.fields.target, dict) and self.task.type != "extraction":
            raise ValueError(
                "data -> fields -> target: a mapping builds a JSON object and applies to extraction only; "
                "name one field"
            )
        return self

    def section_hash(self, *sections: str) -> str:
        """Content hash of some top-level sections: what a stage's output depends on."""
        payload = {s: self.model_dump(mode="json", by_alias=True)[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def recipe_hash(self) -> str:
        return self.section_hash(*type(self).model_fields)


def _yaml_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("function-after",) and not str(p).startswith("function-")]
    return " -> ".join(parts) if parts else "(top level)"


def format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} problem(s) in the recipe:"]
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see README, 'Recipe keys')"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  - {_yaml_path(e['loc'])}: {msg}")
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


def load_recipe(path: Path | str) -> Recipe:
    """Read, validate and resolve a recipe file.

    Relative `data.source`, `data.validation_source` and `data.test_source`
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
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(path, err)) from None
    resolved = {}
    for key in ("source", "validation_source", "test_source"):
        source = getattr(recipe.data, key)
        if isinstance(source, Path) and not source.is_absolute():
            resolved[key] = (path.parent / source).resolve()
    data = recipe.data.model_copy(update=resolved)
    baselines = [  # recorded predictions files, like data.source, are relative to the recipe file
        b.model_copy(update={"path": (path.parent / b.path).resolve()}) if b.path and not b.path.is_absolute() else b
        for b in recipe.eval.baselines
    ]
    evaluation = recipe.eval.model_copy(update={"baselines": baselines})
    return recipe.model_copy(update={"data": data, "eval": evaluation})


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as stored in the run directory and the registry."""
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
