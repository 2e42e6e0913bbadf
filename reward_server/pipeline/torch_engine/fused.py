"""Fused decoder layers for the Llama family: fewer, larger matrix products and fewer passes over
the activations than transformers' modules, with the same arithmetic.

A transformers decoder layer of a known family (`FAMILIES`) is replaced, at load, by a
`FusedDecoderLayer` holding the same weights rearranged:
- q, k and v projections as one matrix (one product instead of three), gate and up as one;
- rotary embedding applied to the queries and keys in one pass over the fused projection;
- residual additions and SiLU x up in place;
- with the native kernels (kernels/layers.cpp, on CPU), each element-wise step one pass in place:
  RMSNorm with the residual addition before it, per-head norms and rotary embedding on the fused
  q/k/v product, SiLU x up; same arithmetic, less than a quarter of torch's time for them;
- on CPU, every weight prepacked for oneDNN (`PackedLinear`) where torch and the CPU allow it:
  MKL's sgemm takes a slow path on some CPUs (DESIGN.md: 172 against 440 GFLOP/s on an AVX-512
  AMD EPYC; 72 against 68 on an AVX2 one), and oneDNN gives each row the same bits whatever the
  number of rows computed with it (batch invariance; MKL does not);
- except bf16 on AMX, where oneDNN's blocking, and so a row's bits, follow the row count: there
  the native kernels compute the products (`TileLinear`) on the tiles in blocks of one fixed shape.
Attention is `attention.packed_attention`, unchanged. Layers of other families, or with
features this module does not implement (see `fusable`), keep transformers' forward (the reason
is logged), with their linear layers' products on prepacked weights too (`PrepackedLinear`), so
that batch invariance holds for them as well.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from reward_server.pipeline.heads import decoder_layers
from reward_server.pipeline.torch_engine.attention import attention_at_reads, read_rows

_LOGGER = logging.getLogger(__name__)

# Decoder layers whose arithmetic this module reproduces: pre-norm RMSNorm, rotary q/k (optionally
# per-head RMSNorm on them, Qwen3), grouped-query attention, SiLU-gated MLP, optional q/k/v bias.
FAMILIES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def fusable(layer: Any) -> str | None:
    """None when `layer` can be fused; else why not (one line)."""
    name = type(layer).__name__
    if name not in FAMILIES:
        return f"{name} is not one of the fused families ({', '.join(FAMILIES)})"
    attn, mlp = layer.self_attn, layer.mlp
    act = getattr(mlp, "act_fn", None)
    if type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return f"{name}: activation {type(act).__name__} (fused layers implement SiLU)"
    if any(getattr(m, "bias", None) is not None for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        return f"{name}: biases outside q/k/v"
    biases = [getattr(m, "bias", None) is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if any(biases) and not all(biases):
        return f"{name}: bias on some of q/k/v only"
    return None


def layer_window(layer: Any) -> int | None:
    """The sliding window the layer's own attention passes on (None: none): Qwen2/3 keep it per layer
    type on the attention module, Mistral reads it from the config for every layer, Llama has none."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None) if type(layer).__name__ == "MistralDecoderLayer" else None


def rms_norm(x, weight, eps: float):
    """transformers' RMSNorm: statistics in fp32, scaled in the input dtype, then the weight."""
    if x.dtype == torch.float32:
        return torch.mul(x, torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))).mul_(weight)
    x32 = x.float()
    return weight * x32.mul_(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))).to(x.dtype)


class PackedLinear:
    """y = x W^T (+ b) with W reordered once for oneDNN's matrix product (CPU, fp32 or bf16)."""

    def __init__(self, weight, bias=None, rows_hint: int = 4096):
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)
        self.bias = bias

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows == 1:  # oneDNN sums a lone row in another order (fp32, 512 x 1408: other bits); two rows don't
            flat = torch.cat([flat, flat.new_zeros(flat.shape)])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], self.out_features)


