"""The MoE transformer: a pure ``forward(params, cfg, tokens)`` and an NNX module that holds params.

Taps: with ``return_taps=True`` the forward also returns, for every MoE layer, the routing (expert ids,
weights, router logits) and the down_proj inputs of every routed slot (and of the shared expert).
``perturb`` takes zero-valued arrays (see ``zero_perturbations``) that are added to each routed expert's
output (and to the shared expert's output); the gradient of any loss with respect to them is the
gradient with respect to each expert's output, routing weight included (the kfac-jax trick).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bmoe_jax.config import MoEConfig
from bmoe_jax.nn import gating as G
from bmoe_jax.nn import layers as L
from bmoe_jax.nn import moe as M
from bmoe_jax.nn import rope
from bmoe_jax.nn.linear_attention import gated_deltanet
from bmoe_jax.params import init_params, logical_axes


class MoETaps(NamedTuple):
  """What one MoE layer exposes to ``forward(return_taps=True)``, for every token of the batch.

  Attributes:
    expert_bsk: int32 [b, s, k] expert ids of each token's k routed slots.
    gate_bsk: float32 [b, s, k] their routing weights (after the family's renormalisation and scaling).
    router_logits_bse: float32 [b, s, E] router logits (a Bayesian router's: the logits it gated with).
    down_in_bskf: [b, s, k, f] each routed slot's down_proj input ``act(x W_gate) * (x W_up)``
      (f = ``moe_intermediate_size``).
    shared_in_bsf: [b, s, f_s] the shared expert's down_proj input (f_s = ``shared_expert_size``); None
      without a shared expert.
    router_aux_bs: float32 [b, s] a Bayesian router's per-token regulariser (KL of mfvr/fcvr, ``-log T`` of
      vtsr averaged over its temperatures, 0 for the other kinds); None with the deterministic router.
    router_in_bsd: [b, s, d] the router's input u (the MoE block's normed input, in the states' dtype).
  """
  expert_bsk: jax.Array
  gate_bsk: jax.Array
  router_logits_bse: jax.Array
  down_in_bskf: jax.Array  # routed down_proj inputs act(x W_gate) * (x W_up), per slot
  shared_in_bsf: jax.Array | None  # shared-expert down_proj input (None without shared experts)
  router_aux_bs: jax.Array | None = None  # a Bayesian router's per-token regulariser (KL, -log T); else None
  router_in_bsd: jax.Array | None = None  # the router's input u (the MoE block's normed input)


class ForwardOutput(NamedTuple):
  """What ``forward`` returns.

  Attributes:
    logits: float32 [b, s, vocab]; [b, vocab] with [b] ``logit_positions_b``, [b, t, vocab] with [b, t] ones;
      None with ``stop_layer``.
    hidden_states: with ``return_hidden``, the input states of the first layer run (the embeddings, or
      ``states_bsd``) then each layer's output, all [b, s, d], the last one final-normed; with ``stop_layer``,
      ``(input states of stop_layer,)``; else None.
    taps: with ``return_taps``, ``{layer: MoETaps}`` for every MoE layer run; else None.
  """
  logits: jax.Array  # [b, s, vocab], or [b, vocab] when logit_positions_b is given
  hidden_states: tuple[jax.Array, ...] | None  # embeddings, then each layer's output; last is normed
  taps: dict[int, MoETaps] | None


def zero_perturbations(cfg: MoEConfig, batch: int, seq: int, dtype=jnp.float32,
                       blocks=None) -> dict[int, dict]:
  """Zero perturbation inputs: routed [b, s, k, d] and shared [b, s, d] per MoE layer, or only for
  ``blocks``; for ``forward(perturb=)``, whose gradients are those of the perturbed blocks' outputs.
  Gradients then flow back only as far as the lowest perturbed layer, so perturb only the layers you need.

  Args:
    cfg: the model's config (k = ``num_experts_per_tok``, d = ``hidden_size``, E = ``num_experts``).
    batch: b, the batch size of the forward to perturb.
    seq: s, its sequence length.
    dtype (jax.typing.DTypeLike): dtype of the "routed" and "shared" arrays (the "router" ones are always
      float32, as the logits).
    blocks (Sequence[tuple[int, str]] | None): (layer, "routed" | "shared" | "router") pairs to perturb; None:
      "routed" and (with a shared expert) "shared" of every MoE layer, no "router".

  Returns:
    ``{layer: {kind: zeros}}``: "routed" [b, s, k, d], added to each routed slot's expert output before its
      routing weight; "shared" [b, s, d], added to the shared expert's output (before its sigmoid gate, if any);
      "router" float32 [b, s, E], added to the router logits (deterministic router only).
  """
  if blocks is None:
    blocks = [(i, kind) for i in cfg.moe_layer_ids
              for kind in (("routed", "shared") if cfg.shared_expert_size else ("routed",))]
  out: dict[int, dict] = {}
  for layer, kind in blocks:
    if kind == "routed":
      arr = jnp.zeros((batch, seq, cfg.num_experts_per_tok, cfg.hidden_size), dtype)
    elif kind == "router":
      arr = jnp.zeros((batch, seq, cfg.num_experts), jnp.float32)
    else:
      arr = jnp.zeros((batch, seq, cfg.hidden_size), dtype)
    out.setdefault(layer, {})[kind] = arr
  return out


def moe_block(p: dict, cfg: MoEConfig, x_bsd: jax.Array, *, expert_impl: str = "sorted",
              chunk_rows: int | None = None, perturb: dict | None = None, router=None,
              train_router: bool = False) -> tuple[jax.Array, MoETaps]:
  """One MoE MLP: the routed experts (plus the optionally gated shared expert) of the normed states.

  Args:
    p: the layer's MLP parameters: ``router`` {``kernel`` [d, E], optional selection ``bias`` [E] and
      ``logit_bias`` [E]}, ``experts`` {``w_gate``, ``w_up`` [E, d, f], ``w_down`` [E, f, d], optional biases
      (``nn.moe.routed_experts``)}, optional ``shared`` and ``shared_gate``.
    cfg: the model's config (k = ``num_experts_per_tok``, the gating rule, ``hidden_act``).
    x_bsd: [b, s, d] the MLP's normed input.
    expert_impl: "dense" (reference), "sorted" (fast on CPU) or "ragged" (GPU/TPU); ``nn.moe``.
    chunk_rows: row chunk of the "sorted" path; None: ``expert_rows.default_chunk_rows``.
    perturb: this layer's zero perturbations (``zero_perturbations``: "routed", "shared", "router"); None: none.
      A "router" perturbation needs ``router=None``.
    router (Callable | None): a routing plan's router for this layer (``RoutingPlan.router_fn``:
      ``router(x_nd, kernel_de, gating, k, train, bias_e) -> (Routing, aux_n)``); None runs the deterministic one.
    train_router: passed to ``router`` as ``train`` (one sample per token, as in training); ignored without it.

  Returns:
    (the MLP's output [b, s, d], this layer's ``MoETaps``).
  """
  b, s, d = x_bsd.shape
  x_nd = x_bsd.reshape(b * s, d)
  k = cfg.num_experts_per_tok
  aux_n = None
  offset = None if perturb is None or "router" not in perturb else perturb["router"].reshape(b * s, -1)
  if router is None:
    routing = G.route_of(cfg, x_nd, p["router"], offset)
  elif offset is not None:
    raise ValueError("a router-logit perturbation (Laplace router block) needs the deterministic router in its layer")
  elif "logit_bias" in p["router"]:
    raise ValueError("the Bayesian routers read the router weight alone; this model's routers are affine "
                     "(router/logit_bias, GPT-OSS) and are not supported by them yet: use the deterministic router")
  else:
    routing, aux_n = router(x_nd, p["router"]["kernel"], G.Gating.of(cfg), k, train_router, p["router"].get("bias"))
  perturb_nkd = None if perturb is None or "routed" not in perturb else perturb["routed"].reshape(b * s, k, d)
  x_in_nd, gate_nk = x_nd, routing.gate_nk
  if cfg.router_on_input:  # Llama-4: the top-1 score scales the expert's input; its output enters unweighted
    x_in_nd, gate_nk = x_nd * gate_nk.astype(x_nd.dtype), jnp.ones_like(gate_nk)  # taps keep the scores
  out_nd, h_nkf = M.routed_experts(expert_impl, x_in_nd, routing.expert_nk, gate_nk,
                                   p["experts"], L.expert_act(cfg), perturb_nkd, chunk_rows)
  shared_in = None
  if "shared" in p:
    shared_in = L.gated_hidden(p["shared"], x_nd, cfg.hidden_act)
    y_nd = L.dot(shared_in, p["shared"]["w_down"])
    if perturb is not None and "shared" in perturb:
      y_nd = y_nd + perturb["shared"].reshape(b * s, d).astype(y_nd.dtype)
    if "shared_gate" in p:
      y_nd = jax.nn.sigmoid(L.dot(x_nd, p["shared_gate"]["kernel"])) * y_nd
    out_nd = out_nd + y_nd
    shared_in = shared_in.reshape(b, s, -1)
  taps = MoETaps(routing.expert_nk.reshape(b, s, k), routing.gate_nk.reshape(b, s, k),
                 routing.logits_ne.reshape(b, s, -1), h_nkf.reshape(b, s, k, -1), shared_in,
                 None if aux_n is None else aux_n.reshape(b, s), x_bsd)
  return out_nd.reshape(b, s, d), taps


def forward(params: dict[str, Any], cfg: MoEConfig, tokens_bs: jax.Array,
            attention_mask_bs: jax.Array | None = None, positions_bs: jax.Array | None = None, *,
            expert_impl: str = "sorted", chunk_rows: int | None = None,
            perturb: dict[int, dict] | None = None, return_taps: bool = False,
            return_hidden: bool = False, logit_positions_b: jax.Array | None = None,
            start_layer: int = 0, states_bsd: jax.Array | None = None,
            stop_layer: int | None = None, segments_bs: jax.Array | None = None,
            routing=None) -> ForwardOutput:
  """Logits of a batch of token ids.

  Args:
    params: the parameter tree (see ``bmoe_jax.params``), with the routers' state under "routing" when
      ``routing`` is given (``routing.attach``).
    cfg: the model's config.
    tokens_bs: int token ids [b, s] (with ``start_layer`` > 0 only their shape is read).
    attention_mask_bs: 1 for real tokens, 0 for padding (left or right); None: no padding.
    positions_bs: RoPE positions; default ``arange(s)`` as transformers' forward. With left padding
      pass ``cumsum(mask) - 1`` for positions that ignore the padding.
    expert_impl: "dense" (reference), "sorted" (fast on CPU) or "ragged" (GPU/TPU).
    chunk_rows: row chunk of the "sorted" expert path; None: ``expert_rows.default_chunk_rows``.
    perturb: zero perturbations per MoE layer (``zero_perturbations``), for expert-output gradients.
    return_taps: also return every MoE layer's ``MoETaps`` (routing, down_proj inputs, router input).
    return_hidden: also return the hidden states: the first layer's input, then each layer's output.
    logit_positions_b: if given, only the logits at these positions are computed: [b] -> [b, vocab];
      [b, t] -> [b, t, vocab].
    start_layer: start at this layer, from its input states ``states_bsd`` (``prefix_states``), e.g. to
      fine-tune the top layers on cached activations of the frozen ones.
    states_bsd: the input states [b, s, d] of layer ``start_layer`` (with ``start_layer`` > 0).
    stop_layer: stop before this layer and return its input states as ``hidden_states[0]`` (no logits).
    segments_bs: packed continuations of a shared context (``nn.layers.attention_mask``): 0 for the
      context, c > 0 for continuation c, which sees only the context and itself. Pass their RoPE
      ``positions_bs`` too (each continuation's positions continue the context's).
    routing (RoutingPlan | None): a ``bmoe_jax.routing.RoutingPlan`` (Bayesian routers by layer, their state in
      ``params``); its ``router_fn`` gives each layer's router, run in training mode when ``routing.train``.
      None: every layer routes deterministically.

  Returns:
    ``ForwardOutput(logits, hidden_states, taps)``: float32 logits [b, s, vocab] (or at ``logit_positions_b``;
      None with ``stop_layer``), the hidden states (``return_hidden``; with ``stop_layer`` always the stop layer's
      input states), the MoE layers' taps (``return_taps``).
  """
  x0_bsd, positions_bs, rope_in = _inputs(params, cfg, tokens_bs, positions_bs, start_layer, states_bsd, segments_bs)
  masks = functools.partial(L.layer_mask, attention_mask_bs, tokens_bs.shape[1], segments_bs, positions_bs)
  x_bsd, hidden, taps = _layers(params, cfg, x0_bsd, rope_in, masks,
                                range(start_layer, cfg.num_layers if stop_layer is None else stop_layer),
                                dict(expert_impl=expert_impl, chunk_rows=chunk_rows), perturb, routing)
  hidden = [x0_bsd] + hidden if return_hidden else None
  if stop_layer is not None:
    return ForwardOutput(None, (x_bsd,), taps if return_taps else None)
  x_bsd = L.block_norm(params["final_norm"], x_bsd, cfg)
  if return_hidden:
    hidden[-1] = x_bsd
  return ForwardOutput(_head(params, cfg, x_bsd, logit_positions_b), tuple(hidden) if return_hidden else None,
                       taps if return_taps else None)


def _layers(params, cfg: MoEConfig, x_bsd, rope_in, mask_of, layers, impl: dict, perturb, routing):
  """(output states, [each layer's output], {MoE layer: taps}) of the decoder ``layers`` from ``x_bsd``;
  ``mask_of(nn.layers.mask_key(cfg, i))``: layer i's mask (built once per distinct key)."""
  masks, hidden, taps = {}, [], {}
  for i in layers:
    w = L.mask_key(cfg, i)
    if w not in masks:
      masks[w] = mask_of(w)
    x_bsd, tap = _decoder_layer(params["layers"][i], cfg, i, x_bsd, rope_in, masks[w], impl["expert_impl"],
                                impl["chunk_rows"], None if perturb is None else perturb.get(i),
                                None if routing is None else routing.router_fn(params, i),
                                routing is not None and routing.train)
    if tap is not None:
      taps[i] = tap
    hidden.append(x_bsd)
  return x_bsd, hidden, taps


class RopeIn(NamedTuple):
  """A forward's position inputs: the cos/sin tables [b, s, c] and the NoPE layers' query scale [b, s] (None:
  not scaled)."""
  cos_bsc: jax.Array
  sin_bsc: jax.Array
  nope_q_bs: jax.Array | None


def _inputs(params, cfg: MoEConfig, tokens_bs, positions_bs, start_layer: int, states_bsd, segments_bs):
  """(first layer's input states, RoPE positions, ``RopeIn``): embeddings, or the cached states of
  ``start_layer``; positions default to ``arange(s)``. The NoPE temperature (Llama-4) is of the index, as
  transformers', or of the positions for packed continuations (their index in the unpacked sequence)."""
  b, s = tokens_bs.shape
  if segments_bs is not None and positions_bs is None:
    raise ValueError("segments_bs (packed continuations) needs positions_bs: each continuation's RoPE "
                     "positions continue its context's")
  if segments_bs is not None and cfg.linear_on_any:
    raise ValueError("segments_bs (packed continuations) needs attention in every layer: a linear-attention layer "
                     "(Gated DeltaNet) reads its row as one sequence; score each continuation in its own row")
  if positions_bs is None:
    positions_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if start_layer:
    if states_bsd is None or states_bsd.shape[:2] != (b, s):
      raise ValueError(f"start_layer={start_layer} needs states_bsd [b, s, d] = the input of that layer "
                       f"(prefix_states), got {None if states_bsd is None else states_bsd.shape}")
    x_bsd = states_bsd
  else:
    x_bsd = params["embed"]["embedding"][tokens_bs]
    if cfg.embedding_multiplier != 1.0:
      x_bsd = x_bsd * jnp.asarray(cfg.embedding_multiplier, x_bsd.dtype)
  cos_bsc, sin_bsc = rope.position_tables(cfg, positions_bs)
  nope_q_bs = None
  if cfg.nope_attn_scale and not all(cfg.rope_on(i) for i in range(cfg.num_layers)):
    at_bs = positions_bs if segments_bs is not None else jnp.broadcast_to(jnp.arange(s), (b, s))
    floors_bs = jnp.floor((at_bs.astype(jnp.float32) + 1.0) / cfg.nope_floor_scale)
    nope_q_bs = jnp.log1p(floors_bs) * cfg.nope_attn_scale + 1.0
  return x_bsd, positions_bs, RopeIn(cos_bsc, sin_bsc, nope_q_bs)


def _decoder_layer(lp, cfg: MoEConfig, i: int, x_bsd, rope_in: RopeIn, mask, expert_impl, chunk_rows, perturb,
                   router=None, train_router: bool = False):
  """One pre-norm decoder layer: (output states, the MoE taps or None for a dense layer)."""
  x_bsd, h_bsd = _attention_half(lp, cfg, i, x_bsd, rope_in, mask)
  if not cfg.moe_layers[i]:
    return _residual(cfg, x_bsd, L.gated_mlp(lp["mlp"], h_bsd, cfg.hidden_act)), None
  y_bsd, tap = moe_block(lp["mlp"], cfg, h_bsd, expert_impl=expert_impl, chunk_rows=chunk_rows, perturb=perturb,
                         router=router, train_router=train_router)
  return _residual(cfg, x_bsd, y_bsd), tap


def _residual(cfg: MoEConfig, x_bsd, y_bsd):
  """x + y, or x + residual_multiplier * y (Granite)."""
  if cfg.residual_multiplier == 1.0:
    return x_bsd + y_bsd
  return x_bsd + y_bsd * jnp.asarray(cfg.residual_multiplier, y_bsd.dtype)


def _attention_half(lp, cfg: MoEConfig, i: int, x_bsd, rope_in: RopeIn, mask):
  """(residual stream after attention, the normed MLP input) of decoder layer ``i``."""
  h_bsd = L.block_norm(lp["attn_norm"], x_bsd, cfg)
  if cfg.linear_on(i):
    a_bsd = gated_deltanet(lp["linear_attn"], h_bsd, mask, cfg.rms_norm_eps, cfg.hidden_act)
  elif cfg.mla:
    a_bsd = L.mla_attention(lp["attn"], h_bsd, rope_in.cos_bsc, rope_in.sin_bsc, mask, cfg.qk_nope_head_dim,
                            rope.mla_scale(cfg), cfg.rope_interleave, cfg.index_topk)
  else:
    on = cfg.rope_on(i)
    a_bsd = L.attention(lp["attn"], h_bsd, rope_in.cos_bsc if on else None, rope_in.sin_bsc if on else None, mask,
                        cfg.rms_norm_eps, cfg.qkv_clip, cfg.attention_multiplier, cfg.rope_interleave,
                        l2_norm=on and cfg.qk_norm == "l2", q_scale_bs=None if on else rope_in.nope_q_bs,
                        norm_offset=cfg.norm_unit_offset)
  x_bsd = _residual(cfg, x_bsd, a_bsd)
  return x_bsd, L.block_norm(lp["mlp_norm"], x_bsd, cfg)


def mlp_inputs(params, cfg: MoEConfig, tokens_bs, attention_mask_bs=None, *, layers, start_layer: int = 0,
               states_bsd: jax.Array | None = None) -> dict[int, jax.Array]:
  """{layer: [b, s, d]}: the normed input of each listed layer's MLP (calibration statistics, e.g. for
  carving a dense FFN into experts, ``convert.carve``, or healing it, ``convert.heal``). Runs the layers up
  to the highest listed one, from the embeddings or from ``states_bsd``, the input of ``start_layer``
  (deterministic routing, "sorted" experts, RoPE positions ``arange(s)``).

  Args:
    params (dict): the parameter tree (see ``bmoe_jax.params``).
    cfg: the model's config.
    tokens_bs (jax.Array): int token ids [b, s] (with ``start_layer`` > 0 only their shape is read).
    attention_mask_bs (jax.Array | None): [b, s] 1 for real tokens, 0 for padding; None: no padding.
    layers (Collection[int]): the layer ids (dense or MoE) whose MLP inputs to return; ids below
      ``start_layer`` are skipped.
    start_layer: the first layer to run (0: from the embeddings).
    states_bsd: [b, s, d] the input states of ``start_layer`` (``prefix_states``); needed when it is > 0.

  Returns:
    ``{layer: [b, s, d]}``: each listed layer's MLP input (its residual stream after attention, RMS-normed).
  """
  s = tokens_bs.shape[1]
  x_bsd, _, rope_in = _inputs(params, cfg, tokens_bs, None, start_layer, states_bsd, None)
  out = {}
  for i in range(start_layer, max(layers) + 1):
    mask = L.layer_mask(attention_mask_bs, s, None, None, L.mask_key(cfg, i))
    if i in layers:
      out[i] = _attention_half(params["layers"][i], cfg, i, x_bsd, rope_in, mask)[1]
    x_bsd, _ = _decoder_layer(params["layers"][i], cfg, i, x_bsd, rope_in, mask, "sorted", None, None)
  return out


def _head(params, cfg: MoEConfig, x_bsd, logit_positions_b=None):
  """float32 logits of the final normed states (only at ``logit_positions_b`` when given: [b] positions
  give [b, vocab], [b, t] positions [b, t, vocab])."""
  if logit_positions_b is not None and logit_positions_b.ndim == 2:
    x_bsd = jnp.take_along_axis(x_bsd, logit_positions_b[:, :, None], axis=1)
  elif logit_positions_b is not None:
    x_bsd = jnp.take_along_axis(x_bsd, logit_positions_b[:, None, None], axis=1)[:, 0]
  head_dv = params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  logits = L.dot(x_bsd, head_dv)
  if "bias" in params.get("lm_head", {}):  # Phi-3.5-MoE
    logits = logits + params["lm_head"]["bias"]
  if cfg.logits_scaling != 1.0:  # Granite
    logits = logits / jnp.asarray(cfg.logits_scaling, logits.dtype)
  return logits.astype(jnp.float32)


def prefix_states(params, cfg: MoEConfig, tokens_bs, attention_mask_bs=None, positions_bs=None, *,
                  stop_layer: int, **kw) -> jax.Array:
  """[b, s, d]: the input of layer ``stop_layer`` (for ``forward(start_layer=, states_bsd=)``).

  Args:
    params (dict): the parameter tree (see ``bmoe_jax.params``).
    cfg: the model's config.
    tokens_bs (jax.Array): int token ids [b, s].
    attention_mask_bs (jax.Array | None): [b, s] 1 for real tokens, 0 for padding; None: no padding.
    positions_bs (jax.Array | None): [b, s] RoPE positions; None: ``arange(s)`` (see ``forward``).
    stop_layer: the layer whose input to return, 0 (the embeddings) to ``cfg.num_layers`` (the last layer's
      output, before the final norm).
    kw (Any): further keyword arguments of ``forward`` (e.g. ``expert_impl``, ``segments_bs``, ``routing``).

  Returns:
    [b, s, d] the input states of layer ``stop_layer``.
  """
  if not 0 <= stop_layer <= cfg.num_layers:
    raise ValueError(f"stop_layer={stop_layer}: expected 0..{cfg.num_layers}")
  return forward(params, cfg, tokens_bs, attention_mask_bs, positions_bs, stop_layer=stop_layer,
                 **kw).hidden_states[0]


def _as_nnx(tree, axes):
  if isinstance(tree, dict):
    return nnx.Dict({k: _as_nnx(v, axes[k]) for k, v in tree.items()})
  if isinstance(tree, (list, tuple)):
    return nnx.List([_as_nnx(v, a) for v, a in zip(tree, axes)])
  return nnx.Param(tree, logical_axes=axes)


def _pure(tree):
  """nnx state (int-keyed lists) back to the plain params tree (lists for layers)."""
  if isinstance(tree, dict):
    if tree and all(isinstance(k, int) for k in tree):
      return [_pure(tree[k]) for k in sorted(tree)]
    return {k: _pure(v) for k, v in tree.items()}
  return tree


class MoEModel(nnx.Module):
  """Holds the parameters (each an ``nnx.Param`` with ``logical_axes`` metadata); numerics are
  ``forward``. ``MoEModel(cfg, rngs=nnx.Rngs(0))`` initialises randomly; ``params=`` wraps a tree."""

  def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None,
               dtype=jnp.float32):
    if params is None:
      if rngs is None:
        raise ValueError("MoEModel needs rngs= (random init) or params= (a converted checkpoint)")
      params = init_params(cfg, rngs.params(), dtype)
    self.cfg = cfg
    self.params = _as_nnx(params, logical_axes(cfg))

  def pure_params(self) -> dict[str, Any]:
    return _pure(nnx.to_pure_dict(nnx.state(self.params, nnx.Param)))

  def __call__(self, tokens_bs, attention_mask_bs=None, positions_bs=None, **kw) -> ForwardOutput:
    return forward(self.pure_params(), self.cfg, tokens_bs, attention_mask_bs, positions_bs, **kw)
