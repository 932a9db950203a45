"""The engine: every real token reaches a probe once, pads never; hooks always come off."""

from collections import Counter

import pytest
import torch
from checks import assert_untouched, state_snapshot

from tl_spikesink.anatomy import hook_name
from tl_spikesink.corpus import tokenize
from tl_spikesink.probes.engine import Pass, Probe, Step, run


class Seen(Probe):
    """The token ids a hook sees at real positions, and how many batches and logits arrived."""

    def __init__(self, name="blocks.0.hook_resid_post", needs_logits=False):
        self.name, self.ids, self.rows, self.logits = name, Counter(), 0, []
        self.needs_logits = needs_logits

    def hooks(self):
        return [(self.name, self._hook)]

    def start_batch(self, step: Step):
        self.step = step

    def _hook(self, act, hook):
        real = self.step.mask
        self.rows += int(real.sum())
        assert act[real].shape[0] == int(real.sum())
        self.ids.update(self.step.tokens[real].tolist())

    def end_batch(self, step, logits):
        self.logits.append(logits)


@pytest.fixture(scope="module")
def corpus(planted, texts):
    # Texts of different lengths, so batches carry pads.
    return tokenize(planted, texts[:7])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_real_token_once_pads_never(planted, corpus, side, batch_size):
    probe = Seen()
    run(planted, corpus, [probe], batch_size=batch_size, padding_side=side, progress=False)
    expected = Counter(t for c in corpus.chunks for t in c.tokens)
    assert probe.rows == corpus.n_tokens
    assert probe.ids == expected


def test_logits_only_for_probes_that_ask(planted, corpus):
    quiet, asks = Seen(), Seen(needs_logits=True)
    run(planted, corpus, passes=[Pass([quiet]), Pass([asks])], batch_size=4, progress=False)
    assert all(x is None for x in quiet.logits)
    assert all(x.shape[-1] == planted.cfg.d_vocab for x in asks.logits)


def test_a_later_pass_sees_what_its_write_hooks_wrote(planted, corpus):
    name = hook_name("resid_post", 0)
    clean, zeroed = Seen(), Seen()
    seen_values = []

    class Max(Probe):
        def hooks(self):
            return [(name, lambda act, hook: seen_values.append(float(act.abs().max())))]

    def zero(act, hook):
        return torch.zeros_like(act)

    run(
        planted,
        corpus,
        passes=[Pass([clean, Max()]), Pass([zeroed, Max()], fwd_hooks=[(name, zero)])],
        batch_size=8,
        progress=False,
    )
    assert seen_values[0] > 0 and seen_values[1] == 0
    assert clean.rows == zeroed.rows == corpus.n_tokens


def test_skip_leaves_a_pass_out(planted, corpus):
    skipped = Seen()
    run(
        planted,
        corpus,
        passes=[Pass([Seen()]), Pass([skipped], skip=lambda step: step.index == 0)],
        batch_size=4,
        progress=False,
    )
    first_batch = sum(len(c.tokens) for c in sorted(corpus.chunks, key=lambda c: -len(c.tokens))[:4])
    assert skipped.rows == corpus.n_tokens - first_batch


def test_stop_at_layer_skips_the_later_blocks(planted, corpus):
    late = Seen(hook_name("resid_post", planted.cfg.n_layers - 1))
    early = Seen(hook_name("resid_post", 0))
    run(planted, corpus, [early, late], stop_at_layer=1, progress=False)
    assert early.rows == corpus.n_tokens and late.rows == 0


@pytest.mark.parametrize("passes", [1, 2])
def test_hooks_come_off_when_a_probe_raises(planted, corpus, passes):
    before = state_snapshot(planted)

    class Boom(Probe):
        def end_batch(self, step, logits):
            raise RuntimeError("interrupted")

    def write(act, hook):
        return act * 2

    name = hook_name("resid_post", 0)
    plan = [Pass([Boom()], fwd_hooks=[(name, write)])]
    if passes == 2:
        plan = [Pass([Seen()]), *plan]
    with pytest.raises(RuntimeError, match="interrupted"):
        run(planted, corpus, passes=plan, progress=False)
    assert_untouched(planted, before)


def test_the_users_own_hooks_stay_and_still_run(planted, corpus):
    # The engine takes off only the hooks it put in, at the points it put them: a hook the user
    # added before (temporary or permanent, at a point the scan also hooks) stays, and runs.
    calls = []
    name = hook_name("resid_post", 0)
    planted.add_hook(name, lambda act, hook: calls.append("temporary"))
    planted.add_hook(name, lambda act, hook: calls.append("permanent"), is_permanent=True)
    level = planted.context_level

    class Boom(Probe):
        def end_batch(self, step, logits):
            raise RuntimeError("interrupted")

    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            run(planted, corpus, [Seen(), Boom()], progress=False)
        assert len(planted.hook_dict[name].fwd_hooks) == 2 and planted.context_level == level
        assert [n for n, hp in planted.hook_dict.items() if hp.fwd_hooks] == [name]
        calls.clear()
        planted(next(iter(corpus.batches(1))).tokens, return_type=None)
        assert calls == ["temporary", "permanent"]
    finally:
        planted.reset_hooks(including_permanent=True)


def test_a_batch_without_pads_goes_in_without_its_mask(planted, corpus, monkeypatch):
    from tl_spikesink.probes import engine
    from tl_spikesink.probes.scan import scan

    masks = []
    forward = planted.forward

    def spy(tokens, attention_mask=None, **kwargs):
        masks.append(attention_mask)
        return forward(tokens, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(planted, "forward", spy)
    dropped = scan(planted, corpus, batch_size=3, progress=False)
    padded = [not bool(b.mask.all()) for b in corpus.batches(3)]
    assert len(masks) == len(padded) and any(padded) and not all(padded)
    assert [m is None for m in masks] == [not p for p in padded]
    # The same numbers as with the mask: TransformerLens only combines it with the causal one.
    monkeypatch.setattr(engine, "_may_drop_mask", lambda model: False)
    kept = scan(planted, corpus, batch_size=3, progress=False)
    assert kept.to_dict() == dropped.to_dict()


def test_the_mask_stays_where_the_model_would_make_one_up(planted, monkeypatch):
    from tl_spikesink.probes.engine import _may_drop_mask

    assert _may_drop_mask(planted)
    monkeypatch.setattr(planted.tokenizer, "padding_side", "left")  # it infers pads from ids
    assert not _may_drop_mask(planted)
