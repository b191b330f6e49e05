import os

# XLA compiling and JAX tracing are two thirds of this suite's time (tiny models; ``python -m tests.durations``:
# 48% and 19% before the 12-07 work), so the suite compiles for speed of compiling, not of the code: LLVM at -O0
# (~40% faster to compile) and XLA:CPU's elemental emitters instead of its MLIR fusion emitters (measured on the
# laplace tests: XLA compile time 73 -> 34 s, 39 -> 20 s). Both compute the same values (the parity tests pass
# unchanged). Set before JAX's backend starts; subprocesses inherit them. Speed is measured in benchmarks/, which
# keep XLA's defaults, and tests/test_xla_cpu.py runs its reproducers in subprocesses with the default flags.
from bmoe_jax.xla_cpu import jaxlib_knows_flag  # noqa: E402  (imports no computation: the backend is not started)

TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
for _name, _value in TEST_XLA_FLAGS.items():
  if _name not in os.environ.get("XLA_FLAGS", "") and jaxlib_knows_flag(_name):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()

# No persistent compilation cache: with one shared by the two workers and the subprocesses (24% of compile requests
# were answered from it), XLA:CPU's executable serialization segfaulted a worker in one of the two full runs with it
# (jaxlib 0.10.2, writing a cache entry); a suite that crashes at random costs more than the cache saves.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import bmoe_jax  # noqa: F401,E402  (imported above, before JAX's backend started: bmoe_jax.xla_cpu's flag is set)

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def padded_batch(vocab: int, seed: int = 0, b: int = 3, s: int = 11, side: str = "right"):
  """Token ids and a mask with padding on one row (right or left) and a full row; ``side="both"``: four rows, one
  full, one right-padded by 4, one left-padded by 4 and one right-padded by 1 (both paddings in one batch)."""
  if side == "both":
    tokens, mask = padded_batch(vocab, seed, b + 1, s, "right")
    mask[3] = mask[2]
    mask[2] = 1
    mask[2, :4] = 0
    return tokens, mask
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


def _memory_maps() -> int:
  """This process's memory mappings (0 where ``/proc`` is not there)."""
  try:
    with open("/proc/self/maps") as fh:
      return sum(1 for _ in fh)
  except OSError:
    return 0


def _map_limit() -> int:
  try:
    with open("/proc/sys/vm/max_map_count") as fh:
      return int(fh.read())
  except (OSError, ValueError):
    return 65530


MAP_BUDGET = 0.5  # of vm.max_map_count: past it, a finished module's compiled programs are dropped


@pytest.fixture(autouse=True, scope="module")
def _bounded_compiled_programs():
  """Every XLA:CPU executable keeps its own memory mappings (LLVM JIT sections), and a test worker compiles thousands
  of programs. Near vm.max_map_count (65530) a compile fails inside LLVM: a worker of a full run segfaulted in
  ``backend_compile_and_load`` at 76% of the suite (12-07). After each module, if the worker holds more than half
  the limit, JAX's caches are cleared (the next module recompiles what it needs; below the budget, compiled
  programs stay shared between modules)."""
  yield
  if _memory_maps() > MAP_BUDGET * _map_limit():
    import gc
    jax.clear_caches()
    gc.collect()


def pytest_configure(config):
  from tests import timing
  timing.register(config)


def pytest_collection_modifyitems(config, items):
  """Modules marked ``heavy`` (about a minute or more each: subprocesses, the real model, the whole pipeline) run
  first, in collection order; the rest keep theirs. Under ``-n 2 --dist loadfile`` (``.ci/run``) each worker then
  starts on a heavy module and both end on short ones, instead of one waiting alone on a heavy module at the end."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
