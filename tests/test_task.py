"""The task: what is scored (letters, per-example cloze tokens, masked choices), the cached prefix, and
class probabilities of Gaussian logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.model import forward
from bmoe_jax.task import (CHOICE_MASK_VALUE, Batch, Task, class_probs, mc_softmax, probit, probit_pairwise,
                           same_prefix, with_prefix)
from tests.fixtures import CLASSES, random_batches


@pytest.fixture(scope="module")
def model():
  cfg = B.tiny_config(vocab_size=64, moe_layers=(False, True))
  return cfg, B.init_params(cfg, jax.random.key(3), std=0.2)


def test_task_scores_letters_cloze_tokens_and_masks_choices(model):
  cfg, params = model
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
  logits = np.asarray(forward(params, cfg, tokens, jnp.ones((2, 6), jnp.int32)).logits)
  letters = Batch(tokens, jnp.ones((2, 6), jnp.int32), jnp.asarray([5, 3]), jnp.asarray([0, 2]))
  f = np.asarray(Task(cfg, CLASSES).logits(params, letters))
  np.testing.assert_allclose(f, np.stack([logits[0, 5, np.asarray(CLASSES)], logits[1, 3, np.asarray(CLASSES)]]),
                             atol=1e-5)
  ids = jnp.asarray([[3, 9, 11], [40, 2, 7]])
  cloze = letters._replace(class_ids_bc=ids)
  want = np.stack([logits[0, 5, [3, 9, 11]], logits[1, 3, [40, 2, 7]]])
  np.testing.assert_allclose(np.asarray(Task(cfg, None).logits(params, cloze)), want, atol=1e-5)
  masked = letters._replace(choice_mask_bc=jnp.asarray([[True] * 4, [True, True, True, False]]))
  fm = np.asarray(Task(cfg, CLASSES).logits(params, masked))
  assert fm[1, 3] == CHOICE_MASK_VALUE and np.allclose(fm[0], f[0], atol=1e-6)
  with pytest.raises(ValueError, match="nothing to score"):
    Task(cfg, None).logits(params, letters)
  # hashable and static: one compiled function per task, class ids normalised to a tuple of ints
  assert Task(cfg, CLASSES) == Task(cfg, (3, 7, 11, 19)) and hash(Task(cfg, CLASSES)) == hash(Task(cfg, [3, 7, 11, 19]))
  with pytest.raises(ValueError, match="start_layer=5"):
    Task(cfg, CLASSES, start_layer=5)


def test_cached_prefix_changes_nothing_and_mismatches_are_refused(model):
  cfg, params = model
  task = Task(cfg, CLASSES)
  batches = random_batches(cfg, 2, b=4, s=6, ragged=True)
  fast, (cached,) = with_prefix(params, task, [batches], 1, progress=False)
  assert fast.start_layer == 1 and all(b.states_bsd is not None for b in cached)
  for full, part in zip(batches, cached):
    np.testing.assert_allclose(fast.logits(params, part), task.logits(params, full), atol=1e-5)
  assert with_prefix(params, task, [batches], 0)[0] is task
  with pytest.raises(ValueError, match="carries states_bsd but the task has start_layer=0"):
    task.logits(params, cached[0])
  with pytest.raises(ValueError, match="carries no cached states"):
    fast.logits(params, batches[0])
  higher, (top,) = with_prefix(params, fast, [cached], 2, progress=False)  # re-cached from the cached states
  assert higher.start_layer == 2
  np.testing.assert_allclose(higher.logits(params, top[0]), task.logits(params, batches[0]), atol=1e-5)
  with pytest.raises(ValueError, match="cannot cache the lower layer 0"):
    with_prefix(params, higher, [top], 0)
  other = {**params, "layers": [params["layers"][0], {}]}  # only the prefix is compared
  assert same_prefix(params, other, 1) and not same_prefix(params, B.init_params(cfg, jax.random.key(4)), 1)
  assert not same_prefix(params, {**params, "layers": []}, 1)  # a missing layer is a mismatch, not a match
  assert not same_prefix(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), 1)
  from bmoe_jax.routing import RouterConfig, RoutingPlan
  routed = Task(cfg, CLASSES, routing=RoutingPlan.of({1: RouterConfig(kind="temperature")}))
  with pytest.raises(ValueError, match="layers \\[1\\] run temperature routers, below the cache's layer 2"):
    with_prefix(params, routed, [batches], 2)
  assert with_prefix(params, routed, [batches], 1, progress=False)[0].start_layer == 1  # below the router: fine


def test_class_probs_links():
  f = jnp.asarray([[2.0, 0.0, -1.0]])
  cov = jnp.asarray([[[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 2.0]]])
  np.testing.assert_array_equal(class_probs(f, cov), probit_pairwise(f, cov))  # the default
  np.testing.assert_array_equal(class_probs(f, cov, "probit"), probit(f, cov))
  np.testing.assert_array_equal(class_probs(f, cov, "mc", jax.random.key(0), 50),
                                mc_softmax(f, cov, jax.random.key(0), 50))
  np.testing.assert_allclose(class_probs(f, 0 * cov, "mc"), jax.nn.softmax(f), atol=1e-6)  # no variance: softmax
  np.testing.assert_allclose(class_probs(f, cov, "mc", num_samples=100000), probit(f, cov), atol=0.03)
  np.testing.assert_allclose(class_probs(f, cov, "mc", num_samples=100000), probit_pairwise(f, cov), atol=0.03)
  with pytest.raises(ValueError, match="link='logit'"):
    class_probs(f, cov, "logit")


def _gaussians(rng, num: int, c: int, spread: float, common: float, offset: float):
  """``num`` [1, c] means and [1, c, c] covariances: a random part of size ``spread`` and variance
  ``common`` shared by every class (continuation scores: the choices share their context)."""
  for _ in range(num):
    a = rng.randn(c, c) * spread
    yield (jnp.asarray(rng.randn(1, c) * 1.5 + offset),
           jnp.asarray((a @ a.T / c + common * np.ones((c, c)))[None]))


def test_pairwise_probit_is_shift_invariant_and_exact_where_it_must_be():
  rng = np.random.RandomState(0)
  for f, cov in _gaussians(rng, 5, 4, 1.0, 0.0, 0.0):
    p = probit_pairwise(f, cov)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)
    # a common shift of the mean, and variance common to every class, change no draw's softmax
    np.testing.assert_allclose(probit_pairwise(f - 40.0, cov + 25.0), p, rtol=1e-5)
    assert np.abs(np.asarray(probit(f - 40.0, cov + 25.0) - probit(f, cov))).max() > 0.05  # laplace-torch's: not
    np.testing.assert_allclose(probit_pairwise(f, 0 * cov), jax.nn.softmax(f), rtol=1e-5)  # no variance
  # two classes: MacKay's probit of the logit difference, sigma(d / sqrt(1 + pi/8 Var d))
  f, cov = jnp.asarray([[0.7, -0.4]]), jnp.asarray([[[2.0, 0.3], [0.3, 0.5]]])
  d, var_d = 1.1, 2.0 + 0.5 - 0.6
  np.testing.assert_allclose(probit_pairwise(f, cov)[0, 0], jax.nn.sigmoid(d / np.sqrt(1 + np.pi / 8 * var_d)),
                             rtol=1e-6)
  # a missing choice (CHOICE_MASK_VALUE, no variance) gets 0 and leaves the others as without it
  masked = probit_pairwise(jnp.asarray([[0.7, -0.4, CHOICE_MASK_VALUE]]), jnp.pad(cov, ((0, 0), (0, 1), (0, 1))))
  np.testing.assert_allclose(masked[0, :2], probit_pairwise(f, cov)[0], rtol=1e-6)
  assert float(masked[0, 2]) == 0.0


@pytest.mark.parametrize("spread,common,offset", [(0.5, 0.0, 0.0), (1.5, 0.0, 0.0), (1.0, 10.0, -40.0)])
def test_pairwise_probit_is_closer_to_mc_than_laplace_torch_probit(spread, common, offset):
  """Against 100k-draw mc on random 4-class Gaussians: the pairwise form is never the worse one on average,
  and with continuation-like logits (far below 0, mostly common variance) it is several times closer."""
  rng, err = np.random.RandomState(1), {"pairwise": [], "probit": []}
  for i, (f, cov) in enumerate(_gaussians(rng, 20, 4, spread, common, offset)):
    mc = mc_softmax(f, cov, jax.random.key(i), 100000)
    err["pairwise"].append(float(jnp.abs(probit_pairwise(f, cov) - mc).max()))
    err["probit"].append(float(jnp.abs(probit(f, cov) - mc).max()))
  assert np.mean(err["pairwise"]) < np.mean(err["probit"])
  assert np.mean(err["pairwise"]) < 0.05
  if common:
    assert np.mean(err["pairwise"]) < 0.3 * np.mean(err["probit"])
