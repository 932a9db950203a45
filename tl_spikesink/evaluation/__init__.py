"""Evaluation: loss, KL and a scan under an intervention; the decoupling experiment table."""

from tl_spikesink.evaluation.decoupling import ExperimentTable, experiment, standard_interventions
from tl_spikesink.evaluation.scoring import Evaluation, evaluate, evaluate_all

__all__ = [
    "Evaluation",
    "ExperimentTable",
    "evaluate",
    "evaluate_all",
    "experiment",
    "standard_interventions",
]
