"""A run owns its workdir: a lock file that a second run meets with a one-line error naming the
holder, that a dead holder does not keep, and that works on the shared file systems multi-host
runs write to.

Only process 0 of a run touches the lock; the other processes learn its outcome from it, so every
process of one run shares the lock and a second run of any size is refused. The lock file
(`WORKDIR/lock`) holds who took it; process 0 refreshes its modification time every
HEARTBEAT_S seconds. A holder is dead when
  - it ran on this machine (same host name and boot id) and its pid is gone or belongs to a newer
    process: taken over at once, as after a SIGKILL or a crash;
  - it ran elsewhere and its lock has not been refreshed for STALE_S seconds, measured against the
    file system's own clock (a file touched here just before), so hosts' clocks need not agree.
Taking a dead holder's lock over happens under a second, exclusive file, so two runs that find the
same dead lock cannot both take it.
"""

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from bigjax import storage
from bigjax.errors import UserError

LOCK_FILE = "lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
# A takeover file older than this was left by a run that died while taking a lock over.
TAKEOVER_STALE_S = 30.0
_MESSAGE_BYTES = 2048


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _proc_stat(pid: int) -> list[str] | None:
  """Fields 3... of /proc/PID/stat (Linux); None when there is no such process or no /proc. The
  command name (field 2) may hold spaces, so the fields count from its closing parenthesis."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()
  except OSError:
    return None


def _process_start(pid: int) -> str | None:
  """The start time of `pid` in clock ticks since boot (field 22), which tells a reused pid from
  the holder."""
  fields = _proc_stat(pid)
  return fields[19] if fields and len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    pass
  fields = _proc_stat(pid)
  if fields is None:  # no /proc: the signal is all we know
    return True
  # A zombie has stopped for good
  return fields[0] != "Z" and (start is None or fields[19] == start)


def _this_process() -> dict:
  return {
      "host": socket.gethostname(),
      "boot_id": _boot_id(),
      "pid": os.getpid(),
      "pid_start": _process_start(os.getpid()),
      "processes": jax.process_count(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv)[:300],
      "token": uuid.uuid4().hex,
  }


def describe(holder: dict) -> str:
  processes = holder.get("processes", 1)
  size = f", {processes} processes" if processes and processes > 1 else ""
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{size}, started {holder.get('started', '?')}"


def _write_failure(path: str, e: OSError) -> UserError:
  full = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted"}
  denied = {
      errno.EROFS: "the file system is read-only",
      errno.EACCES: "permission denied",
      errno.EPERM: "permission denied",
  }
  if e.errno in full:
    return UserError(
        f"cannot write to {path} ({full[e.errno]}); free some space there or choose another --workdir"
    )
  reason = denied.get(e.errno, e.strerror or str(e))
  return UserError(
      f"cannot write to {path} ({reason}); a run needs its --workdir writable: fix the "
      "directory's permissions or mount, or choose another --workdir"
  )


def write_probe(directory: str) -> float:
  """Creates `directory` if needed and writes and removes a small file in it (OSError when it
  cannot). Returns the file system's clock: the file's modification time."""
  probe = os.path.join(directory, f".write-check-{uuid.uuid4().hex}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("bigjax")
    now = os.stat(probe).st_mtime
    os.remove(probe)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(probe)
    raise
  return now


def check_writable(directory: str) -> float:
  """write_probe, with a one-line error when the directory cannot be written (a remote one: when
  it cannot be reached in time either); the file system's clock."""
  if storage.is_remote(directory):
    return storage.check_reachable(directory)
  try:
    return write_probe(directory)
  except OSError as e:
    raise _write_failure(directory, e) from None


def replace_file(path: str, text: str) -> None:
  """Writes `path` whole or not at all (a temporary file renamed over it; on an object store, one
  object); a failed write (a full disk) leaves the old file and no temporary one, and is a
  one-line error."""
  if storage.is_remote(path):
    storage.write_whole(path, text)
    return
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise UserError(
        f"cannot write {path} ({e.strerror or e}); free space or fix the directory, then rerun"
    ) from None


