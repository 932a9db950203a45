"""tl_spikesink: find, explain and intervene on massive activations and attention sinks."""

from tl_spikesink import distributed, mechanism, saes
from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.claims import Claim, ClaimsTable, claims
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.distributed import evaluate_distributed, scan_distributed
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluate import Evaluation, evaluate
from tl_spikesink.experiment import ExperimentTable, experiment, standard_interventions
from tl_spikesink.interventions import (
    Intervention,
    attention_gate,
    compose,
    sink_key_removal,
    spike_ablation,
)
from tl_spikesink.norms import NormScales, norm_scales, norm_swap
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
from tl_spikesink.scan import ScanConfig, ScanResult, scan
from tl_spikesink.sinks import SinkStats, SinkToken
from tl_spikesink.spikes import Activation, SpikeStats, SpikeToken
from tl_spikesink.tokens import TokenRef

__version__ = "0.1.0"


_VIEWS = {
    "plot_alpha": "plots",
    "plot_attention_distance": "plots",
    "plot_interventions": "plots",
    "plot_massive_activations": "plots",
    "plot_sink_ratio": "plots",
    "plot_sink_scores": "plots",
    "plot_claims": "mechanism_plots",
    "plot_head_decomposition": "mechanism_plots",
    "plot_quadratic_norms": "mechanism_plots",
    "plot_quadratic_spectrum": "mechanism_plots",
    "plot_representations": "mechanism_plots",
    "plot_silu_regime": "mechanism_plots",
    "attention_heads_widget": "widgets",
    "sink_scores_widget": "widgets",
    "spike_tokens_widget": "widgets",
    "spike_topk_widget": "widgets",
    "widget_props": "widgets",
    "render_html": "html_report",
    "write_html": "html_report",
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
    "plot_ablation": "training.plots",
    "plot_emergence": "training.plots",
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
