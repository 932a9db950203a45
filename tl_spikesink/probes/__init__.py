"""Probes: read-only hooks that reduce a stream of batches into mergeable statistics.

The :mod:`~tl_spikesink.probes.engine` streams a corpus through a model; :mod:`spikes` and
:mod:`sinks` are the scan's two probes, :mod:`reducers` their mergeable parts, and :mod:`scan`
bundles them into one call, with :mod:`kurtosis` (OSP's excess kurtosis) as the scan's third
probe. :mod:`detectors` applies other outlier rules (MAD, layer persistence) to a scan.
"""

from tl_spikesink.probes.detectors import check_sink_logits, compare_detectors, detect
from tl_spikesink.probes.engine import Pass, Probe, Step, run
from tl_spikesink.probes.kurtosis import ExcessKurtosis, excess_kurtosis
from tl_spikesink.probes.scan import ScanConfig, ScanResult

__all__ = [
    "ExcessKurtosis",
    "Pass",
    "Probe",
    "ScanConfig",
    "ScanResult",
    "Step",
    "check_sink_logits",
    "compare_detectors",
    "detect",
    "excess_kurtosis",
    "run",
]