class WorkdirLock:
  """Process 0's hold on a workdir; see the module docstring. Use `claim(workdir)`."""

  def __init__(self, workdir: str):
    self.workdir = storage.absolute(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    # On an object store: exclusive creates by if-generation-match, times by the store's clock.
    self.remote = storage.is_remote(self.workdir)
    self.me = _this_process()
    self._stop = threading.Event()
    self._heartbeat = None

  def _read(self) -> tuple[dict | None, float] | None:
    """(holder or None when unreadable, modification time), or None when there is no lock."""
    try:
      if self.remote:
        text, mtime = storage.read_text(self.path), storage.modified_time(self.path)
      else:
        with open(self.path) as f:
          text = f.read()
        mtime = os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:  # being written right now, or cut short by a crash
      holder = None
    return (holder if isinstance(holder, dict) else None), mtime

  def _is_dead(self, holder: dict | None, mtime: float, now: float) -> bool:
    if holder is not None and (holder.get("host"), holder.get("boot_id")) == (
        self.me["host"],
        self.me["boot_id"],
    ):
      return not _pid_alive(int(holder.get("pid", -1)), holder.get("pid_start"))
    return now - mtime > STALE_S

  def _create(self) -> bool:
    """Writes the lock if there is none; whether it did."""
    if self.remote:
      return storage.create_exclusive(self.path, json.dumps(self.me))
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(self.me, f)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _take_over(self, dead: tuple[dict | None, float]) -> bool:
    """Replaces the dead holder's lock with ours, unless another run got there first."""
    mutex = self.path + ".takeover"
    if not self._create_mutex(mutex):
      with contextlib.suppress(OSError):
        if self._clock() - self._mtime(mutex) > TAKEOVER_STALE_S:
          self._remove(mutex)
      return False
    try:
      if self._read() != dead:  # changed since we looked: someone else is taking over
        return False
      replace_file(self.path, json.dumps(self.me))
      holder = dead[0] or {}
      print(
          f"took over the lock of {self.workdir} from a run that is no longer running ({describe(holder)})",
          file=sys.stderr,
          flush=True,
      )
      return True
    finally:
      self._remove(mutex)

  def _create_mutex(self, path: str) -> bool:
    if self.remote:
      return storage.create_exclusive(path, "")
    try:
      os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
      return False
    return True

  def _remove(self, path: str) -> None:
    if self.remote:
      storage.remove(path)
    else:
      os.remove(path)

  def _mtime(self, path: str) -> float:
    return storage.modified_time(path) if self.remote else os.stat(path).st_mtime

  def _clock(self) -> float:
    """Now, by the clock lock times are measured with (an object store's own: a probe's time)."""
    return check_writable(self.workdir) if self.remote else time.time()

  def _acquire_here(self) -> str | None:
    """Takes the lock (process 0); None, or why it cannot."""
    try:
      now = check_writable(self.workdir)
      for _ in range(50):
        if self._create():
          return None
        found = self._read()
        if found is None:
          continue  # released in between
        holder, mtime = found
        if self._is_dead(holder, mtime, now):
          if self._take_over(found):
            return None
          time.sleep(0.1)
          continue
        if holder is None:
          return (
              f"{self.workdir} is being claimed by another run right now (its lock {self.path} is being "
              "written); wait for it to finish or use another --workdir"
          )
        heartbeat = (
            f", lock refreshed {max(now - mtime, 0):.0f}s ago"
            if holder.get("host") != self.me["host"]
            else ""
        )
        return (
            f"{self.workdir} is in use by another run ({describe(holder)}{heartbeat}): two runs on one "
            f"workdir would mix their checkpoints and metrics; stop that run or choose another --workdir "
            f"(the lock of a run that died is taken over: at once on the same host, after {STALE_S:.0f}s "
            "from another host)"
        )
      return f"could not take the lock {self.path}: it keeps changing hands; try again"
    except OSError as e:
      return str(_write_failure(self.workdir, e))

  def acquire(self) -> None:
    """Takes the lock for every process of this run, or raises UserError in every one of them."""
    refusal = self._acquire_here() if jax.process_index() == 0 else None
    refusal = _from_process_zero(refusal)
    if refusal is not None:
      raise UserError(refusal)
    if jax.process_index() == 0:
      self._heartbeat = threading.Thread(target=self._beat, name="bigjax-workdir-lock", daemon=True)
      self._heartbeat.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError, UserError):
        if self.remote:  # rewritten: an object's time changes only with its contents
          storage.write_whole(self.path, json.dumps(self.me))
        else:
          os.utime(self.path)  # no times: the file system's clock, as readers compare against it

  def release(self) -> None:
    self._stop.set()
    if jax.process_index() != 0:
      return
    found = self._read()
    if found is not None and found[0] is not None and found[0].get("token") == self.me["token"]:
      with contextlib.suppress(OSError):
        self._remove(self.path)


def _from_process_zero(message: str | None) -> str | None:
  """Process 0's `message` in every process."""
  if jax.process_count() == 1:
    return message
  data = np.zeros(_MESSAGE_BYTES, np.uint8)
  if message is not None:
    encoded = message.encode()[: _MESSAGE_BYTES - 1]
    data[0] = 1
    data[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(data[1:]).rstrip(b"\0").decode(errors="replace") if data[0] else None


_held: dict[str, WorkdirLock] = {}


@contextlib.contextmanager
def claim(workdir: str):
  """Holds `workdir` for this run while the block runs (re-entrant within one process: an
  experiment claims its workdir before it trains a tokenizer there, and `fit` claims it again)."""
  key = storage.absolute(workdir)
  if key in _held:
    yield _held[key]
    return
  lock = WorkdirLock(key)
  lock.acquire()
  _held[key] = lock
  try:
    yield lock
  finally:
    del _held[key]
    lock.release()
