"""Text data: SentencePiece round trips and bits per byte, the loader's determinism and restored
position (in-process and with worker processes), and text files trained on through the CLI."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bigjax import lm_inputs
from bigjax import metrics
from bigjax import models
from bigjax import tasks
from bigjax.data import lm
from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.data import tokenizers
from bigjax.errors import UserError
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def spm_tokenizer(data_dir, tmp_path_factory):
  """A SentencePiece model trained on the byte corpus's validation split (small: seconds)."""
  validation = sources.load_source("python_stdlib_text", "validation", data_dir)
  path = str(tmp_path_factory.mktemp("spm") / tokenizers.MODEL_FILE)
  return tokenizers.train_sentencepiece(lm.documents(validation, "bytes"), 512, path)


def test_sentencepiece_round_trips_the_byte_corpus_exactly(spm_tokenizer, data_dir):
  train = sources.load_source("python_stdlib_text", "train", data_dir)
  token_bytes = spm_tokenizer.token_bytes
  total_bytes = total_tokens = 0
  for i in range(0, len(train), 8):  # files it was not trained on
    text = train[i]["bytes"].tobytes()
    ids = spm_tokenizer.encode(text)
    assert spm_tokenizer.decode(ids) == text, train[i]["name"]
    assert token_bytes[ids].sum() == len(text)
    total_bytes, total_tokens = total_bytes + len(text), total_tokens + len(ids)
  assert total_bytes / total_tokens > 1.5  # it compresses: pieces longer than a byte
  odd = "tab\there  two  spaces ▁ literal U+2581, 日本語, 🙂, \r\n\x00 and a NUL".encode()
  assert spm_tokenizer.decode(spm_tokenizer.encode(odd)) == odd
  assert token_bytes[spm_tokenizer.encode(odd)].sum() == len(odd)


def test_bits_per_byte_is_loss_over_the_evaluated_texts_bytes(spm_tokenizer):
  """Against a reference computed independently: numpy log-softmax of the model's logits, and the
  byte length of the targets decoded back to text."""
  model = models.create("transformer-tiny", vocab_size=512, num_layers=1, embed_dim=32, mlp_dim=64)
  text = b"def add(a, b):\n    return a + b\n\nclass Thing:\n    pass\n"
  ids = np.concatenate([spm_tokenizer.encode(text), [spm_tokenizer.eod_id]]).astype(np.int32)
  batch = {"tokens": np.stack([ids, ids[::-1]]), "weights": np.array([1.0, 0.0], np.float32)}
  task = tasks.LanguageModelling(token_bytes=tuple(int(b) for b in spm_tokenizer.token_bytes))
  variables = jax.jit(lambda rng: task.init(model, rng, batch))(jax.random.PRNGKey(0))
  sums, logits = jax.jit(
      lambda v: (task.loss_sums(model, v, batch)[0], model.apply(v, batch["tokens"][:1, :-1]))
  )(variables)
  logits = np.asarray(logits, np.float64)[0]
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nats = -log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
  target_bytes = len(spm_tokenizer.decode(ids[1:-1])) + 1  # the end of document counts as one byte
  assert float(sums["bytes"]) == target_bytes
  np.testing.assert_allclose(
      task.metrics(sums)["bits_per_byte"], nats / math.log(2) / target_bytes, rtol=1e-5
  )


def test_tokenizer_flags(tmp_path):
  assert tokenizers.parse("bytes") is None and tokenizers.parse("spm:4096") == 4096
  for bad in ("spm", "spm:x", "wordpiece:100", "spm:100"):
    with pytest.raises(UserError, match="--tokenizer"):
      tokenizers.parse(bad)
  with pytest.raises(UserError, match="no SentencePiece model in"):
    tokenizers.open_tokenizer("spm:512", str(tmp_path))


def _take(iterator, count):
  return [next(iterator)["tokens"] for _ in range(count)]


@pytest.mark.parametrize("workers,resumed_workers", [(0, 0), (2, 0)])
def test_a_restored_loader_yields_exactly_the_batches_of_the_uninterrupted_one(
    workers, resumed_workers
):
  """Also across worker counts: the saved position is a batch index, whoever computed the batches."""
  windows = lm.TokenWindows(np.arange(3000, dtype=np.int64) % 251, seq_len=7)
  uninterrupted = _take(iter(pipeline.train_batches(windows, 4, seed=3, workers=0)), 12)
  first = iter(pipeline.train_batches(windows, 4, seed=3, workers=workers))
  head = _take(first, 5)
  state = first.get_state()
  first.close()
  resumed = iter(pipeline.train_batches(windows, 4, seed=3, workers=resumed_workers))
  resumed.set_state(state)
  tail = _take(resumed, 7)
  resumed.close()
  for want, got in zip(uninterrupted, head + tail, strict=True):
    np.testing.assert_array_equal(want, got)
  assert not np.array_equal(
      uninterrupted[0], _take(iter(pipeline.train_batches(windows, 4, seed=4)), 1)[0]
  )


def test_default_workers_leave_a_small_machine_alone():
  assert pipeline.workers(3) == 3 and pipeline.workers(None) == pipeline.default_workers()
  assert 0 <= pipeline.default_workers() <= 8


