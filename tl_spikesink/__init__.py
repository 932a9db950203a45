"""tl_spikesink: find, explain and intervene on massive activations and attention sinks.

The notebook verbs and the results they return live here; everything else lives in its
subpackage (``tl_spikesink.mechanism``, ``.saes``, ``.training``, ``.views``, ...). Every name
loads on first use, so ``import tl_spikesink`` costs nothing (no torch, no plotting library).

Example:
    >>> import tl_spikesink as ts  # doctest: +SKIP
    >>> model = ts.load("smollm2-135m")  # doctest: +SKIP
    >>> result = ts.scan(model)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
"""

from __future__ import annotations

from tl_spikesink.lazy import exports

__version__ = "0.1.0"

_NAMES = {
    # models and corpora
    "load": "models",
    "load_gguf": "models",
    "MODELS": "models",
    "Corpus": "corpus",
    "default_texts": "corpus",
    "tokenize": "corpus",
    "hook_name": "anatomy",
    "SpikeSinkError": "errors",
    # where the spikes and sinks are
    "scan": "probes.scan",
    "ScanConfig": "probes.scan",
    "ScanResult": "probes.scan",
    # what breaks when they are removed
    "Intervention": "interventions",
    "spike_ablation": "interventions",
    "sink_key_removal": "interventions",
    "attention_gate": "interventions",
    "norm_swap": "interventions",
    "compose": "interventions",
    "evaluate": "evaluation",
    "Evaluation": "evaluation",
    "experiment": "evaluation",
    "ExperimentTable": "evaluation",
    "streaming": "evaluation.streaming",
    # what causes them, next to the paper
    "claims": "mechanism.claims",
    "ClaimsTable": "mechanism.claims",
    "paper_row": "mechanism.paper",
    "PaperRow": "mechanism.paper",
    "super_weights": "mechanism.super_weights",
    # views
    "plot_massive_activations": "views.plots",
    "plot_sink_scores": "views.plots",
    "plot_sink_ratio": "views.plots",
    "plot_interventions": "views.plots",
    "plot_claims": "views.mechanism",
    "spike_tokens_widget": "views.widgets",
    "attention_heads_widget": "views.widgets",
    "write_html": "views.html",
}
"""Root name → the module (under tl_spikesink) that defines it."""

_SUBPACKAGES = ("distributed", "mechanism", "saes", "training", "views")
_OTHER_MODULES = (
    "anatomy",
    "cli",
    "corpus",
    "errors",
    "evaluation",
    "interventions",
    "models",
    "probes",
    "tokens",
)
"""Reachable as attributes (``ts.probes.engine``) without being root names."""

_MOVED = {
    "DEFAULT_MODEL": "models",
    "Activation": "probes.spikes",
    "Anatomy": "anatomy",
    "AblationTable": "training",
    "BigramBackcopy": "training",
    "Claim": "mechanism.claims",
    "NormScales": "interventions",
    "SAEReport": "saes",
    "SinkStats": "probes.sinks",
    "SinkToken": "probes.sinks",
    "SpikeRule": "saes",
    "SpikeStats": "probes.spikes",
    "SpikeToken": "probes.spikes",
    "TokenRef": "tokens",
    "TrainConfig": "training",
    "TrainingRun": "training",
    "VARIANTS": "training",
    "Variant": "training",
    "bypassed": "saes",
    "collect_activations": "saes",
    "compare_reports": "saes",
    "evaluate_distributed": "distributed",
    "load_checkpoint": "training",
    "load_table": "training",
    "norm_scales": "interventions",
    "plot_ablation": "views.training",
    "plot_alpha": "views.plots",
    "plot_attention_distance": "views.plots",
    "plot_emergence": "views.training",
    "plot_head_decomposition": "views.mechanism",
    "plot_quadratic_norms": "views.mechanism",
    "plot_quadratic_spectrum": "views.mechanism",
    "plot_representations": "views.mechanism",
    "plot_silu_regime": "views.mechanism",
    "render_html": "views.html",
    "sae_report": "saes",
    "sae_splice": "saes",
    "scan_distributed": "distributed",
    "spike_topk_widget": "views.widgets",
    "standard_interventions": "evaluation",
    "train": "training",
    "train_sae": "saes",
    "widget_props": "views.widgets",
}
"""Names the root exported before 0.2, and where they live now (DeprecationWarning on use)."""

_RENAMED = {
    "ablate": ("training", "ablation_study"),
    "sink_scores_widget": ("views.widgets", "plot_text_sink_scores"),
}
"""Old root names whose new name differs: the old one was misleading or collided."""


__getattr__ = exports(
    "tl_spikesink",
    _NAMES,
    modules=(*_SUBPACKAGES, *_OTHER_MODULES),
    renamed={**{old: (module, old) for old, module in _MOVED.items()}, **_RENAMED},
)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


__all__ = sorted([*_NAMES, *_SUBPACKAGES])
