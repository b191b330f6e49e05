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
]
ACTIVE_WITHOUT_EMBEDDING = {"granite-3.1-3b-a800m.json"}  # 0.806B + 0.076B tied embedding


@pytest.mark.parametrize("name,family,total,active,moe_layers", PUBLISHED)
def test_hub_config_counts_match_published_sizes(name, family, total, active, moe_layers):
  info = parse_hf_config(HUB / name)
  assert info.family == family and info.checkpoint_dtype == "bfloat16"
  assert sum(info.cfg.moe_layers) == moe_layers
  counts = B.count_params(info.cfg)
  assert counts["total"] / 1e9 == pytest.approx(total, abs=0.06)
  embed = counts["embedding"] if name in ACTIVE_WITHOUT_EMBEDDING else 0
  assert (counts["active_per_token"] - embed) / 1e9 == pytest.approx(active, abs=0.06)


def test_forward_traces_at_real_size_without_weights():
  """Shapes of a Qwen1.5-MoE-A2.7B forward, from abstract parameters (nothing allocated)."""
  cfg = parse_hf_config(HUB / "qwen1.5-moe-a2.7b.json").cfg
  params = B.abstract_params(cfg, jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  out = jax.eval_shape(lambda p, t: B.forward(p, cfg, t, return_taps=True), params, tokens)
  assert out.logits.shape == (2, 16, 151936)
  assert out.taps[0].down_in_bskf.shape == (2, 16, 4, 1408)
  assert out.taps[0].shared_in_bsf.shape == (2, 16, 5632)
