"""MAP fine-tuning on a tiny model: it lowers validation loss, trains only the chosen subset, and an
interrupted run resumes to the same parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.task import Task
from bmoe_jax import train as T
from tests.fixtures import CLASSES, synthetic_task as _task

@pytest.fixture(scope="module")
def setup():
  cfg = B.tiny_config(num_experts=4)
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.2), _task(cfg, 6), _task(cfg, 2, seed=1)


def test_finetune_lowers_validation_loss_and_freezes_the_rest(setup):
  cfg, params, train, val = setup
  tc = T.TrainConfig(trainable="experts_router", lr=3e-3, epochs=4, eval_every=6, warmup_steps=2)
  before, _ = T.evaluate_nll(params, Task(cfg, CLASSES), train)
  res = T.finetune(params, Task(cfg, CLASSES), train, tc, val_batches=val, progress=False)
  after, _ = T.evaluate_nll(res.params, Task(cfg, CLASSES), train)
  assert after < before - 0.3  # the training loss drops clearly
  assert [h["step"] for h in res.history] == [6, 12, 18, 24]
  mask = T.trainable_mask(params, cfg, "experts_router")
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, res.params)
  assert jax.tree.leaves(changed) == jax.tree.leaves(mask)  # exactly the trainable leaves moved
  # the returned parameters are the best validation ones
  best = min(h["val_nll"] for h in res.history)
  assert T.evaluate_nll(res.params, Task(cfg, CLASSES), val)[0] == pytest.approx(best, rel=1e-5)


def test_prior_pulls_towards_pretrained(setup):
  cfg, params, train, _ = setup
  dist = {}
  for lam in (0.0, 1e4):
    tc = T.TrainConfig(trainable="experts", lr=3e-3, epochs=2, prior_precision=lam)
    res = T.finetune(params, Task(cfg, CLASSES), train, tc, progress=False)
    dist[lam] = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(params)))
  assert dist[1e4] < 0.5 * dist[0.0]


class Stop(Exception):
  pass


class Interrupting(list):
  """The training batches, raising after ``after`` reads (a crash mid-run)."""

  def __init__(self, items, after):
    super().__init__(items)
    self.after, self.reads = after, 0

  def __getitem__(self, i):
    self.reads += 1
    if self.reads > self.after:
      raise Stop
    return super().__getitem__(i)


def test_interrupted_finetune_resumes_to_the_same_parameters(setup, tmp_path):
  cfg, params, train, val = setup
  tc = T.TrainConfig(trainable="experts", lr=3e-3, epochs=2, grad_accum=2, eval_every=2,
                     checkpoint_every=3)  # saves between evaluations: the running training loss is restored too
  whole = T.finetune(params, Task(cfg, CLASSES), train, tc, val_batches=val, progress=False)
  with pytest.raises(Stop):
    T.finetune(params, Task(cfg, CLASSES), Interrupting(train, 7), tc, val_batches=val, checkpoint_dir=tmp_path,
               progress=False)
  resumed = T.finetune(params, Task(cfg, CLASSES), train, tc, val_batches=val, checkpoint_dir=tmp_path, progress=False)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert resumed.history == whole.history
  with pytest.raises(ValueError, match=r"different run .it differs in train_config.epochs\)"):
    T.finetune(params, Task(cfg, CLASSES), train, dataclasses.replace(tc, epochs=3), val_batches=val,
               checkpoint_dir=tmp_path, progress=False)
  # the same config on other data, a shorter dataset or another starting model is another run, never a resume
  other = [train[0]._replace(labels_b=(train[0].labels_b + 1) % len(CLASSES))] + list(train[1:])
  with pytest.raises(ValueError, match=r"differs in data.train.digest\)"):
    T.finetune(params, Task(cfg, CLASSES), other, tc, val_batches=val, checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"differs in data.train.batches, data.train.digest, data.train.rows\)"):
    T.finetune(params, Task(cfg, CLASSES), train[:-1], tc, val_batches=val, checkpoint_dir=tmp_path, progress=False)
  moved = jax.tree.map(lambda a: a * 1.001, params)
  with pytest.raises(ValueError, match=r"differs in model\)"):
    T.finetune(moved, Task(cfg, CLASSES), train, tc, val_batches=val, checkpoint_dir=tmp_path, progress=False)


def test_checkpoints_of_a_run_load_as_ensemble_members(setup, tmp_path):
  """The kept saves of one run (a checkpoint ensemble): the latest equals the run's result, each one keeps
  the frozen leaves, and the ensemble averages its members' probabilities."""
  from bmoe_jax import baselines as BL

  cfg, params, train, _ = setup
  tc = T.TrainConfig(trainable="experts", lr=3e-3, epochs=2, checkpoint_every=3, keep_checkpoints=3)
  res = T.finetune(params, Task(cfg, CLASSES), train, tc, checkpoint_dir=tmp_path, progress=False)
  members = T.load_checkpoints(tmp_path, params, cfg)
  assert [s for s, _ in members] == [6, 9, 12]
  for a, b in zip(jax.tree.leaves(members[-1][1]), jax.tree.leaves(res.params)):
    np.testing.assert_array_equal(a, b)
  mask = T.trainable_mask(params, cfg, "experts")
  for (_, m), (_, n) in zip(members, members[1:]):
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), m, n)
    assert jax.tree.leaves(moved) == jax.tree.leaves(mask)
  probs = BL.ensemble([m for _, m in members], Task(cfg, CLASSES))(train[0])
  each = [BL.map_method(m, Task(cfg, CLASSES))(train[0]) for _, m in members]
  np.testing.assert_allclose(probs, np.mean(each, 0), rtol=1e-6)
  assert [s for s, _ in T.load_checkpoints(tmp_path, params, cfg, steps=[9])] == [9]
  with pytest.raises(ValueError, match="steps \\[3\\] not saved \\(saved: \\[6, 9, 12\\]\\)"):
    T.load_checkpoints(tmp_path, params, cfg, steps=[3])
  with pytest.raises(FileNotFoundError, match="finetune.json not found"):
    T.load_checkpoints(tmp_path / "nothing", params, cfg)
  other = B.tiny_config(num_experts=2)
  with pytest.raises(ValueError, match="different model config"):
    T.load_checkpoints(tmp_path, B.init_params(other, jax.random.key(0)), other)


