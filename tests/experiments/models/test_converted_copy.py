"""The cached HF copy of a GGUF model is validated by content, not only by file sizes."""

import json
import os

from quantlab.experiments.models.loading import SOURCE_MANIFEST, VERIFIED_STAMP, _converted_copy_is_valid
from quantlab.experiments.store.cache import file_sha256


def converted(folder):
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    hashes = {name: file_sha256(folder / name) for name in files}
    (folder / SOURCE_MANIFEST).write_text(json.dumps({"sha256": "gguf-sha", "files": files, "files_sha256": hashes}))
    return folder


def test_a_same_size_edit_of_the_converted_copy_is_caught(tmp_path):
    folder = converted(tmp_path / "copy")
    assert _converted_copy_is_valid(folder, "gguf-sha")
    assert (folder / VERIFIED_STAMP).is_file()  # later loads skip hashing an unchanged file
    assert _converted_copy_is_valid(folder, "gguf-sha")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    stat = weights.stat()
    weights.write_bytes(bytes(data))  # same size, other content
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later edit (coarse clocks)
    assert not _converted_copy_is_valid(folder, "gguf-sha")
    (folder / VERIFIED_STAMP).unlink()
    assert not _converted_copy_is_valid(folder, "gguf-sha")  # hashed, not stamped: by content
    assert not _converted_copy_is_valid(folder, "another-gguf")
