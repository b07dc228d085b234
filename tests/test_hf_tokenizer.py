"""--tokenizer=hf:DIR: a Hugging Face tokenizer.json, written by transformers itself, in training,
evaluation and sampling; exact round trips and bytes per token that keep bits per byte comparable.
"""

import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from bigjax import metrics
from bigjax.data import tokenizers
from bigjax.errors import UserError
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
# Text the tokenizer was not trained on, with characters outside its merges and outside ASCII.
_UNSEEN = "Grüße, 日本語 and ▁ (U+2581), tabs\tand\r\nline ends, emoji 🙂, NUL-free.\n".encode()


def _corpus(names):
  return [(_STDLIB / name).read_bytes() for name in names]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
  """A byte-level BPE (GPT-2's scheme) trained on a few stdlib files, saved by transformers."""
  import tokenizers as hf
  import transformers

  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=600,
      special_tokens=["<|endoftext|>", "<|pad|>"],
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator([t.decode() for t in _corpus(["textwrap.py", "shlex.py"])], trainer)
  directory = tmp_path_factory.mktemp("hf_tokenizer")
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
  ).save_pretrained(directory)
  return directory


def test_round_trips_exactly_and_counts_every_byte_once(hf_tokenizer_dir):
  tokenizer = tokenizers.HuggingFaceTokenizer(str(hf_tokenizer_dir))
  assert tokenizer.vocab_size == 600 and tokenizer.name == f"hf:{hf_tokenizer_dir}"
  import transformers

  reference = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
  assert tokenizer.eod_id == reference.eos_token_id
  token_bytes = tokenizer.token_bytes
  assert token_bytes[reference.pad_token_id] == 0 and token_bytes[tokenizer.eod_id] == 1
  for text in [*_corpus(["textwrap.py", "colorsys.py", "bisect.py"]), _UNSEEN]:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text)
    assert ids.tolist() == reference(text.decode(), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Bits per byte divide by the text's real length
    assert int(token_bytes[ids].sum()) == len(text)


def test_sentencepiece_style_pieces_count_their_text(tmp_path):
  import tokenizers as hf

  vocab = {"<unk>": 0, "</s>": 1, "<0x41>": 2, "▁the": 3, "cat": 4}
  tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<unk>"))
  tok.add_special_tokens(["</s>"])
  tok.save(str(tmp_path / tokenizers.HF_FILE))  # no tokenizer_config.json: </s> is found by name
  tokenizer = tokenizers.HuggingFaceTokenizer(str(tmp_path))
  assert tokenizer.eod_id == 1
  assert tokenizer.token_bytes.tolist() == [
      0,
      1,
      1,
      4,
      3,
  ]  # <unk>, </s>, a byte, "▁the" = " the", "cat"


def test_bad_tokenizer_directories_are_one_line(tmp_path, hf_tokenizer_dir):
  with pytest.raises(UserError, match=f"--tokenizer=hf:{tmp_path}: no tokenizer.json there"):
    tokenizers.HuggingFaceTokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
  with pytest.raises(UserError, match=r"tokenizer.json is not a readable tokenizer \("):
    tokenizers.HuggingFaceTokenizer(str(tmp_path))
  with pytest.raises(UserError, match="use bytes, spm:VOCAB .* or hf:DIR"):
    tokenizers.parse("hf")
  other = tmp_path / "other"
  other.mkdir()
  text = (hf_tokenizer_dir / "tokenizer.json").read_text()
  (other / "tokenizer.json").write_text(text.replace('"<|endoftext|>"', '"<|end|>"'))
  with pytest.raises(UserError, match=r"no end-of-sequence token \(<\|endoftext\|> or"):
    tokenizers.HuggingFaceTokenizer(str(other))


def test_a_workdir_keeps_its_tokenizer_and_refuses_another(tmp_path, hf_tokenizer_dir):
  workdir = str(tmp_path / "run")
  with pytest.raises(UserError, match="no SentencePiece model"):  # untouched before training
    tokenizers.open_tokenizer("spm:300", workdir)
  tokenizers.open_tokenizer(f"hf:{hf_tokenizer_dir}", workdir, documents=lambda: [])
  assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (
      hf_tokenizer_dir / "tokenizer.json"
  ).read_bytes()
  with pytest.raises(
      UserError, match="trained with the Hugging Face tokenizer tokenizer.json kept there"
  ):
    tokenizers.open_tokenizer("bytes", workdir)
  changed = tmp_path / "changed"
  changed.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (changed / name).write_text((hf_tokenizer_dir / name).read_text())
  (changed / "tokenizer.json").write_text(
      (changed / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|p|>"')
  )
  with pytest.raises(UserError, match="differs from the tokenizer.json that .* was trained with"):
    tokenizers.open_tokenizer(f"hf:{changed}", workdir)


def test_trains_evaluates_and_samples_through_the_cli(tmp_path, hf_tokenizer_dir):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for name in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "heapq.py", "fnmatch.py"):
    (corpus / f"{name}.txt").write_bytes((_STDLIB / name).read_bytes())
  workdir = tmp_path / "run"
  run = [
      sys.executable,
      "-m",
      "experiments.transformer",
      f"--dataset=textfiles:{corpus}/*.txt",
      f"--workdir={workdir}",
      f"--tokenizer=hf:{hf_tokenizer_dir}",
      "--model=llama-tiny",
      "--model_override=num_layers=1",
      "--model_override=embed_dim=32",
      "--model_override=mlp_dim=64",
      "--seq_len=32",
      "--batch_size=8",
      "--log_every=1",
      "--eval_every=2",
      "--checkpoint_every=2",
      "--eval_batches=2",
      "--data_workers=0",
      "--num_steps=2",
  ]
  env = cpu_env()
  trained = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr
  assert f"(hf:{hf_tokenizer_dir})" in trained.stdout
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  assert rows[-1]["step"] == 2 and 0 < rows[-1]["eval_bits_per_byte"] < 30
  sampled = subprocess.run(
      [*run, "--mode=sample", "--prompt=def ", "--num_tokens=8", "--temperature=0"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert sampled.returncode == 0, sampled.stderr
  assert "step 2 checkpoint" in sampled.stdout and "def " in sampled.stdout
