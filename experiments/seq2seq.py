"""Trains an encoder-decoder (TransformerSeq2Seq, or an RNN with attention) on (source, target) pairs,
evaluates it (loss, accuracy and exact match teacher-forced; BLEU, chrF and exact match of decoded
translations), translates --prompt, or exports it.

  python -m experiments.seq2seq --flagfile=experiments/configs/seq2seq_tiny.flags
  python -m experiments.seq2seq --flagfile=experiments/configs/seq2seq_tiny.flags \
      --mode=sample --prompt=abcdef --beam_size=4
"""

import json
import os
import time

import jax
import numpy as np
from absl import flags

from bigjax import beam
from bigjax import flags as bigjax_flags
from bigjax import metrics
from bigjax import models
from bigjax import run as bigjax_run
from bigjax import sample
from bigjax import storage
from bigjax import tasks
from bigjax.data import lm
from bigjax.data import pairs
from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.data import tokenizers
from bigjax.errors import UserError
from experiments import transformer as lm_experiment  # --tokenizer, --prompt and the sampling flags

SOURCE_TOKENIZER = flags.DEFINE_string(
    "source_tokenizer",
    None,
    "The source side's own tokenizer (bytes, spm:VOCAB trained on the sources and kept in "
    "WORKDIR/source_tokenizer, or hf:DIR); unset: --tokenizer for both sides, one vocabulary.",
)
SOURCE_KEY = flags.DEFINE_string(
    "source_key",
    None,
    "Feature holding the source text (default: inputs, or the TFDS builder's first supervised key).",
)
TARGET_KEY = flags.DEFINE_string(
    "target_key",
    None,
    "Feature holding the target text (default: targets, or the second supervised key).",
)
SOURCE_LEN = flags.DEFINE_integer(
    "source_len",
    None,
    "Source tokens per example, padded; default the model's max_source_len.",
    lower_bound=1,
)
TARGET_LEN = flags.DEFINE_integer(
    "target_len",
    None,
    "Decoder input tokens per example (the start token and the target); default the model's max_len.",
    lower_bound=2,
)
TRUNCATE_PAIRS = flags.DEFINE_bool(
    "truncate_pairs",
    False,
    "Cut sources and targets longer than --source_len / --target_len instead of stopping.",
)
BEAM_SIZE = flags.DEFINE_integer(
    "beam_size",
    4,
    "Hypotheses beam search keeps when it decodes (the evaluation's translations, --mode=sample); "
    "1 is greedy decoding. --mode=sample with --beam_size=1 samples with --temperature instead.",
)
LENGTH_PENALTY = flags.DEFINE_float(
    "length_penalty",
    0.6,
    "Beam search's length penalty alpha (Wu et al. 2016); 0 ranks by log-probability.",
)
DECODE_EXAMPLES = flags.DEFINE_integer(
    "decode_examples",
    1000,
    "Evaluation examples decoded for BLEU, chrF and decoded exact match after training and in "
    "--mode=eval; 0 for all of them.",
    lower_bound=0,
)


def use_tokenizer_ids() -> None:
  """Sizes the vocabularies and sets the start/end id for --tokenizer and --source_tokenizer (an
  explicit override of the same field wins)."""
  if bigjax_flags.MODEL.value:  # before its overrides: a preset of another kind has no eos_id
    check_is_seq2seq(models.create(bigjax_flags.MODEL.value))
  lm_experiment.use_tokenizer_vocab()
  given = {o.partition("=")[0].strip() for o in bigjax_flags.MODEL_OVERRIDES.value}
  added = {"eos_id": _end_id(lm_experiment.TOKENIZER.value)}
  if SOURCE_TOKENIZER.value:
    source_vocab = tokenizers.parse(SOURCE_TOKENIZER.value)
    added.update(share_embeddings=False, source_vocab_size=source_vocab or 256)
  new = [f"{name}={value}" for name, value in added.items() if name not in given]
  flags.FLAGS.model_override = [*bigjax_flags.MODEL_OVERRIDES.value, *new]


