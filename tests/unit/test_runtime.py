"""The runtime eval measures and serving serves: the adapter merged or separate as evaluated, other choices
refused unless allowed, and the merged runtime answering like the separate adapter to rounding."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.inference import runtime
from pipeline.recipe.schema import Recipe
from tests.conftest import shipped_recipe


def _recipe(**overrides) -> Recipe:
    return Recipe.model_validate(shipped_recipe("ticket-classification", **overrides))


def _tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def test_the_adapter_follows_the_evaluated_runtime_unless_asked_otherwise():
    model, recipe = _tiny_peft_model(), _recipe()
    merged, separate = runtime.Runtime(adapter="merged"), runtime.Runtime(adapter="separate")
    assert runtime.adapter_for(model, recipe, None, None) == "merged", "eval's default: merged where it can be"
    assert runtime.adapter_for(model, recipe, None, merged) == "merged"
    assert runtime.adapter_for(model, recipe, None, separate) == "separate", "an old version: served as evaluated"
    assert runtime.adapter_for(model, recipe, True, merged) == "merged"
    with pytest.raises(UserError, match="evaluated with its adapter merged; --no-merge .*--allow-unevaluated-runtime"):
        runtime.adapter_for(model, recipe, False, merged)
    with pytest.raises(UserError, match="evaluated with its adapter separate; --merge"):
        runtime.adapter_for(model, recipe, True, separate)
    assert runtime.adapter_for(model, recipe, False, merged, allow_unevaluated=True) == "separate"


def test_a_quantized_base_cannot_merge_and_is_evaluated_separate():
    recipe = _recipe(**{"model.quantization": "4bit"})
    assert runtime.adapter_for(_tiny_peft_model(), recipe, None, None) == "separate"


def test_the_merged_runtime_answers_like_the_separate_adapter_to_rounding():
    recipe = _recipe()
    ids = torch.randint(0, 300, (2, 12))
    model = _tiny_peft_model()
    with torch.no_grad():
        separate_logits = model(input_ids=ids).logits
        prepared, ran_as = runtime.prepare(model, recipe, "merged")
        merged_logits = prepared(input_ids=ids).logits
    assert ran_as.adapter == "merged" and not hasattr(prepared, "peft_config"), "the adapter is folded in"
    assert torch.allclose(merged_logits, separate_logits, atol=1e-4), "fp32: the same function up to rounding"
    assert runtime.Runtime.model_validate_json(ran_as.model_dump_json()) == ran_as
