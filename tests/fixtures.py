"""Shared test setups: class tokens, random multiple-choice batches, tiny models, and a tiny model with a
BPE tokenizer trained on real OBQA rows (for the command-line and pipeline tests)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bmoe_jax as B
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.params import read_blocks
from bmoe_jax.task import Batch, Task

CLASSES = jnp.array([3, 7, 11, 19])

# The library's entry points as one compiled program each. Run op by op (outside jax.jit), a call compiles every
# operation as its own small program the first time its shapes are seen (~20 ms each, hundreds per call); they are
# jit-safe by contract, so the tests that only need their values call them through these.
factor_stats = jax.jit(kfac.factor_stats, static_argnums=(1, 3))
kfac_update = jax.jit(kfac.update, static_argnums=(2, 4))
jacobian_stats = jax.jit(PR.jacobian_stats, static_argnums=1)
predict = jax.jit(PR.predict, static_argnames=("task", "method", "link", "num_samples"))


def random_batches(cfg, n_batches, b=8, s=6, seed=0, labels="first_token", ragged=False):
  """Random token batches answered at the last real position. ``labels``: ``"first_token"`` (the first
  token mod 4: learnable by the experts) or ``"random"`` (uniform over 4 classes). ``ragged``: sequences
  of random lengths (right padding)."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n_batches):
    tokens = rng.randint(0, cfg.vocab_size, (b, s))
    lengths = rng.randint(max(2, s - 3), s + 1, b) if ragged else np.full(b, s)
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    y = tokens[:, 0] % 4 if labels == "first_token" else rng.randint(0, 4, b)
    out.append(Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths - 1), jnp.asarray(y)))
  return out


def synthetic_task(cfg, n_batches, b=8, s=6, seed=0):
  """Batches whose label is the first token mod 4 (learnable by the experts)."""
  return random_batches(cfg, n_batches, b, s, seed)


def top_layer_moe(seq: int = 5):
  """A 2-layer tiny model with only layer 1 MoE (3 experts) and a batch of 4 sequences of ``seq`` tokens."""
  cfg = B.tiny_config(num_experts=3, moe_layers=(False, True))
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (4, seq)))
  batch = Batch(tokens, jnp.ones((4, seq), jnp.int32), jnp.array([seq - 1, 3, 4, 2]), jnp.array([0, 2, 1, 1]))
  return cfg, params, batch


def posterior_of(factors, params, *, prior_mean="map", **kw) -> P.Posterior:
  """``posterior.build`` with the MAP weights read from ``params``; ``prior_mean`` may also be a
  parameter tree (its blocks are the prior mean)."""
  if isinstance(prior_mean, dict) and "layers" in prior_mean:
    prior_mean = read_blocks(prior_mean, factors)
  return P.build(factors, read_blocks(params, factors), prior_mean=prior_mean, **kw)


def fitted_posterior(params, task: Task, batches, spec: kfac.FactorSpec, **kw) -> P.Posterior:
  """A posterior from one factor pass over ``batches`` (``kw``: ``posterior_of``'s)."""
  state = kfac.init(task.cfg, spec)
  for b in batches:
    state = kfac_update(state, params, task, b, spec)
  kw.setdefault("num_sequences", int(state.num_sequences))
  return posterior_of(kfac.finalize(state), params, log_lik=state.log_lik, **kw)


def example(batch, b):
  """Example ``b`` of ``batch`` as a batch of one; ``b`` may be traced (one compiled program for every b)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, b, 1), batch)


def exact_ggn_block(params, task: Task, batch, block):
  """The exact GGN of sum_b CE w.r.t. a block's down_proj [e, f, d]: J^T (diag p - p p^T) J per example,
  J the materialised Jacobian of the task output. Returns [e, f*d, f*d] (the expert-diagonal blocks). One
  compiled program: the examples are a ``lax.map`` over the batch."""
  from bmoe_jax.params import read_block, write_blocks

  w = read_block(params, block)
  e, fdim, d = w.shape

  def per_example(b):
    f = lambda w_down: task.logits(write_blocks(params, {block: w_down}), example(batch, b))[0]
    p = jax.nn.softmax(f(w))
    jac = jax.jacrev(f)(w).reshape(p.shape[0], e, fdim * d)
    lam = jnp.diag(p) - jnp.outer(p, p)
    return jnp.einsum("cep,cq,qeo->epo", jac, lam, jac)

  per_b = jax.jit(lambda: jax.lax.map(per_example, jnp.arange(batch.tokens_bs.shape[0])))()
  return per_b.sum(0)


def obqa_prompts(shared_data, n=400):
  """Lettered OBQA prompts (question, options, the letters) of the first ``n`` training rows."""
  from bmoe_jax import data as D
  return [f"Question: {e.question}\n" + "\n".join(f"{L}. {c}" for L, c in zip("ABCD", e.choices))
          + "\nAnswer: A B C D" for e in D.load("obqa", "train", data_dir=shared_data).examples[:n]]


def tiny_model_dir(out: Path, shared_data, num_experts=4, rows=400, init_seed=0, **cfg) -> Path:
  """A converted tiny model (layer 0 dense, layer 1 MoE, vocabulary 512; ``cfg``: other ``tiny_config``
  fields; weights drawn with ``init_seed``) with a BPE tokenizer trained on OBQA prompts, saved in ``out``."""
  from bmoe_jax.checkpoint import save_params
  from bmoe_jax.data.toy_tokenizer import train_bpe

  tok = train_bpe(obqa_prompts(shared_data, rows), 480)
  cfg = B.tiny_config(vocab_size=512, num_experts=num_experts, **({"moe_layers": (False, True)} | cfg))
  save_params(out, cfg, B.init_params(cfg, jax.random.key(init_seed), std=0.3))
  tok.save_pretrained(str(out))
  return out


def hf_checkpoint(tmp_path_factory, family: str, seed: int) -> Path:
  """A tiny random transformers checkpoint of ``family`` in a fresh temporary directory."""
  from convert.reference import make_checkpoint
  d = tmp_path_factory.mktemp(family)
  make_checkpoint(family, d, seed=seed)
  return d


def assert_same_conversion(source: Path, tensors: dict, out: Path) -> None:
  """``tensors`` (another key layout of the checkpoint in ``source``), written to ``out`` with ``source``'s
  config.json, convert to exactly the parameters ``source`` converts to."""
  from convert import load_hf_checkpoint
  from convert.safetensors_io import save_file
  out.mkdir(parents=True)
  save_file(tensors, out / "model.safetensors")
  (out / "config.json").write_text((source / "config.json").read_text())
  _, a = load_hf_checkpoint(source, progress=False)
  _, b = load_hf_checkpoint(out, progress=False)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
