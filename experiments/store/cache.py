"""Content-addressed caches shared by every run on a machine: an entry's key is a hash of
everything that determines it, and each entry is computed once per key, whichever process asks.

- Writes go to a temporary file renamed into place, so a reader sees a whole file or none.
- An entry is computed under an exclusive `fcntl.flock` on `<entry>.lock`, and looked up again
  once the lock is held: two sweep workers never compute or write the same entry; the second
  waits and reads the first one's. The kernel drops a flock when its process dies, so a killed
  worker never blocks the others.
- Every read is validated (tensor entries against the sha256 and size in a sidecar written
  after them; JSON entries by parsing, comparing the stored key and the value's sha256); an invalid entry (a copy
  cut short, a bad disk, a writer from before the locks) is ignored, logged and recomputed.
- Computations, hits, waits and invalid entries are appended to `<root>/events.jsonl`
  (`computations(root)` counts them), so a test or a user can check what a sweep shared.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
_MISSING = object()
log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def writable_dir(folder: Path) -> bool:
    """Whether entries can be written under `folder` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def warn_uncached(folder: Path, why: str) -> None:
    """Once per folder: a cache that cannot be written is skipped, never fatal."""
    if str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        log.warning("cache %s cannot be written (%s): running uncached; set paths.cache_dir "
                    "(QUANTLAB_CACHE_DIR) to a writable folder to share work between runs", folder, why)


def cache_root() -> Path:
    """$QUANTLAB_CACHE_DIR, else ~/.cache/quantlab."""
    return Path(os.environ.get("QUANTLAB_CACHE_DIR", Path.home() / ".cache" / "quantlab"))


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _canonical(key: dict[str, Any]) -> Any:
    """The key as it reads back from JSON (tuples become lists, objects strings)."""
    return json.loads(json.dumps(key, default=str))


