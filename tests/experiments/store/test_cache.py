"""The shared cache: computed once per key across processes, validated on read, and a write killed
half-way never leaves an entry that is used."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from quantlab.experiments.store.cache import Cache, build_dir_once, computations, key_hash, read_events

REPO = Path(__file__).resolve().parents[3]
KEY = {"model": "m", "calib": {"dataset": "pydocs", "nsamples": 4}, "batch_size": 2}


def _python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the child never reached the point to kill it at"
        time.sleep(0.02)


def test_tensor_entry_is_computed_once_then_read(tmp_path):
    cache, calls = Cache("blobs", tmp_path), []

    def compute():
        calls.append(1)
        return {
            "hidden": [torch.randn(2, 3, 4)],
            "kwargs": [
                {
                    "position_embeddings": (torch.ones(2), torch.zeros(2)),
                    "attention_mask": None,
                    "use_cache": False,
                }
            ],
        }

    first = cache.get_or_compute_tensors(KEY, compute)
    second = cache.get_or_compute_tensors(KEY, compute)
    assert len(calls) == 1
    assert torch.equal(first["hidden"][0], second["hidden"][0])
    assert (
        isinstance(second["kwargs"][0]["position_embeddings"], tuple)
        and second["kwargs"][0]["attention_mask"] is None
    )
    assert computations(tmp_path) == {("blobs", key_hash(KEY)): 1}
    assert [e["event"] for e in read_events(tmp_path)] == ["compute", "hit"]
    other = dict(KEY, batch_size=4)  # any field of the key makes another entry
    cache.get_or_compute_tensors(other, compute)
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_sidecar"])
def test_a_damaged_tensor_entry_is_never_used(tmp_path, damage):
    cache = Cache("blobs", tmp_path)
    cache.get_or_compute_tensors(KEY, lambda: torch.arange(1000))
    payload = tmp_path / "blobs" / f"{key_hash(KEY)}.pt"
    data = payload.read_bytes()
    if damage == "truncate":
        payload.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        payload.write_bytes(data[:-200] + bytes([data[-200] ^ 0xFF]) + data[-199:])
    else:
        payload.with_name(payload.name + ".meta.json").unlink()
    value = cache.get_or_compute_tensors(KEY, lambda: torch.arange(1000) * 2)
    assert torch.equal(value, torch.arange(1000) * 2), "the damaged entry was recomputed, not read"
    assert [e["event"] for e in read_events(tmp_path)] == ["compute", "invalid", "compute"]
    assert torch.equal(cache.get_or_compute_tensors(KEY, lambda: None), torch.arange(1000) * 2)


def test_a_damaged_json_entry_is_recomputed(tmp_path):
    cache = Cache("baseline", tmp_path)
    assert cache.get_or_compute_json(KEY, lambda: {"ppl": 12.5}) == {"ppl": 12.5}
    path = tmp_path / "baseline" / f"{key_hash(KEY)}.json"
    path.write_text(path.read_text()[:20])
    assert cache.get_json(KEY) is None
    assert cache.get_or_compute_json(KEY, lambda: {"ppl": 13.0}) == {"ppl": 13.0}
    assert json.loads(path.read_text())["value"] == {"ppl": 13.0}


def test_an_edited_json_entry_is_recomputed(tmp_path):
    """Editing the cached baseline's JSON changed the reported fp16 numbers: its value is checksummed."""
    cache = Cache("baseline", tmp_path)
    cache.get_or_compute_json(KEY, lambda: {"ppl": 12.5})
    path = tmp_path / "baseline" / f"{key_hash(KEY)}.json"
    entry = json.loads(path.read_text())
    entry["value"]["ppl"] = 1.0
    path.write_text(json.dumps(entry))
    assert cache.get_json(KEY) is None
    assert cache.get_or_compute_json(KEY, lambda: {"ppl": 12.5}) == {"ppl": 12.5}


