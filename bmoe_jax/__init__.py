"""bmoe_jax: post-hoc Bayesian uncertainty for Mixture-of-Experts LLMs in JAX/Flax NNX."""

from bmoe_jax import xla_cpu  # first: an XLA:CPU flag must be set before JAX's backend starts
from bmoe_jax.config import MoEConfig, tiny_config
from bmoe_jax.model import ForwardOutput, MoEModel, MoETaps, forward, zero_perturbations
from bmoe_jax.params import abstract_params, count_params, init_params, logical_axes, param_specs

__version__ = "0.1.0"


def load_model(path, **kw):
  """Load a model from an HF checkpoint directory or a ``bmoe convert`` output directory."""
  from bmoe_jax.checkpoint import load_model as _load
  return _load(path, **kw)


__all__ = ["MoEConfig", "MoEModel", "MoETaps", "ForwardOutput", "forward", "zero_perturbations",
           "init_params", "param_specs", "logical_axes", "abstract_params", "count_params",
           "tiny_config", "load_model"]
