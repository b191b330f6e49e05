"""A tiny learnable multiple-choice task for trainer and baseline tests."""

import jax.numpy as jnp
import numpy as np

from bmoe_jax.laplace.kfac import Batch

CLASSES = jnp.array([3, 7, 11, 19])


def synthetic_task(cfg, n_batches, b=8, s=6, seed=0):
  """Batches whose label is the first token mod 4 (learnable by the experts)."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n_batches):
    tokens = rng.randint(0, cfg.vocab_size, (b, s))
    out.append(Batch(jnp.asarray(tokens), jnp.ones((b, s), jnp.int32), jnp.full((b,), s - 1),
                     jnp.asarray(tokens[:, 0] % 4)))
  return out
