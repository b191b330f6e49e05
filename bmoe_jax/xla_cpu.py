"""A workaround for an XLA:CPU miscompilation that breaks vmapped pullbacks (found 2026-11-24, jaxlib 0.10.2).

Under ``jax.jit`` on CPU, ``jax.vmap`` over the pullback of ``y = x * sum(x * x, -1)`` (RMSNorm's
pattern) with ``x`` of shape [16, 64, 64] in float32 returns gradients 10-45% off (eager and looped
pullbacks are right; shapes below ~1k rows are right). The K-FAC pass (one pullback per class, vmapped)
and the closed-form predictive hit it at realistic batch sizes. XLA's experimental YNNPACK fusion is the
cause, its *reduce* fusion precisely: with ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNN fusions, the
default here) every case here is exact, and so is ``=individual_dot`` (YNNPACK for dots only).

The two differ elsewhere (measured 2026-12-03). Without YNNPACK, XLA:CPU upcasts every bf16 dot to float32 (a
2048x512x1024 bf16 x bf16 -> f32 dot: ~170 GFLOP/s, against ~390 with YNNPACK's dot; float32 ~190 either way), so
a bf16 forward is slower than float32. With YNNPACK's dots, float32 results drift: a last-layer K-FAC GLM
predictive covariance (``benchmarks/laplace.py``'s MLP) is 2.7e-4 off laplace-torch's float64 one, against
4.6e-5 without. Exact float32 numerics stay the default; ``BMOE_XLA_WORKAROUND=dots`` opts into YNNPACK's dots
(for bf16 work on CPU).

``apply()`` (run when ``bmoe_jax`` is imported) adds that flag to ``XLA_FLAGS`` if this jaxlib knows
it, the user has not set it, and JAX's backend has not started yet (XLA reads its flags once). Set
``BMOE_XLA_WORKAROUND=0`` to leave ``XLA_FLAGS`` alone (``=dots``: YNNPACK's dots on, see above). ``check()``
runs the reproducer; the K-FAC and predictive entry points warn once if it fails (e.g. when JAX computed something
before the import).
"""

from __future__ import annotations

import functools
import mmap
import os
import warnings
from pathlib import Path

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
ENV = "BMOE_XLA_WORKAROUND"
FLAG = f"--{FLAG_NAME}=" + ("individual_dot" if os.environ.get(ENV) == "dots" else "")


@functools.lru_cache(maxsize=None)
def jaxlib_knows_flag(name: str = FLAG_NAME) -> bool:
  """Whether jaxlib's shared libraries define the XLA flag ``name`` (an unknown XLA flag aborts the process)."""
  try:
    import jaxlib
  except ImportError:
    return False
  for lib in Path(jaxlib.__file__).parent.glob("*.so*"):
    try:
      with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(name.encode()) >= 0:
          return True
    except (OSError, ValueError):
      continue
  return False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", {}))
  except Exception:  # private API moved: assume not started
    return False


def apply() -> str:
  """Add the flag to ``XLA_FLAGS`` when possible; returns what happened (for tests and logs)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get(ENV, "1") == "0":
    return "disabled"
  if FLAG_NAME in flags:
    return "already set"
  if not jaxlib_knows_flag():
    return "flag unknown to this jaxlib"
  if _backend_started():
    return "too late: the JAX backend started before bmoe_jax was imported"
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return "applied"


STATUS = apply()


@functools.lru_cache(maxsize=1)
def check() -> float:
  """The reproducer's max relative error of a jitted, vmapped pullback against eager pullbacks (CPU
  only; 0.0 elsewhere). Correct compilers give ~1e-7."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  if jax.default_backend() != "cpu":
    return 0.0
  rng = np.random.RandomState(0)
  x0 = jnp.asarray(rng.randn(16, 64, 64), jnp.float32)
  _, pull = jax.vjp(lambda p: ((x0 + p) * jnp.sum((x0 + p) ** 2, -1, keepdims=True))[:, -1, :4], jnp.zeros_like(x0))
  cts = jnp.asarray(rng.randn(3, 16, 4), jnp.float32)
  jitted = jax.jit(lambda c: jax.vmap(lambda ct: pull(ct)[0])(c))(cts)
  eager = jnp.stack([pull(ct)[0] for ct in cts])
  return float(jnp.max(jnp.abs(jitted - eager)) / jnp.max(jnp.abs(eager)))


def warn_if_broken(tol: float = 1e-4) -> None:
  import jax
  with jax.ensure_compile_time_eval():  # callers may be inside a jit trace: run the reproducer concretely
    err = check()
  if err > tol:
    warnings.warn(f"XLA:CPU computes vmapped pullbacks wrongly in this process (reproducer error {err:.2g}; "
                  f"bmoe_jax.xla_cpu: {STATUS}); K-FAC factors and predictives would be wrong. Start Python "
                  f"with XLA_FLAGS={FLAG} (or import bmoe_jax before running any JAX computation).",
                  RuntimeWarning, stacklevel=3)
