"""A lean forward pass for BERT sequence classifiers, with or without LoRA adapters.

It computes the same function as Hugging Face's `BertForSequenceClassification`
(wrapped or not in PEFT LoRA adapters), with fewer and larger operations. On a
CPU every operation is a pass over memory and a parallel region, so the number
of operations costs as much as the FLOPs:

- query, key and value are one matmul over their concatenated frozen weights,
  and their three adapters one batched matmul pair;
- dropout draws only the positions it drops (see `dropped_positions`), and the
  dropout before each residual connection is fused into the addition;
- attention is PyTorch's fused kernel, or, where dropout needs the attention
  probabilities, two batched matmuls and a softmax.

Weights are read from the model's own modules at every call, so the optimizer,
checkpoints and `save_pretrained` see the usual parameters. `supports` says
whether a model can take this path; callers fall back to the model's own
forward otherwise. Imports only torch (peft lazily, when a model uses it).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_QKV_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# A transformers or PEFT module read by attribute name (`layer.attention.self`, `module.lora_A[name]`):
# nn.Module types such attributes as Tensor | Module, so the layouts this file relies on are Any.
HFModule = Any


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: y += scale * (dropout_p(x) @ A^T) @ B^T."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    p: float


def unwrap(model: HFModule) -> HFModule:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but a plain transformers model needs none of it
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def plain_lora(layer: HFModule) -> bool:
    """One active, unmerged, vanilla adapter on a Linear: what `split_linear` computes."""
    names = list(layer.active_adapters)
    return (len(names) == 1 and not layer.merged and not layer.disable_adapters
            and isinstance(layer.base_layer, nn.Linear) and names[0] in layer.lora_A
            and names[0] not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "lora_bias", {}).get(names[0], False))


def supports_encoder(encoder: HFModule) -> bool:
    """True when `encode` computes exactly what this BertModel computes.

    CPU only: that is where it is measured and tested; on a GPU the model's
    own forward (fused dropout, bf16 autocast) is used as it is.
    """
    if type(encoder).__name__ != "BertModel" or next(encoder.parameters()).device.type != "cpu":
        return False
    config = encoder.config
    if config.is_decoder or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    return not getattr(config, "chunk_size_feed_forward", 0) and all(plain_lora(m) for m in lora_layers(encoder))


def supports(model: nn.Module) -> bool:
    """True when `sequence_logits` computes exactly what `model(...)` computes."""
    seq = unwrap(model)
    if type(seq).__name__ != "BertForSequenceClassification":
        return False
    if seq.config.problem_type not in (None, "single_label_classification"):
        return False
    return seq.bert.pooler is not None and supports_encoder(seq.bert) and all(
        plain_lora(m) for m in lora_layers(seq))


def split_linear(module: HFModule) -> tuple[nn.Linear, Adapter | None]:
    """The frozen Linear of a layer and its adapter (None for a plain Linear)."""
    if isinstance(module, nn.Linear):
        return module, None
    name = module.active_adapters[0]
    p = getattr(module.lora_dropout[name], "p", 0.0)
    return module.base_layer, Adapter(module.lora_A[name].weight, module.lora_B[name].weight,
                                      float(module.scaling[name]), float(p))


def dropped_positions(n: int, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Sorted flat indices in [0, n), each included independently with probability p.

    The gaps between successes of a Bernoulli(p) process are independent
    Geometric(p) variables, so drawing ~n*p gaps gives exactly the distribution
    of n Bernoulli draws (what dropout's mask is) for a fraction of the random
    numbers: 5-10% of them at the usual dropout rates.
    """
    expected = n * p
    count = int(expected + 8.0 * math.sqrt(expected) + 16)  # 8 sigma: the loop below almost never runs
    ends = torch.empty(count, dtype=torch.float64, device=device).geometric_(p).cumsum_(0)
    while ends[-1] < n:
        more = torch.empty(count, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).add_(ends[-1])
        ends = torch.cat([ends, more])
    kept = int(torch.searchsorted(ends, float(n), right=True))
    return ends[:kept].long().sub_(1)  # gaps count trials, so the k-th success sits at index cumsum - 1


