"""The lean Llama forward pass used by `expert serve` gives transformers' logits bit for bit, or stays off; behind
its seam (`pipeline/inference/speedups.py`) a transformers that breaks it costs speed, never service."""

import sys
from types import SimpleNamespace

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.inference import answering as predict
from pipeline.inference import lean_forward, speedups
from pipeline.inference.answering import (
    _score_in_one_pass,
    classify,
    generate,
    shared_prefix,
)

LABELS = ["billing", "shipping", "technical support", "account"]
SYSTEM = "<|im_start|>system\nRoute the customer message to one support queue: billing, shipping or account.<|im_end|>\n"
TEXTS = ["my card was charged twice", "parcel late", "I cannot log in to my account at all"]


def prompts(texts):
    return [SYSTEM + f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for t in texts]


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs).eval()


def install_or_skip(model) -> str:
    """`install`, skipping where the hardware cannot give the fused product bit-identically: AMX kernels split a
    stacked matrix product by output width, so there the probe rightly keeps the lean pass off. Anywhere else
    a probe difference is a failure."""
    note = lean_forward.install(model)
    if "differ" in note and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        pytest.skip(f"this AMX CPU does not give the fused projections bit-identically ({note})")
    assert note.startswith("lean forward pass on"), note
    return note


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_scores_are_bit_identical_and_other_calls_still_work(tiny_model_dir, dtype):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference, lean = load(tiny_model_dir, dtype=dtype), load(tiny_model_dir, dtype=dtype)
    install_or_skip(lean)
    assert isinstance(lean.forward, lean_forward.LeanForward)
    calls = []
    real = lean_forward.lean_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lean_forward, "lean_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
        for texts in (TEXTS[:1], TEXTS):  # one request, and a micro-batch of different lengths
            for with_prefix in (True, False):
                prefix = shared_prefix(lean, tokenizer, prompts(TEXTS)) if with_prefix else None
                ref_prefix = shared_prefix(reference, tokenizer, prompts(TEXTS)) if with_prefix else None
                assert _score_in_one_pass(lean, tokenizer, prompts(texts), LABELS, prefix) == \
                    _score_in_one_pass(reference, tokenizer, prompts(texts), LABELS, ref_prefix)
    assert len(calls) == 4, "every label-scoring pass took the lean path"
    # calls of other shapes (two-pass scoring's 2D masks, generation) go to transformers' forward, as before
    messages = [[{"role": "user", "content": t}] for t in TEXTS]

    def answers(rows, key):
        return [(row[key], row["confidence"]) for row in rows]

    assert answers(classify(lean, tokenizer, messages, LABELS, 2, one_pass_tokens=0), "prediction") == \
        answers(classify(reference, tokenizer, messages, LABELS, 2, one_pass_tokens=0), "prediction")
    assert answers(generate(lean, tokenizer, messages, 4, 2), "raw") == \
        answers(generate(reference, tokenizer, messages, 4, 2), "raw")
    assert len(calls) == 4


def test_it_stays_off_where_it_cannot_stand_in(tiny_model_dir):
    eager = load(tiny_model_dir).eval()
    eager.config._attn_implementation = "eager"
    assert lean_forward.install(eager) == "lean forward pass off: attention is `eager`, not sdpa"
    training = load(tiny_model_dir).train()
    assert "training mode" in lean_forward.install(training)
    assert not isinstance(eager.forward, lean_forward.LeanForward)


def parameter_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_fused_projections_replace_the_separate_weights(tiny_model_dir):
    model = load(tiny_model_dir, dtype=torch.bfloat16)
    before = parameter_bytes(model)
    install_or_skip(model)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, lean_forward.FusedLinear)
    assert isinstance(attention.q_proj, lean_forward.FusedPart)
    assert parameter_bytes(model) == before, "the stacked weights replace the separate ones: no extra memory"


def test_transformers_forward_computes_each_fused_product_once(tiny_model_dir, monkeypatch):
    """The prefix pass and two-pass scoring run transformers' forward: q, k and v (and gate, up) asked for one
    by one must still cost one product per layer, not one per part."""
    model = load(tiny_model_dir, dtype=torch.bfloat16)
    install_or_skip(model)
    products = []
    real = lean_forward.FusedLinear.forward
    monkeypatch.setattr(lean_forward.FusedLinear, "forward", lambda self, x: products.append(1) or real(self, x))
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 9, 2, 7]]), use_cache=True)
    assert len(products) == 2 * model.config.num_hidden_layers


