"""experiments.seq2seq through the CLI: a textpairs: corpus made here trains and reports BLEU and
chrF as sacrebleu computes them on the written translations; separate SentencePiece and byte
tokenizers; a TFDS translation set read by its supervised keys; bad input as one-line errors."""

import json
import os
import shutil

import numpy as np
import pytest
import sacrebleu
import tensorflow_datasets as tfds

from bigjax import beam
from bigjax import metrics
from bigjax import models
from bigjax.data import files
from bigjax.data import pairs
from bigjax.data import sources
from bigjax.data import tokenizers
from bigjax.errors import UserError
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run_experiment

_WORDS = "the a red blue cat dog sees eats small big bird fish runs sleeps near under old".split()
_LEXICON = {w: w.upper() for w in _WORDS}  # a made-up target language: one word for each


def _write_corpus(directory, lines: int = 600) -> str:
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(lines):
    sentence = list(rng.choice(_WORDS, int(rng.integers(2, 5))))
    rows.append(" ".join(sentence) + "\t" + " ".join(_LEXICON[w] for w in sentence))
  path = os.path.join(directory, "corpus.tsv")
  with open(path, "w") as f:
    f.write("\n".join(rows) + "\n")
  return path


TINY = [
    "--model=seq2seq-tiny",
    "--model_override=num_layers=1",
    "--model_override=embed_dim=64",
    "--model_override=mlp_dim=128",
    "--model_override=max_len=40",
    "--batch_size=32",
    "--learning_rate=3e-3",
    "--warmup_steps=10",
    "--log_every=20",
    "--decode_examples=20",
    "--beam_size=2",
]


def _seq2seq(*flags):
  return _run_experiment("experiments.seq2seq", *flags)


def test_a_textpairs_corpus_trains_and_reports_bleu_as_sacrebleu_computes_it(tmp_path):
  corpus = _write_corpus(tmp_path)
  workdir = tmp_path / "run"
  result = _seq2seq(
      *TINY,
      f"--dataset=textpairs:{corpus}",
      f"--workdir={workdir}",
      "--num_steps=200",
      "--eval_every=200",
  )
  assert result.returncode == 0, result.stderr
  records = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
  assert records[-1]["eval_loss"] < records[0]["train_loss"] / 2  # it learned
  (decoded,) = metrics.read_jsonl(str(workdir / "decode_eval.jsonl"))
  assert decoded["step"] == 200 and decoded["examples"] == 20 and decoded["beam_size"] == 2
  rows = [json.loads(line) for line in open(decoded["translations"])]
  assert len(rows) == 20 and all("\t" not in r["source"] for r in rows)
  hypotheses, references = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
  assert decoded["decoded_bleu"] == pytest.approx(
      sacrebleu.corpus_bleu(hypotheses, [references]).score
  )
  assert decoded["decoded_chrf"] == pytest.approx(
      sacrebleu.corpus_chrf(hypotheses, [references]).score
  )
  assert decoded["decoded_bleu"] > 5  # a word-for-word code is learned fast
  assert f"BLEU {decoded['decoded_bleu']:.2f}" in result.stdout
  # The same workdir translates a prompt from its checkpoint.
  sampled = _seq2seq(
      *TINY,
      f"--dataset=textpairs:{corpus}",
      f"--workdir={workdir}",
      "--mode=sample",
      "--prompt=the red cat",
      "--num_steps=200",
  )
  assert sampled.returncode == 0, sampled.stderr
  assert "step 200 checkpoint, beam 2" in sampled.stdout
  # An export loads as the model that wrote those translations.
  export = tmp_path / "export"
  exported = _seq2seq(
      *TINY,
      f"--dataset=textpairs:{corpus}",
      f"--workdir={workdir}",
      "--mode=export",
      f"--export_dir={export}",
  )
  assert exported.returncode == 0, exported.stderr
  model, variables = models.load(str(export))
  source = np.frombuffer(rows[0]["source"].encode(), np.uint8).astype(np.int32)
  inputs = np.zeros((1, 40), np.int32)
  inputs[0, : len(source)] = source
  start, step = model.decoder(model)
  tokens, lengths, _ = beam.beam_search(
      start,
      step,
      variables["params"],
      (inputs, np.array([len(source)], np.int32)),
      first_position=1,
      num_tokens=40,
      eos_id=0,
      cfg=beam.BeamConfig(2, 0.6),
  )
  best = np.asarray(tokens)[0, 0, : int(lengths[0, 0]) - 1]
  assert bytes(best.astype(np.uint8)).decode() == rows[0]["hypothesis"]


def test_separate_tokenizers_train_a_sentencepiece_target_side(tmp_path):
  corpus = _write_corpus(tmp_path, lines=800)
  workdir = tmp_path / "run"
  result = _seq2seq(
      *TINY,
      f"--dataset=textpairs:{corpus}",
      f"--workdir={workdir}",
      "--tokenizer=spm:300",
      "--source_tokenizer=bytes",
      "--num_steps=4",
      "--eval_every=4",
      "--decode_examples=4",
  )
  assert result.returncode == 0, result.stderr
  target = tokenizers.SentencePieceTokenizer(str(workdir / tokenizers.MODEL_FILE))
  assert target.vocab_size == 300
  # The target side's pieces come from the target language only.
  assert not os.path.exists(workdir / "source_tokenizer" / tokenizers.MODEL_FILE)
  flags_text = (workdir / "flags.txt").read_text()
  assert "share_embeddings=False" in flags_text and "source_vocab_size=256" in flags_text


