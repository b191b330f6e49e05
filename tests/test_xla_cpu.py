"""The XLA:CPU workaround (``bmoe_jax.xla_cpu``): in this process vmapped pullbacks are right, and the
K-FAC pass at a size that triggered the miscompilation (16 x 64 tokens) equals per-class gradients."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bmoe_jax as B
from bmoe_jax.task import Batch, Task
from bmoe_jax import xla_cpu
from bmoe_jax.laplace import kfac


def test_flag_is_applied_and_the_reproducer_is_right():
  assert xla_cpu.STATUS in ("applied", "already set", "flag unknown to this jaxlib"), xla_cpu.STATUS
  assert xla_cpu.check() < 1e-5


def test_opt_out_and_too_late_are_reported():
  code = ("import jax.numpy as jnp; jnp.ones(2).sum(); import bmoe_jax; from bmoe_jax import xla_cpu; "
          "print(xla_cpu.STATUS)")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  if xla_cpu.STATUS != "flag unknown to this jaxlib":
    assert out.stdout.strip().startswith("too late")
  out = subprocess.run([sys.executable, "-c", "import bmoe_jax; print(bmoe_jax.xla_cpu.STATUS)"],
                       env=dict(env, BMOE_XLA_WORKAROUND="0"), capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == "disabled"


def test_opt_in_to_ynnpack_dots_keeps_the_reproducer_exact():
  """BMOE_XLA_WORKAROUND=dots keeps YNNPACK's dots (fast bf16 on CPU) and still leaves its reduce fusion out."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = "import os, bmoe_jax; print(os.environ['XLA_FLAGS'], bmoe_jax.xla_cpu.check())"
  out = subprocess.run([sys.executable, "-c", code], env=dict(env, BMOE_XLA_WORKAROUND="dots"), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  if xla_cpu.STATUS != "flag unknown to this jaxlib":
    flags, err = out.stdout.split()
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=individual_dot" and float(err) < 1e-5, out.stdout


def test_exact_factors_at_1k_tokens_equal_per_class_gradients():
  """The G factor of exact labels is sum_c p_c g_c g_c^T with g_c the gradient of class c's logit
  w.r.t. the expert outputs: recomputed here one class at a time with jax.grad."""
  cfg = B.tiny_config(vocab_size=256, hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8,
                      moe_intermediate_size=32, num_experts=8, moe_layers=(True,), shared_expert_size=0)
  params = B.init_params(cfg, jax.random.key(0), std=0.05)
  b, s = 16, 64
  tokens = np.random.RandomState(0).randint(0, 256, (b, s))
  batch = Batch(jnp.asarray(tokens), jnp.ones((b, s), jnp.int32), jnp.full((b,), s - 1),
                     jnp.asarray(tokens[:, 0] % 4))
  classes = jnp.array([3, 7, 11, 19])
  spec = kfac.FactorSpec(layers=(0,))
  got = jax.jit(lambda p, bt: kfac.update(kfac.init(cfg, spec), p, Task(cfg, classes), bt, spec))(params, batch)
  zero = B.zero_perturbations(cfg, b, s)
  f_bc, taps = Task(cfg, classes).logits_and_taps(params, batch, zero)
  p = np.asarray(jax.nn.softmax(f_bc, -1), np.float64)
  expert_bk = np.asarray(taps[0].expert_bsk[:, -1])  # the answer position's slots ("last" tokens)
  # J[c, b, k, :] = d f_bc[b, c] / d (slot k's expert output), one class at a time
  jac_cbkd = np.stack([np.asarray(jax.jit(jax.grad(
      lambda z, c=c: Task(cfg, classes).logits_and_taps(params, batch, z)[0][:, c].sum()))(zero)[0]["routed"][:, -1])
      for c in range(4)])
  # exact labels: G_e = sum_b sum_y p_y g g^T with g = J^T (p - e_y), the gradient of -log p_y
  want = np.zeros(got.stats[kfac.Block(0)].g_edd.shape)
  for i in range(b):
    for y in range(4):
      for k in range(cfg.num_experts_per_tok):
        g_d = np.einsum("c,cd->d", p[i] - np.eye(4)[y], jac_cbkd[:, i, k])
        want[int(expert_bk[i, k])] += p[i, y] * np.outer(g_d, g_d)
  have = np.asarray(got.stats[kfac.Block(0)].g_edd, np.float64)
  np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
