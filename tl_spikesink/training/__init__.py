"""Train small variants yourself: the paper's ablations in miniature, on HookedTransformer models.

Names load on first use, so `import tl_spikesink` (and the CLI's parser) stays light:

* ``variants``: the architectures (norm placement, gates, head dimension) and regimes;
* ``tasks``: the data (bigram-backcopy, natural text) and the fixed probe batch;
* ``runs``: :func:`train`, its config, the emergence snapshots and checkpoints;
* ``ablation``: :func:`ablation_study`, the table over variants and seeds;
* ``tables``: the paper's Tables 3–8 as variants, and :func:`compare`, our table beside theirs;
* ``healing``: :func:`heal`, surgery on a pretrained model and brief training of what it added.

Its figures (emergence curves, the table as bars) are views: :mod:`tl_spikesink.views.training`.
"""

from tl_spikesink.lazy import exports

_NAMES = {
    "AblationRow": "ablation",
    "AblationTable": "ablation",
    "ablation_study": "ablation",
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
    "HealConfig": "healing",
    "Healing": "healing",
    "heal": "healing",
    "PAPER_ROWS": "tables",
    "PaperComparison": "tables",
    "compare": "tables",
    "paper_variants": "tables",
    "DynamicTanh": "variants",
    "GatedAttention": "variants",
    "PostNormBlock": "variants",
    "VARIANTS": "variants",
    "Variant": "variants",
    "build_model": "variants",
}
"""Public names and the module holding each."""


_RENAMED = {
    "ablate": ("training.ablation", "ablation_study"),
    "plot_ablation": ("views.training", "plot_ablation"),
    "plot_emergence": ("views.training", "plot_emergence"),
}
"""Old names (``ablate`` read like an intervention; plots are views) → where they are now."""


__getattr__ = exports("tl_spikesink.training", _NAMES, renamed=_RENAMED)

__all__ = sorted(_NAMES)
