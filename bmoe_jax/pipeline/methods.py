"""One registry of uncertainty methods by name: ``build_methods(names, ctx, cfg)`` -> {name: Method}.

Each entry turns the evaluation ``Context`` (the fine-tuned model, its task, the data, what earlier stages
produced) and the ``EvalConfig`` into a ``bmoe_jax.baselines.Method`` (a ``Batch`` -> class
probabilities [b, C]) and a dict of what it fitted (temperature, members, prior precision). The CLI's
``bmoe evaluate``, ``bmoe demo`` and the experiments all build their methods here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from bmoe_jax import baselines as BL
from bmoe_jax.task import DEFAULT_LINK, Task, same_prefix


@dataclasses.dataclass
class Context:
  """What the methods are built from. ``members``: parameter trees per ensemble method (``ensemble``:
  besides ``params``; ``ckpt_ensemble``: all of them); ``posteriors``: Bayesian-MoE posteriors by method
  name (``bmoe``, ``bmoe_ml``, ``bmoe_fixed``, ``bmoe_ts``), built from one factor pass; ``temperatures``: the
  logit temperature of a tempered one (``bmoe_ts``: the MAP's validation temperature, ``stages.temper``)."""
  params: Any
  task: Task
  train: list = dataclasses.field(default_factory=list)
  val: list = dataclasses.field(default_factory=list)
  pretrained: Any = None
  posteriors: dict = dataclasses.field(default_factory=dict)
  members: dict = dataclasses.field(default_factory=dict)
  seed: int = 0
  link: str = DEFAULT_LINK
  logits: Any = None  # a baselines.LogitCache: MAP and temperature scaling share one forward per batch
  routers: dict = dataclasses.field(default_factory=dict)  # router kind -> (RoutingPlan, {layer: parameters})
  temperatures: dict = dataclasses.field(default_factory=dict)  # Bayesian-MoE method -> its logit temperature


def _need(ctx_value, what: str, method: str):
  if ctx_value is None or (hasattr(ctx_value, "__len__") and not len(ctx_value)):
    raise ValueError(f"method {method} needs {what}")
  return ctx_value


def _pretrained(ctx: Context, cfg):
  return BL.map_method(_need(ctx.pretrained, "the pretrained model", "pretrained"), ctx.task, ctx.logits), {}


def _map(ctx: Context, cfg):
  return BL.map_method(ctx.params, ctx.task, ctx.logits), {}


def _ts(ctx: Context, cfg):
  method, temp = BL.temperature_scaling(ctx.params, ctx.task, _need(ctx.val, "validation batches", "ts"), ctx.logits)
  return method, {"temperature": temp}


def _mc_dropout(ctx: Context, cfg):
  return BL.mc_dropout(ctx.params, ctx.task, rate=cfg.dropout, num_samples=cfg.dropout_samples,
                       key=jax.random.key(ctx.seed)), {"rate": cfg.dropout, "samples": cfg.dropout_samples}


def _llla(ctx: Context, cfg):
  method, post = BL.last_layer_laplace(ctx.params, ctx.task, _need(ctx.train, "training batches", "llla"),
                                       link=ctx.link)
  return method, {"prior_precision": float(jax.numpy.exp(next(iter(post.log_prior_prec_e.values()))[0]))}


def _ensemble(name: str, with_model: bool):
  def build(ctx: Context, cfg):
    members = ([ctx.params] if with_model else []) + list(ctx.members.get(name, ()))
    _need(members, "members (--members / --checkpoints)", name)
    start = ctx.task.start_layer
    if start and not all(same_prefix(ctx.params, p, start) for p in members):
      raise ValueError(f"the {name} members differ from the model below layer {start}, where the batches' "
                       "cached prefix was computed; evaluate without --cache-prefix")
    return BL.ensemble(members, ctx.task), {"members": len(members)}
  return build


# grid / evidence / fixed prior precision / grid after the MAP's temperature (Bayesian-MoE + T): one factor pass
BAYESIAN_MOE = ("bmoe", "bmoe_ml", "bmoe_fixed", "bmoe_ts")

# Bayesian routers (bmoe_jax.routing): method name -> router kind. rt_temp needs no training (its plan comes from
# EvalConfig); the others load a bmoe route-train output (--routers). "bmoe+<router method>" combines the router
# with Bayesian-MoE's expert posterior (routing.predict.routed_bayesian_moe).
ROUTER_METHODS = {"rt_temp": "temperature", "rt_mcdr": "mcdr", "rt_swag": "swag", "rt_der": "ensemble",
                  "rt_mfvr": "mfvr", "rt_fcvr": "fcvr", "rt_vtsr": "vtsr"}
COMBINED = tuple(f"bmoe+{m}" for m in ROUTER_METHODS)
LAPLACE_ROUTER = "rt_laplace"  # sampled router weights of a router-only posterior (ctx.posteriors["rt_laplace"])
JOINT = "bmoe+rt_laplace"  # the closed-form predictive of one posterior over experts and router weights


def router_task(ctx: Context, cfg, method: str):
  """(task with the method's routing plan, params carrying its router state)."""
  from bmoe_jax import routing as RT
  from bmoe_jax.routing.train import parse_layers

  kind = ROUTER_METHODS[method]
  if kind == "temperature":
    rc = RT.RouterConfig(kind="temperature", sample_temperature=cfg.sample_temperature)
    plan, rparams = RT.RoutingPlan.of({l: rc for l in parse_layers(ctx.task.cfg, cfg.temp_layers)}), {}
  else:
    if kind not in ctx.routers:
      raise ValueError(f"method {method} needs trained {kind} routers: pass --routers DIR (a bmoe route-train "
                       f"output with --kind {kind}); given: {sorted(ctx.routers) or 'none'}")
    plan, rparams = ctx.routers[kind]
  task = dataclasses.replace(ctx.task, routing=plan)
  return task, RT.attach(ctx.params, rparams, key=jax.random.key(ctx.seed))


def _router_method(name: str):
  def build(ctx: Context, cfg):
    from bmoe_jax.routing.predict import num_draws, routed_method
    task, params = router_task(ctx, cfg, name)
    draws = num_draws(task, cfg.route_samples)
    return routed_method(params, task, num_samples=cfg.route_samples, key=jax.random.key(ctx.seed)), {
        "plan": task.routing.to_dict(), "draws": draws}
  return build


def _combined(name: str):
  def build(ctx: Context, cfg):
    from bmoe_jax.routing.predict import num_draws, routed_bayesian_moe
    post = _need(ctx.posteriors.get("bmoe"), "a posterior (--posterior, or bmoe fit)", name)
    task, params = router_task(ctx, cfg, name.split("+", 1)[1])
    method = routed_bayesian_moe(post, params, task, num_samples=cfg.route_samples, key=jax.random.key(ctx.seed),
                                 link=ctx.link)
    return method, {"plan": task.routing.to_dict(), "draws": num_draws(task, cfg.route_samples)}
  return build

def _laplace_router(ctx: Context, cfg):
  from bmoe_jax.routing.predict import laplace_router_method
  post = _need(ctx.posteriors.get(LAPLACE_ROUTER), "a router posterior (--router-posterior: bmoe fit "
               "--laplace-router only)", LAPLACE_ROUTER)
  if any(b.kind != "router" for b in post.factors):
    raise ValueError(f"{LAPLACE_ROUTER}: the posterior holds non-router blocks {[str(b) for b in post.factors]}; fit "
                     "it with --laplace-router only")
  return laplace_router_method(post, ctx.params, ctx.task, num_samples=cfg.route_samples,
                               key=jax.random.key(ctx.seed)), {"draws": cfg.route_samples}


def _joint(ctx: Context, cfg):
  post = _need(ctx.posteriors.get(JOINT), "a posterior over experts and router weights (--router-posterior: bmoe "
               "fit --laplace-router with)", JOINT)
  kinds = {b.kind for b in post.factors}
  if "router" not in kinds or kinds == {"router"}:
    raise ValueError(f"{JOINT}: the posterior's blocks are {sorted(kinds)}; fit it with --laplace-router with")
  return BL.bayesian_moe(post, ctx.params, ctx.task, link=ctx.link), {"blocks": [str(b) for b in post.factors]}


REGISTRY: dict[str, Callable] = {
    "pretrained": _pretrained, "map": _map, "ts": _ts, "mc_dropout": _mc_dropout, "llla": _llla,
    "ensemble": _ensemble("ensemble", True), "ckpt_ensemble": _ensemble("ckpt_ensemble", False),
    **{name: None for name in BAYESIAN_MOE},  # built together (bayesian_moe_variants)
    **{name: _router_method(name) for name in ROUTER_METHODS}, **{name: _combined(name) for name in COMBINED},
    LAPLACE_ROUTER: _laplace_router, JOINT: _joint,
}
METHODS = tuple(REGISTRY)


def build_methods(names, ctx: Context, cfg) -> tuple[dict[str, Any], dict[str, dict]]:
  """({name: Method} in the order of ``names``, {name: what it fitted})."""
  unknown = sorted(set(names) - set(METHODS))
  if unknown:
    raise ValueError(f"methods {unknown} are unknown; choose from {METHODS}")
  methods, info = {}, {}
  if ctx.logits is None:
    ctx = dataclasses.replace(ctx, logits=BL.LogitCache(ctx.task))
  for name in names:
    if name not in BAYESIAN_MOE:
      methods[name], info[name] = REGISTRY[name](ctx, cfg)
  wanted = [n for n in names if n in BAYESIAN_MOE]
  missing = [n for n in wanted if n not in ctx.posteriors]  # (bmoe+<router> checks its own in _combined)
  if missing:
    raise ValueError(f"methods {missing} need a posterior (bmoe fit, or --posterior for bmoe)")
  methods.update(BL.bayesian_moe_variants({n: ctx.posteriors[n] for n in wanted}, ctx.params, ctx.task,
                                          link=ctx.link, temperatures=ctx.temperatures))  # one Jacobian pass
  return {n: methods[n] for n in names}, info
