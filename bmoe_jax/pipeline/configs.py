"""The stages' options: one frozen dataclass per concern, one default per option, stated here once.

``RunConfig`` (model, output, seed, mesh), ``DataConfig`` (which datasets, how batched), ``TrainConfig``
(``bmoe_jax.train``: MAP fine-tuning), ``FitConfig`` (factors -> posterior -> prior precision) and
``EvalConfig`` (methods, metrics). The command line's flags are generated from their fields
(``bmoe_jax.pipeline.flags``); ``bmoe demo``'s ``DemoConfig`` composes them.

Dataset specs are ``name:split`` (MMLU: ``mmlu:test:subject+subject``); a spec left ``None`` takes the
suite's: the real benchmarks (OBQA -> ARC / MMLU) when a data directory is given (``data_dir`` or
``$BMOE_DATA_DIR``), otherwise the embedded synthetic suite (``bmoe_jax.data.synthetic``).
"""

from __future__ import annotations

import dataclasses
import os

from bmoe_jax.config import check_bounds
from bmoe_jax.data.batches import STYLES
from bmoe_jax.data.continuation import NORMS
from bmoe_jax.laplace.posterior import PRIOR_MEANS, PRIOR_MODES
from bmoe_jax.laplace.kfac import LABEL_MODES, TOKEN_MODES
from bmoe_jax.task import DEFAULT_LINK, LINKS
from bmoe_jax.train import TrainConfig

SUITES = {
    "real": dict(train="obqa:train", val="obqa:dev", test="obqa:test",
                 shift=("arc_challenge:test", "arc_easy:test",
                        "mmlu:test:high_school_geography+high_school_biology+conceptual_physics+astronomy")),
    "synthetic": dict(train="synthetic:train", val="synthetic:dev", test="synthetic:test",
                      shift=("synthetic_capitals:test", "synthetic_opposites:test", "synthetic_languages:test")),
}


def _choice(name: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r}: expected one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: str | None = None  # converted model directory (bmoe convert) or HF checkpoint
  tokenizer: str | None = None  # tokenizer directory (default: the model directory)
  out: str | None = None  # output directory
  seed: int = 0  # data subsets and order, fine-tuning, MC labels, dropout masks
  mesh: str | None = None  # device mesh, e.g. data=2,expert=4: parameters sharded, batches split on data
  cache_prefix: bool = False  # run the frozen layers below the lowest trainable / Bayesian one once per batch
  quiet: bool = False  # no progress bars


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data_dir: str | None = None  # benchmark files in the layout of ../shared/data (default $BMOE_DATA_DIR)
  train: str | None = None  # fine-tuning and factor data (None: the suite's)
  val: str | None = None  # early stopping, temperature scaling, the prior-precision grid
  test: str | None = None  # in-distribution evaluation
  shift: tuple[str, ...] | None = None  # evaluation under distribution shift
  max_train: int | None = None  # seeded subset of the training set (None: all of it)
  max_eval: int | None = None  # seeded subset of every other set
  batch_size: int = 8
  max_length: int = 256
  scoring: str = "continuation"  # letters | cloze (first token) | continuation (each choice's log-likelihood)
  norm: str = "token"  # continuation scores: none | token (per token) | byte (per UTF-8 byte, lm-eval acc_norm)
  chat: bool = False  # wrap prompts in the tokenizer's chat template (letters and cloze only)

  def __post_init__(self):
    _choice("scoring", self.scoring, STYLES)
    _choice("norm", self.norm, NORMS)
    check_bounds(self, {"max_train": (1, None), "max_eval": (1, None), "batch_size": (1, None),
                        "max_length": (1, None)})

  def resolved(self) -> "DataConfig":
    """The data directory from ``$BMOE_DATA_DIR`` if unset, and every unset spec from its suite."""
    data_dir = self.data_dir or os.environ.get("BMOE_DATA_DIR") or None
    suite = SUITES["real" if data_dir else "synthetic"]
    pick = lambda name: getattr(self, name) if getattr(self, name) is not None else suite[name]
    return dataclasses.replace(self, data_dir=data_dir, train=pick("train"), val=pick("val"), test=pick("test"),
                               shift=tuple(pick("shift")))

  @property
  def synthetic(self) -> bool:
    return str(self.resolved().train).startswith("synthetic")


