"""SWAG moments of a weight (Maddox et al. 2019), an evolving state with ``init`` / ``update``.

``update`` folds one snapshot in: running first and second moments, and the deviation ``w - mean`` (mean
after the update) appended to the last ``K`` deviations (a ring, newest last). ``routers.swag_draw`` samples
``mean + sqrt(scale) (sigma z1 + D^T z2 / sqrt(K - 1)) / sqrt(2)`` from it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SwagState(NamedTuple):
  mean: jax.Array  # [...] running mean of the snapshots
  sq_mean: jax.Array  # [...] running mean of their squares
  dev: jax.Array  # [K, ...] the last K deviations from the mean (newest last; zeros before K snapshots)
  count: jax.Array  # float32 scalar: snapshots so far


def init(w: jax.Array, rank: int) -> SwagState:
  """An empty state shaped like ``w`` (no snapshot yet)."""
  w = jnp.asarray(w, jnp.float32)
  return SwagState(jnp.zeros_like(w), jnp.zeros_like(w), jnp.zeros((rank,) + w.shape, jnp.float32),
                   jnp.zeros((), jnp.float32))


def update(state: SwagState, w: jax.Array) -> SwagState:
  n = state.count
  w = jnp.asarray(w, jnp.float32)
  mean = (n * state.mean + w) / (n + 1.0)
  sq_mean = (n * state.sq_mean + jnp.square(w)) / (n + 1.0)
  dev = jnp.concatenate([state.dev[1:], (w - mean)[None]], axis=0)
  return SwagState(mean, sq_mean, dev, n + 1.0)


def as_params(state: SwagState) -> dict:
  """The swag router's parameters (``routers.swag_draw``)."""
  return state._asdict()
