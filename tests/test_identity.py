"""Run identity: the digests change with every bit of the weights and of the data (and with nothing else),
and fingerprint differences are named key by key."""

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.identity import DataDigest, data_digest, differences, tree_digest
from bmoe_jax.task import Batch


def _batch(seed=0, b=2, s=5):
  rng = np.random.RandomState(seed)
  return Batch(jnp.asarray(rng.randint(0, 50, (b, s))), jnp.ones((b, s), jnp.int32), jnp.full((b,), s - 1),
               jnp.asarray(rng.randint(0, 3, b)))


def test_tree_digest_sees_every_bit_and_the_structure():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.ones(2, jnp.bfloat16), None], "key": jax.random.key(0)}
  assert tree_digest(tree) == tree_digest(jax.tree.map(lambda x: x, tree))
  flipped = np.asarray(tree["a"]).copy()
  flipped.view(np.uint32)[1, 2] ^= 1  # one bit of one float
  changes = [{**tree, "a": jnp.asarray(flipped)},
             {**tree, "a": tree["a"].reshape(3, 2)},  # same bytes, another shape
             {**tree, "a": tree["a"].astype(jnp.float64) if jax.config.jax_enable_x64 else tree["a"].astype(jnp.int32)},
             {**tree, "key": jax.random.key(1)},
             {"A": tree["a"], "b": tree["b"], "key": tree["key"]}]  # same leaves under another name
  digests = {tree_digest(t) for t in changes}
  assert len(digests) == len(changes) and tree_digest(tree) not in digests


def test_data_digest_sees_the_data_but_not_a_prefix_cache():
  batches = [_batch(0), _batch(1)]
  d = data_digest(batches)
  assert d["batches"] == 2 and d["rows"] == 4
  cached = [b._replace(states_bsd=jnp.ones((2, 5, 3))) for b in batches]
  assert data_digest(cached) == d  # states are a function of the model (its own digest) and the data
  for other in ([batches[1], batches[0]],  # order
                [batches[0], batches[1]._replace(labels_b=(batches[1].labels_b + 1) % 3)],
                [batches[0], batches[1]._replace(choice_mask_bc=jnp.ones((2, 3), bool))],
                [batches[0]]):
    assert data_digest(other)["digest"] != d["digest"]
  running = DataDigest()
  for b in batches:
    running.update(b)
  assert running.value() == d


def test_differences_name_the_nested_keys():
  old = {"spec": {"rank": 10, "layers": [1, 2]}, "data": {"train": {"digest": "a", "rows": 4}}, "seed": 0}
  new = {"spec": {"rank": 10, "layers": [1]}, "data": {"train": {"digest": "b", "rows": 4}}, "model": "m", "seed": 0}
  assert differences(old, new) == ["data.train.digest", "model (only in the new run)", "spec.layers"]
  assert differences(old, old) == []
  assert differences(1, 2) == ["(the whole fingerprint)"]
