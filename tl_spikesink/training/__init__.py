"""Train small variants yourself: the paper's ablations in miniature, on HookedTransformer models.

Names load on first use, so `import tl_spikesink` (and the CLI's parser) stays light. The
functions `train` and `ablate` share their modules' names, so they are reached as
`tl_spikesink.train` / `tl_spikesink.ablate` (or from `tl_spikesink.training.train` / `.ablate`).
"""

from importlib import import_module
from typing import Any

_NAMES = {
    "AblationRow": "ablate",
    "AblationTable": "ablate",
    "SeedStat": "ablate",
    "BigramBackcopy": "tasks",
    "NaturalText": "tasks",
    "probe_corpus": "tasks",
    "Snapshot": "train",
    "TrainConfig": "train",
    "TrainingRun": "train",
    "load_checkpoint": "train",
    "save_checkpoint": "train",
    "DynamicTanh": "variants",
    "GatedAttention": "variants",
    "PostNormBlock": "variants",
    "VARIANTS": "variants",
    "Variant": "variants",
    "build_model": "variants",
    "plot_ablation": "plots",
    "plot_emergence": "plots",
}
"""Public names and the module holding each."""


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(import_module(f"tl_spikesink.training.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'tl_spikesink.training' has no attribute {name!r}")


__all__ = sorted(_NAMES)
