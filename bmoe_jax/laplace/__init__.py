"""Bayesian-MoE (arXiv 2511.08968): per-expert K-FAC Laplace on the routed experts' down_proj.

``kfac`` (factor pass), ``lowrank`` (incremental SVD factors), ``posterior`` (eigenbasis/Woodbury
posterior, evidence, prior precision, samples), ``predictive`` (closed-form / jvp-MC / NN-MC),
``fit`` (resumable factor pass, posterior save/load).
"""

from bmoe_jax.laplace import kfac, lowrank, posterior, predictive
from bmoe_jax.laplace.fit import fit_factors, load_posterior, save_posterior
from bmoe_jax.laplace.kfac import Batch, FactorSpec
from bmoe_jax.laplace.posterior import Posterior, build, optimize_prior_precision
from bmoe_jax.laplace.predictive import predict

__all__ = ["kfac", "lowrank", "posterior", "predictive", "fit_factors", "load_posterior", "save_posterior",
           "Batch", "FactorSpec", "Posterior", "build", "optimize_prior_precision", "predict"]
