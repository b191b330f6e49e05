"""Llama-4 text models (transformers' ``llama4_text``: the language model of Llama-4 Scout and Maverick).
RoPE on interleaved pairs (default or llama3 frequencies) on most layers and none on every ``no_rope_layer_interval``-th
(NoPE, ``no_rope_layers``), whose queries are scaled by the attention temperature (``attn_temperature_tuning``,
``attn_scale``, ``floor_scale``); chunked attention on the RoPE layers (``attention_chunk_size``, ``layer_types``);
a weightless RMSNorm of q and k on the RoPE layers (``use_qk_norm``); MoE every ``interleave_moe_layer_step``-th
layer (or ``moe_layers``), else a dense MLP of ``intermediate_size_mlp``. The MoE: a top-1 router whose sigmoid
score scales the expert's input, one ungated shared expert; experts fused as ``gate_up_proj`` [E, d, 2f] (gate,
then up) and ``down_proj`` [E, f, d]. The multimodal ``llama4`` checkpoints are refused by model_type: their
``text_config`` is this family."""

from __future__ import annotations

import numpy as np

from convert.family_table import BASE_RULES, EXPERTS, LAYER, Family, Rule

_FF = LAYER + r"feed_forward\."


def _layer_pattern(g, n: int, name: str, values, default) -> list:
  values = default if values is None else list(values)
  if len(values) != n:
    g.fail(f"{name} has {len(values)} entries, expected num_hidden_layers={n}")
  return values


def _build_llama4_text(g, common: dict) -> dict:
  n, k = common["num_layers"], int(g("num_experts_per_tok"))
  if k != 1:
    g.fail(f"num_experts_per_tok={k}: Llama-4's router scales the expert's input by its score, supported for top-1 "
           "(every released Llama-4)")
  interval, step = int(g("no_rope_layer_interval")), int(g("interleave_moe_layer_step"))
  if interval < 1 or step < 1:
    g.fail(f"no_rope_layer_interval={interval} and interleave_moe_layer_step={step} must be >= 1")
  rope = _layer_pattern(g, n, "no_rope_layers", g("no_rope_layers") or None,
                        [int((i + 1) % interval != 0) for i in range(n)])
  moe = set(range(step - 1, n, step) if g("moe_layers") is None else g("moe_layers"))
  if not moe <= set(range(n)):
    g.fail(f"moe_layers={sorted(moe)} names layers past num_hidden_layers={n}")
  chunk = g("attention_chunk_size")
  types = _layer_pattern(g, n, "layer_types", g("layer_types"),
                         ["chunked_attention" if r and chunk is not None else "full_attention" for r in rope])
  if any(t not in ("chunked_attention", "full_attention") for t in types) or (
      "chunked_attention" in types and not chunk):
    g.fail(f"layer_types={types} with attention_chunk_size={chunk!r}: expected full_attention or "
           "chunked_attention (the latter with a positive chunk size)")
  f = int(g("intermediate_size"))
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=int(g("intermediate_size_mlp")), moe_intermediate_size=f,
      num_experts=int(g("num_local_experts")), num_experts_per_tok=1, moe_layers=tuple(i in moe for i in range(n)),
      shared_expert_size=f, shared_expert_gate=False, router_scoring="sigmoid", norm_topk_prob=False,
      router_on_input=True, qkv_bias=bias, attn_out_bias=bias, qk_norm="l2" if g("use_qk_norm") else "none",
      rope_interleave=True, rope_layers=tuple(bool(r) for r in rope),
      attn_chunks=tuple(int(chunk) if t == "chunked_attention" else 0 for t in types),
      nope_attn_scale=float(g("attn_scale")) if g("attn_temperature_tuning") else 0.0,
      nope_floor_scale=float(g("floor_scale")))


