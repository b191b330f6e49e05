"""Datasets -> fixed-shape token batches (``bmoe_jax.laplace.Batch``) and the answer-letter class ids."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from bmoe_jax.data.prompts import INSTRUCTIONS, answer_token_ids, apply_chat, encode, format_prompt
from bmoe_jax.data.records import MCExample
from bmoe_jax.laplace.kfac import Batch


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def make_batches(examples: Sequence[MCExample], tokenizer, *, batch_size: int, max_length: int = 512,
                 num_classes: int | None = None, padding_side: str = "right", chat: bool = False,
                 instruction: str | None = None, dataset: str | None = None, leading_space: bool = True,
                 shuffle: bool = False, seed: int = 0, pad_to: int = 16) -> tuple[list[Batch], jnp.ndarray, dict]:
  """Lettered prompts, tokenised and padded into batches of ``batch_size`` (the last may be smaller).

  ``num_classes`` defaults to the most choices of any example; examples with fewer choices get a
  ``choice_mask_bc``. Sequence lengths are rounded up to ``pad_to`` to bound recompilation. Returns
  (batches, class_ids [C], info {"truncated": n, "num_classes": C, "order": example indices})."""
  if not examples:
    raise ValueError("no examples to batch")
  c = num_classes or max(len(e.choices) for e in examples)
  if any(len(e.choices) > c for e in examples):
    raise ValueError(f"an example has more than num_classes={c} choices")
  class_ids = jnp.asarray(answer_token_ids(tokenizer, c, leading_space))
  instruction = instruction if instruction is not None else INSTRUCTIONS.get(dataset or "")
  order = np.random.RandomState(seed).permutation(len(examples)) if shuffle else np.arange(len(examples))
  batches, truncated = [], 0
  for lo in range(0, len(order), batch_size):
    idx = order[lo:lo + batch_size]
    exs = [examples[i] for i in idx]
    prompts = [format_prompt(e, instruction) for e in exs]
    if chat:
      prompts = [apply_chat(tokenizer, p) for p in prompts]
    tokens, mask, pos, cut = encode(tokenizer, prompts, max_length, padding_side=padding_side)
    truncated += cut
    s = min(_round_up(tokens.shape[1], pad_to), max(max_length, tokens.shape[1]))
    if s > tokens.shape[1]:  # extra padding on the padding side
      extra = s - tokens.shape[1]
      pad_id = int(tokens[mask == 0][0]) if (mask == 0).any() else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
      width = ((0, 0), (0, extra)) if padding_side == "right" else ((0, 0), (extra, 0))
      tokens = np.pad(tokens, width, constant_values=pad_id)
      mask = np.pad(mask, width)
      pos = pos + (extra if padding_side == "left" else 0)
    choice_mask = np.arange(c)[None, :] < np.asarray([len(e.choices) for e in exs])[:, None]
    batches.append(Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pos),
                         jnp.asarray([e.label for e in exs], jnp.int32),
                         None if choice_mask.all() else jnp.asarray(choice_mask)))
  return batches, class_ids, {"truncated": truncated, "num_classes": c, "order": order.tolist()}
