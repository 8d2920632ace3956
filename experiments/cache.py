"""Content-addressed caches: an entry's key is a hash of everything that determines it.

Writes go to a temporary file renamed into place, so concurrent sweep jobs and killed runs never
leave a half-written entry; a reader sees the whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """$QUANTLAB_CACHE_DIR, else ~/.cache/quantlab."""
    return Path(os.environ.get("QUANTLAB_CACHE_DIR", Path.home() / ".cache" / "quantlab"))


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


class Cache:
    def __init__(self, kind: str, root: Path | None = None) -> None:
        self.dir = (root or cache_root()) / kind

    def _path(self, key: dict[str, Any], suffix: str) -> Path:
        return self.dir / f"{key_hash(key)}{suffix}"

    def get_json(self, key: dict[str, Any]) -> Any | None:
        path = self._path(key, ".json")
        if not path.is_file():
            return None
        entry = json.loads(path.read_text())
        return entry["value"] if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put_json(self, key: dict[str, Any], value: Any) -> None:
        atomic_write_json(self._path(key, ".json"), {"key": key, "value": value})
