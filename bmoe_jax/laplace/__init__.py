"""Bayesian-MoE (arXiv 2511.08968): per-expert K-FAC Laplace on the experts' down_proj.

The Bayesian set is a tuple of ``Block``s: the routed experts of chosen MoE layers and, optionally
(``FactorSpec(shared=True)``), their shared experts.

``kfac`` (factor pass), ``lowrank`` (incremental SVD factors), ``posterior`` (eigenbasis/Woodbury
posterior, evidence, prior precision, samples), ``predictive`` (closed-form / jvp-MC / NN-MC),
``fit`` (resumable factor pass, posterior save/load).
"""

from bmoe_jax.laplace import kfac, lowrank, posterior, predictive
from bmoe_jax.laplace.fit import fit_factors, load_posterior, save_posterior
from bmoe_jax.laplace.kfac import Block, FactorSpec
from bmoe_jax.laplace.posterior import Posterior, build, optimize_prior_precision
from bmoe_jax.laplace.predictive import predict

__all__ = ["kfac", "lowrank", "posterior", "predictive", "fit_factors", "load_posterior", "save_posterior",
           "Block", "FactorSpec", "Posterior", "build", "optimize_prior_precision", "predict"]