def _value_sha256(value: Any) -> str:
    """Checksum of a JSON entry's value as it reads back: a hand-edited baseline is not used."""
    canonical = json.dumps(json.loads(json.dumps(value, default=str)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_event(root: Path, kind: str, key: str, event: str) -> None:
    """Append one line to the root's event log. O_APPEND writes of one short line land whole,
    so concurrent workers never interleave; a log failure never fails a run."""
    line = json.dumps(
        {"time": round(time.time(), 3), "pid": os.getpid(), "kind": kind, "key": key, "event": event}
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def read_events(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def computations(root: Path, kind: str | None = None) -> Counter:
    """How many times each (kind, key) entry was computed under `root`."""
    return Counter(
        (e["kind"], e["key"])
        for e in read_events(root)
        if e["event"] == "compute" and kind in (None, e["kind"])
    )


class _Invalid(Exception):
    """An entry is on disk but cannot be trusted."""


class Cache:
    """One kind of entry (`baseline`, `eval_windows`, ...) under `<root>/<kind>/`.

    JSON values: `get_json`/`put_json`, or `get_or_compute_json` (locked, computed once).
    Tensor values (anything `torch.save` writes with `weights_only`-loadable contents):
    `get_or_compute_tensors`.
    """

    def __init__(self, kind: str, root: Path | None = None) -> None:
        self.kind = kind
        self.root = Path(root) if root is not None else cache_root()
        self.dir = self.root / kind

    def _path(self, key: dict[str, Any], suffix: str) -> Path:
        return self.dir / f"{key_hash(key)}{suffix}"

    def _log(self, key: dict[str, Any], event: str) -> None:
        log_event(self.root, self.kind, key_hash(key), event)

    @contextmanager
    def lock(self, key: dict[str, Any]) -> Iterator[None]:
        with file_lock(self._path(key, ".lock"), on_wait=lambda: self._log(key, "wait")):
            yield

    # JSON entries: {"key": key, "value": value} in <hash>.json

    def _read_json(self, key: dict[str, Any]) -> Any:
        path = self._path(key, ".json")
        if not path.is_file():
            return _MISSING
        try:
            entry = json.loads(path.read_text())
            if not isinstance(entry, dict) or "value" not in entry or entry.get("key") != _canonical(key):
                raise _Invalid(path)
            if entry.get("sha256") != _value_sha256(entry["value"]):  # edited by hand, or from before checksums
                raise _Invalid(path)
        except (ValueError, UnicodeDecodeError) as error:
            raise _Invalid(path) from error
        return entry["value"]

    def get_json(self, key: dict[str, Any]) -> Any | None:
        """The value stored under `key`, or None when absent or invalid."""
        try:
            value = self._read_json(key)
        except _Invalid:
            return None
        return None if value is _MISSING else value

    def put_json(self, key: dict[str, Any], value: Any) -> None:
        atomic_write_json(self._path(key, ".json"), {"key": key, "value": value, "sha256": _value_sha256(value)})

    def get_or_compute_json(self, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        return self._get_or_compute(key, self._read_json, self.put_json, compute, (".json",))

    # Tensor entries: torch.save({"value": value}) in <hash>.pt, then <hash>.pt.meta.json with
    # its size and sha256. The sidecar is written last: a payload without one never committed.

    def _read_tensors(self, key: dict[str, Any], map_location: Any = None) -> Any:
        import torch

        payload, meta = self._path(key, ".pt"), self._path(key, ".pt.meta.json")
        if not meta.is_file():
            if payload.exists():
                raise _Invalid(payload)  # written but never committed
            return _MISSING
        try:
            info = json.loads(meta.read_text())
            if info.get("key") != _canonical(key) or payload.stat().st_size != info["bytes"]:
                raise _Invalid(payload)
            if file_sha256(payload) != info["sha256"]:
                raise _Invalid(payload)
            entry = torch.load(payload, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - whatever is wrong with it, the entry is not used
            raise _Invalid(payload) from error
        return entry["value"]

    def _write_tensors(self, key: dict[str, Any], value: Any) -> None:
        import torch

        payload, meta = self._path(key, ".pt"), self._path(key, ".pt.meta.json")
        meta.unlink(missing_ok=True)  # uncommit first: no moment where an old sidecar vouches for new bytes
        _atomic_write(payload, lambda handle: torch.save({"value": value}, handle))
        atomic_write_json(meta, {"key": key, "bytes": payload.stat().st_size, "sha256": file_sha256(payload)})

    def get_or_compute_tensors(
        self, key: dict[str, Any], compute: Callable[[], Any], map_location: Any = None
    ) -> Any:
        def read(k: dict[str, Any]) -> Any:
            return self._read_tensors(k, map_location)

        return self._get_or_compute(key, read, self._write_tensors, compute, (".pt", ".pt.meta.json"))

    def _get_or_compute(
        self,
        key: dict[str, Any],
        read: Callable,
        write: Callable,
        compute: Callable[[], Any],
        suffixes: tuple,
    ) -> Any:
        try:
            value = read(key)
            if value is not _MISSING:
                self._log(key, "hit")
                return value
        except _Invalid:
            pass  # looked at again under the lock, where it is safe to replace
        if not writable_dir(self.dir):
            warn_uncached(self.root, "not writable")
            return compute()
        with self.lock(key):
            try:
                value = read(key)  # another worker may have computed it while this one waited
                if value is not _MISSING:
                    self._log(key, "hit")
                    return value
            except _Invalid:
                self._log(key, "invalid")
            # Only lock holders write, so any file of this entry now is a leftover of a killed
            # writer or an invalid entry: remove it before computing afresh.
            digest = key_hash(key)
            for leftover in self.dir.glob(f".{digest}.*"):
                leftover.unlink(missing_ok=True)
            for suffix in suffixes:
                self._path(key, suffix).unlink(missing_ok=True)
            value = compute()
            try:
                write(key, value)
            except OSError as error:  # a full disk, a quota: the value is good, only the cache is not
                warn_uncached(self.root, f"{type(error).__name__}: {error}")
                return value
            self._log(key, "compute")
            return value


def build_dir_once(
    target: Path, build: Callable[[Path], None], is_valid: Callable[[Path], bool], kind: str, root: Path
) -> Path:
    """A cached directory (a converted model), built once under a lock: `build(staging)` fills a
    staging folder that is then renamed to `target`; `is_valid(target)` checks a finished one."""
    name = target.name
    if is_valid(target):
        log_event(root, kind, name, "hit")
        return target
    if not writable_dir(target.parent):  # build it for this process only, in a temporary folder
        warn_uncached(target.parent, "not writable")
        import atexit

        staging = Path(tempfile.mkdtemp(prefix=f"quantlab-{name}-"))
        atexit.register(shutil.rmtree, staging, True)
        build(staging)
        return staging
    with file_lock(target.parent / f"{name}.lock", on_wait=lambda: log_event(root, kind, name, "wait")):
        if is_valid(target):
            log_event(root, kind, name, "hit")
            return target
        if target.exists():
            log_event(root, kind, name, "invalid")
            shutil.rmtree(target)
        for leftover in target.parent.glob(f".staging-{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".staging-{name}-"))
        try:
            build(staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log_event(root, kind, name, "compute")
    return target
