"""Probes: read-only hooks that reduce a stream of batches into mergeable statistics.

The :mod:`~tl_spikesink.probes.engine` streams a corpus through a model; :mod:`spikes` and
:mod:`sinks` are the scan's two probes, :mod:`reducers` their mergeable parts, and :mod:`scan`
bundles them into one call.
"""

from tl_spikesink.probes.engine import Pass, Probe, Step, run
from tl_spikesink.probes.scan import ScanConfig, ScanResult

__all__ = ["Pass", "Probe", "ScanConfig", "ScanResult", "Step", "run"]
