"""A leaner forward pass for Llama-architecture models (SmolLM2 is one), used by `expert serve` for label scoring.

Why: a served classification request is one ~40-token pass of a small model, and at that size the work around
the matrix products is a large share of a request on a CPU (docs/BENCHMARKS.md, "Serve"). `install` makes two
changes, each exact:

- Projections that read the same input run as one matrix product (`FusedLinear`: q, k and v; gate and up),
  so each layer makes four matrix products (kernel calls) instead of seven. The fused weight replaces the
  separate ones (no extra memory); transformers' forward keeps calling them by their old names and gets slices
  of one product (`FusedPart`).
- `lean_forward` makes the same torch calls as transformers' forward, without its decorators, keyword routing,
  mask building and attention dispatch; it rotates queries and keys in one call, and lets attention share the
  key and value heads across query heads instead of copying them.

Bit-identical logits are the condition: `install` compares transformers' logits before the change with both
the lean and transformers' forward after it, on probe inputs (`torch.equal`), and undoes the change on any
difference. Only calls shaped like the label scorer's (a 4D float mask, explicit positions, a dynamic cache or
none) take the lean path; everything else (the prefix pass, two-pass scoring, generation) runs transformers'
forward, on the fused weights.

This module imports transformers internals, so nothing imports it unconditionally: `pipeline/inference/speedups.py` does,
when serving asks for it, within the transformers versions it was written against, and falls back to
transformers' forward (with a note) when it does not import or `install` fails.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaForCausalLM, rotate_half

from pipeline.inference.answering import (
    _private_copy,
    additive_mask,
    is_plain_dynamic_cache,
)

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


def unsupported(model) -> str | None:
    """Why the lean path cannot stand in for this model's forward; None when it can (subject to the probe)."""
    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    if model.config._attn_implementation != "sdpa":
        return f"attention is `{model.config._attn_implementation}`, not sdpa"
    if model.training:
        return "the model is in training mode"
    if model.device.type != "cpu":  # its probe and its gain (Python overhead per layer) are the CPU's
        return f"the model is on {model.device}, and the lean pass is a CPU optimisation"
    for layer in model.model.layers:
        for module, names in ((layer.self_attn, ATTENTION_PARTS), (layer.mlp, MLP_PARTS)):
            parts = [getattr(module, name) for name in names]
            if any(type(part) is not torch.nn.Linear for part in parts):
                return f"{type(module).__name__}'s {', '.join(names)} are not all plain nn.Linear"
            if len({part.bias is None for part in parts}) > 1:
                return f"{type(module).__name__}'s {', '.join(names)} do not all have a bias, or all none"
    return None


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An inference `nn.Linear` on the given tensors (no copy, no initialisation)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


class FusedLinear(torch.nn.Module):
    """Linear layers that read the same input, as one: their weights stacked, one matrix product, its parts."""

    def __init__(self, parts: list[torch.nn.Linear]):
        super().__init__()
        self.sizes = [part.out_features for part in parts]
        bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
        self.linear = _frozen_linear(torch.cat([p.weight.detach() for p in parts]), bias)
        self._pending: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part `index` of the product with `x`, for callers that ask for the parts one by one (transformers'
        forward): computed at the first ask, kept until every part of it has been taken."""
        if self._pending is None or self._pending[0] is not x:
            self._pending = (x, self(x), set(range(len(self.sizes))))
        _, parts, left = self._pending
        left.discard(index)
        if not left:
            self._pending = None
        return parts[index]

    def unfused(self) -> list[torch.nn.Linear]:
        """The separate layers again, on slices of the stacked weight."""
        weights = self.linear.weight.split(self.sizes)
        biases = self.linear.bias.split(self.sizes) if self.linear.bias is not None else [None] * len(self.sizes)
        return [_frozen_linear(weight, bias) for weight, bias in zip(weights, biases)]


class FusedPart(torch.nn.Module):
    """Stands in for one fused layer under its old name (`q_proj`, ...), for transformers' forward."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child: the fused layer belongs to the parent module
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)


def fuse(module, names: tuple[str, ...], fused_name: str) -> None:
    fused = FusedLinear([getattr(module, name) for name in names])
    setattr(module, fused_name, fused)
    for index, name in enumerate(names):
        setattr(module, name, FusedPart(fused, index))


def unfuse(module, names: tuple[str, ...], fused_name: str) -> None:
    for name, layer in zip(names, getattr(module, fused_name).unfused()):
        setattr(module, name, layer)
    delattr(module, fused_name)


