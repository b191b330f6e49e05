"""The user loop: an interrupted factor pass resumes to the same result; posteriors save and load."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.identity import tree_digest
from bmoe_jax.task import Batch, Task
from tests.fixtures import posterior_of, predict
from bmoe_jax import laplace as LA

CLASSES = jnp.array([1, 2, 5, 9])


def _data(cfg, n_batches=5, b=2, s=6, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n_batches):
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, s)))
    out.append(Batch(tokens, jnp.ones((b, s), jnp.int32), jnp.full((b,), s - 1),
                        jnp.asarray(rng.randint(0, 4, b))))
  return out


class Interrupt(Exception):
  pass


def _interrupted(batches, after):
  for i, b in enumerate(batches):
    if i == after:
      raise Interrupt
    yield b


@pytest.mark.parametrize("rank", [None, 3])
def test_interrupted_pass_resumes_to_the_same_result(tmp_path, rank):
  cfg = B.tiny_config(num_experts=3)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  data = _data(cfg)
  spec = LA.FactorSpec(layers=(0, 1), labels="mc", tokens="expand", rank=rank)
  key = jax.random.key(7)
  whole = LA.fit_factors(params, Task(cfg, CLASSES), data, spec, key=key, progress=False)
  with pytest.raises(Interrupt):
    LA.fit_factors(params, Task(cfg, CLASSES), _interrupted(data, 3), spec, key=key, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
  resumed = LA.fit_factors(params, Task(cfg, CLASSES), data, spec, key=key, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
  assert int(resumed.num_sequences) == 10
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # a finished pass in the same directory is restored, not recomputed
  again = LA.fit_factors(params, Task(cfg, CLASSES), data, spec, key=key, checkpoint_dir=tmp_path, progress=False)
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y)
  other = LA.FactorSpec(layers=(1,), labels="mc", tokens="expand", rank=rank)
  with pytest.raises(ValueError, match="different run .it differs in spec"):
    LA.fit_factors(params, Task(cfg, CLASSES), data, other, key=key, checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"differs in model\)"):
    LA.fit_factors(jax.tree.map(lambda a: a + 1e-3, params), Task(cfg, CLASSES), data, spec, key=key,
                   checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"differs in key\)"):
    LA.fit_factors(params, Task(cfg, CLASSES), data, spec, key=jax.random.key(8), checkpoint_dir=tmp_path,
                   progress=False)
  # the same pass resumed over other data (a generator: the digest is taken as the batches stream past)
  swapped = [data[0]._replace(tokens_bs=data[0].tokens_bs[::-1])] + list(data[1:])
  with pytest.raises(ValueError, match="covered 5 batches of other data"):
    LA.fit_factors(params, Task(cfg, CLASSES), iter(swapped), spec, key=key, checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match="needs key="):
    LA.fit_factors(params, Task(cfg, CLASSES), data, spec, progress=False)


def test_user_loop_and_posterior_roundtrip(tmp_path):
  cfg = B.tiny_config(num_experts=3)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  pretrained = B.init_params(cfg, jax.random.key(0), std=0.3)
  pretrained["layers"][1]["mlp"]["experts"]["w_down"] = pretrained["layers"][1]["mlp"]["experts"]["w_down"] * 0.9
  data = _data(cfg)
  spec = LA.FactorSpec(layers=(0, 1), rank=4, shared=True)
  state = LA.fit_factors(params, Task(cfg, CLASSES), data, spec, progress=False)
  post = posterior_of(LA.kfac.finalize(state), params, prior_mean=pretrained, num_sequences=int(state.num_sequences),
                      dataset_size=100, log_lik=state.log_lik)
  post, curve = LA.optimize_prior_precision(post, "layer", steps=100)
  assert curve["log_marglik"][-1] > curve["log_marglik"][0]
  assert float(post.sq_dist_e[LA.Block(0)].max()) == 0.0 and float(post.sq_dist_e[LA.Block(1)].min()) > 0.0
  assert float(post.sq_dist_e[LA.Block(1, "shared")][0]) == 0.0
  assert len(set(float(v[0]) for v in post.log_prior_prec_e.values())) == 4  # "layer": one lambda per block
  pred = predict(post, params, Task(cfg, CLASSES), data[0], link="probit")
  assert pred.probs_bc.shape == (2, 4) and np.allclose(pred.probs_bc.sum(-1), 1, atol=1e-6)
  LA.save_posterior(tmp_path / "post", post, metadata={"dataset": "synthetic", "model": tree_digest(params)})
  meta = json.loads((tmp_path / "post" / "posterior.json").read_text())
  assert meta["blocks"] == ["0.routed", "0.shared", "1.routed", "1.shared"]
  back = LA.load_posterior(tmp_path / "post", params)  # the model it was fitted on: accepted
  # another model is refused: other Bayesian weights, or the same ones and another final norm (the digest)
  with pytest.raises(ValueError, match="post was fitted on another model: its MAP weights of 1.routed differ"):
    LA.load_posterior(tmp_path / "post", pretrained)
  other = {**params, "final_norm": jax.tree.map(lambda a: a * 2.0, params["final_norm"])}
  with pytest.raises(ValueError, match="post was fitted on another model: the model's weights differ outside"):
    LA.load_posterior(tmp_path / "post", other)
  assert sorted(back.factors) == sorted(post.factors)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(post)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(predict(back, params, Task(cfg, CLASSES), data[0], link="probit").probs_bc,
                                pred.probs_bc)
  with pytest.raises(FileExistsError):
    LA.save_posterior(tmp_path / "post", post)
  # another posterior's arrays under this one's record: readable, refused by the digest written at save
  LA.save_posterior(tmp_path / "post2", post._replace(scale=post.scale * 2))
  shutil.rmtree(tmp_path / "post2" / "state")
  shutil.copytree(tmp_path / "post" / "state", tmp_path / "post2" / "state")
  with pytest.raises(ValueError, match=r"post2/state: the arrays differ from the digest written at save "
                                       r"\(posterior.json: digest\)"):
    LA.load_posterior(tmp_path / "post2")
  with pytest.raises(FileNotFoundError, match="posterior.json"):
    LA.load_posterior(tmp_path)
  meta["format"] = "bmoe_jax/posterior-v1"
  (tmp_path / "post" / "posterior.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="expected 'bmoe_jax/posterior-v2'"):
    LA.load_posterior(tmp_path / "post")


def test_factors_and_evidence_follow_the_parameters_dtype():
  """float64 parameters (jax_enable_x64) give float64 factors, log-likelihood and evidence; float32 and
  bfloat16 parameters accumulate in float32."""
  cfg = B.tiny_config(num_experts=3, moe_layers=(False, True))
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), B.init_params(cfg, jax.random.key(0), std=0.3))
    data = _data(cfg, n_batches=2)
    state = LA.fit_factors(params, Task(cfg, CLASSES), data, LA.FactorSpec(layers=(1,)), progress=False)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(state.stats)[:2]) and state.log_lik.dtype == jnp.float64
    post = posterior_of(LA.kfac.finalize(state), params, prior_mean="zero", num_sequences=4, log_lik=state.log_lik)
    assert LA.posterior.log_marginal_likelihood(post).dtype == jnp.float64
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), B.init_params(cfg, jax.random.key(0), std=0.3))
  assert LA.fit.factor_dtype(bf16, LA.FactorSpec(layers=(1,))) == jnp.float32
