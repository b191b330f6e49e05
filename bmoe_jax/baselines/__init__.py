"""Uncertainty baselines behind one interface: a ``Method`` maps a ``Batch`` to class probabilities
[b, C], so ``bmoe_jax.evaluate`` compares any set of them (MAP, temperature scaling, MC dropout,
checkpoint / deep ensembles, last-layer Laplace, Bayesian-MoE)."""

from bmoe_jax.baselines.methods import (LogitCache, Method, bayesian_moe, bayesian_moe_variants, ensemble, map_method,
                                        mc_dropout, temperature_scaling)
from bmoe_jax.baselines.last_layer import last_layer_laplace

__all__ = ["LogitCache", "Method", "bayesian_moe", "bayesian_moe_variants", "ensemble", "last_layer_laplace",
           "map_method", "mc_dropout", "temperature_scaling"]
