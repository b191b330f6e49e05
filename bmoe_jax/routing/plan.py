"""Which layer runs which router, and how a forward pass finds the routers' parameters and randomness.

A ``RoutingPlan`` (hashable: it lives in the static ``Task``) names a ``RouterConfig`` per MoE layer; layers
it does not name keep the model's deterministic router, bit-identical to the plain forward. The arrays a
plan's routers read travel inside the parameter tree, as one extra top-level entry (``attach``)::

  params["routing"] = {"layers": {"<layer>": router params}, "key": uint32 key data, "sample": int32}

so every function of ``(params, batch)`` (the task's logits, the Laplace Jacobians, the sharded steps) runs
a stochastic router unchanged. Layer ``i``'s randomness is ``fold_in(key, i)``; ``sample`` indexes the forward
sample (ensemble members). A plan in training mode (``train=True``) draws one sample per token where the
router's inference would average several (``routing.routers``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bmoe_jax.routing import routers as R
from bmoe_jax.routing.routers import RouterConfig

ROUTING_KEY = "routing"


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
  """Which MoE layer runs which router (hashable, static under ``jax.jit``); unnamed layers route deterministically.

  Attributes:
    layers: (layer id, ``RouterConfig``) pairs, sorted by layer on construction; a repeated id raises ValueError.
    train: training mode: routers that average samples at inference (mcdr, mfvr, fcvr) draw one per token,
      and vtsr uses its straight-through gradient.
  """
  layers: tuple[tuple[int, RouterConfig], ...] = ()
  train: bool = False

  def __post_init__(self):
    ids = [int(l) for l, _ in self.layers]
    if len(set(ids)) != len(ids):
      raise ValueError(f"RoutingPlan: layer ids {ids} repeat")
    object.__setattr__(self, "layers", tuple(sorted((int(l), rc) for l, rc in self.layers)))

  @classmethod
  def of(cls, routers: Mapping[int, RouterConfig], train: bool = False) -> "RoutingPlan":
    return cls(tuple(routers.items()), train)

  def router(self, layer: int) -> RouterConfig | None:
    return dict(self.layers).get(int(layer))

  def router_fn(self, params: dict, layer: int):
    """Layer ``layer``'s router as the forward calls it (``router_fn``), or None: the deterministic one. The
    forward reaches the routers only through this method, so the model never imports this package."""
    return router_fn(params, self, layer)

  @property
  def layer_ids(self) -> tuple[int, ...]:
    return tuple(l for l, _ in self.layers)

  @property
  def stochastic(self) -> bool:
    return any(rc.stochastic for _, rc in self.layers)

  def training(self, train: bool = True) -> "RoutingPlan":
    return dataclasses.replace(self, train=train)

  def check(self, cfg) -> "RoutingPlan":
    bad = [l for l in self.layer_ids if not (0 <= l < cfg.num_layers and cfg.moe_layers[l])]
    if bad:
      raise ValueError(f"RoutingPlan: layers {bad} are not MoE layers (MoE layers: {list(cfg.moe_layer_ids)})")
    return self

  def to_dict(self) -> dict:
    return {"layers": {str(l): dataclasses.asdict(rc) for l, rc in self.layers}}

  @classmethod
  def from_dict(cls, d: Mapping) -> "RoutingPlan":
    known = {f.name for f in dataclasses.fields(RouterConfig)}
    layers = []
    for l, rc in d["layers"].items():
      unknown = sorted(set(rc) - known)
      if unknown:
        raise ValueError(f"routing plan, layer {l}: unknown router options {unknown} (known: {sorted(known)})")
      layers.append((int(l), RouterConfig(**rc)))
    return cls(tuple(layers))


def key_data(key) -> jax.Array:
  """uint32 key data of a typed key (``jax.random.key``), or of an int seed.

  Args:
    key (jax.Array | int): a typed PRNG key, a Python int seed (``jax.random.key(seed)``), or key data already
      (returned as is).

  Returns:
    The key's raw uint32 data (``jax.random.key_data``), the form the parameter tree carries.
  """
  if isinstance(key, int):
    key = jax.random.key(key)
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jnp.asarray(key)


def attach(params: dict, router_params: Mapping[int, dict], key=0, sample=0) -> dict:
  """A shallow copy of ``params`` carrying the routers' parameters (by layer), a key and a sample index.

  Args:
    params: the model's parameter tree.
    router_params: ``{layer: router parameters}`` (``routers.init``); layers without parameters may be left out.
    key (jax.Array | int): the forward's PRNG key (typed key, int seed or key data; ``key_data``); layer i uses
      ``fold_in(key, i)``.
    sample (int | jax.Array): the forward sample index (an ensemble router uses member ``sample mod M``).

  Returns:
    ``{**params, "routing": {"layers": {"<layer>": router params}, "key": uint32 key data, "sample": int32 scalar}}``.
  """
  layers = {str(int(l)): p for l, p in router_params.items()}
  return {**params, ROUTING_KEY: {"layers": layers, "key": key_data(key), "sample": jnp.asarray(sample, jnp.int32)}}


def with_draw(params: dict, key, sample) -> dict:
  """``params`` with another key and sample index (one forward sample of a stochastic plan).

  Args:
    params: a parameter tree, with or without a routing entry (``attach``).
    key (jax.Array | int): the new PRNG key (typed key, int seed or key data; ``key_data``).
    sample (int | jax.Array): the new forward sample index.

  Returns:
    A shallow copy of ``params`` whose routing entry (created empty of router parameters if absent) carries
      ``key`` and ``sample``; the routers' parameters are kept.
  """
  state = params.get(ROUTING_KEY) or {"layers": {}}
  return {**params, ROUTING_KEY: {**state, "key": key_data(key), "sample": jnp.asarray(sample, jnp.int32)}}


def detach(params: dict) -> dict:
  """``params`` without the routing entry (the model's own parameters).

  Args:
    params: a parameter tree, with or without a routing entry.

  Returns:
    A shallow copy of ``params`` without its "routing" entry.
  """
  return {k: v for k, v in params.items() if k != ROUTING_KEY}


def router_params(params: dict) -> dict[int, dict]:
  """The routers' parameters that ``params`` carries (``attach``'s ``router_params``).

  Args:
    params: a parameter tree, with or without a routing entry.

  Returns:
    ``{layer (int): router parameters}``; {} without a routing entry.
  """
  state = params.get(ROUTING_KEY)
  return {} if state is None else {int(l): p for l, p in state["layers"].items()}


def router_fn(params: dict, plan: RoutingPlan | None, layer: int):
  """Layer ``layer``'s router as the forward calls it, or None (the deterministic one).

  Args:
    params: the parameter tree, carrying the routing state (``attach``) when the layer's router is stochastic.
    plan: the routing plan; None: every layer deterministic.
    layer: the layer id.

  Returns:
    (Callable | None): None when the plan names no router for the layer or a "deterministic" one; else
      ``fn(x_nd, kernel_de, gating, k, train, bias_e) -> (gating.Routing, aux_n)`` (``routers.apply`` with the
      layer's config, parameters, key and sample index).

  Raises:
    ValueError: the layer's router is stochastic but ``params`` carry no routing state.
  """
  found = layer_router(params, plan, layer)
  if found is None:
    return None
  rc, rp, key, sample = found
  return lambda x_nd, kernel, gating, k, train, bias: R.apply(rc, rp, R.RouterIn(x_nd, kernel, key, sample, gating,
                                                                                 k, train, bias))


def layer_router(params: dict, plan: RoutingPlan | None, layer: int) -> tuple[RouterConfig, dict, Any, Any] | None:
  """(config, parameters, PRNG key, sample index) of layer ``layer``'s router, or None: the deterministic one.

  Args:
    params: the parameter tree, carrying the routing state (``attach``) when the layer's router is stochastic.
    plan: the routing plan; None: every layer deterministic.
    layer: the layer id.

  Returns:
    None when the plan names no router for the layer or a "deterministic" one; else (the ``RouterConfig``,
      its parameters ({} if ``params`` carry none for the layer), the layer's key ``fold_in(key, layer)``, the
      int32 sample index).

  Raises:
    ValueError: the layer's router is stochastic but ``params`` carry no routing state.
  """
  rc = None if plan is None else plan.router(layer)
  if rc is None or rc.kind == "deterministic":
    return None
  state = params.get(ROUTING_KEY)
  if state is None:
    raise ValueError(f"layer {layer} runs a {rc.kind} router but the parameters carry no routing state: "
                     "use bmoe_jax.routing.attach(params, router_params, key)")
  p = state["layers"].get(str(layer), {})
  key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), layer)
  return rc, p, key, state["sample"]
