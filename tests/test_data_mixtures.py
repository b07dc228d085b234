"""Weighted mixtures (bigjax/data/mixture.py): observed shares against the weights, batches that
depend on the seed alone (not on loader workers or processes), a killed run resuming with the same
batches, per-source metrics in metrics.jsonl and TensorBoard, an image mixture through
experiments.cnn, the loader benchmark on a mixture, and bad specs as one-line errors."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bigjax import metrics
from bigjax import tasks
from bigjax.data import images
from bigjax.data import lm
from bigjax.data import mixture
from bigjax.data import pipeline
from bigjax.errors import UserError
from tests.test_cli import REPO
from tests.test_cli import TINY_RUN
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run
from tests.test_cli import _run_experiment
from tests.test_damaged_inputs import _png
from tests.test_data_formats import _rows
from tests.test_data_formats import _write_jsonl
from tests.test_data_formats import _write_parquet
from tests.test_scale import _free_port
from tests.cpu_env import cpu_env

SEQ_LEN = 32
NUM_STEPS = 12
# Every run of the kill-and-resume pair: checkpoints at 3, 6, 9, 12; evaluations at 6 and 12.
MIX_RUN = [
    *TINY_RUN,
    f"--num_steps={NUM_STEPS}",
    "--checkpoint_every=3",
    "--eval_every=6",
    "--log_every=1",
]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
  """A mixture of a TFDS builder, a JSON Lines and a Parquet corpus, weighted 1 : 2 : 1."""
  root = tmp_path_factory.mktemp("corpora")
  _write_jsonl(root / "j" / "a.jsonl", _rows(200))
  _write_parquet(root / "p" / "a.parquet", _rows(200, start=200))
  return f"mix:python_stdlib_text@1,jsonl:{root}/j/*.jsonl@2,parquet:{root}/p/*.parquet@1"


NAMES = ("0_python_stdlib_text", "1_j", "2_p")


def _windows(spec, split, data_dir):
  return mixture.open_mixed(
      mixture.parse(spec),
      lambda p: lm.open_windows(p.spec, split, SEQ_LEN, data_dir),
      unit="tokens",
      per_example=SEQ_LEN,
  )


# ------------------------------------------------------------------------------------------------
# The library


def test_observed_shares_match_the_weights_in_every_batch(mix, data_dir):
  spec = mix.replace("@2,", "@5,")  # weights 1 : 5 : 1... as 1/7, 5/7, 1/7
  windows = _windows(spec, "train", data_dir)
  loader = pipeline.train_batches(windows, 14, seed=0)
  iterator = iter(loader)
  batches = [next(iterator) for _ in range(200)]
  iterator.close()
  per_batch = np.stack([np.bincount(b["source_id"], minlength=3) for b in batches])
  want = np.array([1, 5, 1]) / 7
  # The stated tolerance: within one example of the weights' share in every batch of 14, and
  # within 1% over the 2,800 examples.
  assert np.abs(per_batch - 14 * want).max() <= 1
  np.testing.assert_allclose(per_batch.sum(0) / per_batch.sum(), want, atol=0.01)
  assert loader.seen(200) == {f"tokens_{n}": c * SEQ_LEN for n, c in zip(NAMES, per_batch.sum(0))}
  # A row tagged with a source is a window of that source (checked for the two small ones)
  for source_id in (1, 2):
    member = windows.sources[source_id]
    known = {member[i]["tokens"].tobytes() for i in range(len(member))}
    rows = [r for b in batches for r, s in zip(b["tokens"], b["source_id"]) if s == source_id]
    assert {r.tobytes() for r in rows} <= known and len(rows) > len(known)  # repeated epochs


def test_the_parse_rule_the_names_and_bad_specs_as_one_line_errors(mix, data_dir):
  for spec, message in (
      ("mix:", "--dataset='mix:' names no source; write mix:"),
      ("mix: , ", "names no source"),
      ("mix:python_stdlib_text@0", "source 0 ('python_stdlib_text@0'): the weight 0 must be a "),
      ("mix:a@1,python_stdlib_text@-2", "source 1 ('python_stdlib_text@-2'): the weight -2 must"),
      ("mix:python_stdlib_text@nan", "the weight nan must be a positive number"),
      ("mix:python_stdlib_text@lots", "the weight 'lots' is not a number"),
      ("mix:jsonl:/d/{a,b}.jsonl@1", "source 0 ('jsonl:/d/{a') has no @WEIGHT"),
      ("mix:mix:a@1@2", "is a mixture itself"),
  ):
    with pytest.raises(UserError) as error:
      mixture.parse(spec)
    assert message in str(error.value) and "\n" not in str(error.value), spec
  # The parse rule: each item at its last @, so a source may hold @ and :
  (part,) = mixture.parse("mix:textlines:/data/me@host/*.txt@0.5")
  assert (part.spec, part.weight, part.name) == ("textlines:/data/me@host/*.txt", 0.5, "0_me_host")
  assert {
      spec: mixture.short_name(spec)
      for spec in (
          "synthetic_sequences/copy:1.0.0",
          "jsonl:*.jsonl",
          "parquet:/d/Web Text/t.parquet",
      )
  } == {
      "synthetic_sequences/copy:1.0.0": "synthetic_sequences_copy",
      "jsonl:*.jsonl": "jsonl",
      "parquet:/d/Web Text/t.parquet": "t_parquet",
  }
  with pytest.raises(UserError) as kinds:
    mixture.common_kind(
        mixture.parse("mix:python_stdlib_text@1,sklearn_digits@1"), data_dir, "image"
    )
  assert str(kinds.value) == (
      "mix source 0_python_stdlib_text (python_stdlib_text@1) holds text but mix source "
      "1_sklearn_digits (sklearn_digits@1) holds images; a mixture is all text (language models) "
      "or all images (image classifiers)"
  )


def test_an_unknown_source_inside_a_mixture_is_its_own_message_prefixed(tmp_path, mix, data_dir):
  result = _run(
      *TINY_RUN,
      f"--dataset={mix},python_stdlib_txt@1",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
  )
  _assert_one_line_error(
      result,
      1,
      "error: mix source 3_python_stdlib_txt (python_stdlib_txt@1): data set 'python_stdlib_txt' "
      f"is not prepared in {data_dir} (did you mean 'python_stdlib_text'?",
  )


# ------------------------------------------------------------------------------------------------
# One process and two read the same global batches

# This process's rows of the first BATCHES training batches, from the loader built as
# experiments.transformer builds it; one process also writes those of --data_workers=2 and of the
# next seed.
ROWS_SCRIPT = """
import dataclasses
import jax
import numpy as np
from absl import flags
from bigjax import flags as bigjax_flags
from experiments import transformer

