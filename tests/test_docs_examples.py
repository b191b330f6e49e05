"""Every Python example of the README and the docs runs as written, on tiny models and a few real rows. Each
example has a setup here giving the names it assumes (a batch, a model directory) and the substitutions of its
paths; every substitution must find its text, and an example without a setup fails, so no example goes stale
unnoticed. The mesh example runs in a subprocess with 8 virtual CPU devices."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.task import Task
from tests.fixtures import random_batches, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def python_blocks(rel: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", (ROOT / rel).read_text(), re.S)


def run(code: str, subs: dict, scope: dict, where: str) -> dict:
  for old, new in subs.items():
    assert old in code, f"{where}: {old} not found in the example"
    code = code.replace(old, new)
  exec(compile(code, where, "exec"), scope)
  return scope


def readme(code, tmp, data):
  tuned = tiny_model_dir(tmp / "tuned", data, rows=200, init_seed=0)
  prior = tiny_model_dir(tmp / "prior", data, rows=200, init_seed=1)
  ns = run(code, {'"runs/ft/model"': repr(str(tuned)), '"path/to/pretrained-moe"': repr(str(prior)),
                  '"runs/fit"': repr(str(tmp / "fit")), '"../shared/data"': repr(str(data)),
                  'test="obqa:test")': 'test="obqa:test", max_train=32, max_eval=16)'}, {}, "README.md")
  probs, cov = np.asarray(ns["pred"].probs_bc), np.asarray(ns["pred"].f_cov_bcc)
  assert probs.shape == (8, 4) and np.allclose(probs.sum(-1), 1, atol=1e-5)
  assert cov.shape == (8, 4, 4) and np.all(np.linalg.eigvalsh(cov) > -1e-6)  # a covariance
  assert ns["info"]["bmoe"]["mode"] == "layer" and (tmp / "fit" / "posterior").exists()


def guide_model(code, tmp, data):
  model_dir = tiny_model_dir(tmp / "m", data, rows=100)
  b, s = 2, 7
  ns = {"b": b, "s": s, "tokens_bs": jnp.asarray(np.random.RandomState(0).randint(0, 512, (b, s))),
        "attention_mask_bs": jnp.ones((b, s), jnp.int32)}
  ns = run(code, {'"path/to/Qwen1.5-MoE-A2.7B"': repr(str(model_dir))}, ns, "docs/guide.md")
  assert ns["out"].logits.shape == (b, s, 512) and np.isfinite(np.asarray(ns["out"].logits)).all()


MESH_DRIVER = """
import sys, jax, numpy as np
from pathlib import Path
sys.path.insert(0, {root!r})
from bmoe_jax import checkpoint, laplace as LA
from bmoe_jax.task import Task
from tests.fixtures import random_batches
assert jax.device_count() == 8, jax.device_count()
cfg0, _ = checkpoint.load_params({model!r})
task, key = Task(cfg0, (1, 2, 3, 4)), jax.random.key(0)
spec = LA.FactorSpec(layers=LA.kfac.select_layers(cfg0, "all"))
batches = random_batches(cfg0, 2, b=4)
exec(compile({code!r}, "docs/guide.md", "exec"))
want = LA.fit_factors(checkpoint.load_params({model!r})[1], task, batches, spec, progress=False)
for k, st in want.stats.items():
  for a, b in zip(st, state.stats[k]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
print("MESH EXAMPLE OK", int(state.num_sequences))
"""


def guide_mesh(code, tmp, data):
  model_dir = tiny_model_dir(tmp / "m", data, rows=100)
  code = code.replace('"runs/ft/model"', repr(str(model_dir)))
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", MESH_DRIVER.format(root=str(ROOT), model=str(model_dir), code=code)],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "MESH EXAMPLE OK 8" in out.stdout, out.stderr[-3000:]


def data_page(code, tmp, data):
  rng = np.random.RandomState(0)
  p = rng.dirichlet([1, 1, 1, 1], 50)
  ns = {"probs_nc": p, "labels_n": rng.randint(0, 4, 50), "probs_in_nc": p, "probs_out_nc": rng.dirichlet([1] * 4, 30),
        "scores_in": {"mi": rng.rand(50)}, "scores_out": {"mi": rng.rand(30)}}
  ns = run(code, {'"../shared/data"': repr(str(data))}, ns, "docs/data.md")
  assert len(ns["ds"].examples) > 1000


def data_new_dataset(code, tmp, data):
  """The example registers a dataset in the process-wide registry: removed again whatever happens."""
  import json
  from bmoe_jax.data.registry import BENCHMARKS
  root = tmp / "data" / "my_qa"
  root.mkdir(parents=True)
  rows = [{"id": f"q{i}", "question": f"Which number is {i}?", "choices": [str(i), str(i + 1), "seven"][:2 + i % 2],
           "answer": 0} for i in range(6)]
  for split in ("train", "dev", "test"):
    lines = [json.dumps(r) for r in rows] + ([json.dumps({"id": "bad", "question": "?", "choices": ["a"], "answer": 0})]
                                             if split == "dev" else [])
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  model_dir = tiny_model_dir(tmp / "m", data, rows=100)
  try:
    ns = run(code, {'"path/to/data"': repr(str(tmp / "data")), '"runs/ft/model"': repr(str(model_dir))}, {},
             "docs/data.md")
  finally:
    BENCHMARKS.pop("my_qa", None)
  assert ns["ds"].report.kept == 6 and len(ns["ds"].report.skipped) == 1 and "1 choices" in ns["ds"].report.summary()
  assert sum(b.labels_b.shape[0] for b in ns["batches"]) == 6 and ns["info"]["num_classes"] == 5


def bayesian_moe(code, tmp, data):
  model_dir = tiny_model_dir(tmp / "m", data, rows=100)
  model = B.load_model(str(model_dir))
  batches = random_batches(model.cfg, 3, b=4)
  pretrained = model.pure_params()
  ns = {"batches": batches, "class_ids": (1, 2, 3, 4), "test_batch": batches[0], "train_set": range(12),
        "pretrained_params": jax.tree.map(lambda x: x * 0.9 if x.dtype.kind == "f" else x, pretrained)}
  ns = run(code, {'"path/to/finetuned-moe"': repr(str(model_dir)), '"runs/kfac"': repr(str(tmp / "kfac")),
                  '"runs/posterior"': repr(str(tmp / "posterior"))}, ns, "docs/bayesian-moe.md")
  assert np.asarray(ns["pred"].probs_bc).shape == (4, 4) and (tmp / "posterior").exists()


def choosing(code, tmp, data):
  model_dir = tiny_model_dir(tmp / "m", data, rows=100)
  model = B.load_model(str(model_dir))
  params = model.pure_params()
  batches = random_batches(model.cfg, 4, b=4)
  ns = {"params": params, "task": Task(model.cfg, (1, 2, 3, 4)), "train_batches": batches[:3],
        "val_batches": batches[3:], "pretrained": jax.tree.map(lambda x: x * 0.9 if x.dtype.kind == "f" else x, params)}
  ns = run(code, {'"runs/choose"': repr(str(tmp / "choose"))}, ns, "docs/choosing.md")
  assert set(ns["dev_nll"]) == {"probit_pairwise", "probit", "mc"} and all(np.isfinite(list(ns["dev_nll"].values())))
  assert (tmp / "choose" / "factors").exists() and ns["info"]["bmoe_ts"]["temperature"] > 0


SETUPS = {("README.md", 0): readme, ("docs/guide.md", 0): guide_model, ("docs/guide.md", 1): guide_mesh,
          ("docs/data.md", 0): data_page, ("docs/data.md", 1): data_new_dataset,
          ("docs/bayesian-moe.md", 0): bayesian_moe, ("docs/choosing.md", 0): choosing}


def test_every_python_example_has_a_setup():
  found = {(rel, i) for rel in PAGES for i in range(len(python_blocks(rel)))}
  assert found == set(SETUPS), f"examples without a setup: {sorted(found - set(SETUPS))}; stale setups: " \
                               f"{sorted(set(SETUPS) - found)}"


@pytest.mark.parametrize("where", sorted(SETUPS), ids=lambda k: f"{k[0]}#{k[1]}")
def test_example_runs(where, tmp_path, shared_data):
  rel, i = where
  SETUPS[where](python_blocks(rel)[i], tmp_path, shared_data)
