"""SAEs meet spikes: spike- and sink-aware masks, evaluation and training with sae-lens.

sae-lens loads only when an SAE is built or loaded, so importing this package stays light.
"""

from tl_spikesink.saes.evaluation import GROUPS, RUNS, SAEReport, sae_report
from tl_spikesink.saes.masks import TOKEN_CLASSES, SpikeRule, scan_mask
from tl_spikesink.saes.splice import bypassed, check_sae, load_sae, sae_splice
from tl_spikesink.saes.train import Activations, collect_activations, train_sae
from tl_spikesink.views.saes import compare_reports

__all__ = [
    "Activations",
    "GROUPS",
    "RUNS",
    "SAEReport",
    "SpikeRule",
    "TOKEN_CLASSES",
    "bypassed",
    "check_sae",
    "collect_activations",
    "compare_reports",
    "load_sae",
    "sae_report",
    "sae_splice",
    "scan_mask",
    "train_sae",
]
