"""Trains a Transformer language model, evaluates it, or samples from it.

  python -m experiments.transformer --flagfile=experiments/configs/transformer_tiny.flags
  python -m experiments.transformer --flagfile=experiments/configs/transformer_tiny.flags \
      --mode=sample --prompt="def " --num_tokens=200 --temperature=0.8
"""

import jax
import numpy as np
from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import run as bigjax_run
from bigjax import lm_inputs
from bigjax import metrics
from bigjax import sample
from bigjax import tasks
from bigjax.data import lm
from bigjax.data import mixture
from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.data import tokenizers
from bigjax.errors import UserError

DOCUMENT_MASKS = flags.DEFINE_bool(
    "document_masks",
    True,
    "Windows pack documents end to end; in models that take segment ids "
    "(TransformerLM) keep each token's attention inside its own document (segment ids and positions "
    "restart at each end-of-document token). --nodocument_masks lets attention run across document "
    "ends, as plain concatenation does.",
)
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per training window.", lower_bound=1)
TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    "bytes",
    "bytes; spm:VOCAB: a SentencePiece model of VOCAB ids "
    "trained on the training split and kept in the workdir; or hf:DIR: DIR's Hugging "
    "Face tokenizer.json.",
)
PROMPT = flags.DEFINE_string("prompt", "\n", "--mode=sample: text to continue.")
NUM_TOKENS = flags.DEFINE_integer(
    "num_tokens", 200, "--mode=sample: tokens to generate.", lower_bound=1
)
NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 1, "--mode=sample: continuations of the prompt.", lower_bound=1
)
TEMPERATURE = flags.DEFINE_float(
    "temperature", 1.0, "--mode=sample: softmax temperature; 0 is greedy."
)
TOP_K = flags.DEFINE_integer(
    "top_k", 0, "--mode=sample: sample from the k most likely tokens; 0 for all."
)
TOP_P = flags.DEFINE_float(
    "top_p",
    1.0,
    "--mode=sample: sample from the smallest set of tokens whose "
    "probability reaches p (nucleus); 1 for all.",
)


def sampling_config() -> sample.SamplingConfig:
  """--temperature, --top_k and --top_p (shared with experiments.seq2seq)."""
  return sample.SamplingConfig(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value)


def sample_language_model(exp: bigjax_run.Experiment) -> list[str]:
  """Continues --prompt from the newest checkpoint in --workdir and prints each continuation."""
  cfg = sampling_config()
  tokenizer = tokenizers.open_tokenizer(TOKENIZER.value, exp.config.workdir)
  prompt = tokenizer.encode(PROMPT.value.encode())
  if not len(prompt):
    raise UserError("the prompt is empty; give at least one character to continue")
  lm_inputs.check_vocab(exp.base_model, tokenizer)
  # Before the checkpoint: none is needed
  lm_inputs.check_sample_length(exp.base_model, len(prompt), NUM_TOKENS.value)
  example_batch = {"tokens": np.zeros((1, SEQ_LEN.value + 1), np.int32)}
  params, step = bigjax_run.decoding_params(exp, tasks.LanguageModelling(), example_batch)
  prompts = np.tile(prompt.astype(np.int32)[None], (NUM_SAMPLES.value, 1))
  rows = sample.generate(
      exp.model,
      params,
      prompts,
      jax.random.PRNGKey(exp.config.seed),
      num_tokens=NUM_TOKENS.value,
      cfg=cfg,
  )
  texts = [tokenizer.decode(row).decode("utf-8", errors="replace") for row in np.asarray(rows)]
  metrics.console(f"step {step} checkpoint, {cfg}")
  for text in texts:
    metrics.console("-" * 40 + "\n" + text)
  return texts


def fit_language_model(exp: bigjax_run.Experiment) -> dict:
  """Language modelling on the experiment's data set or mixture; --mode picks training, evaluation
  or sampling."""
  lm_inputs.check_seq_len(exp.base_model, SEQ_LEN.value)
  if exp.run_config.mode == "sample":
    return {"samples": sample_language_model(exp)}
  task, train_data, eval_data = language_model_data(exp)
  return bigjax_run.run(exp, task=task, train_data=train_data, eval_data=eval_data)