def scaled_with_drops(t: torch.Tensor, scale: float, dropped: torch.Tensor) -> torch.Tensor:
    """A new contiguous t * scale with the flat positions `dropped` set to zero."""
    out = torch.mul(t, scale).contiguous()
    out.view(-1).index_fill_(0, dropped, 0.0)
    return out


class _Dropout(torch.autograd.Function):
    """Dropout of `copies` independent copies of x (copies=0: x itself)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, copies: int) -> torch.Tensor:
        scale = 1.0 / (1.0 - p)
        source = x.unsqueeze(0).expand(copies, *x.shape) if copies else x
        dropped = dropped_positions(source.numel(), p, x.device)
        ctx.save_for_backward(dropped)
        ctx.scale, ctx.copies = scale, copies
        return scaled_with_drops(source, scale, dropped)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        grad = scaled_with_drops(grad, ctx.scale, dropped)
        return (grad.sum(0) if ctx.copies else grad), None, None


class _DropoutAdd(torch.autograd.Function):
    """residual + dropout(x), in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
        scale = 1.0 / (1.0 - p)
        out = torch.add(residual, x, alpha=scale).contiguous()
        dropped = dropped_positions(out.numel(), p, x.device)
        out.view(-1).index_copy_(0, dropped, residual.reshape(-1).index_select(0, dropped))
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        return scaled_with_drops(grad, ctx.scale, dropped), grad, None


def dropout(x: torch.Tensor, p: float, training: bool, copies: int = 0) -> torch.Tensor:
    """F.dropout (of `copies` independent copies of x, stacked, when copies > 0).

    On CPU the mask comes from `dropped_positions`; on accelerators the fused
    kernel is already fast, so it is used as is.
    """
    if copies:
        x_copies = x.unsqueeze(0).expand(copies, *x.shape)
    if not training or p == 0.0:
        return x_copies if copies else x
    if x.device.type != "cpu":
        return F.dropout(x_copies.contiguous() if copies else x, p, True)
    return _Dropout.apply(x, p, copies)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x)."""
    if not training or p == 0.0:
        return residual + x
    if x.device.type != "cpu":
        return residual + F.dropout(x, p, True)
    return _DropoutAdd.apply(x, residual, p)


def linear(x: torch.Tensor, module: HFModule, training: bool) -> torch.Tensor:
    """A Linear, or a LoRA-adapted Linear, of x (tokens, in) -> (tokens, out)."""
    base, adapter = split_linear(module)
    y = F.linear(x, base.weight, base.bias)
    if adapter is None:
        return y
    down = dropout(x, adapter.p, training) @ adapter.A.t()  # (tokens, r)
    if y.dtype != adapter.B.dtype:  # autocast: only the out-of-place op casts
        return torch.addmm(y, down, adapter.B.t(), alpha=adapter.scale)
    return y.addmm_(down, adapter.B.t(), alpha=adapter.scale)  # in place: one pass over y fewer


def concatenated(bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query/key/value weights and biases stacked along the output dimension.

    Frozen weights are concatenated once and cached (the cache is checked
    against each tensor's version, so an in-place update is seen); weights
    that train are concatenated at every call so gradients reach them.
    """
    tensors = [t for b in bases for t in (b.weight, b.bias)]
    if any(t.requires_grad for t in tensors):
        return torch.cat([b.weight for b in bases]), torch.cat([b.bias for b in bases])
    key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
    cached = _QKV_CACHE.get(bases[0])
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable by training later
            cached = (key, torch.cat([b.weight for b in bases]), torch.cat([b.bias for b in bases]))
        _QKV_CACHE[bases[0]] = cached
    return cached[1], cached[2]


