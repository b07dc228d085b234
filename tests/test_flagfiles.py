"""Every flagfile in experiments/configs names flags its experiment defines, with values they
parse, and a model preset that builds with its overrides (or an --init_from to take it from): the
configs for a GPU or TPU host are checked here too, though they cannot run on this machine."""

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.flags")))

# Run in a process of its own: the experiments' flags and the benchmarks' (imported by other
# tests in the same pytest worker) share names, and absl defines each name once per process.
_CHECK = r"""
import ast, json, sys
from absl import flags
from bigjax import models
from bigjax.errors import UserError
from experiments import cnn, mlp, rnn, seq2seq, transformer  # each defines its own flags


def problem(path):
  model, overrides, init_from = None, {}, False
  for line in open(path):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if not line.startswith("--"):
      return f"not a flag: {line}"
    name, has_value, value = line[2:].partition("=")
    if not has_value and name not in flags.FLAGS and name.startswith("no"):
      name = name[2:]  # --noflag
    if name not in flags.FLAGS:
      return f"unknown flag --{name}"
    if has_value:
      try:
        flags.FLAGS[name].parser.parse(value)
      except (ValueError, flags.Error) as e:
        return f"--{name}={value}: {e}"
    if name == "model":
      model = value
    elif name == "init_from":
      init_from = True
    elif name == "model_override":
      key, _, literal = value.partition("=")
      try:
        overrides[key] = ast.literal_eval(literal)
      except (ValueError, SyntaxError):
        overrides[key] = literal
  if model is None:  # the architecture comes from the export or checkpoint it starts from
    return None if init_from else "neither --model nor --init_from"
  try:
    models.create(model, **overrides)
  except UserError as e:
    return str(e)
  return None


print(json.dumps({path: problem(path) for path in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def problems():
  result = subprocess.run(
      [sys.executable, "-c", _CHECK, *CONFIGS],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_a_flagfile_names_known_flags_with_parseable_values_and_a_model_that_builds(problems, path):
  assert problems[path] is None, f"{os.path.basename(path)}: {problems[path]}"
