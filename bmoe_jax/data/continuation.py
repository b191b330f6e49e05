"""Continuation scoring: each choice's text scored as a continuation of the question (lm-evaluation-harness).

The task output is ``f_c = w_c * sum_t log p(token_t of choice c | context, earlier tokens of c)``, with
the normalisation ``w_c`` of ``NORMS``: ``none`` (1), ``token`` (1 / its scored tokens) or ``byte``
(1 / the UTF-8 bytes of its scored text; lm-evaluation-harness' ``acc_norm`` up to bytes vs characters).

Prompts (``parts``), as lm-evaluation-harness words them:
  * question answering (OBQA, ARC, MMLU, the synthetic suite): ``Question: <q>\\nAnswer:`` + `` <choice>``;
  * BoolQ: ``<passage>\\nQuestion: <q>?\\nAnswer:`` + `` yes`` / `` no``;
  * WinoGrande, partial scoring: the sentence up to the blank is the shared context, then the option
    (not scored) and the rest of the sentence (scored: the same text for every option).

**Packing.** One row per question: the context's tokens once (segment 0), then each choice's tokens
(segment c + 1) with RoPE positions that continue the context's, each choice seeing only the context and
itself (``bmoe_jax.nn.layers.attention_mask``). One forward thus scores all C choices, the context
computed once, and every later stage (fine-tuning, K-FAC, predictives) sees one sequence per question.
The texts are tokenised piecewise (context, then each piece of a choice) and the ids concatenated, as
lm-evaluation-harness does; an over-long row loses tokens from the start of its context.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from bmoe_jax.data.prompts import bucket
from bmoe_jax.data.records import MCExample
from bmoe_jax.task import Batch, Continuation

NORMS = ("none", "token", "byte")


class Parts(NamedTuple):
  context: str
  choices: tuple[tuple[str, str], ...]  # per choice: (unscored text, scored text)


def parts(ex: MCExample, dataset: str | None = None) -> Parts:
  """The context and each choice's (unscored, scored) texts of ``ex`` (module docstring)."""
  if dataset == "winogrande":
    if ex.question.count("_") != 1:
      raise ValueError(f"WinoGrande example {ex.uid}: expected one blank '_' in {ex.question!r}")
    before, after = ex.question.split("_")
    if not after.strip():
      raise ValueError(f"WinoGrande example {ex.uid}: nothing after the blank to score")
    return Parts(before.rstrip(), tuple((" " + c if before.strip() else c, " " + after.strip())
                                        for c in ex.choices))
  if dataset == "boolq":
    q = ex.question.rstrip("?")
    return Parts(f"{ex.context}\nQuestion: {q}?\nAnswer:", tuple(("", " " + c) for c in ex.choices))
  head = f"{ex.context}\n" if ex.context else ""
  return Parts(f"{head}Question: {ex.question}\nAnswer:", tuple(("", " " + c) for c in ex.choices))


class Row(NamedTuple):
  tokens: list[int]
  segments: list[int]
  positions: list[int]
  scored: list[tuple[int, int, float]]  # (index of the token scored, its choice, its weight)
  truncated: bool


def _encode(tokenizer, text: str, special: bool) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=special)) if text else []


def pack(tokenizer, p: Parts, max_length: int, norm: str = "none") -> Row:
  """One packed row of ``p``: the context once, then each choice (module docstring). Raises ValueError
  when the choices alone do not fit ``max_length`` or a choice has nothing to score."""
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
  ctx = _encode(tokenizer, p.context, True)
  pieces = [(_encode(tokenizer, u, False), _encode(tokenizer, s, False), s) for u, s in p.choices]
  if any(not s for _, s, _ in pieces):
    raise ValueError(f"a choice of {p.choices} has no tokens to score")
  tail = sum(len(u) + len(s) for u, s, _ in pieces)
  room = max_length - tail
  bos = tokenizer.bos_token_id
  keep_bos = bool(ctx) and bos is not None and ctx[0] == bos
  if room < 1 + int(keep_bos) and len(ctx) > room:
    raise ValueError(f"the {len(pieces)} choices take {tail} tokens: no room for the context in "
                     f"max_length={max_length}")
  truncated = len(ctx) > room
  if truncated:
    ctx = ctx[:int(keep_bos)] + ctx[len(ctx) - room + int(keep_bos):]
  tokens, segments, positions, scored = list(ctx), [0] * len(ctx), list(range(len(ctx))), []
  for c, (unscored, score, text) in enumerate(pieces):
    start = len(tokens)
    ids = unscored + score
    if not ctx and not unscored:
      raise ValueError("a scored choice with no context before it: nothing predicts its first token")
    w = {"none": 1.0, "token": 1.0 / len(score), "byte": 1.0 / len(text.encode("utf-8"))}[norm]
    tokens += ids
    segments += [c + 1] * len(ids)
    positions += list(range(len(ctx), len(ctx) + len(ids)))
    scored += [(start + len(unscored) + i, c, w) for i in range(len(score))]
  return Row(tokens, segments, positions, scored, truncated)