def _end_id(spec: str) -> int:
  """The end-of-sequence id of the tokenizer `spec` names, known before it is trained."""
  if spec.startswith("hf:"):
    return tokenizers.HuggingFaceTokenizer(spec[len("hf:") :]).eod_id
  if tokenizers.parse(spec) is None:
    return tokenizers.ByteTokenizer.eod_id
  return tokenizers.SPM_EOS_ID


def open_examples(exp: bigjax_run.Experiment, split: str, tokenizer_pair) -> pairs.PairExamples:
  cfg = exp.base_model.config
  return pairs.PairExamples(
      sources.load_source(exp.dataset, split, exp.data_dir),
      _keys(exp),
      *tokenizer_pair,
      source_len=SOURCE_LEN.value or cfg.max_source_len or cfg.max_len,
      target_len=TARGET_LEN.value or cfg.max_len,
      truncate=TRUNCATE_PAIRS.value,
  )


def _keys(exp: bigjax_run.Experiment) -> tuple[str, str]:
  return pairs.pair_keys(exp.dataset, exp.data_dir, SOURCE_KEY.value, TARGET_KEY.value)


def open_tokenizers(exp: bigjax_run.Experiment, train_split: str):
  """(source tokenizer, target tokenizer): one for both sides unless --source_tokenizer is given;
  SentencePiece models are trained on the training pairs the first time a workdir needs them."""
  keys = _keys(exp)

  def texts(*sides):
    def documents():
      source = sources.load_source(exp.dataset, train_split, exp.data_dir)
      for i in range(len(source)):
        example = source[i]
        for key in sides:
          yield lm.as_bytes(example[key])

    return documents

  workdir = exp.config.workdir
  if not SOURCE_TOKENIZER.value:
    shared = tokenizers.open_tokenizer(lm_experiment.TOKENIZER.value, workdir, texts(*keys))
    return shared, shared
  target = tokenizers.open_tokenizer(lm_experiment.TOKENIZER.value, workdir, texts(keys[1]))
  source = tokenizers.open_tokenizer(
      SOURCE_TOKENIZER.value, os.path.join(workdir, "source_tokenizer"), texts(keys[0])
  )
  return source, target


def check_model_fits(exp: bigjax_run.Experiment, tokenizer_pair, examples: pairs.PairExamples):
  """The tokenizers' ids, the end id and the example lengths against the model, before any step."""
  cfg = exp.base_model.config
  source_tok, target_tok = tokenizer_pair
  source_vocab = cfg.source_vocab_size or cfg.vocab_size
  for side, tokenizer, vocab, field in (
      ("source", source_tok, source_vocab, "source_vocab_size"),
      ("target", target_tok, cfg.vocab_size, "vocab_size"),
  ):
    if tokenizer.vocab_size > vocab:
      raise UserError(
          f"the {side} tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} ids but the model's "
          f"{field} is {vocab}; add --model_override={field}={tokenizer.vocab_size}"
      )
  if cfg.eos_id != target_tok.eod_id:
    raise UserError(
        f"the model's eos_id={cfg.eos_id} is not the target tokenizer's end id {target_tok.eod_id}; "
        f"add --model_override=eos_id={target_tok.eod_id}"
    )
  longest = {
      "source": (
          examples.source_len,
          "--source_len",
          cfg.max_source_len or cfg.max_len,
          "max_source_len",
      ),
      "target": (examples.target_len, "--target_len", cfg.max_len, "max_len"),
  }
  for side, (length, flag, model_len, field) in longest.items():
    if length > model_len:
      raise UserError(
          f"{flag}={length} is longer than the model's {field}={model_len}; lower {flag} or add "
          f"--model_override={field}={length}"
      )


def check_is_seq2seq(model) -> None:
  if not getattr(model, "is_seq2seq", False):
    raise UserError(
        f"{type(model).__name__} is not an encoder-decoder; experiments.seq2seq trains "
        f"seq2seq-tiny, lstm-attention-tiny, transformer-base-wmt or a model whose class sets "
        f"is_seq2seq"
    )


def beam_config() -> beam.BeamConfig:
  return beam.BeamConfig(beam_size=BEAM_SIZE.value, length_penalty=LENGTH_PENALTY.value)


