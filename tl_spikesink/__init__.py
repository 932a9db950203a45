"""tl_spikesink: find, explain and intervene on massive activations and attention sinks."""

from tl_spikesink import distributed, mechanism, saes
from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.mechanism.claims import Claim, ClaimsTable, claims
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.distributed import evaluate_distributed, scan_distributed
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.scoring import Evaluation, evaluate
from tl_spikesink.evaluation.decoupling import ExperimentTable, experiment, standard_interventions
from tl_spikesink.interventions import (
    Intervention,
    attention_gate,
    compose,
    sink_key_removal,
    spike_ablation,
)
from tl_spikesink.interventions.norms import NormScales, norm_scales, norm_swap
from tl_spikesink.saes import (
    SAEReport,
    SpikeRule,
    bypassed,
    collect_activations,
    compare_reports,
    sae_report,
    sae_splice,
    train_sae,
)
from tl_spikesink.probes.scan import ScanConfig, ScanResult, scan
from tl_spikesink.probes.sinks import SinkStats, SinkToken
from tl_spikesink.probes.spikes import Activation, SpikeStats, SpikeToken
from tl_spikesink.tokens import TokenRef

__version__ = "0.1.0"


_VIEWS = {
    "plot_alpha": "views.plots",
    "plot_attention_distance": "views.plots",
    "plot_interventions": "views.plots",
    "plot_massive_activations": "views.plots",
    "plot_sink_ratio": "views.plots",
    "plot_sink_scores": "views.plots",
    "plot_claims": "views.mechanism",
    "plot_head_decomposition": "views.mechanism",
    "plot_quadratic_norms": "views.mechanism",
    "plot_quadratic_spectrum": "views.mechanism",
    "plot_representations": "views.mechanism",
    "plot_silu_regime": "views.mechanism",
    "attention_heads_widget": "views.widgets",
    "sink_scores_widget": "views.widgets",
    "spike_tokens_widget": "views.widgets",
    "spike_topk_widget": "views.widgets",
    "widget_props": "views.widgets",
    "render_html": "views.html",
    "write_html": "views.html",
}
"""Views and the module holding each; plotly and CircuitsVis load on first use, not on import."""

_TRAINING = {
    "AblationTable": "training.ablation",
    "ablate": "training.ablation",
    "load_table": "training.ablation",
    "TrainConfig": "training.runs",
    "TrainingRun": "training.runs",
    "load_checkpoint": "training.runs",
    "train": "training.runs",
    "BigramBackcopy": "training.tasks",
    "VARIANTS": "training.variants",
    "Variant": "training.variants",
    "plot_ablation": "views.training",
    "plot_emergence": "views.training",
}
"""Training small variants (tl_spikesink.training); TransformerLens loads on first use."""

_LAZY = {**_VIEWS, **_TRAINING}


def __getattr__(name: str):
    # Loading models pulls in transformers' GGUF stack; keep `import tl_spikesink` light.
    if name in ("load", "load_gguf", "MODELS", "DEFAULT_MODEL"):
        from tl_spikesink import models

        return getattr(models, name)
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"tl_spikesink.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tl_spikesink' has no attribute {name!r}")


__all__ = [
    "AblationTable",
    "Activation",
    "Anatomy",
    "BigramBackcopy",
    "Claim",
    "ClaimsTable",
    "Corpus",
    "DEFAULT_MODEL",
    "Evaluation",
    "ExperimentTable",
    "Intervention",
    "MODELS",
    "NormScales",
    "SAEReport",
    "ScanConfig",
    "ScanResult",
    "SinkStats",
    "SinkToken",
    "SpikeRule",
    "SpikeSinkError",
    "SpikeStats",
    "SpikeToken",
    "TokenRef",
    "TrainConfig",
    "TrainingRun",
    "VARIANTS",
    "Variant",
    "ablate",
    "attention_gate",
    "attention_heads_widget",
    "bypassed",
    "claims",
    "collect_activations",
    "compare_reports",
    "compose",
    "default_texts",
    "distributed",
    "evaluate",
    "evaluate_distributed",
    "experiment",
    "hook_name",
    "load",
    "load_checkpoint",
    "load_gguf",
    "load_table",
    "mechanism",
    "norm_scales",
    "norm_swap",
    "plot_ablation",
    "plot_alpha",
    "plot_attention_distance",
    "plot_claims",
    "plot_emergence",
    "plot_head_decomposition",
    "plot_interventions",
    "plot_massive_activations",
    "plot_quadratic_norms",
    "plot_quadratic_spectrum",
    "plot_representations",
    "plot_silu_regime",
    "plot_sink_ratio",
    "plot_sink_scores",
    "render_html",
    "sae_report",
    "sae_splice",
    "saes",
    "scan",
    "scan_distributed",
    "sink_key_removal",
    "sink_scores_widget",
    "spike_ablation",
    "spike_tokens_widget",
    "spike_topk_widget",
    "standard_interventions",
    "tokenize",
    "train",
    "train_sae",
    "widget_props",
    "write_html",
]
