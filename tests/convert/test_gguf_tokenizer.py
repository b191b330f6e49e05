"""The GGUF tokenizer built with ``tokenizers`` (no torch) equals transformers' own GGUF tokenizer on the real
SmolLM2 vocabulary: token ids, decoding, special tokens, padding and the chat template, on a few hundred real
benchmark strings and edge cases; and building it imports no torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from convert.gguf_tokenizer import gguf_tokenizer
from convert.sources import fetch_gguf

EDGES = ["", " ", "   leading and trailing   ", "Hello world! ünïcödé  spaces\n\nnew", "日本語のテキスト",
         "emoji 🤗🚀 and ZWJ 👩‍👩‍👧", "tabs\tand\r\nCRLF", "<|im_start|>user\nhi<|im_end|>\n",
         "<repo_name>x<file_sep>",
         "123456789 3.14159 1e-5", "a" * 300, "don't won't y'all", "\u00a0non-breaking\u2009thin", "x<|endoftext|>y"]


@pytest.fixture(scope="module")
def both():
  from transformers import AutoTokenizer
  path = fetch_gguf("smollm2")
  return gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _strings(shared_data, n=300):
  out = []
  with open(Path(shared_data) / "obqa" / "test.jsonl", encoding="utf-8") as fh:
    for line in fh:
      row = json.loads(line)
      out += [row["question"], " " + row["choices"][row["label"]]]
      if len(out) >= n:
        break
  return out + EDGES


def test_same_ids_and_text_as_transformers(both, shared_data):
  ours, ref = both
  texts = _strings(shared_data)
  assert len(texts) > 300
  for s in texts:
    assert ours(s).input_ids == ref(s).input_ids, s
    ids = ref(s).input_ids
    assert ours.decode(ids) == ref.decode(ids), s
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), s
  batch = texts[:16]
  a, b = ours(batch, padding=True), ref(batch, padding=True)
  assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask
  assert ours.special_tokens_map == ref.special_tokens_map and len(ours) == len(ref)
  chat = [{"role": "user", "content": "Which planet is the largest?"}]
  assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
          == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_building_it_imports_no_torch():
  path = fetch_gguf("smollm2")
  code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
          "from convert.gguf_tokenizer import gguf_tokenizer\n"
          f"tok = gguf_tokenizer({str(path)!r})\n"
          "assert tok('The capital of France is').input_ids == [504, 3575, 282, 4649, 314]\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
  assert res.returncode == 0, res.stderr[-2000:]
