"""Phi-3.5-MoE beyond the parity cases: the cases see each new mechanism, and the config gate refuses what it cannot
honour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from convert import load_hf_checkpoint
from convert.errors import ConversionError
from convert.hf_config import parse_hf_config_dict
from convert.reference import make_checkpoint
from tests.conftest import padded_batch

TOL = 1e-4


def test_the_parity_cases_see_every_mechanism(tmp_path):
  """Dropping the LayerNorms' biases or the head's, reading the longrope mscale as 1 or its factors as 1, or gating
  by a renormalised softmax instead of the sparsemixer each moves the logits far past the parity tolerance."""
  make_checkpoint("phimoe", tmp_path, seed=0)
  info, params = load_hf_checkpoint(tmp_path, progress=False)
  cfg, params = info.cfg, jax.tree.map(jnp.asarray, params)
  assert (cfg.layer_norm, cfg.lm_head_bias, cfg.rope_type, cfg.router_scoring) == (True, True, "longrope",
                                                                                    "sparsemixer")
  tokens, mask = padded_batch(cfg.vocab_size)
  real = mask.astype(bool)
  fwd = jax.jit(B.forward, static_argnums=1)
  base = np.asarray(fwd(params, cfg, tokens, mask).logits)
  zero_bias = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if "norm" in str(path[-2]) and path[-1].key == "bias" else a, params)
  moved = {"norm biases": (zero_bias, cfg), "head bias": ({**params, "lm_head": {"kernel": params["lm_head"]["kernel"]}},
                                                          cfg.replace(lm_head_bias=False)),
           "long mscale": (params, cfg.replace(longrope_long_mscale=1.0)),
           "short factors": (params, cfg.replace(longrope_short_factor=(1.0,) * 4)),
           "sparsemixer": (params, cfg.replace(router_scoring="softmax", norm_topk_prob=True))}
  for name, (p, c) in moved.items():
    assert np.abs(np.asarray(fwd(p, c, tokens, mask).logits) - base)[real].max() > 100 * TOL, name


BASE = {"model_type": "phimoe", "architectures": ["PhimoeForCausalLM"], "num_hidden_layers": 2, "hidden_size": 32,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 16, "num_local_experts": 4,
        "vocab_size": 64}
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "short_mscale": 1.1, "long_mscale": 1.2, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("change,match", [
    ({"num_experts_per_tok": 3}, "sparsemixer router selects 2 experts"),
    ({"router_jitter_noise": -0.1}, "must be >= 0"),
    ({"rope_parameters": {k: v for k, v in LONGROPE.items() if k != "short_mscale"}}, r"needs \['short_mscale'\]"),
    ({"rope_parameters": dict(LONGROPE, short_factor=[1.0] * 3)}, "short_factor and long_factor have 3 and 4"),
    ({"rope_parameters": dict(LONGROPE, long_factor=[1.0] * 3, short_factor=[1.0] * 3)},
     "longrope_short_factor and longrope_long_factor with 4 entries"),
    ({"rope_parameters": LONGROPE, "original_max_position_embeddings": 32}, "contradicts the rope parameters' 16"),
    ({"model_type": "mixtral", "architectures": None, "num_local_experts": 4, "rope_parameters": LONGROPE},
     "rope type 'longrope' is not supported by this family"),
])
def test_config_gate(change, match):
  with pytest.raises(ConversionError, match=match):
    parse_hf_config_dict({k: v for k, v in {**BASE, **change}.items() if v is not None}, "config.json")
