"""Bayesian routing (arXiv 2509.23830): routers with uncertainty in the routing decision.

``bmoe_jax.nn.gating`` (the families' gating rules, Gumbel-top-k, Jaccard: the model's numerics, re-exported
here), ``routers`` (every router as a pure function), ``plan`` (which layer runs which router; the routers'
state inside the parameter tree).
"""

from bmoe_jax.nn.gating import Gating, Routing, gates_at, gumbel_topk, jaccard, route
from bmoe_jax.routing.plan import RoutingPlan, attach, detach, router_params, with_draw
from bmoe_jax.routing.routers import KINDS, RouterConfig

__all__ = ["Gating", "Routing", "gates_at", "gumbel_topk", "jaccard", "route", "RoutingPlan", "attach", "detach",
           "router_params", "with_draw", "KINDS", "RouterConfig"]