def test_fused_parts_asked_for_one_by_one_are_the_separate_products(monkeypatch):
    """transformers' forward asks for q, k and v one at a time: one product per input, kept only until all its
    parts are taken, and never served for another input.

    A stacked product is not bit-equal to separate ones on every CPU (AMX kernels split the work by output
    width), so values are compared within fp32 rounding; `install`'s probe is what guards serving's bit-identity.
    """
    torch.manual_seed(0)
    separate = [torch.nn.Linear(8, n) for n in (8, 4, 4)]
    fused = lean_forward.FusedLinear(separate)
    q, k, v = (lean_forward.FusedPart(fused, i) for i in range(3))
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    products = []
    real = fused.linear.forward
    monkeypatch.setattr(fused.linear, "forward", lambda inp: products.append(inp) or real(inp))

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    with torch.inference_mode():
        assert close(q(x), separate[0](x))
        assert close(q(y), separate[0](y)), "a new input is a new product"
        assert close(k(y), separate[1](y)) and close(v(y), separate[2](y))
        assert [p is y for p in products] == [False, True], "one product per input, its parts served from it"
        assert fused._pending is None, "the product is let go once all its parts are taken"
        assert close(v(x), separate[2](x)) and len(products) == 3
        assert all(close(a, b(x)) for a, b in zip(fused(x), separate))
    unfused = fused.unfused()
    for layer, original in zip(unfused, separate):
        assert torch.equal(layer.weight, original.weight) and torch.equal(layer.bias, original.bias)
        assert layer.weight.untyped_storage().data_ptr() == fused.linear.weight.untyped_storage().data_ptr(), \
            "unfused layers are slices of the stack, not copies"