def padded_lengths(rows: Sequence[Row], pad_to: int) -> tuple[int, int]:
  """(tokens, scored tokens) of the longest rows, on the ``prompts.bucket`` ladder."""
  return (bucket(max(len(r.tokens) for r in rows), pad_to), bucket(max(len(r.scored) for r in rows), pad_to))


def collate(rows: Sequence[Row], labels: Sequence[int], num_choices: Sequence[int], num_classes: int,
            pad_id: int, pad_to: int = 16, padded: tuple[int, int] | None = None) -> Batch:
  """A ``Batch`` of packed rows, right-padded to ``padded`` = (tokens, scored tokens) (default
  ``padded_lengths(rows, pad_to)``): the context's last token is the answer position, scored token t of
  row b is predicted by the logits at position ``index - 1``, and ``weight_btc`` puts its weight in its
  choice's column."""
  b = len(rows)
  s, t = padded or padded_lengths(rows, pad_to)
  tokens = np.full((b, s), pad_id, np.int32)
  mask, segments, positions = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
  pos_bt, tok_bt = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  weight_btc = np.zeros((b, t, num_classes), np.float32)
  answer_pos = np.zeros(b, np.int32)
  for i, r in enumerate(rows):
    n = len(r.tokens)
    tokens[i, :n], mask[i, :n], segments[i, :n], positions[i, :n] = r.tokens, 1, r.segments, r.positions
    positions[i, n:] = np.arange(n, s)
    last_ctx = r.segments.count(0) - 1
    answer_pos[i] = max(last_ctx, 0)
    for j, (idx, c, w) in enumerate(r.scored):
      prev = idx - 1 if r.segments[idx - 1] == r.segments[idx] else last_ctx
      pos_bt[i, j], tok_bt[i, j], weight_btc[i, j, c] = prev, r.tokens[idx], w
  choice_mask = np.arange(num_classes)[None, :] < np.asarray(num_choices)[:, None]
  cont = Continuation(jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(pos_bt), jnp.asarray(tok_bt),
                      jnp.asarray(weight_btc))
  return Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(answer_pos), jnp.asarray(labels, jnp.int32),
               None if choice_mask.all() else jnp.asarray(choice_mask), cont=cont)


def make_batches(examples: Sequence[MCExample], tokenizer, *, batch_size: int, max_length: int = 512,
                 num_classes: int | None = None, dataset: str | None = None, norm: str = "none",
                 shuffle: bool = False, seed: int = 0, pad_to: int = 16) -> tuple[list[Batch], dict]:
  """Packed continuation batches of ``examples`` (the last batch may be smaller). Lengths are padded on
  the ``prompts.bucket`` ladder so that few shapes compile (on CPU a compilation of the Jacobian pass
  costs more than a batch's compute):
  - ``shuffle=False``: examples sorted by packed length, each batch padded to its own bucket (sorted, the
    buckets rise monotonically: at most one shape per ladder step). A set's median row is often a third of
    its longest (MMLU, ARC), so one shape per set would triple the compute. The pipeline builds every
    set this way, the training set too: its batches hold questions of similar length (as transformers'
    ``group_by_length``) and ``train.finetune`` permutes the batch order every epoch.
  - ``shuffle=True``: a seeded permutation, every batch padded to the set's longest row (one shape).
  Returns (batches, info {"truncated", "num_classes", "order": example indices in batch order,
  "unscorable": examples whose choices alone exceed ``max_length``})."""
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad_id is None:
    raise ValueError("the tokenizer has neither a pad nor an eos token")
  packed, unscorable = [], 0
  for e in examples:
    try:
      packed.append((e, pack(tokenizer, parts(e, dataset), max_length, norm)))
    except ValueError:
      unscorable += 1
  if not packed:
    raise ValueError(f"no examples to batch ({unscorable} did not fit max_length={max_length})")
  c = num_classes or max(len(e.choices) for e, _ in packed)
  if any(len(e.choices) > c for e, _ in packed):
    raise ValueError(f"an example has more than num_classes={c} choices")
  if shuffle:
    order = np.random.RandomState(seed).permutation(len(packed))
  else:
    order = np.argsort([len(r.tokens) for _, r in packed], kind="stable")
  batches, padded = [], padded_lengths([r for _, r in packed], pad_to) if shuffle else None
  for lo in range(0, len(order), batch_size):
    chunk = [packed[i] for i in order[lo:lo + batch_size]]
    batches.append(collate([r for _, r in chunk], [e.label for e, _ in chunk], [len(e.choices) for e, _ in chunk],
                           c, pad_id, pad_to, padded))
  return batches, {"truncated": sum(r.truncated for _, r in packed), "num_classes": c, "order": order.tolist(),
                   "unscorable": unscorable, "norm": norm}