def test_a_cache_that_cannot_be_written_warns_and_computes(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cache = Cache("baseline", blocked / "cache")
    assert cache.get_or_compute_json(KEY, lambda: {"ppl": 12.5}) == {"ppl": 12.5}
    assert torch.equal(cache.get_or_compute_tensors(KEY, lambda: torch.ones(3)), torch.ones(3))
    built = build_dir_once(blocked / "models" / "m", lambda d: (d / "x").write_text("1"), lambda d: False, "models",
                           blocked)
    assert (built / "x").read_text() == "1"
    assert "cannot be written" in caplog.text and "running uncached" in caplog.text


# A worker that computes a slow JSON entry; all start together and print what they got.
WORKER = """
    import os, sys, time
    from pathlib import Path
    from quantlab.experiments.store.cache import Cache
    root, go = Path(sys.argv[1]), Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    def compute():
        time.sleep(0.5)
        return {"computed_by": os.getpid()}
    print(Cache("baseline", root).get_or_compute_json({"model": "m"}, compute)["computed_by"])
"""


def test_concurrent_processes_compute_an_entry_once(tmp_path):
    go = tmp_path / "go"
    workers = [_python(WORKER, str(tmp_path), str(go)) for _ in range(4)]
    time.sleep(0.5)
    go.touch()
    outputs = [w.communicate(timeout=60) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert len({out.strip() for out, _ in outputs}) == 1, "every worker got the one computed value"
    assert computations(tmp_path) == {("baseline", key_hash({"model": "m"})): 1}
    events = read_events(tmp_path)
    assert sum(e["event"] == "hit" for e in events) == 3


# Dies (SIGKILL from the test) half-way through writing an entry: in the payload, or after the
# payload but before the sidecar that commits it.
KILLED_WRITER = """
    import io, sys, time
    from pathlib import Path
    import torch
    import quantlab.experiments.store.cache as cache
    root, stage, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    real_save, real_json = torch.save, cache.atomic_write_json

    def half_save(obj, handle):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
        handle.flush()
        marker.touch()
        time.sleep(120)

    def stalled_json(path, obj):
        marker.touch()
        time.sleep(120)

    if stage == "payload":
        torch.save = half_save
    else:
        cache.atomic_write_json = stalled_json
    cache.Cache("blobs", root).get_or_compute_tensors({"n": 1}, lambda: torch.arange(50000))
"""


@pytest.mark.parametrize("stage", ["payload", "sidecar"])
def test_no_entry_survives_a_writer_killed_mid_write(tmp_path, stage):
    marker = tmp_path / "writing"
    child = _python(KILLED_WRITER, str(tmp_path), stage, str(marker))
    _wait_for(marker, child)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    entry_dir, digest = tmp_path / "blobs", key_hash({"n": 1})
    if stage == "payload":
        leftovers = list(entry_dir.glob(f".{digest}.pt.*"))
        assert leftovers and 0 < leftovers[0].stat().st_size, "a half-written temporary file is left"
        assert not (entry_dir / f"{digest}.pt").exists()
    else:
        assert (entry_dir / f"{digest}.pt").exists() and not (entry_dir / f"{digest}.pt.meta.json").exists()

    calls = []
    value = Cache("blobs", tmp_path).get_or_compute_tensors(
        {"n": 1}, lambda: calls.append(1) or torch.arange(50000)
    )
    assert calls == [1], "the killed writer's entry was not used: it was computed again"
    assert torch.equal(value, torch.arange(50000))
    assert not list(entry_dir.glob(f".{digest}.*")), "the killed writer's leftovers are cleaned up"
    assert computations(tmp_path) == {("blobs", digest): 1}, (
        "the killed writer never counted as a computation"
    )


# Builds a cached directory slowly (a GGUF conversion stands behind this in the real code).
DIR_BUILDER = """
    import sys, time
    from pathlib import Path
    from quantlab.experiments.store.cache import build_dir_once
    root, go = Path(sys.argv[1]), Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    def build(staging):
        time.sleep(0.5)
        (staging / "weights.bin").write_bytes(b"x" * 1000)
        (staging / "done.json").write_text("{}")
    valid = lambda folder: (folder / "done.json").is_file()
    (root / "models").mkdir(parents=True, exist_ok=True)
    print(build_dir_once(root / "models" / "tiny", build, valid, "models", root))
"""


def test_a_cached_directory_is_built_once_and_rebuilt_when_invalid(tmp_path):
    go = tmp_path / "go"
    workers = [_python(DIR_BUILDER, str(tmp_path), str(go)) for _ in range(3)]
    time.sleep(0.5)
    go.touch()
    assert all(w.wait(timeout=60) == 0 for w in workers)
    assert computations(tmp_path) == {("models", "tiny"): 1}
    target = tmp_path / "models" / "tiny"
    assert (target / "weights.bin").stat().st_size == 1000 and not list(target.parent.glob(".staging-*"))

    (target / "done.json").unlink()  # a folder that does not pass its check is rebuilt
    built = []
    build_dir_once(
        target,
        lambda staging: built.append((staging / "done.json").write_text("{}")),
        lambda folder: (folder / "done.json").is_file(),
        "models",
        tmp_path,
    )
    assert len(built) == 1 and not (target / "weights.bin").exists()
    assert computations(tmp_path) == {("models", "tiny"): 2}
