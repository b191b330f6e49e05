"""The validation statistics of the prior-precision grid: streamed, resumable after an interruption without
recomputing the saved batches, equal to an uninterrupted pass, and refusing other data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.pipeline import validation as V
from bmoe_jax.task import Task
from tests.fixtures import fitted_posterior, random_batches, top_layer_moe

CLASSES = jnp.array([3, 7, 11, 19])
GRID = [0.1, 1.0, 10.0]


class Stop(Exception):
  pass


def test_an_interrupted_pass_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  cfg, params, _ = top_layer_moe()
  task = Task(cfg, CLASSES)
  batches = random_batches(cfg, 3, b=4, s=5)
  post = fitted_posterior(params, task, batches[:1], kfac.FactorSpec(layers=(1,)), dataset_size=4)
  whole = V.validation_stats(params, task, batches, post, GRID)
  computed, kill_at = [], [3]
  real = PR.jacobian_stats_jit

  def counting(params, *, task, batch, post):
    computed.append(int(batch.labels_b[0]))
    if len(computed) == kill_at[0]:  # killed while computing the third batch of the first run
      raise Stop
    return real(params, task=task, batch=batch, post=post)

  monkeypatch.setattr(PR, "jacobian_stats_jit", counting)
  with pytest.raises(Stop):
    V.validation_stats(params, task, batches, post, GRID, resume_dir=tmp_path)
  computed.clear()
  kill_at[0] = 0
  resumed = V.validation_stats(params, task, batches, post, GRID, resume_dir=tmp_path)
  assert len(computed) == 1  # only the batch the kill interrupted
  for a, b in zip(resumed, whole):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # the same posterior and grid on other data: refused; another grid: recomputed from the start
  other = [jax.tree.map(lambda x: x, b)._replace(labels_b=(b.labels_b + 1) % 4) for b in batches]
  with pytest.raises(ValueError, match="labels differ from the saved ones"):
    V.validation_stats(params, task, other, post, GRID, resume_dir=tmp_path)
  computed.clear()
  V.validation_stats(params, task, batches, post, GRID[:2], resume_dir=tmp_path)
  assert len(computed) == 3