def fit_seq2seq(exp: bigjax_run.Experiment, beam_cfg: beam.BeamConfig) -> dict:
  check_is_seq2seq(exp.base_model)
  train_split = bigjax_flags.TRAIN_SPLIT.value
  eval_split = bigjax_flags.EVAL_SPLIT.value or sources.default_eval_split(
      exp.dataset, exp.data_dir
  )
  tokenizer_pair = open_tokenizers(exp, train_split)
  train_examples = open_examples(exp, train_split, tokenizer_pair)
  eval_examples = open_examples(exp, eval_split, tokenizer_pair)
  check_model_fits(exp, tokenizer_pair, train_examples)
  if exp.run_config.mode == "sample":
    return {"translations": translate_prompt(exp, tokenizer_pair, train_examples, beam_cfg)}
  metrics.console(
      f"{exp.dataset}: {len(train_examples):,} {train_split} / {len(eval_examples):,} {eval_split} "
      f"pairs ({exp.base_model.__class__.__name__}, {tokenizer_pair[1].name} tokens, sources "
      f"padded to {train_examples.source_len}, decoder inputs to {train_examples.target_len})"
  )
  record = bigjax_run.run(
      exp,
      task=tasks.SequenceToSequence(),
      train_data=pipeline.train_batches(
          train_examples,
          exp.config.batch_size,
          exp.config.seed,
          workers=pipeline.workers(bigjax_flags.DATA_WORKERS.value),
      ),
      eval_data=pipeline.eval_batches(
          eval_examples, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value
      ),
  )
  if exp.run_config.mode in ("train", "eval") and not exp.run_config.compile_only:
    record = {**record, **decode_evaluation(exp, eval_examples, tokenizer_pair[1], beam_cfg)}
  return record


def _load_params(exp: bigjax_run.Experiment, examples: pairs.PairExamples):
  example_batch = {k: v[None] for k, v in examples[0].items()}
  return bigjax_run.decoding_params(exp, tasks.SequenceToSequence(), example_batch)


def _beams(model, decoder, params, source, num_tokens: int, beam_cfg) -> list[list[np.ndarray]]:
  """Each source row's hypotheses, best first, as target tokens without the end token."""
  start, step = decoder
  eos = model.config.eos_id
  tokens_BWN, lengths_BW, _ = beam.beam_search(
      start,
      step,
      params,
      source,
      first_position=1,
      num_tokens=num_tokens,
      eos_id=eos,
      cfg=beam_cfg,
  )
  tokens_BWN, lengths_BW = np.asarray(tokens_BWN), np.asarray(lengths_BW)
  rows = []
  for tokens_WN, lengths_W in zip(tokens_BWN, lengths_BW):
    hypotheses = [t[:n] for t, n in zip(tokens_WN, lengths_W)]
    rows.append([h[:-1] if len(h) and h[-1] == eos else h for h in hypotheses])
  return rows


def decode_batches(model, params, examples: pairs.PairExamples, indices, batch_size: int, beam_cfg):
  """The best hypothesis' target tokens (end token dropped) for each example in `indices`."""
  decoder = model.decoder(model)  # once: beam_search compiles for these two functions
  decoded = []
  for first in range(0, len(indices), batch_size):
    chunk = list(indices[first : first + batch_size])
    rows = [examples[i] for i in chunk + chunk[:1] * (batch_size - len(chunk))]  # one shape
    source = (
        np.stack([r["inputs"] for r in rows]),
        np.stack([r["input_lengths"] for r in rows]),
    )
    beams = _beams(model, decoder, params, source, examples.target_len, beam_cfg)
    decoded += [hypotheses[0] for hypotheses in beams[: len(chunk)]]
  return decoded


