"""The strict config gate accepts the real hub config.json files of the target models, and the
parameter counts it implies match the published model sizes."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import bmoe_jax as B
from convert import parse_hf_config

HUB = Path(__file__).parent / "hub_configs"
# (file, family, published total params, published activated params, MoE layers), in billions. The activated
# count includes the embeddings unless the row's name is in ACTIVE_WITHOUT_EMBEDDING. The files are the hub's
# config.json of each model (written from the hub pages; no hub access at test time).
PUBLISHED = [
    ("qwen1.5-moe-a2.7b.json", "qwen2_moe", 14.3, 2.7, 24),
    ("deepseek-moe-16b-base.json", "deepseek_v1", 16.4, 2.8, 27),
    ("mixtral-8x7b-v0.1.json", "mixtral", 46.7, 12.9, 32),
    ("olmoe-1b-7b-0924.json", "olmoe", 6.9, 1.3, 16),  # allenai/OLMoE-1B-7B-0924: "1B active / 7B total", paper 6.9B / 1.3B
    ("qwen3-30b-a3b.json", "qwen3_moe", 30.5, 3.3, 48),  # Qwen/Qwen3-30B-A3B model card: 30.5B / 3.3B activated
    ("granite-3.1-3b-a800m.json", "granitemoe", 3.3, 0.8, 32),  # ibm-granite: "3.3B total, 800M active"
    # deepseek-ai/DeepSeek-V2-Lite: "15.7B total parameters, 2.4B activated" (we count 2.45B without the input
    # embedding, 2.66B with it)
    ("deepseek-v2-lite.json", "deepseek_v2", 15.7, 2.4, 26),
    # deepseek-ai/DeepSeek-V3: "671B total, 37B activated" (+14B of multi-token-prediction module, not part of
    # the causal LM's forward); 37B is rounded to 1B, hence the wider tolerance (we count 671.03B / 37.55B).
    ("deepseek-v3.json", "deepseek_v3", 671.0, 37.0, 58),
    # deepseek-ai/DeepSeek-V3.2-Exp: V3's sizes ("671B total, 37B activated" in its report; the hub's 685B counts the
    # MTP module) plus a lightning indexer per layer (61 x 13.96M = 0.85B): we count 671.88B / 38.40B, the indexers
    # beyond the rounded published figures, hence the wider tolerances.
    ("deepseek-v3.2-exp.json", "deepseek_v32", 671.0, 37.0, 58),
    # zai-org/GLM-4.5-Air and GLM-4.5 (tech report, arXiv 2508.06471: 106B / 12B and 355B / 32B activated),
    # counted without the input embedding and the LM head (0.62B each for Air, 0.78B for GLM-4.5): Air 105.61B /
    # 12.18B, GLM-4.5 32.08B activated. GLM-4.5's total is 351.30B without its multi-token-prediction layer
    # (skipped: not part of the causal LM) and 355.29B with it (3.99B), so the published 355B counts it while
    # Air's 106B does not (107.98B with it); the wider tolerance on GLM-4.5's total says so.
    ("glm-4.5-air.json", "glm4_moe", 106.0, 12.0, 45),
    ("glm-4.5.json", "glm4_moe", 355.0, 32.0, 89),
    # MiniMaxAI/MiniMax-M2: "230 billion total parameters with 10 billion active"; we count 228.69B total and 9.80B
    # activated without the embedding and the LM head (0.62B each). The file holds the release's keys (attention
    # type per layer, q/k norm type, scoring, routing bias, MTP modules), as far as they are known here.
    ("minimax-m2.json", "minimax_m2", 230.0, 10.0, 62),
    # baidu/ERNIE-4.5-21B-A3B-PT ("21B total, 3B activated") and ERNIE-4.5-300B-A47B-PT ("300B / 47B"), the keys
    # transformers saves: 21.83B / 3.09B and 299.48B / 47.08B without the embedding (tied in the 21B model); the 21B
    # model's total is stated to the billion below (21.8)
    ("ernie-4.5-21b-a3b.json", "ernie4_5_moe", 21.0, 3.0, 27),
    ("ernie-4.5-300b-a47b.json", "ernie4_5_moe", 300.0, 47.0, 51),
    # openai/gpt-oss-20b and gpt-oss-120b (model card, arXiv 2508.10925: 20.91B / 3.61B and 116.83B / 5.13B active,
    # the active counts without the input embedding): ours 20.91B / 3.61B and 116.83B / 5.13B. The files hold the
    # release's keys (its legacy experts_per_token and initial_context_length, mxfp4 quantization_config) as far
    # as they are known here.
    ("gpt-oss-20b.json", "gpt_oss", 20.91, 3.61, 24),
    ("gpt-oss-120b.json", "gpt_oss", 116.83, 5.13, 36),
    # meta-llama/Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E (model card: 17B activated, 109B and 400B
    # total): their text models (text_config, the keys as far as known here) count 107.77B / 17.17B and 400.71B /
    # 17.18B; Scout's published total counts the whole multimodal model (vision encoder and projector), which the
    # text model leaves out, hence its wider tolerance.
    ("llama-4-scout-17b-16e-text.json", "llama4_text", 109.0, 17.0, 48),
    ("llama-4-maverick-17b-128e-text.json", "llama4_text", 400.0, 17.0, 24),
    # Qwen/Qwen3-Next-80B-A3B-Instruct ("80B total, 3B activated"): the release's tensors outside the
    # multi-token-prediction module hold 79,674,391,296 parameters, 3,874,929,408 of them active per token (the
    # routed experts counted at 10 of 512) -- ours to the parameter, hence the tight tolerance.
    ("qwen3-next-80b-a3b-instruct.json", "qwen3_next", 79.674391296, 3.874929408, 48),
    # Qwen/Qwen3.5-35B-A3B ("35B total, 3B activated"): its text model (text_config, the keys as far as known here)
    # counts 34.66B / 2.95B without the input embedding; the published total also counts the vision encoder and the
    # multi-token-prediction layer, which the text model leaves out, hence its wider tolerance.
    ("qwen3.5-35b-a3b-text.json", "qwen3_5_moe_text", 35.0, 3.0, 40),
    # microsoft/Phi-3.5-MoE-instruct ("41.9B total, 6.6B active"): ours 41.87B / 6.64B. The file holds the release's
    # keys as far as known here; its longrope factor lists are placeholders of the right length (64 ones), which
    # do not enter the counts.
    ("phi-3.5-moe-instruct.json", "phimoe", 41.9, 6.6, 32),
]
# the vocabulary matrices a row's published counts leave out: 1 the input embedding, 2 the embedding and the
# LM head; none for the active count of the other rows. Granite: 0.806B + 0.076B tied.
WITHOUT_VOCAB = {"granite-3.1-3b-a800m.json": (0, 1), "deepseek-v2-lite.json": (0, 1), "glm-4.5-air.json": (2, 2),
                 "glm-4.5.json": (2, 2), "minimax-m2.json": (0, 2), "ernie-4.5-21b-a3b.json": (0, 1),
                 "ernie-4.5-300b-a47b.json": (0, 1), "gpt-oss-20b.json": (0, 1),
                 "gpt-oss-120b.json": (0, 1), "qwen3.5-35b-a3b-text.json": (0, 1)}  # (total, active)
TOLERANCE = {"deepseek-v3.json": 0.6, "deepseek-v3.2-exp.json": (0.9, 1.45), "glm-4.5-air.json": 0.5, "glm-4.5.json": (4.1, 0.5),
             "minimax-m2.json": (1.5, 0.5), "ernie-4.5-21b-a3b.json": (0.9, 0.1),
             "ernie-4.5-300b-a47b.json": 0.6, "llama-4-scout-17b-16e-text.json": (1.3, 0.2),
             "llama-4-maverick-17b-128e-text.json": 0.75, "qwen3-next-80b-a3b-instruct.json": 1e-9,
             "qwen3.5-35b-a3b-text.json": (0.5, 0.06)}  # billions; default 0.06


@pytest.mark.parametrize("name,family,total,active,moe_layers", PUBLISHED)
def test_hub_config_counts_match_published_sizes(name, family, total, active, moe_layers):
  info = parse_hf_config(HUB / name)
  assert info.family == family and info.checkpoint_dtype == "bfloat16"
  assert (info.fp8_block is not None) == family.startswith("deepseek_v3")  # V3's release: fp8, 128x128 blocks
  assert sum(info.cfg.moe_layers) == moe_layers
  counts = B.count_params(info.cfg)
  tol = TOLERANCE.get(name, 0.06)
  tol_total, tol_active = tol if isinstance(tol, tuple) else (tol, tol)
  vocab_total, vocab_active = WITHOUT_VOCAB.get(name, (0, 0))
  assert (counts["total"] - vocab_total * counts["embedding"]) / 1e9 == pytest.approx(total, abs=tol_total)
  assert (counts["active_per_token"] - vocab_active * counts["embedding"]) / 1e9 == pytest.approx(active,
                                                                                                  abs=tol_active)


def test_forward_traces_at_real_size_without_weights():
  """Shapes of a Qwen1.5-MoE-A2.7B forward, from abstract parameters (nothing allocated)."""
  cfg = parse_hf_config(HUB / "qwen1.5-moe-a2.7b.json").cfg
  params = B.abstract_params(cfg, jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  out = jax.eval_shape(lambda p, t: B.forward(p, cfg, t, return_taps=True), params, tokens)
  assert out.logits.shape == (2, 16, 151936)
  assert out.taps[0].down_in_bskf.shape == (2, 16, 4, 1408)
  assert out.taps[0].shared_in_bsf.shape == (2, 16, 5632)


def test_deepseek_v3_forward_traces_at_real_size_without_weights():
  """MLA with q latent, yarn, noaux_tc routing and shared experts at DeepSeek-V3's real shapes (abstract)."""
  cfg = parse_hf_config(HUB / "deepseek-v3.json").cfg
  assert (cfg.mla, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.head_dim, cfg.rope_type) == (True, 1536, 512, 64, "yarn")
  assert (cfg.router_scoring, cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.router_bias) == (
      "sigmoid", "noaux_tc", 8, 4, True)
  params = B.abstract_params(cfg, jnp.bfloat16)
  assert params["layers"][3]["attn"]["wkv_b"].shape == (512, 128, 256)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  out = jax.eval_shape(lambda p, t: B.forward(p, cfg, t, return_taps=True, stop_layer=4), params, tokens)
  assert out.hidden_states[0].shape == (1, 8, 7168) and out.taps[3].shared_in_bsf.shape == (1, 8, 2048)


