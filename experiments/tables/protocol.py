"""PROTOCOL.md as data: every choice the cells make is read from here, so a table and the protocol version that
made it cannot disagree. Changing anything here is a new protocol version (PROTOCOL.md, "Versions")."""

from __future__ import annotations

import dataclasses

from bmoe_jax.laplace.posterior import PRIOR_MODES
from bmoe_jax.pipeline.configs import DataConfig, EvalConfig, FitConfig
from bmoe_jax.task import LINKS
from bmoe_jax.train import TrainConfig

VERSION = "1.4"
SEEDS = (0, 1, 2)  # fine-tuning seeds: the data order, and every method's draws
DATA_SEED = 0  # the splits and subsets: the same for every seed and method
REGIMES = ("early", "long")  # the best-dev-NLL epoch; the last epoch


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: str
  dev: str
  test: str
  max_train: int | None = None  # a seeded subset of the training split
  shift: tuple[str, ...] = ()  # evaluated with the in-distribution test set (OOD against it)


MAX_TEST = 1000  # a seeded subset of every evaluation set larger than this (dev sets are all smaller)
DATASETS = {
    "arc_easy": Dataset("arc_easy:train", "arc_easy:dev", "arc_easy:test"),
    "arc_challenge": Dataset("arc_challenge:train", "arc_challenge:dev", "arc_challenge:test"),
    "obqa": Dataset("obqa:train", "obqa:dev", "obqa:test", max_train=2251,
                    shift=("arc_easy:test", "arc_challenge:test", "mmlu:test:college_chemistry",
                           "mmlu:test:college_physics", "mmlu:test:college_computer_science",
                           "mmlu:test:electrical_engineering")),
    "boolq": Dataset("boolq:train", "boolq:dev", "boolq:test"),
    "winogrande": Dataset("winogrande:train_m", "winogrande:dev_m", "winogrande:test_m"),
}
ORDER = ("arc_easy", "obqa", "arc_challenge", "winogrande", "boolq")  # the order of work (PROTOCOL.md §9)

DATA = DataConfig(max_eval=MAX_TEST, batch_size=16, max_length=256, scoring="continuation", norm="token")
EPOCHS = 6
TRAIN = TrainConfig(trainable="experts_router", lr=5e-4, schedule="constant", epochs=EPOCHS, warmup_ratio=0.05,
                    patience=0, keep_checkpoints=EPOCHS)  # eval/checkpoint every epoch: set per dataset (cells)
FIT = FitConfig(prior="grid", labels="exact", tokens="last", rank=None, prior_mean="pretrained")
EVAL = EvalConfig(dropout=0.1, dropout_samples=16)
LINK_CHOICE = ("arc_easy", 0, "long")  # where the link is chosen by dev NLL, among LINKS
REGISTRY_METHODS = ("map", "ts", "mc_dropout", "ckpt_ensemble")  # built by the pipeline's registry
EVIDENCE = {f"bmoe_ev_{mode}": mode for mode in PRIOR_MODES}  # lambda by the evidence, per mode
BMOE = ("bmoe_grid", *EVIDENCE, "bmoe_ts")
ENSEMBLE = "deep_ensemble"  # the seeds' models of one regime: one per dataset and regime
PRIMARY = "bmoe_ev_layer"
PRIMARY_METRICS = ("nll", "ece", "aurc", "err_auroc")
BASELINES = ("map", "ts")  # every claimed difference is paired against both

assert set(LINKS) >= {"probit_pairwise", "probit", "mc"} and set(PRIOR_MODES) == {"global", "layer", "expert"}


def checkpoint_epochs(epoch: int) -> list[int]:
  """The checkpoint ensemble of a regime ending at ``epoch``: it and the two before (the first three when
  ``epoch`` < 3)."""
  last = max(epoch, 3)
  return list(range(last - 2, last + 1))
