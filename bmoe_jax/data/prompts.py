"""Lettered multiple-choice prompts, answer-letter token ids and padded, truncated token batches.

The task output of every model is the C answer-letter logits at the last real position of a prompt
ending in "Answer:" (``answer_pos_b``), the layout ``bmoe_jax.laplace.Batch`` and the trainer use.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bmoe_jax.data.records import LETTERS, MCExample

INSTRUCTIONS = {"winogrande": "Which option correctly fills the blank (_)?",
                "boolq": "Answer the question about the passage."}


def format_prompt(ex: MCExample, instruction: str | None = None) -> str:
  """``[instruction]\\n[Passage: ...]\\nQuestion: ...\\nA. ...\\nB. ...\\nAnswer:``."""
  lines = [instruction] if instruction else []
  if ex.context:
    lines.append(f"Passage: {ex.context}")
  lines.append(f"Question: {ex.question}")
  lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)]
  lines.append("Answer:")
  return "\n".join(lines)


def format_cloze(ex: MCExample, instruction: str | None = None) -> str:
  """``[instruction]\n[Passage: ...]\nQuestion: ...\nAnswer:`` without the options: each choice is scored
  as the continuation (its first token, ``cloze_token_ids``)."""
  lines = [instruction] if instruction else []
  if ex.context:
    lines.append(f"Passage: {ex.context}")
  lines += [f"Question: {ex.question}", "Answer:"]
  return "\n".join(lines)


def cloze_token_ids(tokenizer, choices: Sequence[str]) -> list[int]:
  """The first token of " <choice>" for each choice; ValueError if two choices share it (unscorable)."""
  ids = []
  for c in choices:
    toks = tokenizer.encode(" " + c, add_special_tokens=False)
    if not toks:
      raise ValueError(f"choice {c!r} encodes to no token")
    ids.append(int(toks[0]))
  if len(set(ids)) != len(ids):
    raise ValueError(f"choices {list(choices)} share a first token ({ids}); cloze scoring cannot tell them apart")
  return ids


def apply_chat(tokenizer, prompt: str) -> str:
  """The prompt as a user turn of the tokenizer's chat template, with "Answer:" opening the reply."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"{type(tokenizer).__name__} has no chat_template; use chat=False")
  body, _, tail = prompt.rpartition("\n")
  text = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                       tokenize=False)
  return text + tail


def answer_token_ids(tokenizer, num_choices: int, leading_space: bool = True) -> np.ndarray:
  """Token id of each answer letter (" A" with ``leading_space``, else "A"); error if any letter is not
  exactly one token of this tokenizer."""
  ids = []
  for letter in LETTERS[:num_choices]:
    text = (" " if leading_space else "") + letter
    toks = tokenizer.encode(text, add_special_tokens=False)
    if len(toks) != 1:
      raise ValueError(f"answer letter {text!r} is {len(toks)} tokens {toks} for {type(tokenizer).__name__} "
                       f"({getattr(tokenizer, 'name_or_path', '')}); expected one. Try "
                       f"leading_space={not leading_space}.")
    ids.append(toks[0])
  if len(set(ids)) != len(ids):
    raise ValueError(f"answer letters map to repeated token ids {ids}")
  return np.asarray(ids, np.int32)


def round_up(n: int, multiple: int) -> int:
  """n rounded up to a multiple (padded lengths: fewer distinct shapes, fewer recompilations)."""
  return -(-n // multiple) * multiple


def bucket(n: int, multiple: int) -> int:
  """The smallest of ``multiple`` x (1, 2, 3, 4, 6, 8, 12, 16, ...) that holds n: padded lengths on a
  geometric ladder (from 2 x multiple on, at most 50% padding), so a set of varied lengths compiles a
  handful of shapes, where rounding to a multiple compiles one per step (each jitted Jacobian pass
  takes seconds to compile: measured, the demo's evaluation was mostly compilation)."""
  size = multiple
  while True:
    if n <= size:
      return size
    if size >= 2 * multiple and n <= size * 3 // 2:
      return size * 3 // 2
    size *= 2


def encode(tokenizer, prompts: Sequence[str], max_length: int, *, padding_side: str = "right",
           pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Token ids [b, s], mask [b, s] and answer positions [b] (the last real token: ":" of "Answer:").

  Over-long prompts lose tokens from their start (after any BOS token), never from the end, so the
  answer slot survives; returns also how many prompts were truncated. ``s`` is the longest prompt
  (at most ``max_length``)."""
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
  if pad_id is None:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad_id is None:
    raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_id=")
  rows, truncated = [], 0
  bos = tokenizer.bos_token_id
  for text in prompts:
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    if len(ids) > max_length:
      truncated += 1
      keep_bos = bos is not None and ids[0] == bos
      ids = ([bos] if keep_bos else []) + ids[len(ids) - max_length + int(keep_bos):]
    rows.append(ids)
  s = max(len(r) for r in rows)
  tokens = np.full((len(rows), s), pad_id, np.int32)
  mask = np.zeros((len(rows), s), np.int32)
  pos = np.zeros(len(rows), np.int32)
  for i, ids in enumerate(rows):
    start = 0 if padding_side == "right" else s - len(ids)
    tokens[i, start:start + len(ids)] = ids
    mask[i, start:start + len(ids)] = 1
    pos[i] = start + len(ids) - 1
  return tokens, mask, pos, truncated
