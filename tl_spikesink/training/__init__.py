"""Train small variants yourself: the paper's ablations in miniature, on HookedTransformer models.

Names load on first use, so `import tl_spikesink` (and the CLI's parser) stays light:

* ``variants``: the architectures (norm placement, gates, head dimension) and regimes;
* ``tasks``: the data (bigram-backcopy, natural text) and the fixed probe batch;
* ``runs``: :func:`train`, its config, the emergence snapshots and checkpoints;
* ``ablation``: :func:`ablate`, the table over variants and seeds;
* ``plots``: emergence curves and the table as bars.
"""

from importlib import import_module
from typing import Any

_NAMES = {
    "AblationRow": "ablation",
    "AblationTable": "ablation",
    "ablate": "ablation",
    "load_table": "ablation",
    "SeedStat": "ablation",
    "BigramBackcopy": "tasks",
    "NaturalText": "tasks",
    "probe_corpus": "tasks",
    "Snapshot": "runs",
    "TrainConfig": "runs",
    "TrainingRun": "runs",
    "train": "runs",
    "load_checkpoint": "runs",
    "save_checkpoint": "runs",
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
