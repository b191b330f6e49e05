"""The README's Python example runs as written, on two tiny models (the fine-tuned one and the prior's) and a few
OBQA rows: only its paths and the data's size are substituted, and each substitution must find its text (a
README whose example changes shape fails here rather than going stale)."""

import re
from pathlib import Path

import numpy as np

from tests.fixtures import tiny_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_example_runs(tmp_path, shared_data):
  blocks = python_blocks(README.read_text())
  assert len(blocks) == 1, "the README holds one Python example; a new one needs its substitutions here"
  tuned = tiny_model_dir(tmp_path / "tuned", shared_data, rows=200, init_seed=0)
  prior = tiny_model_dir(tmp_path / "prior", shared_data, rows=200, init_seed=1)
  subs = {'"runs/ft/model"': repr(str(tuned)), '"path/to/pretrained-moe"': repr(str(prior)),
          '"runs/fit"': repr(str(tmp_path / "fit")), '"../shared/data"': repr(str(shared_data)),
          'test="obqa:test")': 'test="obqa:test", max_train=32, max_eval=16)'}
  code = blocks[0]
  for old, new in subs.items():
    assert old in code, f"README example: {old} not found"
    code = code.replace(old, new)
  scope: dict = {}
  exec(compile(code, str(README), "exec"), scope)
  probs, cov = np.asarray(scope["pred"].probs_bc), np.asarray(scope["pred"].f_cov_bcc)
  assert probs.shape == (8, 4) and np.allclose(probs.sum(-1), 1, atol=1e-5)
  assert cov.shape == (8, 4, 4) and np.all(np.linalg.eigvalsh(cov) > -1e-6)  # a covariance
  assert scope["info"]["bmoe"]["mode"] == "layer" and (tmp_path / "fit" / "posterior").exists()
