"""Every tensor the label scorer and generation make goes to the model's device, and scores leave it once per pass.

There is no GPU here, so the `meta` device stands in for one: the model's weights are moved to `meta`, where
ops that mix a meta tensor with a CPU tensor fail ("Tensor on device cpu is not on the expected device meta")
as they would between a GPU and the CPU. Meta is lenient for a few ops (an embedding or gather with CPU indices),
so the model's forward also checks that every tensor it is given is on the model's device. A meta tensor has no
data, so the one device-to-host read (`answering._to_host`) is where the results would come back: the test counts
those reads and hands back zeros of the right shape.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.inference import answering

LABELS = ["billing", "shipping", "technical support", "account", "refund request"]
TEXTS = ["my card was charged twice", "parcel late", "I cannot log in to my account at all", "refund please"]
SYSTEM = "Route the customer message to one support queue. Answer with the queue name only, nothing else."


class WrongDevice(AssertionError):
    pass


@pytest.fixture
def on_meta(tiny_model_dir, monkeypatch):
    """(model on the meta device whose forward checks its inputs' devices, tokenizer, reads of results)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval().to("meta")
    assert model.device.type == "meta"
    real_forward = model.forward

    def forward(*args, **kwargs):
        for name, value in [*enumerate(args), *kwargs.items()]:
            if torch.is_tensor(value) and value.device != model.device:
                raise WrongDevice(f"forward got `{name}` on {value.device}, the model is on {model.device}")
        return real_forward(*args, **kwargs)

    model.forward = forward
    reads = []

    def to_host(tensor):
        reads.append(tuple(tensor.shape))
        assert tensor.device == model.device
        return torch.zeros(tensor.shape, dtype=tensor.dtype).tolist()

    monkeypatch.setattr(answering, "_to_host", to_host)
    return model, tokenizer, reads


def messages(texts):
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in texts]


def test_one_pass_label_scoring_runs_on_the_models_device_and_reads_once_per_batch(on_meta):
    model, tokenizer, reads = on_meta
    rows = answering.classify(model, tokenizer, messages(TEXTS), LABELS, batch_size=2)
    assert [r["prediction"] in LABELS for r in rows] == [True] * 4
    assert len(reads) == 2, "one read per batch of two: the first-token and trie scores together"


def test_pruned_label_scoring_runs_on_the_models_device_one_read_per_pass(on_meta):
    model, tokenizer, reads = on_meta
    rows = answering.classify(model, tokenizer, messages(TEXTS), LABELS, batch_size=4, one_pass_tokens=0)
    assert len(rows) == 4
    # the prompt pass reads its label-first tokens once; each trie pass reads its label sums once
    assert reads[0] == (4, len(LABELS)) and all(shape[1] == len(LABELS) for shape in reads[1:])
    assert len(reads) <= 1 + 4, "never one read per label or per number"


def test_generation_gets_its_inputs_on_the_models_device_and_every_eos(on_meta, monkeypatch):
    """Also: decoding stops on every eos id the model's generation config lists (Llama-3 Instruct: `<|eot_id|>`
    and `<|end_of_text|>`), not only on the tokenizer's."""
    model, tokenizer, _ = on_meta
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id, 9]
    seen = {}

    def generate(**kwargs):
        seen.update({k: v.device for k, v in kwargs.items() if torch.is_tensor(v)})
        seen["eos"] = kwargs["eos_token_id"]
        raise WrongDevice("stop here: meta tensors cannot be decoded")

    monkeypatch.setattr(model, "generate", generate)
    with pytest.raises(WrongDevice, match="stop here"):
        answering.generate(model, tokenizer, messages(TEXTS), max_new_tokens=4, batch_size=4)
    assert seen.pop("eos") == [tokenizer.eos_token_id, 7, 9]
    assert seen and set(seen.values()) == {model.device}, seen


def test_the_schema_mask_is_applied_on_the_scores_device(on_meta):
    """llguidance fills its bitmask in host memory; the mask must reach the logits' device before it is applied."""
    model, tokenizer, _ = on_meta
    schema = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"],
              "additionalProperties": False}
    vocab = model.get_output_embeddings().out_features
    constraint = answering.SchemaConstraint(tokenizer, schema, 2, vocab, max_new_tokens=16)
    input_ids = torch.zeros((2, 5), dtype=torch.long, device=model.device)
    scores = torch.zeros((2, vocab), device=model.device)
    assert constraint(input_ids, scores).device == model.device
