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
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
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


def sample_language_model(exp: bigjax_run.Experiment) -> list[str]:
  """Continues --prompt from the newest checkpoint in --workdir and prints each continuation."""
  cfg = sample.SamplingConfig(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value)
  tokenizer = tokenizers.open_tokenizer(TOKENIZER.value, exp.config.workdir)
  prompt = tokenizer.encode(PROMPT.value.encode())
  if not len(prompt):
    raise UserError("the prompt is empty; give at least one character to continue")
  lm_inputs.check_vocab(exp.base_model, tokenizer)
  # Before the checkpoint: none is needed
  lm_inputs.check_sample_length(exp.base_model, len(prompt), NUM_TOKENS.value)
  example_batch = {"tokens": np.zeros((1, SEQ_LEN.value + 1), np.int32)}
  single_device = sharding.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
  with train.mesh_context(single_device):
    state, step, _ = train.load_checkpoint(
        model=exp.model,
        task=tasks.LanguageModelling(),
        tx=exp.tx,
        example_batch=example_batch,
        config=exp.config,
        mesh=single_device,
    )
  prompts = np.tile(prompt.astype(np.int32)[None], (NUM_SAMPLES.value, 1))
  rows = sample.generate(
      exp.model,
      state.params,
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
  """Language modelling on the experiment's text data set (bytes or SentencePiece tokens), or on
  its (inputs, targets) pairs with the loss on the targets only; --mode picks training,
  evaluation or sampling."""
  lm_inputs.check_seq_len(exp.base_model, SEQ_LEN.value)
  if exp.run_config.mode == "sample":
    return {"samples": sample_language_model(exp)}
  train_split = bigjax_flags.TRAIN_SPLIT.value
  eval_split = bigjax_flags.EVAL_SPLIT.value or sources.default_eval_split(
      exp.dataset, exp.data_dir
  )
  workers = pipeline.workers(bigjax_flags.DATA_WORKERS.value)
  if lm.is_prompt_target(exp.dataset, exp.data_dir):
    if TOKENIZER.value != "bytes":
      raise UserError(
          f"{exp.dataset} holds (inputs, targets) pairs, which are byte-level; drop --tokenizer"
      )
    lm_inputs.check_vocab(exp.base_model, tokenizers.ByteTokenizer())
    train_pairs = lm.open_prompt_targets(exp.dataset, train_split, SEQ_LEN.value, exp.data_dir)
    eval_pairs = lm.open_prompt_targets(exp.dataset, eval_split, SEQ_LEN.value, exp.data_dir)
    metrics.console(
        f"{exp.dataset}: {len(train_pairs):,} train / {len(eval_pairs):,} {eval_split} pairs"
    )
    return bigjax_run.run(
        exp,
        task=tasks.LanguageModelling(bytes_per_token=None),
        train_data=pipeline.train_batches(
            train_pairs, exp.config.batch_size, exp.config.seed, workers=workers
        ),
        eval_data=pipeline.eval_batches(
            eval_pairs, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value
        ),
    )
  tokenizer = open_tokenizer(exp, train_split)
  lm_inputs.check_vocab(exp.base_model, tokenizer)
  # Segment ids for the models that declare they keep attention inside a document with them.
  declared = lm_inputs.takes_segment_ids(exp.base_model)
  segments = DOCUMENT_MASKS.value and bool(declared)
  if DOCUMENT_MASKS.value and declared is None:
    metrics.console(
        f"note: {type(exp.base_model).__name__} does not declare takes_segment_ids, so documents "
        f"packed into one window attend across their ends; declare it True and take segment_ids_BT "
        f"and positions_BT (as TransformerLM does), or False (or pass --nodocument_masks) to say "
        f"that is intended"
    )
  windows = {
      split: lm.open_windows(
          exp.dataset,
          split,
          SEQ_LEN.value,
          exp.data_dir,
          tokenizer,
          bigjax_flags.TEXT_KEY.value,
          segments=segments,
      )
      for split in (train_split, eval_split)
  }
  metrics.console(
      f"{exp.dataset}: {len(windows[train_split].stream):,} {train_split} / "
      f"{len(windows[eval_split].stream):,} {eval_split} tokens ({tokenizer.name})"
  )
  return bigjax_run.run(
      exp,
      task=tasks.LanguageModelling(token_bytes=tuple(int(b) for b in tokenizer.token_bytes)),
      train_data=pipeline.train_batches(
          windows[train_split], exp.config.batch_size, exp.config.seed, workers=workers
      ),
      eval_data=pipeline.eval_batches(
          windows[eval_split], exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value
      ),
  )


def open_tokenizer(exp: bigjax_run.Experiment, train_split: str):
  """--tokenizer, trained on the training split's text the first time a workdir needs it."""

  def training_text():
    source = sources.load_source(exp.dataset, train_split, exp.data_dir)
    field = lm.pick_text_key(
        sources.feature_names(exp.dataset, exp.data_dir), bigjax_flags.TEXT_KEY.value, exp.dataset
    )
    return lm.documents(source, field)

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
