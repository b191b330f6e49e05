"""Bayesian-MoE (arXiv 2511.08968): per-expert K-FAC Laplace on the routed experts' down_proj."""