def decode_evaluation(
    exp: bigjax_run.Experiment, examples: pairs.PairExamples, tokenizer, beam_cfg
):
  """BLEU and chrF (sacrebleu, on the detokenized text) and exact match of the model's decoded
  translations of the first --decode_examples evaluation examples: printed, appended to
  WORKDIR/decode_eval.jsonl, and every translation beside its source and reference in
  WORKDIR/translations/step_N.jsonl."""
  import sacrebleu

  if jax.process_count() > 1:
    metrics.console("decoded evaluation skipped: it runs in single-process runs only")
    return {}
  params, step = _load_params(exp, examples)
  count = len(examples) if not DECODE_EXAMPLES.value else min(DECODE_EXAMPLES.value, len(examples))
  indices = np.arange(count)
  started = time.perf_counter()
  decoded = decode_batches(exp.model, params, examples, indices, exp.config.batch_size, beam_cfg)
  hypotheses = [tokenizer.decode(t).decode("utf-8", errors="replace") for t in decoded]
  references = [examples.reference(int(i)) for i in indices]
  scores = {
      "decoded_bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
      "decoded_chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
      "decoded_exact_match": float(np.mean([h == r for h, r in zip(hypotheses, references)])),
  }
  seconds = time.perf_counter() - started
  metrics.console(
      f"step {step}: decoded {count:,} evaluation examples (beam {beam_cfg.beam_size}, length "
      f"penalty {beam_cfg.length_penalty}) in {seconds:.1f}s: BLEU {scores['decoded_bleu']:.2f}, "
      f"chrF {scores['decoded_chrf']:.2f}, exact match {scores['decoded_exact_match']:.4f}"
  )
  translations = os.path.join(exp.config.workdir, "translations", f"step_{step}.jsonl")
  storage.write_whole(
      translations,
      "".join(
          json.dumps({"source": examples.source_text(int(i)), "hypothesis": h, "reference": r})
          + "\n"
          for i, h, r in zip(indices, hypotheses, references)
      ),
  )
  record = {
      "step": step,
      "examples": count,
      "beam_size": beam_cfg.beam_size,
      "length_penalty": beam_cfg.length_penalty,
      **scores,
      "translations": translations,
  }
  path = os.path.join(exp.config.workdir, "decode_eval.jsonl")
  earlier = storage.read_text(path) if storage.exists(path) else ""
  storage.write_whole(path, earlier + json.dumps(record) + "\n")
  return scores


def translate_prompt(exp: bigjax_run.Experiment, tokenizer_pair, examples, beam_cfg) -> list[str]:
  """--prompt translated from the newest checkpoint: by beam search, or sampled with --temperature
  when --beam_size=1."""
  source_tok, target_tok = tokenizer_pair
  tokens = source_tok.encode(lm_experiment.PROMPT.value.encode()).astype(np.int32)
  if not len(tokens):
    raise UserError("the prompt is empty; give the source text to translate")
  if len(tokens) > examples.source_len:
    raise UserError(
        f"the prompt has {len(tokens)} tokens, more than --source_len={examples.source_len}"
    )
  params, step = _load_params(exp, examples)
  # One row for beam search, which returns its beams; a row per sample for sampling.
  num = 1 if beam_cfg.beam_size > 1 else lm_experiment.NUM_SAMPLES.value
  inputs = np.zeros((num, examples.source_len), np.int32)
  inputs[:, : len(tokens)] = tokens
  source = (inputs, np.full((num,), len(tokens), np.int32))
  if beam_cfg.beam_size > 1:
    decoder = exp.model.decoder(exp.model)
    rows = _beams(exp.model, decoder, params, source, examples.target_len, beam_cfg)[0]
    how = f"beam {beam_cfg.beam_size}"
  else:
    cfg = lm_experiment.sampling_config()
    sampled = sample.translate(
        exp.model,
        params,
        source,
        jax.random.PRNGKey(exp.config.seed),
        num_tokens=examples.target_len,
        cfg=cfg,
    )
    eos = exp.base_model.config.eos_id
    rows = [row[: (list(row) + [eos]).index(eos)] for row in np.asarray(sampled)]
    how = str(cfg)
  texts = [target_tok.decode(row).decode("utf-8", errors="replace") for row in rows]
  metrics.console(f"step {step} checkpoint, {how}: {lm_experiment.PROMPT.value!r} ->")
  for text in texts:
    metrics.console("-" * 40 + "\n" + text)
  return texts


def main(argv):
  del argv
  use_tokenizer_ids()
  beam_cfg = beam_config()  # before the workdir is claimed
  fit_seq2seq(bigjax_flags.experiment(), beam_cfg)


if __name__ == "__main__":
  bigjax_flags.run(main)