def project_qkv(h: torch.Tensor, attention: HFModule, training: bool) -> torch.Tensor:
    """Query, key and value of h (tokens, hidden), stacked: (3, tokens, hidden)."""
    modules = (attention.query, attention.key, attention.value)
    parts = [split_linear(m) for m in modules]
    adapters = [a for _, a in parts if a is not None]
    same = len(adapters) == len(parts) and len({(a.A.shape, a.scale, a.p) for a in adapters}) == 1
    if not same or any(b.bias is None for b, _ in parts):
        return torch.stack([linear(h, m, training) for m in modules])
    weight, bias = concatenated([b for b, _ in parts])
    tokens, out = h.shape[0], parts[0][0].out_features
    base = torch.addmm(bias, h, weight.t()).view(tokens, 3, out).transpose(0, 1)  # (3, tokens, out)
    dropped = dropout(h, adapters[0].p, training, copies=3)  # (3, tokens, hidden)
    down = torch.bmm(dropped, torch.stack([a.A for a in adapters]).transpose(1, 2))  # (3, tokens, r)
    up = torch.stack([a.B for a in adapters]).transpose(1, 2)  # (3, r, out)
    return torch.baddbmm(base, down, up, alpha=adapters[0].scale)


def attention_bias(mask: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 1/0 mask -> additive bias (batch*heads, 1, seq): 0 or the dtype's minimum."""
    bias = (1.0 - mask.to(dtype)) * torch.finfo(dtype).min
    return bias.repeat_interleave(heads, dim=0).unsqueeze(1)


def attend(qkv: torch.Tensor, mask: torch.Tensor, heads: int, p: float, training: bool) -> torch.Tensor:
    """Multi-head attention of (3, batch*seq, hidden) -> (batch*seq, hidden), keys masked by mask (batch, seq).

    Without dropout it is PyTorch's fused attention (what the model's own
    `sdpa` attention calls). With dropout the CPU has no fused kernel, so it
    is two batched matmuls and a softmax, the dropout drawn as in `dropout`.
    """
    _, tokens, hidden = qkv.shape
    batch, seq = mask.shape
    size = hidden // heads
    q, k, v = qkv.view(3, batch, seq, heads, size).transpose(2, 3).unbind(0)  # (batch, heads, seq, size)
    if not training or p == 0.0:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
    else:
        q, k, v = (t.reshape(batch * heads, seq, size) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(size ** -0.5).add_(attention_bias(mask, heads, q.dtype))
        probs = dropout(torch.softmax(scores, dim=-1), p, training)  # (batch*heads, seq, seq)
        context = torch.bmm(probs, v).view(batch, heads, seq, size)
    return context.transpose(1, 2).reshape(tokens, hidden)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def encoder_layer(h: torch.Tensor, layer: HFModule, mask: torch.Tensor, training: bool) -> torch.Tensor:
    """One BERT layer (post-LayerNorm) on h (batch*seq, hidden); mask (batch, seq) marks real tokens."""
    attention, heads = layer.attention, layer.attention.self.num_attention_heads
    qkv = project_qkv(h, attention.self, training)
    context = attend(qkv, mask, heads, attention.self.dropout.p, training)
    out = attention.output
    h = layer_norm(dropout_add(linear(context, out.dense, training), h, out.dropout.p, training), out.LayerNorm)
    inner = layer.intermediate.intermediate_act_fn(linear(h, layer.intermediate.dense, training))
    out = layer.output
    return layer_norm(dropout_add(linear(inner, out.dense, training), h, out.dropout.p, training), out.LayerNorm)


def encode(bert: HFModule, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (batch, seq, hidden) of a BertModel `supports_encoder` accepts,
    in train or eval mode as the model is set."""
    training = bert.training
    batch, length = input_ids.shape
    emb = bert.embeddings
    # the same sums in the same order as BertEmbeddings (token type 0 everywhere)
    x = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0]
    x = layer_norm(x + emb.position_embeddings.weight[:length], emb.LayerNorm)  # (batch, seq, hidden)
    h = dropout(x, emb.dropout.p, training).reshape(batch * length, -1)
    for layer in bert.encoder.layer:
        h = encoder_layer(h, layer, attention_mask, training)
    return h.view(batch, length, -1)


def sequence_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (batch, labels) of a model `supports` accepts, in train or eval mode as it is set."""
    seq = unwrap(model)
    bert, training = seq.bert, seq.training
    first = encode(bert, input_ids, attention_mask)[:, 0]  # the [CLS] token of each text
    pooled = bert.pooler.activation(linear(first, bert.pooler.dense, training))
    return seq.classifier(dropout(pooled, seq.dropout.p, training))