def test_bad_configs(setup):
  cfg, params, train, _ = setup
  with pytest.raises(ValueError, match="trainable='lora'"):
    T.TrainConfig(trainable="lora")
  with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
    T.trainable_mask(params, cfg, "experts", layers=[7])
  dense = B.tiny_config(moe_layers=(False, False))
  with pytest.raises(ValueError, match="selects no parameters"):
    T.trainable_mask(B.init_params(dense, jax.random.key(0)), dense, "experts")
  with pytest.raises(ValueError, match="no training batches"):
    T.finetune(params, Task(cfg, CLASSES), [], T.TrainConfig(), progress=False)


def test_cached_prefix_gives_the_same_fine_tune(setup):
  """Only layer 1 trains: running layer 0 once per batch and training on its cached output is exact."""
  cfg, params, train, val = setup
  tc = T.TrainConfig(trainable="experts_router", layers=(1,), lr=3e-3, epochs=2, eval_every=3)
  plain = T.finetune(params, Task(cfg, CLASSES), train, tc, val_batches=val, progress=False)
  cached = T.finetune(params, Task(cfg, CLASSES), train, tc, val_batches=val, progress=False, cache_prefix=True)
  for a, b in zip(jax.tree.leaves(cached.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert [h["val_nll"] for h in cached.history] == pytest.approx([h["val_nll"] for h in plain.history], rel=1e-5)
  assert T.first_trainable_layer(T.trainable_mask(params, cfg, "experts", layers=(1,))) == 1
  assert T.first_trainable_layer(T.trainable_mask(params, cfg, "all")) == 0


def test_a_diverged_run_stops_with_the_step_and_keeps_only_finite_saves(setup, tmp_path):
  """lr = 1e8 diverges: the run raises naming the step instead of returning (and saving) a NaN model, and the
  saves it leaves behind are finite; a NaN gradient (here: a NaN in the trainable weights) stops step 1."""
  from bmoe_jax.finite import NonFiniteError, nonfinite_leaves

  cfg, params, train, val = setup
  tc = T.TrainConfig(trainable="all", lr=1e8, epochs=20, eval_every=0, checkpoint_every=1, keep_checkpoints=1,
                     warmup_steps=0, schedule="constant")
  with pytest.raises(NonFiniteError, match=r"fine-tuning diverged at step (\d+) \(epoch \d+, batch \d+\): the loss "
                                           r"or a gradient is not finite.*the last finite save, step \d+, is kept"):
    T.finetune(params, Task(cfg, CLASSES), train, tc, checkpoint_dir=tmp_path, progress=False)
  saved = T.load_checkpoints(tmp_path, params, cfg)
  assert saved and not nonfinite_leaves(saved[-1][1])
  bad = jax.tree.map(lambda a: a, params)
  bad["layers"][0]["mlp"]["experts"]["w_up"] = bad["layers"][0]["mlp"]["experts"]["w_up"].at[0, 0, 0].set(jnp.nan)
  with pytest.raises(NonFiniteError, match="diverged at step 1 .*nothing was saved"):
    T.finetune(bad, Task(cfg, CLASSES), train, dataclasses.replace(tc, lr=1e-3), progress=False)
