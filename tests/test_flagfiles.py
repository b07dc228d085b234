"""Every flagfile in experiments/configs names flags its experiment defines, with values they
parse, and a model preset that builds with its overrides (or an --init_from to take it from): the
configs for a GPU or TPU host are checked here too, though they cannot run on this machine."""

import ast
import glob
import os

import pytest
from absl import flags

from bigjax import models
from experiments import cnn  # noqa: F401  (each experiment module defines its own flags)
from experiments import mlp  # noqa: F401
from experiments import rnn  # noqa: F401
from experiments import seq2seq  # noqa: F401
from experiments import transformer  # noqa: F401

CONFIGS = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "*.flags"))
)


def _flag_lines(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_a_flagfile_names_known_flags_with_parseable_values_and_a_model_that_builds(path):
  model, overrides = None, {}
  for line in _flag_lines(path):
    assert line.startswith("--"), line
    name, has_value, value = line[2:].partition("=")
    if not has_value and name not in flags.FLAGS and name.startswith("no"):
      name = name[2:]  # --noflag
    assert name in flags.FLAGS, f"{os.path.basename(path)}: unknown flag --{name}"
    if has_value:
      flags.FLAGS[name].parser.parse(value)  # raises on a value the flag cannot take
    if name == "model":
      model = value
    elif name == "model_override":
      key, _, literal = value.partition("=")
      try:
        overrides[key] = ast.literal_eval(literal)
      except (ValueError, SyntaxError):
        overrides[key] = literal
  if model is None:  # the architecture comes from the export or checkpoint it starts from
    assert any(line.startswith("--init_from=") for line in _flag_lines(path)), path
    return
  models.create(model, **overrides)