class BigjaxTestTranslate(tfds.core.GeneratorBasedBuilder):
  """A TFDS translation set shaped as wmt14_translate's: a Translation feature and supervised keys."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "test data"}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.Translation(languages=("de", "en")),
        supervised_keys=("de", "en"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(40), "validation": self._generate_examples(8)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"de": f"Satz {i}", "en": f"sentence {i}"}


def test_a_tfds_translation_set_is_read_by_its_supervised_keys(tmp_path):
  data_dir = str(tmp_path)
  BigjaxTestTranslate(data_dir=data_dir, file_format="array_record").download_and_prepare()
  name = "bigjax_test_translate/de-en"
  assert pairs.pair_keys(name, data_dir, None, None) == ("de", "en")
  assert pairs.pair_keys(name, data_dir, "en", "de") == ("en", "de")  # the other direction
  byte = tokenizers.ByteTokenizer()
  examples = pairs.PairExamples(
      sources.load_source(name, "validation", data_dir), ("de", "en"), byte, byte, 12, 14
  )
  for i in range(len(examples)):  # TFDS shuffles: pair each source with its own target
    example = examples[i]
    source = bytes(example["inputs"][: example["input_lengths"]].astype(np.uint8)).decode()
    target = "sentence " + source.removeprefix("Satz ")
    assert bytes(example["targets"][1 : 1 + len(target)].astype(np.uint8)).decode() == target
    assert example["targets"][0] == 0 and example["targets"][1 + len(target)] == 0
    assert example["loss_mask"].sum() == len(target) + 1
  with pytest.raises(UserError, match="has no feature 'fr'; its features are"):
    pairs.pair_keys(name, data_dir, "fr", "en")


def test_bad_pairs_are_one_line_errors_naming_the_line(tmp_path):
  for text, problem in [
      ("a\tb\nno tab here\n", "corpus.tsv:2 has no tab between the source and the target"),
      ("a\tb\n\nc\t \n", "corpus.tsv:3 has an empty target"),
      ("\tb\n", "corpus.tsv:1 has an empty source"),
  ]:
    (tmp_path / "corpus.tsv").write_text(text)
    with pytest.raises(UserError, match=problem):
      files.open_split(f"textpairs:{tmp_path}/corpus.tsv", "train")
  (tmp_path / "corpus.tsv").write_text("abcdefghij\txyz\n")
  byte = tokenizers.ByteTokenizer()
  source = files.open_split(f"textpairs:{tmp_path}/corpus.tsv", "train+validation")
  with pytest.raises(
      UserError, match="example 0 has a source of 10 tokens, more than --source_len=8; raise"
  ):
    pairs.PairExamples(source, ("inputs", "targets"), byte, byte, 8, 8)[0]
  cut = pairs.PairExamples(source, ("inputs", "targets"), byte, byte, 8, 3, truncate=True)[0]
  assert cut["input_lengths"] == 8 and bytes(cut["targets"][1:3].astype(np.uint8)) == b"xy"


def test_bad_flags_are_one_line_errors(tmp_path):
  corpus = _write_corpus(tmp_path, lines=50)
  common = [*TINY, f"--dataset=textpairs:{corpus}", f"--workdir={tmp_path / 'run'}"]
  _assert_one_line_error(_seq2seq(*common, "--beam_size=0"), 1, "beam_size=0")
  _assert_one_line_error(
      _seq2seq(*common, "--model=transformer-tiny"), 1, "TransformerLM is not an encoder-decoder"
  )
  _assert_one_line_error(
      _seq2seq(*common, "--source_len=80"),
      1,
      "--source_len=80 is longer than the model's max_source_len=40",
  )
  (tmp_path / "bad.tsv").write_text("one\tuno\ntwo dos\n")
  _assert_one_line_error(
      _seq2seq(*TINY, f"--dataset=textpairs:{tmp_path}/bad.tsv", f"--workdir={tmp_path / 'b'}"),
      1,
      "bad.tsv:2 has no tab",
  )
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_rnn_with_attention_resumes_to_the_uninterrupted_losses(tmp_path):
  corpus = _write_corpus(tmp_path, lines=200)
  rnn = [
      "--model=lstm-attention-tiny",
      "--model_override=embed_dim=16",
      "--model_override=hidden_size=32",
      f"--dataset=textpairs:{corpus}",
      "--batch_size=16",
      "--log_every=1",
      "--eval_every=6",
      "--checkpoint_every=3",
      "--decode_examples=4",
  ]
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  assert _seq2seq(*rnn, f"--workdir={whole}", "--num_steps=6").returncode == 0
  # As if the run had been killed after its step-3 checkpoint: that checkpoint alone survives.
  shutil.copytree(whole, parts)
  shutil.rmtree(parts / "checkpoints" / "6")
  resumed = _seq2seq(*rnn, f"--workdir={parts}", "--num_steps=6")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 3" in resumed.stdout
  want, got = (metrics.read_jsonl(str(w / "metrics.jsonl")) for w in (whole, parts))
  assert [r["step"] for r in got] == list(range(1, 7))
  for key in ("train_loss", "grad_norm", "data_fingerprint", "eval_exact_match"):
    assert [r.get(key) for r in got] == [r.get(key) for r in want], key