class TileLinear:
    """y = x W^T (+ b) in bf16 on AMX tiles through the native kernels (`kernels/layers.cpp`,
    `product`): blocks of a fixed shape, so a row gets the same bits in any batch, which oneDNN's bf16
    matmul on AMX does not give (its blocking follows the row count)."""

    def __init__(self, weight, bias, native):
        self.out_features = weight.shape[0]
        self.native, self.weight, self.bias = native, native.pack_product(weight.contiguous()), bias

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        y = torch.empty(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        with torch.profiler.record_function("reward_server::product"):  # named in profiles (bench.engine_profile)
            self.native.product(flat, self.weight, self.bias, y)
        return y.view(*x.shape[:-1], self.out_features)


def tiles_apply(native: Any, dtype) -> bool:
    """The native bf16 products (`TileLinear`) run here: bf16, the native kernels loaded, AMX tiles."""
    return native is not None and dtype == torch.bfloat16 and native.products_on_tiles()


def product(weight, bias=None, prepack: bool = True, native: Any = None):
    """The product a layer's weight runs through: on AMX tiles in bf16 where `tiles_apply`, else
    oneDNN on a prepacked weight where `prepack`, else torch's default."""
    if tiles_apply(native, weight.dtype) and weight.shape[1] % 2 == 0:
        return TileLinear(weight, bias, native)
    return PackedLinear(weight, bias) if prepack else PlainLinear(weight, bias)


class PlainLinear:
    """y = x W^T (+ b) through torch's default matrix product."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias, self.out_features = weight.contiguous(), bias, weight.shape[0]

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)


class PrepackedLinear(torch.nn.Module):
    """A transformers layer's `nn.Linear`, its product on a prepacked weight (`product`: AMX tiles or
    oneDNN)."""

    def __init__(self, linear, native: Any = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach()
        self.product = product(linear.weight.detach(), bias, native=native)

    def forward(self, x):
        return self.product(x)


def prepack_linears(module, native: Any = None) -> int:
    """Replace every `nn.Linear` inside `module` by a `PrepackedLinear`; returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, PrepackedLinear(child, native))
                replaced += 1
    return replaced


@functools.lru_cache(maxsize=None)
def _oneDNN_prepacks(dtype) -> bool:  # noqa: N802
    try:  # e.g. bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT: refused on AVX2-only CPUs
        PackedLinear(torch.zeros(8, 8, dtype=dtype), rows_hint=8)(torch.zeros(2, 8, dtype=dtype))
        return True
    except RuntimeError:
        return False


