"""The tokenizer stored in a GGUF file, built with the ``tokenizers`` package from the file's metadata (no
torch: transformers' own GGUF path imports it).

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, SmolLM2, Qwen, Llama-3, ...): ``tokens`` and ``merges`` are
the BPE vocabulary and merge list as stored; the pre-tokenizer is byte level (GPT-2 regex, a leading space
only with ``add_space_prefix``), the decoder byte level; control tokens (``token_type`` 3) are special added
tokens, user-defined ones (4) plain added tokens; BOS is prepended when ``add_bos_token`` says so. The result
is wrapped as transformers' ``PreTrainedTokenizerFast`` with the file's BOS/EOS/UNK/PAD tokens and chat
template: the object every stage takes. Other tokenizer models (SentencePiece ``llama``) go through
transformers, which then needs torch.
"""

from __future__ import annotations

from pathlib import Path

from convert.errors import ConversionError

CONTROL, USER_DEFINED = 3, 4
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def gguf_tokenizer(path: str | Path):
  """A transformers ``PreTrainedTokenizerFast`` equal to ``AutoTokenizer.from_pretrained(dir, gguf_file=)``."""
  from convert.gguf import _field, _reader

  path = Path(path)
  _, reader = _reader(path)
  meta = lambda key: _field(reader, f"tokenizer.ggml.{key}")
  model = meta("model")
  if model != "gpt2":
    return _through_transformers(path, model)
  tokens, merges, types = meta("tokens"), meta("merges"), meta("token_type")
  if not tokens or merges is None or types is None or len(types) != len(tokens):
    raise ConversionError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens, merges and token_type of one "
                          f"length (got {len(tokens or [])} tokens, {len(types or [])} types)")
  tok = _backend(tokens, merges, types, bool(meta("add_space_prefix")), meta("bos_token_id")
                 if meta("add_bos_token") else None)
  from transformers import PreTrainedTokenizerFast

  specials = {name: tokens[int(meta(key))] for name, key in _SPECIAL_IDS.items() if meta(key) is not None}
  return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=_field(reader, "tokenizer.chat_template"),
                                 clean_up_tokenization_spaces=False, **specials)


def _backend(tokens, merges, types, add_prefix_space: bool, bos_id: int | None):
  from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
  from tokenizers.models import BPE

  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  if bos_id is None:
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
  else:
    bos = tokens[int(bos_id)]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                       special_tokens=[(bos, int(bos_id))])
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                          for i, t in enumerate(types) if int(t) == CONTROL])
  tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                  for i, t in enumerate(types) if int(t) == USER_DEFINED])
  return tok


def _through_transformers(path: Path, model):
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  except Exception as err:
    raise ConversionError(f"{path}: transformers could not build the {model!r} tokenizer from the GGUF metadata "
                          f"({type(err).__name__}: {err}); byte-level BPE (gpt2) files need no torch, the others "
                          "need transformers with torch") from None