def _run(*flags):
  env = cpu_env()
  return subprocess.run(
      [sys.executable, "-m", "experiments.transformer", *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_text_files_train_with_sentencepiece_which_resume_and_sampling_reuse(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(40):
    (corpus / f"doc{i:02d}.txt").write_text(
        f"Document {i}: the quick brown fox jumps over the lazy dog. " * (20 + i)
    )
  workdir = tmp_path / "run"
  run = [
      f"--dataset=textfiles:{corpus}/*.txt",
      f"--workdir={workdir}",
      "--tokenizer=spm:300",
      "--model=transformer-tiny",
      "--model_override=num_layers=1",
      "--model_override=embed_dim=32",
      "--model_override=mlp_dim=64",
      "--seq_len=32",
      "--batch_size=8",
      "--log_every=1",
      "--eval_every=2",
      "--checkpoint_every=2",
      "--data_workers=0",
  ]
  first = _run(*run, "--num_steps=2")
  assert first.returncode == 0, first.stderr
  assert "(spm:300)" in first.stdout
  model_bytes = (workdir / tokenizers.MODEL_FILE).read_bytes()
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  assert rows[-1]["step"] == 2 and 0 < rows[-1]["eval_bits_per_byte"] < 10
  sampled = _run(
      *run,
      "--num_steps=2",
      "--mode=sample",
      "--prompt=Document ",
      "--num_tokens=8",
      "--temperature=0",
  )
  assert sampled.returncode == 0, sampled.stderr
  assert "step 2 checkpoint" in sampled.stdout and "Document " in sampled.stdout
  assert (workdir / tokenizers.MODEL_FILE).read_bytes() == model_bytes  # reused, not retrained


def test_packed_windows_hold_only_stream_tokens_and_mark_their_documents(data_dir):
  validation = sources.load_source("python_stdlib_text", "validation", data_dir)
  stream = lm.token_stream(validation)
  windows = lm.TokenWindows(stream, seq_len=64, eod_id=lm.DOCUMENT_SEPARATOR)
  examples = [windows[i] for i in range(len(windows))]
  # Window i holds stream[64i : 64i + 65]: windows minus their one-token overlaps are the stream
  # itself, so nothing was padded or dropped but the last partial window.
  rebuilt = np.concatenate([examples[0]["tokens"]] + [e["tokens"][1:] for e in examples[1:]])
  np.testing.assert_array_equal(rebuilt, stream[: len(rebuilt)])
  assert len(stream) - len(rebuilt) < 64
  for example in examples:
    tokens, segments, positions = example["tokens"], example["segment_ids"], example["positions"]
    assert tokens.shape == segments.shape == positions.shape == (65,)
    new_document = np.diff(segments) == 1
    np.testing.assert_array_equal(new_document, tokens[:-1] == lm.DOCUMENT_SEPARATOR)
    np.testing.assert_array_equal(positions[1:][new_document], 0)
  batch = next(iter(pipeline.train_batches(windows, 8, seed=0, workers=0)))
  assert batch["tokens"].shape == batch["segment_ids"].shape == (8, 65)


def test_segment_mask_stops_attention_across_documents_by_gradient():
  from bigjax.nn import attention
  from bigjax.ops import attention as attention_ops

  segment_ids = lm_inputs.document_segments(np.array([5, 6, 0, 7, 8, 9, 0, 1]), eod_id=0)[
      "segment_ids"
  ][None]
  rng = np.random.default_rng(0)
  q, k, v = (jax.numpy.asarray(rng.normal(size=(1, 2, 8, 4)), jax.numpy.float32) for _ in range(3))

  def doc2_output(k, v, mask):
    return attention_ops.grouped_attention(q, k, v, mask)[:, :, 3:7].sum()

  packed = attention.combine_masks(
      attention.causal_mask(8), attention.segment_mask(jax.numpy.asarray(segment_ids))
  )
  grad_k, grad_v = jax.grad(doc2_output, argnums=(0, 1))(k, v, packed)
  assert np.all(np.asarray(grad_k)[:, :, :3] == 0) and np.all(np.asarray(grad_v)[:, :, :3] == 0)
  assert np.all(np.abs(np.asarray(grad_v)[:, :, 3:7]).sum(-1) > 0)  # its own document does reach it
  _, leaky = jax.grad(doc2_output, argnums=(0, 1))(k, v, attention.causal_mask(8))
  # Without the segment mask it leaks
  assert np.all(np.abs(np.asarray(leaky)[:, :, :3]).sum(-1) > 0)


def test_a_packed_transformer_sees_each_document_as_if_it_were_alone():
  import flax.linen as nn
  from bigjax import models

  tokens = np.array([[5, 6, 0, 7, 8, 9, 0, 1, 2]], np.int32)
  packed = lm_inputs.document_segments(tokens[0], eod_id=0)
  model = models.create(
      "transformer-tiny", num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=16
  )
  params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
  together = model.apply(
      {"params": params},
      tokens,
      segment_ids_BT=packed["segment_ids"][None],
      positions_BT=packed["positions"][None],
  )
  for start, end in [(0, 3), (3, 7), (7, 9)]:  # each document with its end-of-document token
    alone = model.apply({"params": params}, tokens[:, start:end])
    np.testing.assert_allclose(together[:, start:end], alone, atol=1e-5)
  leaky = model.apply({"params": params}, tokens)  # plain concatenation: document 2 sees document 1
  assert not np.allclose(leaky[:, 3:7], together[:, 3:7], atol=1e-3)
