"""The guard around JAX internals in ``nn.linear_batching``: a JAX without them, or whose ``linear_call`` passes
other parameters, gets one message naming its version and the tested one (the rule itself: ``test_moe``)."""

import subprocess
import sys

import pytest

from bmoe_jax.nn import linear_batching as LB


def test_a_jax_without_the_internals_is_named_at_import():
  code = ("import jax._src.custom_derivatives as cd; del cd.linear_call_p\n"
          "try:\n  import bmoe_jax\nexcept ImportError as err:\n  print(err)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "jax.custom_derivatives.linear_call" in out.stdout and "tested with jax 0.10.2" in out.stdout, out.stdout
  assert "pip install -c constraints.txt" in out.stdout


def test_other_primitive_parameters_are_named():
  with pytest.raises(NotImplementedError, match=r"expects the parameters .*callee.*; jax .* passes \['jaxpr'\]"):
    LB._linear_call_batched([], [], jaxpr=None)
