"""A ``vmap`` rule for ``jax.custom_derivatives.linear_call`` (JAX ships none: ``vmap`` of a function that calls it,
or of a pullback through it, raises ``NotImplementedError``).

``linear_call(fun, fun_transpose, residuals, linear)`` states a linear map and its transpose; the sorted expert
path's derivatives are one (``nn.expert_rows``), and the library vmaps pullbacks (one per class in K-FAC and the
predictive) and linearised functions (posterior samples). The rule below vmaps both ``fun`` and its transpose
over the batch axis, so a batched call is again a ``linear_call`` whose transpose is the batched transpose:
``L_b(x_b) = [L(r_i, x_i)]_i`` and ``L_b^T(c_b) = [L^T(r_i, c_i)]_i``. Every linear operand is given the batch
axis (broadcast where it had none), so both directions are batched alike; residuals keep theirs (or none).

It is registered through JAX's internal batching table (``jax._src``; the only other use of JAX internals is
``xla_cpu``'s backend check); nothing is done where a rule already exists. A JAX whose internals differ gets one
message naming its version and the tested one: at import if the table or the primitive moved, at the first vmap if
the primitive's parameters changed.
"""

from __future__ import annotations

import jax

TESTED = "jax 0.10.2 (constraints.txt pins the versions the test suite last passed with)"
try:
  from jax._src import core
  from jax._src.custom_derivatives import linear_call_p
  from jax._src.interpreters import batching
  _TABLE = batching.primitive_batchers
except (ImportError, AttributeError) as err:
  raise ImportError(f"bmoe_jax registers a vmap rule for jax.custom_derivatives.linear_call through JAX internals "
                    f"that jax {jax.__version__} does not have ({err}); tested with {TESTED}: install with "
                    "`pip install -c constraints.txt -e .`") from None
PARAMS = {"callee", "transpose_thunk", "num_callee_consts", "num_res"}


def _eval(closed, consts, *args):
  return core.eval_jaxpr(closed.jaxpr, closed.consts, *consts, *args)


def _linear_call_batched(args, dims, **params):
  if set(params) != PARAMS:
    raise NotImplementedError(f"bmoe_jax's vmap rule for linear_call expects the parameters {sorted(PARAMS)}; jax "
                              f"{jax.__version__} passes {sorted(params)}. Tested with {TESTED}.")
  return _batched(args, dims, **params)


def _batched(args, dims, *, callee, transpose_thunk, num_callee_consts, num_res):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  fixed = num_callee_consts + num_res
  res = [batching.moveaxis(a, d, 0) if d is not None else a for a, d in zip(args[:fixed], dims)]
  res_axes = [None if d is None else 0 for d in dims[:fixed]]
  lin = [batching.bdim_at_front(a, d, size) for a, d in zip(args[fixed:], dims[fixed:])]
  operand_axes = res_axes[num_callee_consts:]  # the callee's constants are its first operands

  def fun(r, x):
    return jax.vmap(lambda r_, x_: _eval(callee, (), *r_, *x_), in_axes=(res_axes, 0))(r, x)

  def fun_t(r, ct):
    t_jaxpr, t_consts = transpose_thunk()
    operands = r[num_callee_consts:]  # the transpose takes its own constants, then the residuals
    return jax.vmap(lambda r_, c_: _eval(t_jaxpr, t_consts, *r_, *c_), in_axes=(operand_axes, 0))(operands, ct)

  out = jax.custom_derivatives.linear_call(fun, fun_t, res, lin)
  return out, [0] * len(out)


if linear_call_p not in getattr(batching, "fancy_primitive_batchers", {}):
  _TABLE[linear_call_p] = _linear_call_batched
