"""The registered expert as an MLflow pyfunc model: texts in, answers and confidences out.

Why pyfunc with "models from code" and a bundle artifact rather than the
`transformers` flavour: the flavour would copy the base weights into every
version and knows nothing of label scoring, schemas or the cascade threshold;
a pyfunc keeps a version small (adapter + tokenizer + spec), answers exactly
as the eval stage did (with its cascade threshold, or its route's chain and
thresholds and the triage router the route keeps, bundled as `triage/<router>/`),
and loads without unpickling anything (the model class comes from code, weights
and routers from safetensors). Loading needs this package
installed; the base model is the one `train_record.json` names (same revision,
checked by content hash) or the bundled copy when pushed with `--include-base`,
loaded in training's precision. The pipeline itself never loads a version
through MLflow's loader (which executes the entry file stored with it):
`registry.load_version` verifies the version's files and calls `load_context`
on this class directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from pipeline.run.tracking import BUNDLE


def _texts(model_input: Any) -> list[str]:
    """Accept a list of strings, a pandas Series, or a DataFrame with a `text` column."""
    if hasattr(model_input, "columns"):
        if "text" not in model_input.columns:
            raise ValueError(f"input DataFrame needs a `text` column; it has {list(model_input.columns)}")
        model_input = model_input["text"]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    bad = [i for i, t in enumerate(model_input) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"inputs at positions {bad[:10]} are not non-empty strings")
    return list(model_input)


class ExpertModel(mlflow.pyfunc.PythonModel):
    """Base model + LoRA adapter + the task's spec; predicts like the eval stage."""

    triage = None  # `cascade.RouteTriage` when the version's route keeps a triage router (`load_context`)

    def load_context(self, context) -> None:
        from peft import PeftModel

        from pipeline.inference import models
        from pipeline.recipe.schema import load_recipe
        from pipeline.routing import cascade
        from pipeline.run import contracts
        from pipeline.run.stage_documents import read_spec, read_verdict

        bundle = Path(context.artifacts[BUNDLE])
        self.recipe = load_recipe(bundle / "recipe.yaml")
        spec_doc = read_spec(bundle / "spec.json")
        self.spec, self.system_prompt = spec_doc.spec, spec_doc.system_prompt
        # what the frontier is asked when a request escalates: the instruction with the label list or schema
        # (versions pushed before the expert's prompt dropped the label list have one prompt for both)
        self.baseline_system_prompt = spec_doc.baseline_system_prompt
        cascade_file = bundle / "cascade.json"
        cascade_doc = json.loads(cascade_file.read_text(encoding="utf-8")) if cascade_file.is_file() else {}
        # a route (eval's chain and thresholds) replaces the cascade and its frontier
        verdict = bundle / "verdict.json"
        route = read_verdict(verdict).route if verdict.is_file() else None
        self.route = None if route is None else route.model_dump()
        self.threshold = cascade.expert_threshold(cascade_doc.get("threshold"), self.route)
        # the triage router the route keeps (push bundles eval/triage/<router>/; its files were verified with the rest)
        self.triage = cascade.load_triage(self.route, bundle)
        # the baseline that answers escalated requests
        self.frontier = cascade_doc.get("frontier") if self.route is None else None
        # the base and precision training used, as train/record.json says (not decided again on this machine)
        trained = contracts.read_record(bundle / "train_record.json", contracts.TrainRecord)
        self.precision = trained.precision
        base_dir = bundle / "base"
        if base_dir.is_dir():
            if models.weights_hash(base_dir) != trained.base.content_hash:
                raise ValueError(f"{base_dir}: the bundled base is not the one the adapter was trained on")
            source = base_dir
        else:
            source = models.recorded_base(trained.base)
        self.base_source = source
        self.tokenizer = models.load_tokenizer(bundle / "adapter", self.recipe.model.trust_remote_code)
        base = models.load_base_model(self.recipe.model, source, trained.precision,
                                      device_map=models.inference_device_map())
        self.model = PeftModel.from_pretrained(base, bundle / "adapter").eval()
        # how eval ran it (`pipeline/inference/runtime.py`): the first answer, or `expert serve` with its options, prepares it
        self.evaluated_runtime = contracts.evaluated_runtime(bundle / "eval_record.json")
        self.runtime = None  # until prepared (`runtime.prepare_expert`); `expert export` writes it as loaded

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Per text: the expert's answer, its confidence and `escalate`, judged as serving judges them (a
        confidence that is no probability is an error, never a sure answer). With triage (`self.triage`), the
        router runs first and each row says where it started the request (`triage`): a `text` router's rows sent
        above the expert skip it (no answer, `escalate`: the caller climbs from their start tier); a `probe`
        router's rows sent up escalate even when the expert is sure."""
        from pipeline.inference import answering
        from pipeline.routing import cascade

        texts = _texts(model_input)
        before = self.triage is not None and self.triage.before_expert
        decided = self.triage.decisions(texts) if before else [None] * len(texts)
        rows = [None if d is None else cascade.past_the_expert(d) for d in decided]
        asked = [i for i, row in enumerate(rows) if row is None or not cascade.sent_up(row)]
        for i, answer in zip(asked, self.answer_texts([texts[i] for i in asked]), strict=True):
            rows[i] = cascade.expert_row(answer, self.threshold)
            if decided[i] is not None:
                rows[i] = cascade.with_triage(rows[i], decided[i])
        if self.triage is not None and not before:
            prompts = [answering.expert_prompt(self.system_prompt, texts[i]) for i in asked]
            for i, (decision, _) in zip(asked, self.triage.probe_decisions(self.model, self.tokenizer, prompts)):
                rows[i] = cascade.with_triage(rows[i], decision)
        return rows

    def answer_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """The expert's raw answer and confidence per text (`answering.answer`, as eval measured it), no triage."""
        from pipeline.inference import answering, runtime

        if not texts:
            return []
        if self.runtime is None:
            runtime.prepare_expert(self)
        prompts = [answering.expert_prompt(self.system_prompt, t) for t in texts]  # as `expert serve` builds them
        rows = answering.answer(self.model, self.tokenizer, prompts, self.recipe, self.spec)
        return [{"answer": r["prediction"], "confidence": r["confidence"]} for r in rows]