def test_a_forward_that_differs_from_transformers_is_not_installed(tiny_model_dir, monkeypatch):
    """Fault injection: a rotary embedding off by one rounding step must be caught by the install probe, and
    the model left as it was (projections unfused, transformers' forward, the same logits)."""
    real = lean_forward.rotate_half

    def drifting(x):
        rotated = real(x)
        return torch.nextafter(rotated, torch.full_like(rotated, float("inf")))

    monkeypatch.setattr(lean_forward, "rotate_half", drifting)
    reference, model = load(tiny_model_dir), load(tiny_model_dir)
    assert lean_forward.install(model) == "lean forward pass off: its logits differ from transformers' on a probe"
    assert not isinstance(model.forward, lean_forward.LeanForward)
    attention = model.model.layers[0].self_attn
    assert type(attention.q_proj) is torch.nn.Linear and not hasattr(attention, "qkv_proj")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_fused_product_that_differs_is_caught(tiny_model_dir, monkeypatch):
    """Fault injection: a fused product one rounding step off (as a kernel blocking the stacked matrix
    differently could be) fails the probe through transformers' forward as well as the lean one."""
    real = lean_forward.FusedLinear.forward

    def drifting(self, x):
        return tuple(torch.nextafter(p, torch.full_like(p, float("inf"))) for p in real(self, x))

    monkeypatch.setattr(lean_forward.FusedLinear, "forward", drifting)
    model = load(tiny_model_dir)
    assert "differ" in lean_forward.install(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# --------------------------------------------------------------------------- the seam (pipeline/inference/speedups.py)


def rename_a_transformers_internal(monkeypatch) -> None:
    """What a transformers release that renames an internal the lean module imports looks like: the module, imported
    afresh, fails with ImportError."""
    import transformers.modeling_utils

    monkeypatch.delattr(transformers.modeling_utils, "slice_logits_to_keep")
    monkeypatch.delitem(sys.modules, "pipeline.inference.lean_forward")


def test_the_seam_serves_without_a_lean_module_that_does_not_import(tiny_model_dir, monkeypatch):
    """A transformers rename makes `pipeline/inference/lean_forward.py` fail to import (its top imports transformers
    internals): the seam says so and leaves transformers' forward."""
    rename_a_transformers_internal(monkeypatch)
    model = load(tiny_model_dir)
    note = speedups.install_lean_forward(model)
    assert note.startswith("lean forward pass off: it does not import with transformers") and "ImportError" in note
    assert "slice_logits_to_keep" in note
    assert "forward" not in model.__dict__ and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_the_seam_undoes_an_install_that_fails_half_way(tiny_model_dir, monkeypatch):
    """A renamed attribute found only once the projections are fused (here: the lean pass itself raising, as it
    would reading a module transformers renamed) is undone: unfused layers, transformers' forward, its logits."""
    def renamed(*args, **kwargs):
        raise AttributeError("'LlamaModel' object has no attribute 'rotary_emb'")

    monkeypatch.setattr(lean_forward, "lean_forward", renamed)
    reference, model = load(tiny_model_dir), load(tiny_model_dir)
    note = speedups.install_lean_forward(model)
    assert note.startswith("lean forward pass off: installing it failed (AttributeError") and "rotary_emb" in note
    assert "forward" not in model.__dict__
    attention = model.model.layers[0].self_attn
    assert type(attention.q_proj) is torch.nn.Linear and not hasattr(attention, "qkv_proj")
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_the_seam_keeps_off_transformers_releases_it_was_not_written_against(tiny_model_dir, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    monkeypatch.setitem(sys.modules, "pipeline.inference.lean_forward", None)  # never imported: the version says no first
    note = speedups.install_lean_forward(load(tiny_model_dir))
    assert note.startswith("lean forward pass off: transformers 6.0.0 is outside the releases it was written against")


def same_answers(rows, reference) -> bool:
    """The same labels, and confidences within bf16 rounding of the reference's."""
    return [a for a, _ in rows] == [a for a, _ in reference] and all(
        c == pytest.approx(r, rel=1e-2, abs=1e-3) for (_, c), (_, r) in zip(rows, reference, strict=True))


def served(tiny_model_dir, tmp_path, texts, **options):
    """`expert serve`'s answers (one request at a time over HTTP) for a tiny classification expert loaded the way
    serve loads a version (adapter merged, then the speed-ups through their seam)."""
    from peft import LoraConfig, get_peft_model

    from pipeline import serving
    from pipeline.inference import models
    from pipeline.recipe.schema import load_recipe
    from pipeline.tasks import classification
    from tests.conftest import shipped_recipe, write_recipe
    from tests.support.serve_thread import serving as running

    recipe = load_recipe(write_recipe(tmp_path, shipped_recipe("ticket-classification",
                                                               **{"model.base": str(tiny_model_dir)})))
    labels = recipe.task.labels
    base = load(tiny_model_dir, dtype=torch.bfloat16)
    expert = SimpleNamespace(
        recipe=recipe, spec=labels, tokenizer=models.load_tokenizer(tiny_model_dir), threshold=None, frontier=None,
        system_prompt=classification.system_prompt(recipe.task.instruction, labels),
        model=get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).eval())
    opts = serving.ServeOptions(escalate=False, **options)
    serving.prepare(expert, opts)
    service = serving.Service(expert, "tickets", None, "local", opts)
    try:
        with running(serving.create_app(service)) as url:
            rows = [httpx.post(f"{url}/v1/predict", json={"text": t}, timeout=60).json() for t in texts]
    finally:
        service.close()
    assert service.engine.prefix is not None and service.engine.fallbacks == 0
    return [(row["answer"], row["confidence"]) for row in rows]


def test_serving_answers_identically_when_the_lean_pass_and_packing_are_gone(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """The default serve path with both speed-ups, then the same with the lean module failing to import and
    oneDNN's private op missing: the same answers, confidences equal within bf16 rounding (the two paths are
    different kernels, checked bit-identical only on their install probes), and a note for each speed-up left
    out."""
    texts = ["my card was charged twice", "where is my parcel? it is late", "I cannot log in", "refund please"]
    fast = served(tiny_model_dir, tmp_path, texts)
    notes = capsys.readouterr().err
    assert "lean forward pass on" in notes or "lean forward pass off: its logits differ" in notes, notes

    rename_a_transformers_internal(monkeypatch)
    monkeypatch.setattr(predict, "PACKING_OPS", ("_reorder_linear_weight_renamed", "_linear_pointwise"))
    assert same_answers(served(tiny_model_dir, tmp_path, texts), fast)
    notes = capsys.readouterr().err
    assert "lean forward pass off: it does not import" in notes, notes
    assert "weights not packed for oneDNN" in notes, notes

    # and `--no-lean-forward` never imports it at all
    assert same_answers(served(tiny_model_dir, tmp_path, texts, lean_forward=False), fast)
    assert "lean forward pass" not in capsys.readouterr().err
