"""Prompts, answer-letter ids and padded/truncated batches with a byte-level BPE tokenizer trained here."""

import numpy as np
import pytest

from bmoe_jax.data import MCExample
from bmoe_jax.data.prompts import answer_token_ids, apply_chat, bucket, encode, format_prompt
from bmoe_jax.data.toy_tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok():
  corpus = ["Question: what is it?\nA. one\nB. two\nC. three\nD. four\nAnswer: A B C D"] * 50
  t = train_bpe(corpus, 300)
  t.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
  return t


EX = MCExample("x", "what is it?", ("one", "two", "three", "four"), 2)


def test_prompt_layout():
  p = format_prompt(EX)
  assert p == "Question: what is it?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
  ctx = MCExample("y", "is it?", ("yes", "no"), 0, context="Some passage.")
  assert format_prompt(ctx, "Read it.").splitlines()[:3] == ["Read it.", "Passage: Some passage.", "Question: is it?"]


def test_answer_ids_and_chat(tok):
  ids = answer_token_ids(tok, 4)
  assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]
  with pytest.raises(ValueError, match="answer letter ' E' is 2 tokens"):
    answer_token_ids(tok, 5)
  chat = apply_chat(tok, format_prompt(EX))
  assert chat.startswith("<|user|>Question:") and chat.endswith("<|assistant|>Answer:")


@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_padding_and_truncation(tok, side):
  long = format_prompt(MCExample("z", "what is it? " * 30, ("one", "two"), 1))
  short = format_prompt(EX)
  tokens, mask, pos, truncated = encode(tok, [short, long], max_length=40, padding_side=side)
  assert tokens.shape == (2, 40) and truncated == 1
  n_short = len(tok.encode(short))
  assert mask[0].sum() == n_short and mask[1].sum() == 40
  for i in range(2):
    assert mask[i, pos[i]] == 1 and (pos[i] == 39 if side == "left" else pos[i] == mask[i].sum() - 1)
    real = tokens[i][mask[i] == 1]
    assert tok.decode(real).endswith("Answer:")  # the answer slot survives truncation
  pad = tok.pad_token_id
  assert np.all(tokens[mask == 0] == pad)
  with pytest.raises(ValueError, match="padding_side='middle'"):
    encode(tok, [short], 10, padding_side="middle")


def test_make_batches_masks_missing_choices(tok):
  from bmoe_jax.data.batches import make_batches

  exs = [EX, MCExample("t", "what is it?", ("one", "two", "three"), 1), EX]
  batches, class_ids, info = make_batches(exs, tok, batch_size=2, max_length=64, padding_side="left")
  assert info["num_classes"] == 4 and len(batches) == 2 and class_ids.shape == (4,)
  b0 = batches[0]
  assert b0.tokens_bs.shape[1] % 16 == 0 and b0.choice_mask_bc.tolist() == [[True] * 4, [True, True, True, False]]
  assert batches[1].choice_mask_bc is None and b0.labels_b.tolist() == [2, 1]
  assert all(int(b.mask_bs[i, b.answer_pos_b[i]]) == 1 for b in batches for i in range(b.tokens_bs.shape[0]))
  assert tok.decode(b0.tokens_bs[0][b0.mask_bs[0] == 1]).endswith("Answer:")


def test_cloze_batches(tok):
  """Cloze style: no options in the prompt, each choice's first token per example, collisions dropped."""
  from bmoe_jax.data.batches import make_batches
  from bmoe_jax.data.prompts import cloze_token_ids, format_cloze

  assert format_cloze(EX) == "Question: what is it?\nAnswer:"
  same = MCExample("s", "what is it?", ("one", "one more", "two", "three"), 0)  # " one" twice: unscorable
  short = MCExample("t", "what is it?", ("two", "four", "one"), 2)
  batches, class_ids, info = make_batches([EX, same, short], tok, batch_size=4, style="cloze")
  assert class_ids is None and info["unscorable"] == 1 and info["style"] == "cloze"
  (b,) = batches
  want = [cloze_token_ids(tok, EX.choices), cloze_token_ids(tok, short.choices) + [0]]
  assert b.class_ids_bc.tolist() == want and b.choice_mask_bc.tolist()[1] == [True, True, True, False]
  assert "A." not in tok.decode(b.tokens_bs[0][b.mask_bs[0] == 1])
  with pytest.raises(ValueError, match="share a first token"):
    cloze_token_ids(tok, same.choices)
  with pytest.raises(ValueError, match="style="):
    make_batches([EX], tok, batch_size=1, style="free")


def test_bucket_ladder():
  assert [bucket(n, 16) for n in (1, 16, 17, 33, 49, 65, 97, 129, 193)] == [16, 16, 32, 48, 64, 96, 128, 192, 256]
  assert [bucket(n, 1) for n in range(1, 13)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
  lengths = range(40, 193)  # ten multiples of 16 would be compiled, the ladder needs five shapes
  assert sorted({bucket(n, 16) for n in lengths}) == [48, 64, 96, 128, 192]
  assert all(n <= bucket(n, 16) <= max(32, 1.5 * n) for n in range(1, 2000))
