"""bigjax.run: the run the CLI does, called from a script with configs alone (no flags): train,
evaluate, export and compile-only, each mode doing what its RunConfig says."""

import json

import numpy as np
import pytest

from bigjax import models
from bigjax import optim
from bigjax import run
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
from bigjax.data import pipeline
from bigjax.errors import UserError

OVERRIDES = dict(num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, max_len=32)


def _experiment(workdir, **run_fields):
  return run.Experiment(
      model=models.create("transformer-tiny", **OVERRIDES),
      mesh=sharding.make_mesh("data:-1,fsdp:2"),
      config=train.TrainConfig(
          workdir=str(workdir),
          num_steps=3,
          batch_size=8,
          log_every=1,
          eval_every=3,
          checkpoint_every=3,
      ),
      optim=optim.OptimConfig(learning_rate=3e-3, warmup_steps=0),
      dataset="python_stdlib_text",
      data_dir=None,
      run_config=run.RunConfig(**run_fields),
  )


def test_train_eval_export_and_compile_only_from_configs(tmp_path, data_dir):
  windows = {
      split: lm.open_windows("python_stdlib_text", split, 32, data_dir)
      for split in ("train", "validation")
  }
  data = dict(
      task=tasks.LanguageModelling(),
      train_data=pipeline.train_batches(windows["train"], 8, seed=0),
      eval_data=pipeline.eval_batches(windows["validation"], 8, max_batches=2),
  )
  trained = run.run(_experiment(tmp_path, flags_text="--seed=0\n"), **data)
  assert trained["step"] == 3 and np.isfinite(trained["eval_loss"])
  assert (tmp_path / "flags.txt").read_text() == "--seed=0\n"
  evaluated = run.run(_experiment(tmp_path, mode="eval"), **data)
  assert evaluated["step"] == 3 and evaluated["eval_loss"] == pytest.approx(trained["eval_loss"])
  export_dir = tmp_path / "export"
  exporting = _experiment(
      tmp_path,
      mode="export",
      export_dir=str(export_dir),
      model_identity=("transformer-tiny", OVERRIDES),
  )
  exported = run.run(exporting, **data)
  assert exported == {"step": 3}
  assert json.loads((export_dir / "model.json").read_text())["overrides"]["embed_dim"] == 32
  model, variables = models.load(str(export_dir))
  tokens = data["eval_data"][0]["tokens"][:2, :-1]
  assert model.apply(variables, tokens).shape == (2, 32, 256)
  report = run.run(_experiment(tmp_path / "compiled", compile_only=True), **data)
  assert report["flops_per_step"] > 0 and not (tmp_path / "compiled").exists()


def test_run_configs_that_cannot_run_are_one_line_errors():
  with pytest.raises(UserError, match="mode='export' needs export_dir"):
    run.RunConfig(mode="export")
  with pytest.raises(UserError, match="mode"):
    run.RunConfig(mode="serve")
