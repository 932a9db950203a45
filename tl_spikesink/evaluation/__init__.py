"""Evaluation: loss, KL and a scan under an intervention; the decoupling experiment table.

Also the neighbours' loss tables: :func:`bos_audit` (first-token dependence),
:func:`quantization` (RTN split by token class) and :func:`streaming` (StreamingLLM).
"""

from tl_spikesink.evaluation.bos import BosAudit, bos_audit
from tl_spikesink.evaluation.decoupling import ExperimentTable, experiment, standard_interventions
from tl_spikesink.evaluation.quantization import Quantization, quantization
from tl_spikesink.evaluation.scoring import Evaluation, evaluate, evaluate_all
from tl_spikesink.evaluation.streaming import Streaming, streaming

__all__ = [
    "BosAudit",
    "Evaluation",
    "ExperimentTable",
    "Quantization",
    "Streaming",
    "bos_audit",
    "evaluate",
    "evaluate_all",
    "experiment",
    "quantization",
    "standard_interventions",
    "streaming",
]
