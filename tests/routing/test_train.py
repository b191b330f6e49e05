"""Router training: every kind trains top-down through the stages, training lowers the objective, and an
interrupted run resumes to the same routers."""

import jax
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.routing import routers as R
from bmoe_jax.routing import train as RTT
from bmoe_jax.task import Task
from tests.fixtures import CLASSES, synthetic_task
from tests.test_train import Interrupting, Stop


@pytest.fixture(scope="module")
def setup():
  cfg = B.tiny_config(num_experts=4, shared_expert_size=0, shared_expert_gate=False)
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3), synthetic_task(cfg, 4)


def _mean_objective(stage, params, batches, keys=8):
  """The stage's objective at its theta, averaged over batches and ``keys`` fixed PRNG keys."""
  fn = jax.jit(jax.vmap(lambda theta, p, b, k: stage.loss(theta, p, b, k)[0], in_axes=(None, None, None, 0)))
  ks = jax.random.split(jax.random.key(123), keys)
  return float(np.mean([np.asarray(fn(stage.theta, params, b, ks)) for b in batches]))


@pytest.mark.parametrize("kind", ["mcdr", "mfvr", "fcvr", "vtsr", "swag", "ensemble"])
def test_every_kind_trains_top_down_into_a_plan(setup, kind):
  cfg, params, batches = setup
  two = kind in ("mfvr", "ensemble")  # progressive over both layers (slower: a compile per stage)
  rc = R.RouterConfig(kind=kind, router_members=2, swag_rank=3)
  rtc = RTT.RouteTrainConfig(route_layers="last:2" if two else "last:1", route_epochs=1)
  plan, rparams, hist = RTT.train_routers(params, Task(cfg, CLASSES), batches, rc, rtc, progress=False)
  assert plan.layer_ids == ((0, 1) if two else (1,)) and set(rparams) == set(plan.layer_ids)
  assert [h["stage"] for h in hist][0].startswith("1")  # the top layer first
  if kind == "swag":
    assert float(rparams[1]["count"]) == 3 and rparams[1]["dev"].shape[0] == 3
  if kind == "ensemble":
    k = np.asarray(rparams[0]["kernels"])
    assert k.shape[0] == 2 and not np.allclose(k[0], k[1])
  # the trained routers run in the model's forward, in inference mode
  f = Task(cfg, CLASSES, routing=plan).logits(B.routing.attach(params, rparams, key=3), batches[0])
  assert np.isfinite(np.asarray(f)).all()


@pytest.mark.parametrize("kind", ["mfvr", "vtsr"])
def test_training_lowers_the_objective(setup, kind):
  cfg, params, batches = setup
  rc = R.RouterConfig(kind=kind)
  rtc = RTT.RouteTrainConfig(route_layers="1", route_epochs=6, route_lr=1e-2)
  task = Task(cfg, CLASSES)
  stage = RTT.stages_of(params, task, rc, 1, {}, rtc, len(batches))[0]
  before = _mean_objective(stage, params, batches)
  _, rparams, hist = RTT.train_routers(params, task, batches, rc, rtc, progress=False)
  after = _mean_objective(stage._replace(theta=rparams[1]), params, batches)
  assert after < before - 0.02, (before, after)  # same keys before and after: no sampling noise
  assert hist[-1]["loss"] < hist[0]["loss"]


def test_interrupted_training_resumes_to_the_same_routers(setup, tmp_path):
  cfg, params, batches = setup
  rc = R.RouterConfig(kind="mfvr")
  rtc = RTT.RouteTrainConfig(route_layers="last:2", route_epochs=2, route_checkpoint_every=3)
  task = Task(cfg, CLASSES)
  _, whole, hist = RTT.train_routers(params, task, batches, rc, rtc, progress=False)
  with pytest.raises(Stop):  # dies in the second layer's stage
    RTT.train_routers(params, task, Interrupting(batches, 8 + 5), rc, rtc, out=tmp_path, progress=False)
  _, resumed, hist2 = RTT.train_routers(params, task, batches, rc, rtc, out=tmp_path, progress=False)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert [h["epoch"] for h in hist2] == [h["epoch"] for h in hist]
  with pytest.raises(ValueError, match="different run"):
    RTT.train_routers(params, task, batches, rc, RTT.RouteTrainConfig(route_layers="last:2", route_epochs=3),
                      out=tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"differs in data.batches, data.digest, data.rows\)"):
    RTT.train_routers(params, task, batches[:-1], rc, rtc, out=tmp_path, progress=False)


def test_layer_specs():
  cfg = B.tiny_config(num_layers=4, moe_layers=(False, True, True, True))
  assert RTT.parse_layers(cfg, "last:2") == (3, 2)
  assert RTT.parse_layers(cfg, "1,3") == (3, 1)
  with pytest.raises(ValueError, match="not MoE layers"):
    RTT.parse_layers(cfg, "0")
  with pytest.raises(ValueError, match="has 3 MoE layers"):
    RTT.parse_layers(cfg, "last:4")
