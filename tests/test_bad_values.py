"""A bad flag or config value is a one-line error where the config is built, naming the field, the
value and what is allowed: never a traceback from deep inside initialisation, never accepted.

A few runs go through the CLI as a user would (each costs seconds of JAX import); the rest of the
rules are checked in-process on the config classes themselves.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigjax import lm_inputs
from bigjax import models
from bigjax import optim
from bigjax import sample
from bigjax import tasks
from bigjax.data import tokenizers
from bigjax.errors import UserError
from bigjax.nn import lora
from bigjax.nn import recurrent
from bigjax.nn import transformer
from tests.test_cli import TINY_FLAGS
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run_experiment

# ----------------------------------------------------------------------------------------------
# Through the CLI: the cases a tester hit.


@pytest.fixture
def tiny_lm(tmp_path, data_dir):
  # Every error below comes before any data is read or any step compiled.
  return [
      f"--flagfile={TINY_FLAGS}",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--seq_len=32",
      "--num_steps=1",
  ]


def test_cli_seq_len_longer_than_max_len(tiny_lm):
  result = _run_experiment("experiments.transformer", *tiny_lm, "--seq_len=300")
  _assert_one_line_error(
      result,
      1,
      "--seq_len=300 is longer than the model's max_len=256; use --seq_len=256 "
      "or less, or --model_override=max_len=300",
  )


def test_cli_sampling_past_max_len_is_refused_before_any_checkpoint_is_needed(tiny_lm):
  result = _run_experiment(
      "experiments.transformer", *tiny_lm, "--mode=sample", "--prompt=hello", "--num_tokens=300"
  )
  _assert_one_line_error(
      result,
      1,
      "--num_tokens=300 after the 5-token --prompt makes 305 tokens, more than "
      "the model's max_len=256; use --num_tokens=251 or less",
  )


@pytest.mark.parametrize(
    "flag,message",
    [
        (
            "--model_override=num_layers=abc",
            "TransformerConfig: num_layers='abc' must be an integer >= 1",
        ),
        (
            "--model_override=num_layers=0",
            "TransformerConfig: num_layers=0 must be an integer >= 1",
        ),
        ("--learning_rate=-1", "OptimConfig: learning_rate=-1.0 must be a finite number > 0"),
    ],
)
def test_cli_bad_transformer_values(tiny_lm, flag, message):
  _assert_one_line_error(_run_experiment("experiments.transformer", *tiny_lm, flag), 1, message)


def test_cli_mlp_with_no_classes(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.mlp",
      "--dataset=sklearn_digits",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--num_steps=1",
      "--model_override=num_classes=0",
  )
  _assert_one_line_error(result, 1, "MLPConfig: num_classes=0 must be an integer >= 1")


def test_cli_rnn_with_a_negative_hidden_size(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.rnn",
      "--model=lstm-lm",
      "--dataset=python_stdlib_text",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--num_steps=1",
      "--model_override=hidden_size=-5",
  )
  _assert_one_line_error(result, 1, "RNNLMConfig: hidden_size=-5 must be an integer >= 1")


# ----------------------------------------------------------------------------------------------
# In-process: every field of every config.

# One valid instance of each config class (the presets' own where there is one).
_VALID = {
    "TransformerConfig": lambda: models.create("transformer-tiny").config,
    "ViTConfig": lambda: models.create("vit-ti16").config,
    "CNNConfig": lambda: models.create("cnn-small").config,
    "ResNetConfig": lambda: models.create("resnet18").config,
    "MLPConfig": lambda: models.create("mlp").config,
    "RNNConfig": lambda: recurrent.RNNConfig(hidden_size=8),
    "RNNLMConfig": lambda: models.create("lstm-lm").config,
    "RNNClassifierConfig": lambda: models.create("lstm-classifier").config,
    "OptimConfig": optim.OptimConfig,
    "SamplingConfig": sample.SamplingConfig,
    "Losses": tasks.Losses,
    "LoraConfig": lora.LoraConfig,
}
# Fields that hold free text (a regular expression): a number is their wrong type.
_FREE_TEXT = {("LoraConfig", "targets")}


def _fields():
  return [
      pytest.param(name, field.name, id=f"{name}.{field.name}")
      for name, make in _VALID.items()
      for field in dataclasses.fields(make())
  ]


@pytest.mark.parametrize("config,field", _fields())
def test_every_field_rejects_a_value_of_the_wrong_type(config, field):
  """Outside _FREE_TEXT no field is text, so "abc" is wrong for each one: a field without a check fails here."""
  with pytest.raises(UserError) as error:
    dataclasses.replace(_VALID[config](), **{field: 5 if (config, field) in _FREE_TEXT else "abc"})
  message = str(error.value)
  assert message.startswith(f"{config}: ") and field in message and "\n" not in message


def _replace(config, **changes):
  return lambda: dataclasses.replace(_VALID[config](), **changes)


@pytest.mark.parametrize(
    "build,message",
    [
        # TransformerConfig
        (_replace("TransformerConfig", num_layers=0), "num_layers=0 must be an integer >= 1"),
        (_replace("TransformerConfig", num_layers=True), "num_layers=True must be an integer >= 1"),
        (_replace("TransformerConfig", num_layers=2.0), "num_layers=2.0 must be an integer >= 1"),
        (_replace("TransformerConfig", embed_dim=-5), "embed_dim=-5 must be an integer >= 1"),
        (_replace("TransformerConfig", vocab_size=0), "vocab_size=0 must be an integer >= 1"),
        (_replace("TransformerConfig", max_len=0), "max_len=0 must be an integer >= 1"),
        (_replace("TransformerConfig", mlp_dim=0), "mlp_dim=0 must be an integer >= 1"),
        (
            _replace("TransformerConfig", num_kv_heads=0),
            "num_kv_heads=0 must be None or an integer >= 1",
        ),
        (_replace("TransformerConfig", num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
        (
            _replace("TransformerConfig", num_heads=5),
            "num_heads=5 must divide embed_dim=256 (or set head_dim)",
        ),
        (_replace("TransformerConfig", head_dim=-1), "head_dim=-1 must be None or an integer >= 1"),
        (
            _replace("TransformerConfig", position="rotary", head_dim=7),
            "head_dim=7 must be even for rotary",
        ),
        (
            _replace("TransformerConfig", position="sinusoidal", embed_dim=33, num_heads=3),
            "embed_dim=33 must be even for sinusoidal positions",
        ),
        (
            _replace("TransformerConfig", position="learnt"),
            "unknown position 'learnt'; use one of learned, sinusoidal",
        ),
        (
            _replace("TransformerConfig", activation="swish"),
            "unknown activation 'swish'; use one of gelu",
        ),
        (
            _replace("TransformerConfig", remat="some"),
            "unknown remat policy 'some'; use one of none, full",
        ),
        (
            _replace("TransformerConfig", dropout_rate=1.0),
            "dropout_rate=1.0 must be a number in [0, 1)",
        ),
        (
            _replace("TransformerConfig", dropout_rate=-0.1),
            "dropout_rate=-0.1 must be a number in [0, 1)",
        ),
        (
            _replace("TransformerConfig", layer_norm_epsilon=0.0),
            "layer_norm_epsilon=0.0 must be a finite number > 0",
        ),
        (
            _replace("TransformerConfig", rotary_base=math.inf),
            "rotary_base=inf must be a finite number > 0",
        ),
        (_replace("TransformerConfig", use_bias=1), "use_bias=1 must be True or False"),
        (
            _replace("TransformerConfig", dtype="int32"),
            "dtype='int32' must be a floating-point dtype",
        ),
        (
            _replace("TransformerConfig", param_dtype=None),
            "param_dtype=None must be a floating-point dtype",
        ),
        # ViTConfig
        (
            _replace("ViTConfig", patch_size=15),
            "patch_size=15 must divide the image's height and width",
        ),
        (_replace("ViTConfig", embed_dim=190), "num_heads=3 must divide embed_dim=190"),
        (
            _replace("ViTConfig", position="sinusoidal_2d", embed_dim=198),
            "embed_dim=198 must be divisible by 4 for sinusoidal_2d positions",
        ),
        (
            _replace("ViTConfig", input_shape=(224, 224)),
            "input_shape=(224, 224) must be a tuple of 3 integers >= 1",
        ),
        (_replace("ViTConfig", num_classes=0), "num_classes=0 must be an integer >= 1"),
        (_replace("ViTConfig", pool="max"), "unknown pool 'max'; use one of cls, mean"),
        # CNNConfig
        (_replace("CNNConfig", num_classes=0), "num_classes=0 must be an integer >= 1"),
        (
            _replace("CNNConfig", features=()),
            "features=() must be a tuple of one or more integers >= 1",
        ),
        (
            _replace("CNNConfig", features=(32, 0)),
            "features=(32, 0) must be a tuple of one or more integers >= 1",
        ),
        (
            _replace("CNNConfig", features=(8, 8, 8, 8)),
            "features=(8, 8, 8, 8) shrink the 8x8 input to 0x0 (each of the 4 stages halves it); use fewer stages",
        ),
        (_replace("CNNConfig", dense=(0,)), "dense=(0,) must be a tuple of integers >= 1"),
        (_replace("CNNConfig", kernel=0), "kernel=0 must be an integer >= 1"),
        (_replace("CNNConfig", convs_per_stage=0), "convs_per_stage=0 must be an integer >= 1"),
        (
            _replace("CNNConfig", norm="group"),
            "unknown norm 'group'; use one of batch, layer, none",
        ),
        (
            _replace("CNNConfig", input_shape=(8, -8, 1)),
            "input_shape=(8, -8, 1) must be a tuple of 3 integers >= 1",
        ),
        # ResNetConfig
        (
            _replace("ResNetConfig", stage_sizes=()),
            "stage_sizes=() must be a tuple of one or more integers >= 1",
        ),
        (_replace("ResNetConfig", width=0), "width=0 must be an integer >= 1"),
        (
            _replace("ResNetConfig", block="wide"),
            "unknown block 'wide'; use one of basic, bottleneck",
        ),
        (_replace("ResNetConfig", stem="tiny"), "unknown stem 'tiny'; use one of imagenet, small"),
        (
            _replace("ResNetConfig", conv_impl="fft"),
            "unknown conv_impl 'fft'; use one of auto, xla, matmul",
        ),
        # MLPConfig
        (_replace("MLPConfig", num_classes=0), "num_classes=0 must be an integer >= 1"),
        (
            _replace("MLPConfig", hidden=(256, -1)),
            "hidden=(256, -1) must be a tuple of integers >= 1",
        ),
        (
            _replace("MLPConfig", input_shape=(64,)),
            "input_shape=(64,) must be a tuple of 3 integers >= 1",
        ),
        # RNNConfig and its subclasses
        (_replace("RNNConfig", hidden_size=-5), "hidden_size=-5 must be an integer >= 1"),
        (_replace("RNNConfig", num_layers=0), "num_layers=0 must be an integer >= 1"),
        (_replace("RNNConfig", max_len=0), "max_len=0 must be an integer >= 1"),
        (_replace("RNNConfig", cell="lstmx"), "unknown cell 'lstmx'; use one of gru, lstm, rnn"),
        (_replace("RNNConfig", forget_bias=math.nan), "forget_bias=nan must be a finite number"),
        (_replace("RNNLMConfig", vocab_size=0), "vocab_size=0 must be an integer >= 1"),
        (
            _replace("RNNLMConfig", bidirectional=True),
            "bidirectional=True cannot be a language model",
        ),
        (
            _replace("RNNLMConfig", tie_embeddings=True),
            "tie_embeddings=True needs embed_dim=128 == hidden_size=512",
        ),
        (_replace("RNNClassifierConfig", num_classes=0), "num_classes=0 must be an integer >= 1"),
        (
            _replace("RNNClassifierConfig", input_shape=()),
            "input_shape=() must be a tuple of one or more integers",
        ),
        (
            _replace("RNNClassifierConfig", max_len=4),
            "input_shape=(8, 8, 1) has 8 steps, more than max_len=4",
        ),
        (_replace("RNNClassifierConfig", pool="max"), "unknown pool 'max'; use one of last, mean"),
        # OptimConfig
        (
            _replace("OptimConfig", learning_rate=-1.0),
            "learning_rate=-1.0 must be a finite number > 0",
        ),
        (_replace("OptimConfig", learning_rate=0), "learning_rate=0 must be a finite number > 0"),
        (
            _replace("OptimConfig", learning_rate=math.nan),
            "learning_rate=nan must be a finite number > 0",
        ),
        (_replace("OptimConfig", warmup_steps=-1), "warmup_steps=-1 must be an integer >= 0"),
        (_replace("OptimConfig", warmup_steps=1.5), "warmup_steps=1.5 must be an integer >= 0"),
        (
            _replace("OptimConfig", weight_decay=-0.1),
            "weight_decay=-0.1 must be a finite number >= 0",
        ),
        (_replace("OptimConfig", grad_clip=-1.0), "grad_clip=-1.0 must be a finite number >= 0"),
        (_replace("OptimConfig", momentum=1.0), "momentum=1.0 must be a number in [0, 1)"),
        (_replace("OptimConfig", b2=-0.5), "b2=-0.5 must be a number in [0, 1)"),
        (_replace("OptimConfig", eps=0.0), "eps=0.0 must be a finite number > 0"),
        (_replace("OptimConfig", nesterov=1), "nesterov=1 must be True or False"),
        (
            _replace("OptimConfig", optimizer="adamx"),
            "unknown optimizer 'adamx'; use one of adamw, sgd",
        ),
        (
            _replace("OptimConfig", schedule="cyclic"),
            "unknown schedule 'cyclic'; use one of constant",
        ),
        # SamplingConfig
        (
            _replace("SamplingConfig", temperature=math.nan),
            "temperature=nan must be a finite number >= 0",
        ),
        (_replace("SamplingConfig", top_k=-1), "top_k=-1 must be an integer >= 0"),
        (_replace("SamplingConfig", top_p=1.5), "top_p=1.5 must be a number in (0, 1]"),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_range(build, message):
  with pytest.raises(UserError) as error:
    build()
  assert message in str(error.value)


@pytest.mark.parametrize(
    "build",
    [
        _replace("TransformerConfig", num_kv_heads=1, dropout_rate=0.0),
        _replace(
            "TransformerConfig", num_heads=5, head_dim=48
        ),  # an explicit head_dim need not divide
        _replace(
            "TransformerConfig", num_layers=np.int64(2), embed_dim=np.int32(64)
        ),  # numpy ints are ints
        _replace("TransformerConfig", position="sinusoidal"),
        _replace("TransformerConfig", dtype=jnp.bfloat16),
        _replace("CNNConfig", dense=(), features=[16]),  # no dense layers; a list is a sequence too
        _replace("MLPConfig", hidden=()),  # logistic regression
        _replace(
            "ResNetConfig", stem="small", input_shape=(8, 8, 1)
        ),  # a map never shrinks below 1x1
        _replace(
            "OptimConfig",
            warmup_steps=0,
            weight_decay=0,
            grad_clip=0.0,
            momentum=0.0,
            b2=0.0,
            learning_rate=1,
        ),
        _replace("SamplingConfig", temperature=0, top_k=0, top_p=1.0),
    ],
)
def test_edge_values_that_work_are_accepted(build):
  build()


def test_checked_values_are_kept_as_given():
  # Nothing is coerced, so a checked config computes exactly what it did before the checks.
  config = _replace("TransformerConfig", num_layers=np.int64(2), rotary_base=10_000)()
  assert type(config.num_layers) is np.int64 and type(config.rotary_base) is int


def test_create_names_the_config_once():
  with pytest.raises(UserError) as error:
    models.create("transformer-tiny", num_layers="abc")
  assert str(error.value) == "TransformerConfig: num_layers='abc' must be an integer >= 1"


@pytest.mark.parametrize("name", [n for n in models.names() if n not in models.FULL_CONFIG_PRESETS])
def test_every_preset_still_builds(name):
  models.create(name)


@pytest.mark.parametrize(
    "name, like", [("transformer-lm", "llama-tiny"), ("vit", "vit-ti16"), ("resnet", "resnet18")]
)
def test_the_full_config_presets_take_every_field_and_assume_none(name, like):
  import dataclasses

  module = models.create(like)
  config = module.config
  assert models.create(name, **dataclasses.asdict(config)).config == config
  assert models.full_config_preset(module) == name
  with pytest.raises(UserError, match=f"model '{name}': .*missing .* required"):
    models.create(name)


# ----------------------------------------------------------------------------------------------
# In-process: the experiment's checks of flags against the model.


def _lm(**overrides):
  return models.create("transformer-tiny", **overrides)


@pytest.mark.parametrize(
    "model,seq_len,message",
    [
        (
            _lm(),
            257,
            "--seq_len=257 is longer than the model's max_len=256; use --seq_len=256 or less, or "
            "--model_override=max_len=257 (a new run only: the learned position table has max_len "
            "rows)",
        ),
        (_lm(position="rotary"), 300, "use --seq_len=256 or less, or --model_override=max_len=300"),
        (
            models.create("lstm-lm", max_len=64),
            65,
            "--seq_len=65 is longer than the model's max_len=64",
        ),
    ],
)
def test_seq_len_longer_than_max_len(model, seq_len, message):
  with pytest.raises(UserError) as error:
    lm_inputs.check_seq_len(model, seq_len)
  assert message in str(error.value)


def test_seq_len_up_to_max_len_and_models_without_one_pass():
  lm_inputs.check_seq_len(_lm(), 256)
  lm_inputs.check_seq_len(nn.Dense(3), 10_000)  # a fork's model with no config says nothing


@pytest.mark.parametrize(
    "model,prompt_len,num_tokens,message",
    [
        (
            _lm(),
            5,
            300,
            "--num_tokens=300 after the 5-token --prompt makes 305 tokens, more than the model's "
            "max_len=256; use --num_tokens=251 or less, or a shorter --prompt",
        ),
        (_lm(position="rotary"), 5, 300, "or a shorter --prompt, or --model_override=max_len=305"),
        (_lm(), 256, 1, "shorten --prompt to at most 255 tokens"),
    ],
)
def test_sampling_past_max_len(model, prompt_len, num_tokens, message):
  with pytest.raises(UserError) as error:
    lm_inputs.check_sample_length(model, prompt_len, num_tokens)
  assert message in str(error.value)
  if model.config.position == "learned":  # a checkpoint's position table cannot grow
    assert "max_len=" not in str(error.value).split(";")[1]


def test_the_sampling_check_allows_exactly_what_generate_does():
  model = models.create(
      "transformer-tiny", max_len=8, embed_dim=16, num_heads=2, mlp_dim=32, num_layers=1
  )
  prompt = jnp.zeros((1, 3), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), prompt)["params"]

  def generated_shape(num_tokens):  # traced, not compiled: generate's own length check runs
    return jax.eval_shape(
        lambda p: sample.generate(model, p, prompt, jax.random.key(0), num_tokens=num_tokens),
        params,
    ).shape

  lm_inputs.check_sample_length(model, 3, 5)
  assert generated_shape(5) == (1, 8)  # prompt + new tokens == max_len: both allow it
  with pytest.raises(UserError, match="--num_tokens=6 after the 3-token --prompt makes 9 tokens"):
    lm_inputs.check_sample_length(model, 3, 6)
  with pytest.raises(UserError, match="exceed the model's max_len=8"):
    generated_shape(6)


def test_vocab_smaller_than_the_tokenizer():
  with pytest.raises(UserError) as error:
    lm_inputs.check_vocab(_lm(vocab_size=100), tokenizers.ByteTokenizer())
  assert str(error.value) == (
      "the tokenizer (bytes) has 256 token ids but the model's vocab_size=100; use "
      "--model_override=vocab_size=256"
  )
  lm_inputs.check_vocab(_lm(), tokenizers.ByteTokenizer())
  # Spare ids are harmless
  lm_inputs.check_vocab(models.create("gpt2-small"), tokenizers.ByteTokenizer())


def test_the_vit_blocks_config_is_valid():
  config = models.create("vit-ti16").config
  assert isinstance(config.block_config(), transformer.TransformerConfig)