def prepack_available(device, dtype) -> bool:
    """oneDNN prepacking applies: CPU, fp32 or bf16, torch built with mkldnn, and this CPU accepted."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and _oneDNN_prepacks(dtype))


class FusedDecoderLayer(torch.nn.Module):
    """A drop-in for one transformers decoder layer (see the module docstring).

    The weights are held as plain attributes (a prepacked oneDNN weight cannot be a Parameter):
    build it on the device and in the dtype the engine runs in.
    """

    def __init__(self, layer, attention, prepack: bool, native: Any = None, last: bool = False):
        super().__init__()
        self.native = native  # the native kernels module (element-wise steps), or None: torch's operations
        self.last = last  # the model's last decoder layer: computes only the rows that are read (`read_rows`)
        attn, mlp = layer.self_attn, layer.mlp
        config = attn.config
        self.layer_idx = attn.layer_idx
        self.attention = attention
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.scaling = attn.scaling
        make = functools.partial(product, prepack=prepack, native=native)
        with torch.no_grad():
            qkv_bias = None
            if attn.q_proj.bias is not None:
                qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            self.qkv = make(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv_bias)
            self.o = make(attn.o_proj.weight)
            self.gate_up = make(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            self.down = make(mlp.down_proj.weight)
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.norm_in = (layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon)
        self.norm_post = (layer.post_attention_layernorm.weight.detach(),
                          layer.post_attention_layernorm.variance_epsilon)
        self.sliding_window = layer_window(layer)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norms = None if q_norm is None else ((q_norm.weight.detach(), q_norm.variance_epsilon),
                                                     (k_norm.weight.detach(), k_norm.variance_epsilon))

    def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
        if self.native is not None:
            return self._forward_native(hidden_states, position_embeddings)
        x = hidden_states
        batch, length, _ = x.shape
        heads_qk = self.heads + self.kv_heads
        qkv = self.qkv(rms_norm(x, *self.norm_in)).view(batch, length, heads_qk + self.kv_heads, self.head_dim)
        v = qkv[:, :, heads_qk:]
        if self.qk_norms is None:
            qk = qkv[:, :, :heads_qk]
        else:  # Qwen3: RMSNorm over each head of q and k before the rotation
            qk = torch.cat([rms_norm(qkv[:, :, : self.heads], *self.qk_norms[0]),
                            rms_norm(qkv[:, :, self.heads: heads_qk], *self.qk_norms[1])], dim=2)
        # Rotary embedding on q and k at once: x cos + rotate_half(x) sin, each product rounded to
        # the dtype before the sum, as transformers does (a fused multiply-add differs in bf16).
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)  # [batch, length, 1, head_dim]
        half = self.head_dim // 2
        qk = torch.mul(qk, cos).add_(torch.cat([-qk[..., half:], qk[..., :half]], dim=-1).mul_(sin))
        q, k = qk[:, :, : self.heads], qk[:, :, self.heads:]
        out, _ = self.attention(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                scaling=self.scaling, sliding_window=self.sliding_window)
        x = x + self.o(out.reshape(batch, length, -1))
        gate_up = self.gate_up(rms_norm(x, *self.norm_post))
        return x.add_(self.down(F.silu(gate_up[..., : self.intermediate]).mul_(gate_up[..., self.intermediate:])))

    def _forward_native(self, x, position_embeddings):
        """`forward` with the element-wise steps in the native kernels. The residual stream `x`
        [batch, length, hidden] is updated in place (transformers' models only hand a layer's
        output to the next layer)."""
        (batch, length, hidden), step = x.shape, self._native_step
        rows = x.view(batch * length, hidden)
        normed = torch.empty_like(rows)
        step("rms_norm", rows, None, self.norm_in[0], self.norm_in[1], normed)
        qkv = self.qkv(normed)
        cos, sin = (t.reshape(batch * length, self.head_dim) for t in position_embeddings)
        q_norm, k_norm = self.qk_norms or ((None, 1e-6), (None, 1e-6))
        step("rotary", qkv, cos, sin, self.heads, self.kv_heads, self.head_dim, q_norm[0], k_norm[0], q_norm[1])
        heads = qkv.view(batch, length, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        reads = read_rows() if self.last and batch == 1 else None
        if reads is None:
            out, _ = self.attention(self, q, k, v, None, scaling=self.scaling, sliding_window=self.sliding_window)
        else:  # no later layer: the rows nobody reads end here (their keys and values are recorded)
            out, index = attention_at_reads(self, q, k, v, self.scaling, self.sliding_window)
            x = rows = rows[index]
            normed = normed[: len(index)]
        count = rows.shape[0]
        step("rms_norm", rows, self.o(out.reshape(count, -1)), self.norm_post[0], self.norm_post[1], normed)
        gate_up = self.gate_up(normed)
        act = torch.empty(count, self.intermediate, dtype=x.dtype, device=x.device)
        step("silu_mul", gate_up, act)
        rows.add_(self.down(act))
        return x if reads is None else x.view(1, count, hidden)

    def _native_step(self, name: str, *args) -> None:
        with torch.profiler.record_function(f"reward_server::{name}"):  # named in profiles (bench.engine_profile)
            getattr(self.native, name)(*args)


class FusedLayers:
    """What `fuse_layers` did, for the log and for benchmarks."""

    def __init__(self, fused: int, total: int, prepacked: bool, reason: str | None, seconds: float,
                 native: bool = False, tiles: bool = False):
        self.fused, self.total, self.prepacked, self.reason, self.seconds = fused, total, prepacked, reason, seconds
        self.native, self.tiles = native, tiles

    def __repr__(self) -> str:
        text = f"{self.fused}/{self.total} decoder layers fused"
        text += " (element-wise steps in the native kernels)" if self.native and self.fused else ""
        if self.tiles:
            text += ", bf16 products on AMX tiles in blocks of a fixed shape (native)"
        elif self.prepacked:
            text += ", weights prepacked for oneDNN (every layer's)"
        return text + (f" (others: {self.reason})" if self.reason else "") + f" in {self.seconds:.1f}s"


def fuse_layers(backbone, attention, device, dtype, prepack: bool = True, native: Any = None) -> FusedLayers:
    """Replace every fusable decoder layer of the backbone (`decoder_layers`) by a `FusedDecoderLayer` calling
    `attention` (the engine's packed attention); prepack the linear layers of the others.

    `native`: the native kernels module (`torch_engine.kernels`) for the element-wise steps, or None.

    `prepack`: prepack wherever oneDNN can (`prepack_available`). Not chosen by timing: a
    choice that could flip between starts would change scores' bits, and oneDNN's product gives a
    row the same bits whatever the rows around it, where MKL's does not (measured: 1 against 3 bit
    patterns for one row computed among 1 to 4,091 rows).
    The transformers layers are dropped (their weights live on in the fused ones).
    """
    started = time.perf_counter()
    layers = decoder_layers(backbone)
    prepack = prepack and prepack_available(device, dtype)
    tiles = tiles_apply(native, dtype)
    reason, fused = None, 0
    for i, layer in enumerate(layers):
        why = fusable(layer)
        if why is not None:
            reason = reason or why
            continue
        layers[i] = FusedDecoderLayer(layer, attention, prepack, native, last=i == len(layers) - 1)
        fused += 1
    if prepack or tiles:  # the layers left as they are: their products on prepacked weights too
        for layer in layers:
            if not isinstance(layer, FusedDecoderLayer):
                prepack_linears(layer, native)
    return FusedLayers(fused, len(layers), prepack, reason, time.perf_counter() - started, native is not None, tiles)
