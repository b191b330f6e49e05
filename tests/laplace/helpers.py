"""Shared tiny setups for the Laplace tests."""

import jax
import jax.numpy as jnp
import numpy as np

import bmoe_jax as B
from bmoe_jax.laplace import kfac


def top_layer_moe(seq: int = 5):
  """A 2-layer tiny model with only layer 1 MoE (3 experts) and a batch of 4 sequences of ``seq`` tokens."""
  cfg = B.tiny_config(num_experts=3, moe_layers=(False, True))
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (4, seq)))
  batch = kfac.Batch(tokens, jnp.ones((4, seq), jnp.int32), jnp.array([seq - 1, 3, 4, 2]),
                     jnp.array([0, 2, 1, 1]))
  return cfg, params, batch
