"""Interventions: write hooks that remove spikes, sink keys or swap norms, always removed again.

A factory returns an :class:`Intervention` (named ``(hook_name, fn)`` pairs); ``iv.applied(model)``
installs them for a ``with`` block and removes them on exit, also on error.
"""

from tl_spikesink.interventions.attention import (
    attention_gate,
    sink_key_removal,
    window_attention,
)
from tl_spikesink.interventions.base import Intervention, compose
from tl_spikesink.interventions.norms import NormScales, norm_scales, norm_swap
from tl_spikesink.interventions.quantize import activation_quantization, weight_rtn
from tl_spikesink.interventions.spikes import spike_ablation
from tl_spikesink.interventions.weights import super_weight_edit

__all__ = [
    "Intervention",
    "NormScales",
    "activation_quantization",
    "attention_gate",
    "compose",
    "norm_scales",
    "norm_swap",
    "sink_key_removal",
    "spike_ablation",
    "super_weight_edit",
    "weight_rtn",
    "window_attention",
]
