"""The converted-model cache: one folder per model, written atomically, verified on every load.

A folder holds ``meta.json`` (the HookedTransformerConfig, the source GGUF, SHA-256s),
``weights.pt`` (float32 parameters) and ``tokenizer/``. Conversion takes a minute; loading
the folder takes seconds, so later loads never touch the GGUF. Because a cached model is
trusted as the model, every load re-hashes the files against ``meta.json`` (whose own hash it
also holds): an edited, half-copied or bit-rotted cache is rebuilt, not analysed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_spikesink.anatomy import NORM_SCALE_ATTR
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.models.fetch import file_sha256

logger = logging.getLogger(__name__)

FORMAT = 3
"""Bump when the cache layout or the conversion recipe changes: older folders are rebuilt.
2: SHA-256s of every file and of the metadata itself. 3: layer 0's ln1 gain, from before folding."""
META, WEIGHTS, TOKENIZER = "meta.json", "weights.pt", "tokenizer"


def cache_dir() -> Path:
    """Return the cache root: ``$TL_SPIKESINK_CACHE`` if set, else ``~/.cache/tl_spikesink``."""
    env = os.environ.get("TL_SPIKESINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tl_spikesink"


def cache_root(explicit: str | Path | None) -> Path:
    """``explicit`` as a path, or :func:`cache_dir` when None: the ``cache_dir=`` arguments."""
    return Path(explicit).expanduser() if explicit is not None else cache_dir()


def is_complete(target: Path) -> bool:
    """Whether ``target`` looks like a finished cache folder of the current :data:`FORMAT`.

    Cheap (no hashing): it tells a folder to build from one to verify.
    """
    meta = _read_meta(target)
    return meta is not None and meta.get("format") == FORMAT and (target / WEIGHTS).is_file()


def _read_meta(target: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((target / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its ``meta_sha256`` entry, in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cached_files(target: Path) -> list[str]:
    tokenizer = sorted(p for p in (target / TOKENIZER).rglob("*") if p.is_file())
    return [WEIGHTS, *(p.relative_to(target).as_posix() for p in tokenizer)]


def verify(target: Path, progress: bool) -> str | None:
    """Check the complete cache folder ``target`` against the hashes in its metadata.

    Hashes the weights file once (a progress bar for it if `progress`) and the small
    tokenizer files.

    Returns:
        None when everything matches, else what does not.
    """
    meta = _read_meta(target)
    if meta is None:
        return f"{META} is unreadable"
    if meta.get("meta_sha256") != meta_digest(meta):
        return f"{META} was edited (its content no longer matches its recorded hash)"
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict) or WEIGHTS not in recorded:
        return f"{META} records no file hashes"
    extra = sorted(set(_cached_files(target)) - set(recorded))
    if extra:
        return f"unexpected file {extra[0]}"
    for name, expected in recorded.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path, progress and name == WEIGHTS) != expected:
            return f"{name} does not match its recorded sha256"
    return None


def publish(
    model: HookedTransformer,
    tokenizer: Any,
    target: Path,
    gguf_name: str,
    gguf_sha256: str,
    progress: bool = False,
) -> None:
    """Write ``model`` and ``tokenizer`` as the cache folder ``target``, atomically.

    Everything goes to a temporary sibling first, hashed, then renamed into place, so a reader
    never sees a half-written folder; if another process published first, its folder is kept.
    """
    cfg = model.cfg
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would lock other users out of a shared cache
    try:
        # contiguous(): the standard layout on disk, whatever layout the model had in memory.
        weights = {k: p.detach().contiguous() for k, p in model.named_parameters()}
        torch.save(weights, tmp / WEIGHTS)
        del weights
        tokenizer.save_pretrained(tmp / TOKENIZER)
        skip = {"device", "dtype", "n_devices"}  # chosen anew at every load
        fields = [f.name for f in dataclasses.fields(cfg) if f.init and f.name not in skip]
        meta: dict[str, Any] = {
            "format": FORMAT, "gguf": gguf_name, "gguf_sha256": gguf_sha256,
            "cfg": {k: getattr(cfg, k) for k in fields},
            "first_norm_scale": None if (g := getattr(model, NORM_SCALE_ATTR, None)) is None
                                else g.tolist(),
            "sha256": {name: file_sha256(tmp / name, progress and name == WEIGHTS)
                       for name in _cached_files(tmp)},
        }  # fmt: skip
        # Hash what a reader will parse back, so float and tuple round trips cannot differ.
        meta = json.loads(json.dumps(meta, default=float))
        meta["meta_sha256"] = meta_digest(meta)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(target, ignore_errors=True)  # a stale, older-format or damaged cache
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):  # else another process published first; keep that
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class UnreadableCacheError(Exception):
    """A cache folder that does not load; never escapes :func:`materialise`, which rebuilds."""


def materialise(
    target: Path,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    build: Callable[[], None],
    progress: bool = False,
) -> HookedTransformer:
    """Load the cache folder ``target``, (re)building it with ``build`` when needed.

    Built when absent or of an older format; rebuilt, with a logged warning, when it fails
    :func:`verify` or cannot be loaded (typically written under another TransformerLens).

    Raises:
        SpikeSinkError: A freshly built folder that still cannot be loaded.
    """
    fresh = not is_complete(target)
    if fresh:
        build()
    elif problem := verify(target, progress):
        logger.warning("Cache %s fails its integrity check (%s); converting again", target, problem)
        shutil.rmtree(target, ignore_errors=True)
        build()
        fresh = True
    try:
        return load_cached(target, name, device, dtype)
    except UnreadableCacheError as exc:
        if fresh:
            raise SpikeSinkError(
                f"The converted model at {target} cannot be loaded ({exc}). Delete that folder "
                "and re-run; please report it if it happens again."
            ) from exc
        logger.warning("Cache %s is unreadable (%s); converting again", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        return materialise(target, name, device, dtype, build, progress)


def load_cached(
    target: Path, name: str, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformer:
    """Build the ``HookedTransformer`` of the cache folder ``target``, without verifying it.

    Raises:
        UnreadableCacheError: The folder does not load (missing or mismatched weights, a
            config this TransformerLens rejects); :func:`materialise` rebuilds it then.
    """
    from transformers import AutoTokenizer

    try:
        meta = json.loads((target / META).read_text())
        cfg = HookedTransformerConfig.from_dict(
            {**meta["cfg"], "model_name": name, "dtype": dtype, "device": device}
        )
        tokenizer = AutoTokenizer.from_pretrained(target / TOKENIZER, local_files_only=True)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        # mmap keeps peak memory near one copy of the weights.
        weights = torch.load(target / WEIGHTS, "cpu", weights_only=True, mmap=True)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        lost = sorted({k for k, _ in model.named_parameters()} & set(missing))
        if unexpected or lost:
            raise RuntimeError(f"missing {lost[:3]}, unexpected {unexpected[:3]}")
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RuntimeError) as exc:
        raise UnreadableCacheError(exc) from exc
    if meta.get("first_norm_scale") is not None:
        setattr(model, NORM_SCALE_ATTR, torch.tensor(meta["first_norm_scale"]))
    model.move_model_modules_to_device()
    return model.eval()
