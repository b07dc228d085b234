"""Trains a Transformer language model, evaluates it, or samples from it.

  python -m experiments.transformer --flagfile=experiments/configs/transformer_tiny.flags
  python -m experiments.transformer --flagfile=experiments/configs/transformer_tiny.flags \
      --mode=sample --prompt="def " --num_tokens=200 --temperature=0.8
"""

import jax
import numpy as np
from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import metrics
from bigjax import sample
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
from bigjax.data import pipeline

SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per training window.", lower_bound=1)
PROMPT = flags.DEFINE_string("prompt", "\n", "--mode=sample: text to continue.")
NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "--mode=sample: tokens to generate.", lower_bound=1)
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "--mode=sample: continuations of the prompt.", lower_bound=1)
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "--mode=sample: softmax temperature; 0 is greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "--mode=sample: sample from the k most likely tokens; 0 for all.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "--mode=sample: sample from the smallest set of tokens whose "
                           "probability reaches p (nucleus); 1 for all.")


def sample_language_model(exp: bigjax_flags.Experiment) -> list[str]:
  """Continues --prompt from the newest checkpoint in --workdir and prints each continuation."""
  cfg = sample.SamplingConfig(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value)
  example_batch = {"tokens": np.zeros((1, SEQ_LEN.value + 1), np.int32)}
  single_device = sharding.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
  with train.mesh_context(single_device):
    state, step, _ = train.load_checkpoint(model=exp.model, task=tasks.LanguageModelling(), tx=exp.tx,
                                           example_batch=example_batch, config=exp.config, mesh=single_device)
  texts = sample.generate_text(exp.model, state.params, PROMPT.value, num_tokens=NUM_TOKENS.value, cfg=cfg,
                               num_samples=NUM_SAMPLES.value, seed=exp.config.seed)
  metrics.console(f"step {step} checkpoint, {cfg}")
  for text in texts:
    metrics.console("-" * 40 + "\n" + text)
  return texts


def fit_language_model(exp: bigjax_flags.Experiment) -> dict:
  """Byte-level language modelling on the experiment's text data set, or on its (inputs, targets)
  pairs with the loss on the targets only; --mode picks training, evaluation or sampling."""
  if bigjax_flags.MODE.value == "sample":
    return {"samples": sample_language_model(exp)}
  if lm.is_prompt_target(exp.dataset, exp.data_dir):
    train_pairs = lm.open_prompt_targets(exp.dataset, "train", SEQ_LEN.value, exp.data_dir)
    eval_pairs = lm.open_prompt_targets(exp.dataset, "test", SEQ_LEN.value, exp.data_dir)
    metrics.console(f"{exp.dataset}: {len(train_pairs):,} train / {len(eval_pairs):,} test pairs")
    return exp.run(task=tasks.LanguageModelling(bytes_per_token=None),
                   train_data=pipeline.train_batches(train_pairs, exp.config.batch_size, exp.config.seed),
                   eval_data=pipeline.eval_batches(eval_pairs, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value))
  train_windows = lm.open_windows(exp.dataset, "train", SEQ_LEN.value, exp.data_dir)
  eval_windows = lm.open_windows(exp.dataset, "validation", SEQ_LEN.value, exp.data_dir)
  metrics.console(f"{exp.dataset}: {len(train_windows.stream):,} train / {len(eval_windows.stream):,} "
                  "validation tokens")
  return exp.run(task=tasks.LanguageModelling(bytes_per_token=1.0),
          train_data=lm.train_batches(train_windows, exp.config.batch_size, exp.config.seed),
          eval_data=lm.eval_batches(eval_windows, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value))


def main(argv):
  del argv
  fit_language_model(bigjax_flags.experiment())


if __name__ == "__main__":
  bigjax_flags.run(main)
