"""Continuation scoring: prompts, packing, and packed scores = each choice scored in its own forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.data import MCExample
from bmoe_jax.data import continuation as C
from bmoe_jax.data.batches import make_batches
from bmoe_jax.data.toy_tokenizer import train_bpe
from bmoe_jax.data.prompts import bucket
from bmoe_jax.task import CHOICE_MASK_VALUE, Task, output_mask

QA = MCExample("q", "Which gas do plants take in?", ("carbon dioxide", "oxygen", "helium", "water vapor"), 0)
ARC3 = MCExample("a", "What melts ice?", ("heat", "cold", "a very long and unlikely answer"), 0)
BOOLQ = MCExample("b", "is the sky blue", ("yes", "no"), 0, context="The sky is blue on a clear day.")
WINO = MCExample("w", "Sarah was a better surgeon than Maria so _ got the harder cases.", ("Sarah", "Maria"), 0)


@pytest.fixture(scope="module")
def tok():
  corpus = [f"Question: {e.question}\nAnswer: {' '.join(e.choices)} {e.context or ''}"
            for e in (QA, ARC3, BOOLQ, WINO)] * 30
  return train_bpe(corpus, 300)


def test_parts_follow_lm_evaluation_harness():
  assert C.parts(QA) == ("Question: Which gas do plants take in?\nAnswer:",
                         tuple(("", " " + c) for c in QA.choices))
  assert C.parts(BOOLQ, "boolq") == ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:",
                                     (("", " yes"), ("", " no")))
  # WinoGrande: the option completes the shared context and is not scored; the rest of the sentence is.
  assert C.parts(WINO, "winogrande") == ("Sarah was a better surgeon than Maria so",
                                         ((" Sarah", " got the harder cases."), (" Maria", " got the harder cases.")))
  with pytest.raises(ValueError, match="one blank"):
    C.parts(MCExample("x", "no blank here", ("a", "b"), 0), "winogrande")


def _reference_scores(fwd, tok, ex, dataset):
  """Each choice in a forward of its own (context + choice tokens, right-padded to 64): per choice the
  summed log p of its scored tokens, their count and their text's bytes."""
  p = C.parts(ex, dataset)
  ctx = tok.encode(p.context, add_special_tokens=True)
  out = []
  for unscored, scored in p.choices:
    u, s = tok.encode(unscored, add_special_tokens=False) if unscored else [], tok.encode(scored, add_special_tokens=False)
    ids = ctx + u + s
    logp = jax.nn.log_softmax(fwd(jnp.asarray([ids + [0] * (64 - len(ids))]))[0], -1)
    first = len(ctx) + len(u)
    out.append((sum(float(logp[first + i - 1, s[i]]) for i in range(len(s))), len(s), len(scored.encode())))
  return out


def test_packed_scores_equal_separate_forwards(tok):
  """One packed row per question (context once, choices in their own segments with continued RoPE
  positions) gives exactly each choice's log-likelihood scored alone, under every normalisation;
  missing choices are masked."""
  cfg = B.tiny_config(vocab_size=320)
  params = B.init_params(cfg, jax.random.key(1), std=0.3)
  fwd = jax.jit(lambda t: B.forward(params, cfg, t).logits)
  scores = jax.jit(Task(cfg).logits)
  for dataset, exs in ((None, [QA, ARC3]), ("boolq", [BOOLQ]), ("winogrande", [WINO])):
    refs = [_reference_scores(fwd, tok, ex, dataset) for ex in exs]
    for norm in C.NORMS:
      batches, class_ids, info = make_batches(exs, tok, batch_size=4, max_length=128, dataset=dataset,
                                              style="continuation", norm=norm)
      assert class_ids is None and len(batches) == 1 and info["style"] == "continuation"
      f_bc = np.asarray(scores(params, batches[0]))[np.argsort(info["order"])]  # rows back in example order
      for i, ref in enumerate(refs):
        want = [total * {"none": 1.0, "token": 1.0 / n, "byte": 1.0 / nbytes}[norm] for total, n, nbytes in ref]
        np.testing.assert_allclose(f_bc[i, :len(want)], want, rtol=1e-4, atol=1e-4)
        assert np.all(f_bc[i, len(want):] == CHOICE_MASK_VALUE)


def test_pack_truncates_the_context_start_and_marks_output_positions(tok):
  long = MCExample("l", "word " * 80 + "which gas?", QA.choices, 1)
  batches, _, info = make_batches([long, QA], tok, batch_size=2, max_length=64, style="continuation")
  b = batches[0]
  assert info["order"] == [1, 0]  # sorted by length: the truncated one last
  assert info["truncated"] == 1 and int(b.mask_bs[1].sum()) == 64
  row = C.pack(tok, C.parts(QA), 128)
  # output positions: the context's last token (predicts every first choice token) and each choice token
  # that predicts the next one of the same choice
  n_ctx = row.segments.count(0)
  want = {n_ctx - 1} | {i - 1 for i, _, _ in row.scored if row.segments[i - 1] == row.segments[i]}
  assert set(np.flatnonzero(np.asarray(output_mask(b))[0])) == want
  with pytest.raises(ValueError, match="no room for the context"):
    C.pack(tok, C.parts(QA), 8)
  tail = len(row.tokens) - n_ctx  # the choices alone
  _, _, info = make_batches([QA, ARC3], tok, batch_size=2, max_length=tail, style="continuation")
  assert info["unscorable"] == 1  # QA's choices fill max_length; ARC3's (shorter in all) leave room
  with pytest.raises(ValueError, match="1 did not fit"):
    make_batches([QA], tok, batch_size=1, max_length=tail, style="continuation")
  with pytest.raises(ValueError, match="chat=False"):
    make_batches([QA], tok, batch_size=1, style="continuation", chat=True)


def test_batch_shapes_few_and_on_the_bucket_ladder(tok):
  """Unshuffled: examples sorted by length, each batch padded to its own bucket (rising, few shapes).
  Shuffled: every batch padded to the set's longest row (one compilation per set)."""
  long = MCExample("l", "word " * 30 + "which gas?", QA.choices, 1)
  exs = [long, QA, ARC3, long]
  batches, _, info = make_batches(exs, tok, batch_size=2, max_length=128, style="continuation")
  lengths = [len(C.pack(tok, C.parts(e), 128).tokens) for e in exs]
  assert [lengths[i] for i in info["order"]] == sorted(lengths)
  widths = [b.tokens_bs.shape[1] for b in batches]
  assert widths == [bucket(max(lengths[i] for i in info["order"][k:k + 2]), 16) for k in (0, 2)]
  assert widths[0] < widths[1]  # the short pair is not padded to the long one
  shuffled, _, info = make_batches(exs, tok, batch_size=1, max_length=128, style="continuation", shuffle=True)
  shapes = {(b.tokens_bs.shape, b.cont.weight_btc.shape) for b in shuffled}
  assert len(shuffled) == 4 and len(shapes) == 1 and sorted(info["order"]) == [0, 1, 2, 3]
  (s_shape, _), = shapes
  assert s_shape[1] == bucket(max(lengths), 16)
