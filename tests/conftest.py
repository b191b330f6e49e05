import os

# Compiling is ~85% of this suite's time (tiny models; measured with jax.monitoring's compile-duration events): LLVM
# at -O0 compiles ~40% faster and computes the same values (the parity tests pass unchanged). Set before JAX's backend
# starts; subprocesses inherit it. Tests of speed live in benchmarks/, which keep XLA's default.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import bmoe_jax  # noqa: F401,E402  (first: sets the XLA:CPU flag of bmoe_jax.xla_cpu before JAX's backend starts)

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def padded_batch(vocab: int, seed: int = 0, b: int = 3, s: int = 11, side: str = "right"):
  """Token ids and a mask with padding on one row (right or left) and a full row."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (b, s))
  mask = np.ones((b, s), np.int64)
  if side == "right":
    mask[1, s - 4:] = 0
  else:
    mask[1, :4] = 0
  mask[2, s - 1:] = 0 if side == "right" else 1
  return tokens, mask


@pytest.fixture(scope="session")
def shared_data():
  """``../shared/data``. Under CI it must exist: a missing data dir fails the test, never skips it."""
  path = os.path.abspath(SHARED_DATA)
  if not os.path.isdir(path):
    if os.environ.get("CI"):
      pytest.fail(f"{path} is missing: CI must run with ../shared/data beside the repository")
    pytest.skip(f"{path} not present")
  return path


@pytest.fixture
def rng():
  return np.random.RandomState(0)