LLAMA4_TEXT = Family(
    name="llama4_text", model_types=("llama4_text",), architectures=("Llama4ForCausalLM",),
    handled=frozenset({"intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
                       "moe_layers", "interleave_moe_layer_step", "use_qk_norm", "no_rope_layers",
                       "no_rope_layer_interval", "attention_chunk_size", "layer_types", "attn_temperature_tuning",
                       "floor_scale", "attn_scale", "attention_bias"}),
    # router_jitter_noise: training-time noise on the router (transformers' Llama-4 never applies it)
    ignored=frozenset({"router_jitter_noise"}),
    # transformers' Llama4TextConfig defaults (Maverick's text sizes)
    defaults=dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                  num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                  hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=500000.0, rope_scaling=None, rope_parameters=None, num_experts_per_tok=1,
                  num_local_experts=16, moe_layers=None, interleave_moe_layer_step=1, use_qk_norm=True,
                  no_rope_layers=None, no_rope_layer_interval=4, attention_chunk_size=8192, layer_types=None,
                  attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, attention_bias=False),
    build=_build_llama4_text,
    rules=BASE_RULES + (
        Rule(_FF + r"(?P<proj>gate|up|down)_proj\.weight", "layers/{layer}/mlp/w_{proj}", "linear"),
        Rule(_FF + r"router\.weight", "layers/{layer}/mlp/router/kernel", "linear"),
        Rule(_FF + r"experts\.gate_up_proj", (EXPERTS + "w_gate", EXPERTS + "w_up"), "halves"),
        Rule(_FF + r"experts\.down_proj", EXPERTS + "w_down", "tensor"),
        Rule(_FF + r"shared_expert\.(?P<proj>gate|up|down)_proj\.weight", "layers/{layer}/mlp/shared/w_{proj}",
             "linear"),
    ),
    aliases=(("num_experts", "num_local_experts"),))


def hf_config(cfg, need) -> dict:
  """The ``llama4_text`` config.json of ``cfg`` (the inverse of the gate above; ``need(cond, msg)`` refuses what has
  no equivalent), without the model's common fields (``export._common`` adds them)."""
  need(cfg.router_on_input and cfg.num_experts_per_tok == 1 and cfg.router_scoring == "sigmoid"
       and not cfg.norm_topk_prob and cfg.routed_scaling_factor == 1.0,
       "Llama-4's router: a top-1 sigmoid score scaling the expert's input")
  need(cfg.shared_expert_size == cfg.moe_intermediate_size and not cfg.shared_expert_gate,
       "one ungated shared expert as wide as the routed ones")
  need(cfg.rope_interleave and cfg.qk_norm in ("l2", "none") and cfg.qkv_bias == cfg.attn_out_bias
       and not cfg.attn_windows, "RoPE on interleaved pairs, the weightless q/k norm or none, attention bias on q, k, "
       "v, o together, no sliding window")
  chunks = set(cfg.attn_chunks or (0,)) - {0}
  need(len(chunks) <= 1, f"attention chunks differ across layers: {sorted(chunks)}")
  rope = [cfg.rope_on(i) for i in range(cfg.num_layers)]
  need(cfg.nope_attn_scale == 0 or not all(rope), "an attention temperature without NoPE layers")
  need(float(cfg.nope_floor_scale).is_integer(), f"nope_floor_scale={cfg.nope_floor_scale} (floor_scale is an integer)")
  return dict(architectures=["Llama4ForCausalLM"], model_type="llama4_text", intermediate_size=cfg.moe_intermediate_size,
              intermediate_size_mlp=cfg.intermediate_size or cfg.moe_intermediate_size,
              num_local_experts=cfg.num_experts, num_experts_per_tok=1,
              moe_layers=[i for i, m in enumerate(cfg.moe_layers) if m], use_qk_norm=cfg.qk_norm == "l2",
              no_rope_layers=[int(r) for r in rope], attention_chunk_size=max(chunks, default=None),
              layer_types=["chunked_attention" if cfg.chunk(i) else "full_attention" for i in range(cfg.num_layers)],
              attn_temperature_tuning=cfg.nope_attn_scale > 0, attn_scale=cfg.nope_attn_scale or 0.1,
              floor_scale=int(cfg.nope_floor_scale), attention_bias=cfg.qkv_bias)


def hf_expert_tensors(cfg, experts_of) -> dict:
  """transformers' fused expert tensors (``gate_up_proj`` [E, d, 2f]: gate, then up; ``down_proj`` [E, f, d]) from
  ``experts_of(layer)`` (the layer's ``experts`` dict of numpy arrays)."""
  out = {}
  for i in cfg.moe_layer_ids:
    w, pre = experts_of(i), f"model.layers.{i}.feed_forward.experts."
    out[pre + "gate_up_proj"] = np.concatenate([w["w_gate"], w["w_up"]], -1)
    out[pre + "down_proj"] = w["w_down"]
  return out
