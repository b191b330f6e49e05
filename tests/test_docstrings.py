"""The API reference's docstrings are complete (``tools/docstring_check.py``, also the docs build's hook), and
the checker itself finds what it should: a missing parameter, a missing Returns, a missing docstring."""

import ast

from tools import docstring_check as dc


def test_every_public_function_documents_its_args_and_returns():
  modules = dc.api_modules()
  assert {"bmoe_jax.model", "bmoe_jax.laplace.kfac", "bmoe_jax.sharding"} <= set(modules)
  assert dc.all_gaps() == []


def _gaps(src: str) -> list[str]:
  return dc.function_gaps(ast.parse(src).body[0])


def test_the_checker_finds_each_kind_of_gap():
  complete = ('def f(x_bd, *, scale=1.0):\n  """Doc.\n\n  Args:\n    x_bd: x.\n    scale: s.\n\n'
              '  Returns:\n    y.\n  """\n')
  assert _gaps(complete) == []
  assert _gaps(complete.replace("    scale: s.\n", "")) == ["scale"]
  assert _gaps(complete.replace("  Returns:\n    y.\n", "")) == ["Returns"]
  assert _gaps("def f(x):\n  return x\n") == ["docstring"]
  assert _gaps('def f(self, x) -> None:\n  """Doc.\n\n  Args:\n    x: x.\n  """\n') == []
  varargs = 'def f(*args, **kw):\n  """Doc.\n\n  Args:\n    args: a.\n    kw: k.\n\n  Yields:\n    a.\n  """\n'
  assert _gaps(varargs) == []
  assert _gaps(varargs.replace("    kw: k.\n", "")) == ["kw"]
