"""tl_spikesink: find, explain and intervene on massive activations and attention sinks."""

from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.scan import ScanConfig, ScanResult, scan
from tl_spikesink.sinks import SinkStats, SinkToken
from tl_spikesink.spikes import Activation, SpikeStats, SpikeToken
from tl_spikesink.tokens import TokenRef

__version__ = "0.1.0"


def __getattr__(name: str):
    # Loading models pulls in transformers' GGUF stack; keep `import tl_spikesink` light.
    if name in ("load", "load_gguf", "MODELS", "DEFAULT_MODEL"):
        from tl_spikesink import models

        return getattr(models, name)
    raise AttributeError(f"module 'tl_spikesink' has no attribute {name!r}")


__all__ = [
    "Activation",
    "Anatomy",
    "Corpus",
    "DEFAULT_MODEL",
    "MODELS",
    "ScanConfig",
    "ScanResult",
    "SinkStats",
    "SinkToken",
    "SpikeSinkError",
    "SpikeStats",
    "SpikeToken",
    "TokenRef",
    "default_texts",
    "hook_name",
    "load",
    "load_gguf",
    "scan",
    "tokenize",
]