OUT = flags.DEFINE_string("rows_out", None, "Folder for the .npz files.")


def save(name, loader, count=6):
  iterator = iter(loader)
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  np.savez(f"{OUT.value}/{name}.npz", **{k: np.stack([b[k] for b in batches]) for k in batches[0]})


def main(argv):
  exp = bigjax_flags.experiment()
  _, loader, _ = transformer.language_model_data(exp)
  save(f"of{jax.process_count()}_process{jax.process_index()}", loader)
  if jax.process_count() == 1:
    save("workers2", dataclasses.replace(loader, workers=2))
    seed = dataclasses.replace(exp.config, seed=exp.config.seed + 1)
    save("seed1", transformer.language_model_data(dataclasses.replace(exp, config=seed))[1])


if __name__ == "__main__":
  bigjax_flags.run(main)
"""


def _rows_of(script, tmp_path, mix, data_dir, *flags, devices):
  """Starts the rows script (see ROWS_SCRIPT), writing into tmp_path."""
  return subprocess.Popen(
      [
          sys.executable,
          str(script),
          *TINY_RUN,
          f"--dataset={mix}",
          f"--data_dir={data_dir}",
          f"--rows_out={tmp_path}",
          *flags,
      ],
      cwd=REPO,
      env=cpu_env(devices, PYTHONPATH=REPO),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _finish(*processes):
  for process in processes:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


def _load(path) -> dict:
  with np.load(path) as saved:
    return dict(saved)


@pytest.fixture(scope="module")
def one_process_rows(tmp_path_factory, mix, data_dir):
  """The folder the rows script wrote into as one process of 8 devices."""
  folder = tmp_path_factory.mktemp("rows")
  script = folder / "rows.py"
  script.write_text(ROWS_SCRIPT)
  _finish(_rows_of(script, folder, mix, data_dir, f"--workdir={folder / 'one'}", devices=8))
  return folder


def test_the_same_seed_gives_the_same_batches_whatever_the_workers(one_process_rows):
  threads = _load(one_process_rows / "of1_process0.npz")
  workers, other_seed = (_load(one_process_rows / f"{n}.npz") for n in ("workers2", "seed1"))
  assert set(threads) == {"tokens", "segment_ids", "positions", "source_id"}
  for key, rows in threads.items():
    np.testing.assert_array_equal(workers[key], rows)
  assert not np.array_equal(threads["tokens"], other_seed["tokens"])
  # The interleaving is the weights': which rows come from which source does not move with the seed
  np.testing.assert_array_equal(threads["source_id"], other_seed["source_id"])
  assert set(threads["source_id"].ravel()) == {0, 1, 2}


def test_one_process_and_two_read_the_same_global_batches(
    tmp_path, one_process_rows, mix, data_dir
):
  coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
  flags = [f"--workdir={tmp_path / 'two'}", coordinator, "--num_processes=2"]
  script = one_process_rows / "rows.py"
  _finish(
      *(
          _rows_of(script, tmp_path, mix, data_dir, *flags, f"--process_id={i}", devices=4)
          for i in range(2)
      )
  )
  whole = _load(one_process_rows / "of1_process0.npz")
  halves = [_load(tmp_path / f"of2_process{i}.npz") for i in range(2)]
  for key, rows in whole.items():
    assert rows.shape[:2] == (6, 8) and halves[0][key].shape[:2] == (6, 4)  # 6 batches of 8
    np.testing.assert_array_equal(np.concatenate([halves[0][key], halves[1][key]], axis=1), rows)


# ------------------------------------------------------------------------------------------------
# Training through the CLI


def _mix_run(workdir, mix, data_dir):
  return [*MIX_RUN, f"--dataset={mix}", f"--workdir={workdir}", f"--data_dir={data_dir}"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, mix, data_dir):
  """The workdir of one uninterrupted run on the mixture, and its stdout."""
  workdir = tmp_path_factory.mktemp("unbroken")
  result = _run(*_mix_run(workdir, mix, data_dir))
  assert result.returncode == 0, result.stderr
  return workdir, result.stdout


def test_a_killed_run_resumes_with_the_batches_of_an_unbroken_one(
    tmp_path, unbroken, mix, data_dir
):
  workdir = tmp_path / "broken"
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.transformer", *_mix_run(workdir, mix, data_dir)],
      cwd=REPO,
      env=cpu_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  log = workdir / metrics.METRICS_FILE
  deadline = time.time() + 300
  while not (
      (workdir / "checkpoints" / "3").is_dir()
      and log.exists()
      and any(r["step"] >= 4 for r in metrics.read_jsonl(log))
  ):
    assert process.poll() is None, process.communicate()[1]  # it must still be running when killed
    assert time.time() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  killed_at = max(r["step"] for r in metrics.read_jsonl(log))
  assert killed_at < NUM_STEPS
  resumed = _run(*_mix_run(workdir, mix, data_dir))
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout
  rows, want = (metrics.read_jsonl(w / metrics.METRICS_FILE) for w in (workdir, unbroken[0]))
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  # The batches themselves (the CRC32 of each step's batch), what the run counts of each source,
  # and so the losses: the same as the unbroken run's, before the kill and after it
  for key in ("data_fingerprint", *(f"tokens_{n}" for n in NAMES), "train_loss"):
    assert [r[key] for r in rows] == [r[key] for r in want], key
  assert len({r["data_fingerprint"] for r in rows}) == NUM_STEPS


def test_tokens_and_eval_metrics_per_source_in_metrics_jsonl_and_tensorboard(
    unbroken, mix, data_dir
):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  workdir, stdout = unbroken
  rows = metrics.read_jsonl(workdir / metrics.METRICS_FILE)
  # Weights 1 : 2 : 1 over batches of 8 windows of 32 tokens
  for r in rows:
    assert [r[f"tokens_{n}"] for n in NAMES] == [64 * r["step"], 128 * r["step"], 64 * r["step"]]
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [6, 12]
  # The mixture's eval loss is the token-weighted mean of its sources': each source's validation
  # split, a sample of --eval_batches=2 batches (16 windows) of each
  parts = mixture.parse(mix)
  counts = [min(len(w), 16) for w in mixture.members(_windows(mix, "validation", data_dir))]
  for r in evals:
    losses = [r[f"eval_loss_{p.name}"] for p in parts]
    assert r["eval_loss"] == pytest.approx(np.average(losses, weights=counts), rel=1e-5)
    assert all(0 <= r[f"eval_accuracy_{p.name}"] <= 1 for p in parts)
  assert "mix source 1_j (jsonl:" in stdout and "@2): " in stdout
  events = EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  for name in NAMES:
    for key, steps in ((f"eval_loss_{name}", [6, 12]), (f"tokens_{name}", list(range(1, 13)))):
      assert [e.step for e in events.Scalars(key)] == steps
      assert [e.value for e in events.Scalars(key)] == pytest.approx(
          [r[key] for r in rows if key in r]
      )
  assert "data_fingerprint" not in events.Tags()["scalars"]  # a string: metrics.jsonl only
  # --keep_best_metric reads a source's accuracy as higher-is-better, its loss as lower
  task = tasks.LanguageModelling(sources=NAMES)
  assert tasks.higher_is_better(task, "eval_accuracy_1_j")
  assert not tasks.higher_is_better(task, "eval_loss_1_j")


def test_a_source_evaluated_alone_scores_what_the_mixture_reported_for_it(unbroken, mix, data_dir):
  workdir, _ = unbroken
  final = metrics.read_jsonl(workdir / metrics.METRICS_FILE)[-1]
  jsonl = mixture.parse(mix)[1]
  result = _run(
      *TINY_RUN,
      f"--dataset={jsonl.spec}",
      f"--workdir={workdir}",
      f"--data_dir={data_dir}",
      "--mode=eval",
  )
  assert result.returncode == 0, result.stderr
  alone = float(result.stdout.split("| eval_loss ")[1].split()[0])  # printed to 4 decimals
  assert alone == pytest.approx(final[f"eval_loss_{jsonl.name}"], abs=6e-5)


def test_an_image_mixture_trains_the_cnn_with_each_sources_own_eval_split(tmp_path, data_dir):
  rng = np.random.default_rng(0)
  for label, folder in enumerate("ab"):
    (tmp_path / "glyphs" / folder).mkdir(parents=True)
    for i in range(40):
      (tmp_path / "glyphs" / folder / f"{i}.png").write_bytes(_png(label, rng))
  result = _run_experiment(
      "experiments.cnn",
      f"--flagfile={REPO}/experiments/configs/cnn_tiny.flags",
      f"--dataset=mix:sklearn_digits@3,imagefolder:{tmp_path}/glyphs@1",
      f"--workdir={tmp_path / 'run'}",
      f"--data_dir={data_dir}",
      "--batch_size=16",
      "--num_steps=4",
      "--eval_every=4",
      "--log_every=2",
  )
  assert result.returncode == 0, result.stderr
  # sklearn_digits has train and test, the folder train and validation
  assert "mix source 0_sklearn_digits (sklearn_digits@3): 1,438 train / 359 eval images" in (
      result.stdout
  )
  assert "mix source 1_glyphs (imagefolder:" in result.stdout
  rows = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [(r["images_0_sklearn_digits"], r["images_1_glyphs"]) for r in rows] == [(24, 8), (48, 16)]
  for name in ("0_sklearn_digits", "1_glyphs"):
    assert 0 <= rows[-1][f"eval_accuracy_{name}"] <= 1 and rows[-1][f"train_loss_{name}"] > 0
  # Images of another shape cannot join the mixture
  for path in (tmp_path / "wide" / c / f"{i}.png" for c in "ab" for i in range(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 9), np.uint8), mode="L").save(path)
  spec = f"mix:imagefolder:{tmp_path}/glyphs@1,imagefolder:{tmp_path}/wide@1"
  opened = mixture.open_mixed(
      mixture.parse(spec), lambda p: images.open_split(p.spec, "train", data_dir)
  )
  with pytest.raises(UserError) as shapes:
    images.train_batches(opened, 16, seed=0)
  assert str(shapes.value).startswith(
      f"mix source 1_wide (imagefolder:{tmp_path}/wide@1) has images of shape (8, 9, 1) but mix "
      f"source 0_glyphs (imagefolder:{tmp_path}/glyphs@1) has (8, 8, 1); a mixture's images must"
  )


def test_the_loader_benchmark_measures_a_mixture_and_the_wait_in_the_loop(mix, data_dir):
  result = _run_experiment(
      "benchmarks.data",
      f"--flagfile={REPO}/experiments/configs/transformer_tiny.flags",
      *TINY_RUN[1:],
      f"--dataset={mix}",
      f"--data_dir={data_dir}",
      "--bench_workers=0",
      "--bench_seconds=0.5",
      "--bench_steps=3",
  )
  assert result.returncode == 0, result.stderr
  record = json.loads(result.stdout.strip().splitlines()[-1])
  (loader,) = record["loaders"]
  assert loader["shares"] == pytest.approx(dict(zip(NAMES, [0.25, 0.5, 0.25])), abs=0.01)
  (lead,) = record["loop"]
  assert lead["steps"] == 3 and 0 <= lead["wait_ms_median"] <= lead["wait_ms_max"]
  assert 0 <= lead["wait_share"] < 1 and lead["step_ms"] > 0
