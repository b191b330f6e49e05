"""DeepSeek-V2/V3/V3.2 specifics: the release format of V3 (fp8 block-scaled weights and multi-token-prediction
layers past num_hidden_layers), V3.2's indexer, and the configurations on which the converter refuses to guess."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from convert import ConversionError, load_hf_checkpoint
from convert.hf_config import parse_hf_config_dict
from convert.reference import make_checkpoint
from convert.safetensors_io import read_header, save_file


def _quantised(w: np.ndarray, block: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """fp8 e4m3 weight and its per-block scale_inv (w ~= q * scale, blockwise), as DeepSeek-V3 ships them."""
  rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
  scale = rng.uniform(1.0, 2.0, (rows, cols)).astype(np.float32) * np.abs(w).max() / 448
  full = np.repeat(np.repeat(scale, block, 0), block, 1)[: w.shape[0], : w.shape[1]]
  return (w / full).astype(ml_dtypes.float8_e4m3fn), scale


def test_v3_release_format_fp8_and_mtp_layers(tmp_path):
  """Every 2-D weight fp8 with 16 x 16 block scales (ragged edge blocks included), plus a multi-token-prediction
  layer model.layers.3.* (num_hidden_layers = 3), fp8 too: the converter dequantises everything exactly as
  q * scale and skips the MTP layer, giving the parameters of the dequantised float32 checkpoint."""
  make_checkpoint("deepseek_v3", tmp_path / "src", seed=4)
  tensors = {k: r.numpy() for k, r in read_header(tmp_path / "src" / "model.safetensors").items()}
  rng = np.random.RandomState(0)
  fp8, plain = {}, {}
  for key, w in tensors.items():
    if w.ndim == 2 and min(w.shape) >= 8 and "gate.weight" not in key:
      q, s = _quantised(w, 16, rng)
      fp8[key], fp8[key + "_scale_inv"] = q, s
      full = np.repeat(np.repeat(s, 16, 0), 16, 1)[: w.shape[0], : w.shape[1]]
      plain[key] = q.astype(np.float32) * full
    else:
      fp8[key] = plain[key] = w
  mtp = {"model.layers.3.eh_proj.weight": rng.randn(32, 64).astype(np.float32),
         "model.layers.3.enorm.weight": np.ones(32, np.float32),
         "model.layers.3.self_attn.kv_b_proj.weight": rng.randn(56, 12).astype(np.float32)}
  q, s = _quantised(mtp.pop("model.layers.3.eh_proj.weight"), 16, rng)
  mtp.update({"model.layers.3.eh_proj.weight": q, "model.layers.3.eh_proj.weight_scale_inv": s})
  config = json.loads((tmp_path / "src" / "config.json").read_text())
  for name, tensors_, extra in (("fp8", {**fp8, **mtp}, {"quantization_config": {
      "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]},
      "num_nextn_predict_layers": 1}), ("plain", plain, {})):
    (tmp_path / name).mkdir()
    save_file(tensors_, tmp_path / name / "model.safetensors")
    (tmp_path / name / "config.json").write_text(json.dumps(dict(config, **extra)))
  _, a = load_hf_checkpoint(tmp_path / "fp8", progress=False)
  _, b = load_hf_checkpoint(tmp_path / "plain", progress=False)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert sum(k.endswith("_scale_inv") for k in fp8) > 20


def test_mtp_layers_are_refused_outside_v3(tmp_path):
  make_checkpoint("deepseek_v2", tmp_path, seed=1)
  t = {k: r.numpy().copy() for k, r in read_header(tmp_path / "model.safetensors").items()}  # not mapped
  t["model.layers.3.enorm.weight"] = np.ones(32, np.float32)
  save_file(t, tmp_path / "model.safetensors")
  with pytest.raises(ConversionError, match="'model.layers.3.enorm.weight'"):
    load_hf_checkpoint(tmp_path, progress=False)


V2 = {"model_type": "deepseek_v2", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
      "num_experts_per_tok": 2, "n_routed_experts": 4}
V3 = dict(V2, model_type="deepseek_v3", n_group=2, topk_group=1, num_key_value_heads=4)
V32 = dict(V3, model_type="deepseek_v32", index_topk=4, index_n_heads=2, index_head_dim=64)


@pytest.mark.parametrize("raw,message", [
    (dict(V2, norm_topk_prob=True), "norm_topk_prob=true is not supported: transformers' DeepSeek-V2 ignores it"),
    (dict(V2, num_key_value_heads=2), "num_key_value_heads=2 must equal num_attention_heads=4"),
    (dict(V2, moe_layer_freq=2), "moe_layer_freq=2 is not supported"),
    (dict(V2, topk_method="noaux_tc"), "topk_method='noaux_tc' is not supported by DeepSeek-V2"),
    (dict(V2, scoring_func="sigmoid"), "scoring_func='sigmoid': transformers' DeepSeek-V2 scores with softmax"),
    (dict(V2, mlp_bias=True), "mlp_bias=true is not supported"),
    (dict(V2, head_dim=32), "head_dim=32 contradicts qk_rope_head_dim=64"),
    (dict(V2, topk_method="group_limited_greedy", n_group=3, topk_group=1), "MoEConfig: n_group=3 must divide num_experts=4"),
    (dict(V3, scoring_func="softmax"), "scoring_func='softmax': transformers' DeepSeek-V3 always routes with sigmoid"),
    (dict(V3, n_group=None), "n_group and topk_group must be integers"),
    (dict(V3, first_k_dense_replace=None), "first_k_dense_replace=None must be an integer >= 0"),
    (dict(V3, num_local_experts=8), "num_local_experts=8 and n_routed_experts=4 name the same attribute"),
    (dict(V32, q_lora_rank=None), "q_lora_rank=None: DeepSeek-V3.2's indexer reads the q latent"),
    (dict(V32, layer_types=["full_attention"] * 2), r"layer_types=\['full_attention', 'full_attention'\]: "
     "transformers' DeepSeek-V3.2 has 2 indexed_attention layers"),
    (dict(V32, mlp_layer_types=["dense", "moe"]), r"mlp_layer_types=\['dense', 'moe'\]: expected 2 entries, each "
     "dense or sparse"),
    (dict(V32, rope_interleave=False), "rope_interleave=false: transformers' DeepSeek-V3.2 always rotates"),
    (dict(V32, index_head_dim=32), "MoEConfig: the indexer .index_topk=4. needs latent attention"),
])
def test_deepseek_gate_refuses_what_it_cannot_match(raw, message):
  with pytest.raises(ConversionError, match="config.json: " + message.replace("(", r"\(")):
    parse_hf_config_dict(raw, "config.json")


def test_deepseek_gate_reads_transformers_saved_configs(tmp_path):
  """transformers 5 writes head_dim, qk_head_dim, num_nextn_predict_layers, rope_parameters: all read."""
  for family in ("deepseek_v2", "deepseek_v3", "deepseek_v32"):
    make_checkpoint(family, tmp_path / family, seed=0)
    raw = json.loads((tmp_path / family / "config.json").read_text())
    assert {"head_dim", "qk_head_dim", "rope_parameters"} <= set(raw)
    cfg = parse_hf_config_dict(raw, "config.json").cfg
    assert cfg.mla and cfg.head_dim == 4 and cfg.qk_nope_head_dim == 8 and cfg.moe_layers == (False, True, True)
    shutil.rmtree(tmp_path / family)


def test_the_indexer_binds_in_the_parity_case(tmp_path):
  """The parity case's indexer keeps 4 of up to 11 keys: without it (every visible key) the logits move far past the
  parity tolerance; with index_topk at least the sequence length it changes nothing."""
  import jax.numpy as jnp

  import bmoe_jax as B
  from tests.conftest import padded_batch
  make_checkpoint("deepseek_v32", tmp_path, seed=0)
  info, params = load_hf_checkpoint(tmp_path, progress=False)
  cfg, params = info.cfg, jax.tree.map(jnp.asarray, params)
  assert cfg.index_topk == 4 and cfg.moe_layers == (False, True, True)
  tokens, mask = padded_batch(cfg.vocab_size)
  real = mask.astype(bool)
  fwd = jax.jit(B.forward, static_argnums=1)
  base = np.asarray(fwd(params, cfg, tokens, mask).logits)
  dense = {**params, "layers": [{**lp, "attn": {k: v for k, v in lp["attn"].items() if k != "indexer"}}
                                for lp in params["layers"]]}
  assert np.abs(np.asarray(fwd(dense, cfg.replace(index_topk=0, index_heads=0, index_head_dim=0), tokens,
                               mask).logits) - base)[real].max() > 1e-2
  assert np.abs(np.asarray(fwd(params, cfg.replace(index_topk=11), tokens, mask).logits)
                - np.asarray(fwd(dense, cfg.replace(index_topk=0, index_heads=0, index_head_dim=0), tokens,
                                 mask).logits))[real].max() < 1e-5