def language_model_data(exp: bigjax_run.Experiment):
  """(task, training Loader, eval batches) for the experiment's data set, or each source of a
  mixture (bigjax.data.mixture): text in windows of bytes or SentencePiece tokens, or (inputs,
  targets) pairs with the loss on the targets only."""
  parts = mixture.parse(exp.dataset)
  train_split = bigjax_flags.TRAIN_SPLIT.value
  eval_splits = mixture.eval_splits(parts, bigjax_flags.EVAL_SPLIT.value, exp.data_dir)
  kind = mixture.common_kind(parts, exp.data_dir, bigjax_flags.IMAGE_KEY.value)
  names = tuple(p.name for p in parts if p.name)
  if kind == "(inputs, targets) pairs":
    if TOKENIZER.value != "bytes":
      raise UserError(
          f"{exp.dataset} holds (inputs, targets) pairs, which are byte-level; drop --tokenizer"
      )
    lm_inputs.check_vocab(exp.base_model, tokenizers.ByteTokenizer())
    task = tasks.LanguageModelling(bytes_per_token=None, sources=names)
    open_split = lambda p, split: lm.open_prompt_targets(p.spec, split, SEQ_LEN.value, exp.data_dir)
    size = lambda pairs: f"{len(pairs):,}"
    what = "pairs"
  else:
    tokenizer = open_tokenizer(exp, train_split, parts)
    lm_inputs.check_vocab(exp.base_model, tokenizer)
    task = tasks.LanguageModelling(
        token_bytes=tuple(int(b) for b in tokenizer.token_bytes), sources=names
    )
    segments = document_segments(exp)
    open_split = lambda p, split: lm.open_windows(
        p.spec,
        split,
        SEQ_LEN.value,
        exp.data_dir,
        tokenizer,
        bigjax_flags.TEXT_KEY.value,
        segments=segments,
    )
    size = lambda windows: f"{len(windows.stream):,}"
    what = f"tokens ({tokenizer.name})"
  train = mixture.open_mixed(
      parts, lambda p: open_split(p, train_split), unit="tokens", per_example=SEQ_LEN.value
  )
  evaluation = mixture.open_mixed(parts, lambda p: open_split(p, eval_splits[p]))
  for part, train_part, eval_part in zip(
      parts, mixture.members(train), mixture.members(evaluation)
  ):
    metrics.console(
        f"{part.label()}: {size(train_part)} {train_split} / {size(eval_part)} "
        f"{eval_splits[part]} {what}"
    )
  workers = pipeline.workers(bigjax_flags.DATA_WORKERS.value)
  return (
      task,
      pipeline.train_batches(train, exp.config.batch_size, exp.config.seed, workers=workers),
      pipeline.eval_batches(evaluation, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value),
  )


def document_segments(exp: bigjax_run.Experiment) -> bool:
  """Whether windows carry segment ids: for the models that declare they keep attention inside a
  document with them."""
  declared = lm_inputs.takes_segment_ids(exp.base_model)
  if DOCUMENT_MASKS.value and declared is None:
    metrics.console(
        f"note: {type(exp.base_model).__name__} does not declare takes_segment_ids, so documents "
        f"packed into one window attend across their ends; declare it True and take segment_ids_BT "
        f"and positions_BT (as TransformerLM does), or False (or pass --nodocument_masks) to say "
        f"that is intended"
    )
  return DOCUMENT_MASKS.value and bool(declared)


def open_tokenizer(exp: bigjax_run.Experiment, train_split: str, parts: tuple[mixture.Source, ...]):
  """--tokenizer, trained on the training split's text (every source's, for a mixture) the first
  time a workdir needs it."""

  def training_text():
    for source, field in mixture.each(
        parts,
        lambda p: (
            sources.load_source(p.spec, train_split, exp.data_dir),
            lm.pick_text_key(
                sources.feature_names(p.spec, exp.data_dir), bigjax_flags.TEXT_KEY.value, p.spec
            ),
        ),
    ):
      yield from lm.documents(source, field)

  return tokenizers.open_tokenizer(TOKENIZER.value, exp.config.workdir, training_text)


def use_tokenizer_vocab() -> None:
  """Sizes the model's vocabulary for --tokenizer=spm:VOCAB or hf:DIR (an explicit vocab_size override
  wins)."""
  if bigjax_flags.hf_init_dir() is not None:
    return  # the shared model's vocabulary stays; lm_inputs.check_vocab checks the tokenizer fits it
  vocab = tokenizers.parse(TOKENIZER.value)
  overrides = bigjax_flags.MODEL_OVERRIDES.value
  if vocab is not None and not any(o.strip().startswith("vocab_size") for o in overrides):
    flags.FLAGS.model_override = [*overrides, f"vocab_size={vocab}"]


def main(argv):
  del argv
  use_tokenizer_vocab()
  fit_language_model(bigjax_flags.experiment())


if __name__ == "__main__":
  bigjax_flags.run(main)
