"""tl_spikesink: find, explain and intervene on massive activations and attention sinks."""

from tl_spikesink import mechanism
from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.claims import Claim, ClaimsTable, claims
from tl_spikesink.corpus import Corpus, default_texts, tokenize
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
from tl_spikesink.scan import ScanConfig, ScanResult, scan
from tl_spikesink.sinks import SinkStats, SinkToken
from tl_spikesink.spikes import Activation, SpikeStats, SpikeToken
from tl_spikesink.tokens import TokenRef

__version__ = "0.1.0"


_VIEWS = {
    "plot_alpha": "plots",
    "plot_attention_distance": "plots",
    "plot_massive_activations": "plots",
    "plot_sink_ratio": "plots",
    "plot_sink_scores": "plots",
    "attention_heads_widget": "widgets",
    "sink_scores_widget": "widgets",
    "spike_tokens_widget": "widgets",
    "spike_topk_widget": "widgets",
    "widget_props": "widgets",
    "render_html": "html_report",
    "write_html": "html_report",
}
"""Views and the module holding each; plotly and CircuitsVis load on first use, not on import."""


def __getattr__(name: str):
    # Loading models pulls in transformers' GGUF stack; keep `import tl_spikesink` light.
    if name in ("load", "load_gguf", "MODELS", "DEFAULT_MODEL"):
        from tl_spikesink import models

        return getattr(models, name)
    if name in _VIEWS:
        from importlib import import_module

        return getattr(import_module(f"tl_spikesink.{_VIEWS[name]}"), name)
    raise AttributeError(f"module 'tl_spikesink' has no attribute {name!r}")


__all__ = [
    "Activation",
    "Claim",
    "ClaimsTable",
    "Anatomy",
    "Corpus",
    "DEFAULT_MODEL",
    "Evaluation",
    "ExperimentTable",
    "Intervention",
    "MODELS",
    "NormScales",
    "ScanConfig",
    "ScanResult",
    "SinkStats",
    "SinkToken",
    "SpikeSinkError",
    "SpikeStats",
    "SpikeToken",
    "TokenRef",
    "attention_gate",
    "attention_heads_widget",
    "claims",
    "compose",
    "default_texts",
    "evaluate",
    "experiment",
    "hook_name",
    "load",
    "load_gguf",
    "mechanism",
    "norm_scales",
    "norm_swap",
    "plot_alpha",
    "plot_attention_distance",
    "plot_massive_activations",
    "plot_sink_ratio",
    "plot_sink_scores",
    "render_html",
    "scan",
    "sink_key_removal",
    "sink_scores_widget",
    "spike_ablation",
    "spike_tokens_widget",
    "spike_topk_widget",
    "standard_interventions",
    "tokenize",
    "widget_props",
    "write_html",
]
