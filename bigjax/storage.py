"""Paths on the local disk or in the file systems etils.epath knows (`gs://`, and others fsspec
reaches), for the files a run writes beside its checkpoints: workdirs, exports, flags.txt,
metrics, tokenizers.

Local paths keep what only a local file system gives (fsync, an exclusive create for the lock,
free-space checks); object stores get whole-object writes instead, which are atomic there (an
object is replaced whole or not at all), and no append (GCS has none: a run's growing files are
rewritten whole). Checkpoints go through Orbax, which writes `gs://` through tensorstore itself.
"""

import os
import threading
import uuid

from etils import epath

from bigjax.errors import UserError

# How long the first contact with a remote workdir may take before it is reported unreachable
# (storage clients retry a refused connection for minutes, which would look like a hang);
# BIGJAX_STORAGE_REACH_TIMEOUT_S sets another.
REACH_TIMEOUT_S = 30.0


def is_remote(path: str) -> bool:
  """Whether `path` names a file system other than the local one (`gs://bucket/...`)."""
  return "://" in str(path) and not str(path).startswith("file://")


def absolute(path: str) -> str:
  """A local path made absolute (~ expanded); a remote one as it is."""
  path = str(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def list_names(directory: str) -> list[str]:
  """The names in `directory`; [] when there is none (an object store has no empty directories)."""
  path = epath.Path(directory)
  return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_whole(path: str, data: str | bytes) -> None:
  """A remote file written as one object: readers see the old object or the new one, never a part.
  (Local files go through bigjax.workdir.replace_file, with its temporary file and fsync.)"""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, bytes):
    target.write_bytes(data)
  else:
    target.write_text(data)


def create_exclusive(path: str, text: str) -> bool:
  """Writes `path` only if it does not exist yet, atomically (GCS's if-generation-match=0);
  whether this call created it."""
  filesystem, name = _fsspec(path)
  try:
    filesystem.pipe(name, text.encode(), mode="create")
  except FileExistsError:
    return False
  return True


def modified_time(path: str) -> float:
  """The object's last modification as the store's own clock has it (seconds since the epoch)."""
  return epath.Path(path).stat().mtime


def remove(path: str) -> None:
  path = epath.Path(path)
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def rename(source: str, target: str) -> None:
  """Moves a file or a directory (on an object store: copied, then deleted)."""
  epath.Path(source).rename(target)


def tree_bytes(directory: str) -> int:
  """The bytes of every file under `directory`."""
  if not is_remote(directory):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(directory)
        for name in files
    )
  return sum(size for _, size in _remote_files(epath.Path(directory)))


def check_reachable(
    directory: str, timeout_s: float | None = None, *, write: bool = True
) -> float | None:
  """Writes, reads back and removes a small object in the remote `directory` (without `write`:
  looks whether it exists), within `timeout_s`; one line saying what failed (no bucket, no
  permission, no answer) otherwise. A run checks this before anything else touches the store, so
  an unreachable bucket is an error, not a hang. Returns the store's clock (the probe's time)."""
  if timeout_s is None:
    timeout_s = float(os.environ.get("BIGJAX_STORAGE_REACH_TIMEOUT_S", REACH_TIMEOUT_S))
  probe = os.path.join(directory, f".reach-check-{uuid.uuid4().hex}")

  def round_trip():
    if not write:
      if not epath.Path(directory).exists():
        raise FileNotFoundError(f"{directory} does not exist")
      return "bigjax", None
    epath.Path(probe).write_text("bigjax")
    text, now = epath.Path(probe).read_text(), modified_time(probe)
    epath.Path(probe).unlink()
    return text, now

  outcome = {}

  def attempt():
    try:
      outcome["text"] = round_trip()
    except Exception as e:  # noqa: BLE001 - gcsfs, aiohttp and google-auth raise many types
      outcome["error"] = e

  # A daemon thread: a client still retrying when the time is up must not hold the exit.
  thread = threading.Thread(target=attempt, name="bigjax-reach-check", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise UserError(
        f"no answer from the storage holding {directory} within {timeout_s:.0f} s; check the "
        "bucket name, the network and the credentials (gcloud auth application-default login)"
    )
  if "error" in outcome:
    e = outcome["error"]
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(
        f"cannot write to {directory} ({type(e).__name__}: {first_line}); check the bucket name, "
        "its permissions and the credentials"
    )
  text, now = outcome["text"]
  if text != "bigjax":
    raise UserError(f"{directory} gave back other bytes than were written to it")
  return now


def _fsspec(path: str):
  """(fsspec file system, path inside it) for a remote path."""
  import fsspec  # pylint: disable=g-import-not-at-top

  filesystem, name = fsspec.core.url_to_fs(path)
  return filesystem, name


def local_cache_root() -> str:
  """Where copies of remote data live on this host (BIGJAX_CACHE_DIR, else ~/.cache/bigjax)."""
  return os.path.expanduser(os.environ.get("BIGJAX_CACHE_DIR", "~/.cache/bigjax"))


def local_mirror(remote_dir: str, local_dir: str, progress=print) -> int:
  """Copies every file under `remote_dir` into `local_dir` that is not there yet with the same
  size (a copy cut short by a crash is redone: each file lands under its name only once whole).
  Readers that take only local files (ArrayRecord's) then read the local copy. Returns the bytes
  copied."""
  files = list(_remote_files(epath.Path(remote_dir)))
  copied = 0
  for source, size in files:
    target = os.path.join(local_dir, os.path.relpath(str(source), remote_dir))
    if os.path.exists(target) and os.path.getsize(target) == size:
      continue
    if not copied:
      total = sum(size for _, size in files)
      progress(
          f"copying {remote_dir} to {local_dir} ({len(files)} files, {total / 2**20:,.1f} MiB)"
      )
    copy_to_local(str(source), target)
    copied += size
  return copied


def copy_to_local(source: str, target: str) -> None:
  """A remote file copied to the local `target`, which appears only once whole."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f"{target}.partial"
  with epath.Path(source).open("rb") as reader, open(partial, "wb") as writer:
    while chunk := reader.read(1 << 24):
      writer.write(chunk)
  os.replace(partial, target)


def _remote_files(directory):
  """(path, bytes) of every file under an epath directory, one listing per level (GCS lists no
  `**`)."""
  for path in directory.iterdir():
    if path.is_dir():
      yield from _remote_files(path)
    else:
      yield path, path.stat().length
