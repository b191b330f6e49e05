"""Datasets -> fixed-shape token batches (``bmoe_jax.task.Batch``) and their class token ids.

Three answer styles (``STYLES``): ``letters`` (options listed as A., B., ...; the classes are the
answer-letter tokens, one set for the whole dataset), ``cloze`` (only the question; the classes are each
choice's first token, per example, in ``Batch.class_ids_bc``) and ``continuation`` (each choice's whole
text scored as a continuation, ``bmoe_jax.data.continuation``: how lm-evaluation-harness scores small
LMs, which answer lettered options at chance)."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from bmoe_jax.data import continuation
from bmoe_jax.data.prompts import (INSTRUCTIONS, answer_token_ids, apply_chat, cloze_token_ids, encode, round_up,
                                   format_cloze, format_prompt)
from bmoe_jax.data.records import MCExample
from bmoe_jax.task import Batch

STYLES = ("letters", "cloze", "continuation")


def _pad_length(tokens, mask, pos, tokenizer, max_length: int, pad_to: int, padding_side: str):
  """Extra padding on the padding side up to a multiple of ``pad_to`` (at most ``max_length``)."""
  s = min(round_up(tokens.shape[1], pad_to), max(max_length, tokens.shape[1]))
  if s <= tokens.shape[1]:
    return tokens, mask, pos
  extra = s - tokens.shape[1]
  pad_id = int(tokens[mask == 0][0]) if (mask == 0).any() else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
  width = ((0, 0), (0, extra)) if padding_side == "right" else ((0, 0), (extra, 0))
  return (np.pad(tokens, width, constant_values=pad_id), np.pad(mask, width),
          pos + (extra if padding_side == "left" else 0))


def _cloze_filter(examples, tokenizer):
  """(examples whose choices have distinct first tokens, their token ids by uid, how many were dropped)."""
  kept, ids = [], {}
  for e in examples:
    try:
      ids[e.uid] = cloze_token_ids(tokenizer, e.choices)
      kept.append(e)
    except ValueError:
      pass
  return kept, ids, len(examples) - len(kept)


def make_batches(examples: Sequence[MCExample], tokenizer, *, batch_size: int, max_length: int = 512,
                 num_classes: int | None = None, padding_side: str = "right", chat: bool = False,
                 instruction: str | None = None, dataset: str | None = None, leading_space: bool = True,
                 shuffle: bool = False, seed: int = 0, pad_to: int = 16, style: str = "letters",
                 norm: str = "none") -> tuple[list[Batch], jnp.ndarray | None, dict]:
  """Prompts of ``style`` (module docstring), tokenised and padded into batches of ``batch_size`` (the
  last may be smaller).

  ``num_classes`` defaults to the most choices of any example; examples with fewer choices get a
  ``choice_mask_bc``. Sequence lengths are rounded up to ``pad_to`` to bound recompilation. Returns
  (batches, class_ids [C] (None for cloze: per example in the batches), info {"truncated": n,
  "num_classes": C, "order": example indices, "unscorable": cloze examples dropped because two choices
  share a first token, or continuation examples whose choices alone exceed ``max_length``}).
  ``norm``: the continuation scores' normalisation (``continuation.NORMS``)."""
  if style not in STYLES:
    raise ValueError(f"style={style!r}: expected one of {STYLES}")
  if style == "continuation":
    if chat:
      raise ValueError("continuation scoring scores raw text continuations; use chat=False")
    batches, info = continuation.make_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length,
                                              num_classes=num_classes, dataset=dataset, norm=norm,
                                              shuffle=shuffle, seed=seed, pad_to=pad_to)
    return batches, None, {**info, "style": style}
  examples, cloze_ids, unscorable = _cloze_filter(examples, tokenizer) if style == "cloze" else (examples, {}, 0)
  if not examples:
    raise ValueError("no examples to batch" + (f" ({unscorable} unscorable in cloze style)" if unscorable else ""))
  c = num_classes or max(len(e.choices) for e in examples)
  if any(len(e.choices) > c for e in examples):
    raise ValueError(f"an example has more than num_classes={c} choices")
  class_ids = jnp.asarray(answer_token_ids(tokenizer, c, leading_space)) if style == "letters" else None
  fmt = format_prompt if style == "letters" else format_cloze
  instruction = instruction if instruction is not None else INSTRUCTIONS.get(dataset or "")
  order = np.random.RandomState(seed).permutation(len(examples)) if shuffle else np.arange(len(examples))
  batches, truncated = [], 0
  for lo in range(0, len(order), batch_size):
    idx = order[lo:lo + batch_size]
    exs = [examples[i] for i in idx]
    prompts = [fmt(e, instruction) for e in exs]
    if chat:
      prompts = [apply_chat(tokenizer, p) for p in prompts]
    tokens, mask, pos, cut = encode(tokenizer, prompts, max_length, padding_side=padding_side)
    truncated += cut
    tokens, mask, pos = _pad_length(tokens, mask, pos, tokenizer, max_length, pad_to, padding_side)
    choice_mask = np.arange(c)[None, :] < np.asarray([len(e.choices) for e in exs])[:, None]
    ids_bc = None
    if style == "cloze":  # missing choices point at token 0 and are masked
      ids_bc = jnp.asarray([cloze_ids[e.uid] + [0] * (c - len(e.choices)) for e in exs], jnp.int32)
    batches.append(Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pos),
                         jnp.asarray([e.label for e in exs], jnp.int32),
                         None if choice_mask.all() else jnp.asarray(choice_mask), class_ids_bc=ids_bc))
  return batches, class_ids, {"truncated": truncated, "num_classes": c, "order": order.tolist(),
                              "style": style, "unscorable": unscorable}
