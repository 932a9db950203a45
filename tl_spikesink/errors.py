"""The one exception type of tl_spikesink."""


class SpikeSinkError(ValueError):
    """Raised for bad input or a model that lacks what an analysis needs.

    The message always names the problem and the fix.
    """
