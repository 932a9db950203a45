"""The model is borrowed: a scan changes no parameter and leaves no hook, even when it fails."""

import pytest
from checks import assert_untouched, state_snapshot

import tl_spikesink as ts
from tl_spikesink.probes.sinks import SinkProbe


def test_scan_leaves_model_as_found(planted, texts):
    before = state_snapshot(planted)
    ts.scan(planted, texts, progress=False)
    assert_untouched(planted, before)


def test_scan_failure_leaves_model_as_found(planted, texts, monkeypatch):
    before = state_snapshot(planted)

    def boom(self, *args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(SinkProbe, "end_batch", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        ts.scan(planted, texts, progress=False)
    assert_untouched(planted, before)


def test_users_own_hooks_survive_a_scan(planted, texts):
    calls = []
    planted.blocks[0].hook_resid_post.add_hook(lambda x, hook: calls.append(1))
    try:
        ts.scan(planted, texts[:2], progress=False)
        assert planted.blocks[0].hook_resid_post.fwd_hooks, "the scan removed the user's hook"
        assert calls  # it also kept running during the scan
    finally:
        planted.reset_hooks()