def test_glm_forward_traces_at_real_size_without_weights():
  """GLM-4.5's partial RoPE (64 of 128 dims), q/k norm, q/k/v biases, dense first 3 layers (abstract)."""
  cfg = parse_hf_config(HUB / "glm-4.5.json").cfg
  assert (cfg.rotary_dim, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias, cfg.attn_out_bias) == (64, 128, "head", True,
                                                                                            False)
  assert cfg.moe_layers[:4] == (False, False, False, True) and cfg.shared_expert_size == 1536
  params = B.abstract_params(cfg, jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  out = jax.eval_shape(lambda p, t: B.forward(p, cfg, t, return_taps=True, stop_layer=4), params, tokens)
  assert out.hidden_states[0].shape == (1, 8, 5120) and out.taps[3].down_in_bskf.shape == (1, 8, 8, 1536)
  from bmoe_jax.cli import describe
  assert describe(HUB / "glm-4.5-air.json")["attention"] == (
      "96 heads / 8 kv heads x 128; RoPE default on 64 of 128 dims")
  m2 = parse_hf_config(HUB / "minimax-m2.json").cfg
  got = (m2.rotary_dim, m2.qk_norm, m2.router_scoring, m2.router_bias, m2.shared_expert_size)
  assert got == (64, "full", "sigmoid", True, 0)


def test_info_describes_latent_attention_and_group_routing():
  from bmoe_jax.cli import describe
  d = describe(HUB / "deepseek-v3.json")
  assert d["attention"].startswith("latent (MLA): 128 heads, q/k 128 + 64 RoPE, v 128, kv latent 512, q latent 1536")
  assert "RoPE yarn x40, interleaved" in d["attention"]
  assert d["routing"].endswith("noaux_tc over 4 of 8 groups, selection bias")
  assert describe(HUB / "qwen3-30b-a3b.json")["attention"] == "32 heads / 4 kv heads x 128; RoPE default"


@pytest.mark.parametrize("name,attention,experts,routing", [
    ("gpt-oss-120b.json", "64 heads / 8 kv heads x 64; RoPE yarn x32; window 128 on 18 of 36 layers; sinks",
     "128 routed, top-4, width 2880, biased, clamped SwiGLU (limit 7, alpha 1.702)", ", affine"),
    ("llama-4-maverick-17b-128e-text.json", "40 heads / 8 kv heads x 128; RoPE default, interleaved; chunks 8192 on "
     "36 of 48 layers; NoPE on 12 of 48 layers (temperature 0.1)", "128 routed, top-1, width 8192",
     ", the score scales the expert's input"),
])
def test_info_describes_the_2025_mechanisms_and_traces_at_real_size(name, attention, experts, routing):
  """``bmoe info`` names GPT-OSS's and Llama-4's mechanisms; both forwards trace at their real shapes (abstract)."""
  from bmoe_jax.cli import describe
  got = describe(HUB / name)
  assert (got["attention"], got["experts"]) == (attention, experts) and got["routing"].endswith(routing)
  cfg = parse_hf_config(HUB / name).cfg
  params = B.abstract_params(cfg, jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  out = jax.eval_shape(lambda p, t: B.forward(p, cfg, t, return_taps=True, stop_layer=4), params, tokens)
  assert out.hidden_states[0].shape == (1, 8, cfg.hidden_size) and len(out.taps) == sum(cfg.moe_layers[:4])
