"""What a K-FAC pass computes (``FactorSpec``: the Bayesian blocks, label and token modes, rank) and which MoE layers
are Bayesian (``select_layers``); the pass itself is ``bmoe_jax.laplace.kfac``."""

from __future__ import annotations

import dataclasses

from bmoe_jax.config import MoEConfig
from bmoe_jax.params import Block

LABEL_MODES = ("exact", "mc", "empirical")
TOKEN_MODES = ("last", "expand", "reduce")


@dataclasses.dataclass(frozen=True)
class FactorSpec:
  """What a factor pass computes: the Bayesian blocks, how labels and tokens form the factors' rows, and the
  factors' rank (module docstring). Hashable (a static argument of ``jax.jit``); invalid values raise ``ValueError``.

  Attributes:
    layers: the MoE layer ids whose blocks are Bayesian (``select_layers``).
    labels: how output gradients are formed, one of ``LABEL_MODES``: ``"exact"`` (every class, weighted by its
      predictive probability: the GGN's output factor exactly), ``"mc"`` (one sampled label; needs a key) or
      ``"empirical"`` (the true label).
    tokens: which tokens are rows, one of ``TOKEN_MODES``: ``"last"`` (the positions whose logits enter the task
      output), ``"expand"`` (every real token) or ``"reduce"`` (one row per sequence and expert).
    rank: None: full f x f and d x d factors; r: rank-r factors by incremental SVD (``lowrank``; routers stay full).
    shared: also the layers' shared experts (models with shared experts only).
    router: also the layers' router weights (a Laplace router).
    experts: the layers' routed experts (False with ``router=True``: a Laplace router alone).
  """
  layers: tuple[int, ...]  # MoE layers whose experts are Bayesian
  labels: str = "exact"
  tokens: str = "last"
  rank: int | None = None  # None: full factors; r: rank-r factors by incremental SVD
  shared: bool = False  # also the layers' shared experts (models with shared experts only)
  router: bool = False  # also the layers' router weights (a Laplace router)
  experts: bool = True  # the routed experts (False with router=True: a Laplace router alone)

  def rank_of(self, blk: Block) -> int | None:
    """The factor rank of a block: ``rank``, but full factors for a router (d x d and E x E, E small)."""
    return None if blk.kind == "router" else self.rank

  @property
  def blocks(self) -> tuple[Block, ...]:
    kinds = (("routed",) if self.experts else ()) + (("shared",) if self.shared else ()) + \
        (("router",) if self.router else ())
    return tuple(Block(l, k) for l in self.layers for k in kinds)

  def __post_init__(self):
    if self.labels not in LABEL_MODES:
      raise ValueError(f"labels={self.labels!r}: expected one of {LABEL_MODES}")
    if self.tokens not in TOKEN_MODES:
      raise ValueError(f"tokens={self.tokens!r}: expected one of {TOKEN_MODES}")
    if self.rank is not None and self.rank < 1:
      raise ValueError(f"rank={self.rank}: expected a positive rank or None (full factors)")
    if not (self.experts or self.shared or self.router):
      raise ValueError("FactorSpec: no block chosen (experts, shared and router all False)")


def select_layers(cfg: MoEConfig, which="all") -> tuple[int, ...]:
  """The Bayesian set of MoE layers: ``"all"``, a quarter ``"Q1"``..``"Q4"`` of the MoE layers by depth
  (contiguous, sizes differing by at most one; the paper's ablation), or an explicit list of layer ids.

  Args:
    cfg: the model's config (its ``moe_layer_ids``).
    which: ``"all"`` (every MoE layer), ``"Q1"``..``"Q4"`` (quarter q: positions ``n (q-1) // 4`` to
      ``n q // 4 - 1`` of the n MoE layers in depth order; needs n >= 4), or an iterable of MoE layer ids
      (deduplicated and sorted).

  Returns:
    The chosen MoE layer ids, ascending. Raises ``ValueError`` on an unknown string, an empty list or ids that
    are not MoE layers.
  """
  moe = cfg.moe_layer_ids
  if isinstance(which, str):
    if which == "all":
      return tuple(moe)
    if which in ("Q1", "Q2", "Q3", "Q4"):
      if len(moe) < 4:
        raise ValueError(f"{which}: the model has {len(moe)} MoE layers, fewer than four quarters")
      q = int(which[1]) - 1
      lo, hi = (len(moe) * q) // 4, (len(moe) * (q + 1)) // 4
      return tuple(moe[lo:hi])
    raise ValueError(f"layers={which!r}: expected 'all', 'Q1'..'Q4' or a list of MoE layer ids")
  layers = tuple(sorted(set(int(l) for l in which)))
  bad = [l for l in layers if l not in moe]
  if bad or not layers:
    raise ValueError(f"layers {list(which)}: {bad or 'empty'} not MoE layers (MoE layers: {list(moe)})")
  return layers
