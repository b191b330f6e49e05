"""A byte-level BPE tokenizer trained on given texts (``tokenizers``), wrapped for transformers: for
tiny end-to-end runs and tests where no pretrained tokenizer can be downloaded."""

from __future__ import annotations

from typing import Iterable


def train_bpe(texts: Iterable[str], vocab_size: int, pad: str = "<pad>", bos: str = "<s>"):
  """A ``PreTrainedTokenizerFast`` (byte-level BPE, no prefix space) with pad and bos tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  raw = Tokenizer(models.BPE(unk_token=None))
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[pad, bos],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=pad, bos_token=bos)