@torch.inference_mode()
def lean_forward(model, input_ids, attention_mask, position_ids, cache: DynamicCache | None = None,
                 logits_to_keep: int | torch.Tensor = 0) -> SimpleNamespace:
    """`LlamaForCausalLM.forward` for a 4D additive mask and explicit positions: logits, and `cache` extended."""
    body, config = model.model, model.config
    hidden = body.embed_tokens(input_ids)
    cos, sin = body.rotary_emb(hidden, position_ids=position_ids)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over the heads of (batch, length, heads, head_dim)
    batch, length = input_ids.shape
    n_query, n_rotated = config.num_attention_heads, config.num_attention_heads + config.num_key_value_heads
    for index, layer in enumerate(body.layers):
        attention, mlp = layer.self_attn, layer.mlp
        residual = hidden
        heads = attention.qkv_proj.linear(layer.input_layernorm(hidden)).view(batch, length, -1, attention.head_dim)
        # queries and keys rotated in one go: `apply_rotary_pos_emb`'s arithmetic, element for element
        rotated = heads[:, :, :n_rotated]
        rotated = (rotated * cos) + (rotate_half(rotated) * sin)
        query = rotated[:, :, :n_query].transpose(1, 2)
        key = rotated[:, :, n_query:].transpose(1, 2)
        value = heads[:, :, n_rotated:].transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, index)
        # grouped-query attention without copying the shared keys and values per query head (`repeat_kv`)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=attention.scaling, is_causal=False,
            enable_gqa=True)
        hidden = residual + attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        residual = hidden
        gate, up = mlp.gate_up_proj(layer.post_attention_layernorm(hidden))
        hidden = residual + mlp.down_proj(mlp.act_fn(gate) * up)
    hidden = body.norm(hidden)
    return SimpleNamespace(logits=model.lm_head(slice_logits_to_keep(hidden, logits_to_keep)), cache=cache)


class LeanForward:
    """Stands in for `model.forward`: label-scoring calls go to `lean_forward`, any other call to the original."""

    def __init__(self, model, original):
        self.model, self.original = model, original

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0, **rest):
        scorer_call = (not rest and input_ids is not None and position_ids is not None and attention_mask is not None
                       and attention_mask.dim() == 4 and attention_mask.is_floating_point())
        if scorer_call and (cache is None or is_plain_dynamic_cache(cache)):
            return lean_forward(self.model, input_ids, attention_mask, position_ids, cache, logits_to_keep)
        return self.original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, logits_to_keep=logits_to_keep, **rest)


def _probe_calls(model):
    """Calls shaped like the label scorer's, with random tokens: a prompt after a cached 7-token prefix, and a
    padded batch of two without a cache, each under a 4D mask. Yields (prefix ids or None, keyword arguments)."""
    dtype = model.get_input_embeddings().weight.dtype
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for batch, cached in ((ids[:1, 7:], 7), (ids, 0)):
        length = batch.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = torch.cat([torch.ones(length, cached, dtype=torch.bool), allowed], dim=-1).expand(len(batch), -1, -1)
        if cached == 0:
            allowed = allowed.clone()
            allowed[1, :, :3] = False  # the second row starts with 3 padding positions ...
            allowed[1, torch.arange(3), torch.arange(3)] = True  # ... which see only themselves
        positions = (cached + torch.arange(length)).expand(len(batch), -1)
        keep = torch.arange(length - 3, length)
        yield (ids[:1, :cached] if cached else None,
               dict(input_ids=batch, attention_mask=additive_mask(allowed, dtype), position_ids=positions,
                    logits_to_keep=keep))


@torch.inference_mode()
def _probe_logits(model, forward) -> list[torch.Tensor]:
    """`forward`'s logits for the probe calls, the prefix's cache made by the model's own (transformers') forward."""
    out = []
    for prefix, call in _probe_calls(model):
        cache = _private_copy(model(input_ids=prefix, use_cache=True).cache) if prefix is not None else None
        out.append(forward(**call, cache=cache).logits)
    return out


def install(model) -> str:
    """Fuse the projections and route the label scorer's calls through `lean_forward`, when both are bit-identical
    here (else the model is left as it was); says what it did. An error on the way leaves the model as far
    installed as it got: `uninstall` undoes that."""
    reason = unsupported(model)
    if reason is not None:
        return f"lean forward pass off: {reason}"
    want = _probe_logits(model, model.forward)
    for layer in model.model.layers:
        fuse(layer.self_attn, ATTENTION_PARTS, "qkv_proj")
        fuse(layer.mlp, MLP_PARTS, "gate_up_proj")
    lean = LeanForward(model, model.forward)
    for forward in (lean, model.forward):
        if not all(torch.equal(a, b) for a, b in zip(_probe_logits(model, forward), want)):
            uninstall(model)
            return "lean forward pass off: its logits differ from transformers' on a probe"
    model.forward = lean
    return "lean forward pass on for label scoring, q/k/v and gate/up fused (logits checked bit-identical)"


def uninstall(model) -> None:
    """Undo `install`, or as much of it as happened: transformers' forward back, the projections unfused."""
    forward = model.__dict__.get("forward")
    if isinstance(forward, LeanForward):
        original = forward.original
        if getattr(original, "__self__", None) is model and getattr(original, "__func__", None) is type(model).forward:
            del model.forward  # the class's own forward again, not a copy of it bound to the instance
        else:
            model.forward = original
    for layer in getattr(getattr(model, "model", None), "layers", ()):
        for module, names, fused in ((layer.self_attn, ATTENTION_PARTS, "qkv_proj"), (layer.mlp, MLP_PARTS, "gate_up_proj")):
            if isinstance(getattr(module, fused, None), FusedLinear):
                unfuse(module, names, fused)