@dataclasses.dataclass(frozen=True)
class FitConfig:
  bayes_layers: str = "all"  # all | Q1..Q4 | comma-separated MoE layer ids
  shared: bool = False  # also the shared experts
  laplace_router: str = "off"  # off | with (experts and router weights) | only (router weights: a Laplace router)
  labels: str = "exact"  # exact | mc | empirical
  tokens: str = "last"  # last | expand | reduce
  rank: int | None = None  # low-rank factors (None: full)
  prior: str = "layer"  # global | layer | expert (evidence, LPO) or grid (validation NLL)
  grid: tuple[float, float, int] = (1e-4, 1e4, 41)  # log-spaced prior precisions (low, high, points)
  prior_mean: str = "pretrained"  # pretrained (needs pretrained=) | zero | map (refused by the evidence)
  pretrained: str | None = None  # model directory of the pretrained weights, the prior mean
  fixed_prior: float = 1.0  # the prior precision of method bmoe_fixed, and the evidence optimiser's start
  link: str = DEFAULT_LINK  # probit_pairwise | probit (laplace-torch) | mc: E softmax of Gaussian logits

  def __post_init__(self):
    _choice("labels", self.labels, LABEL_MODES)
    _choice("tokens", self.tokens, TOKEN_MODES)
    _choice("prior", self.prior, PRIOR_MODES + ("grid",))
    _choice("prior_mean", self.prior_mean, PRIOR_MEANS)
    _choice("link", self.link, LINKS)
    _choice("laplace_router", self.laplace_router, ("off", "with", "only"))
    if self.rank == 0:  # 0 on the command line: full factors
      object.__setattr__(self, "rank", None)
    check_bounds(self, {"rank": (1, None), "fixed_prior": (0, None, True)})
    lo, hi, n = self.grid
    if not (0 < lo < hi and int(n) >= 2):
      raise ValueError(f"FitConfig.grid (--grid) = {self.grid}: expected low > 0, high > low and >= 2 points")
    if self.prior_mean == "map" and self.prior != "grid":
      raise ValueError(f"prior_mean='map' with prior={self.prior!r}: centred at the MAP the evidence grows with "
                       "the prior precision forever; use prior='grid', or prior_mean='pretrained' / 'zero'")

  @property
  def grid_values(self):
    import numpy as np
    lo, hi, n = self.grid
    return np.logspace(np.log10(lo), np.log10(hi), int(n))

  def layers(self):
    """The ``kfac.select_layers`` argument."""
    if self.bayes_layers in ("all", "Q1", "Q2", "Q3", "Q4"):
      return self.bayes_layers
    return [int(x) for x in str(self.bayes_layers).split(",") if x.strip()]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  methods: tuple[str, ...] = ("map", "ts")  # bmoe_jax.pipeline.methods.METHODS
  dropout: float = 0.1  # MC dropout rate on the experts' hidden units
  dropout_samples: int = 16
  posterior: str | None = None  # posterior directory (bmoe fit) for method bmoe
  members: tuple[str, ...] = ()  # model directories of method ensemble (besides the model itself)
  checkpoints: str | None = None  # a fine-tuning run's checkpoints (RUN or RUN/checkpoints): ckpt_ensemble
  ci: bool = False  # bootstrap 95% intervals
  link: str = DEFAULT_LINK  # probit_pairwise | probit (laplace-torch) | mc: E softmax of Gaussian logits
  routers: tuple[str, ...] = ()  # bmoe route-train output directories (methods rt_mcdr, rt_mfvr, ..., bmoe+rt_*)
  router_posterior: str | None = None  # posterior directory of bmoe fit --laplace-router only (method rt_laplace)
  route_samples: int = 8  # forward draws of a stochastic router's predictive (an ensemble router: its members)
  temp_layers: str = "last:1"  # rt_temp: MoE layers that sample (last:N or comma-separated ids)
  sample_temperature: float = 0.3  # rt_temp: T of the sampling distribution softmax(l / T)
  stability: bool = False  # routing stability and router FLOPs (routing.json / .md, plots/stability.png)
  stability_batches: int = 10  # in-distribution batches the stability is measured on

  def __post_init__(self):
    _choice("link", self.link, LINKS)
    check_bounds(self, {"dropout": (0, 1), "dropout_samples": (1, None), "route_samples": (1, None),
                        "sample_temperature": (0, None, True), "stability_batches": (1, None)})
    from bmoe_jax.pipeline.methods import METHODS
    bad = sorted(set(self.methods) - set(METHODS))
    if bad:
      raise ValueError(f"methods {bad} are unknown; choose from {METHODS}")


__all__ = ["SUITES", "RunConfig", "DataConfig", "TrainConfig", "FitConfig", "EvalConfig"]
