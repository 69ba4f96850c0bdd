"""Seq2SeqTransformer: cached decoding equals uncached, beam search (beam 1 = greedy,
wider beams never score worse), padding; TimeSeriesTransformer: causality and rollout."""

import pytest
import torch

from fastformer.ops.decode_attention import use_decode_backend

from fastformer.models import Seq2SeqConfig, Seq2SeqTransformer, TimeSeriesTransformer
from fastformer.models.timeseries import make_windows, persistence_forecast


@pytest.fixture(autouse=True)
def _decode_in_torch():
    """Decoding here runs decode_attention's PyTorch path: the Triton kernel under the
    interpreter is covered by test_decode_attention.py and the GPT cache tests, and
    would make every beam-search step seconds long."""
    with use_decode_backend("torch"):
        yield


def tiny_seq2seq(**kw):
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab_size=23, tgt_vocab_size=19, d_model=32, num_heads=2, num_encoder_layers=2,
                        num_decoder_layers=2, dim_feedforward=64, dropout=0.0, max_len=40, **kw)
    return Seq2SeqTransformer(cfg).eval()


def _score(model, src, hyp):
    """Summed log-probability of hypothesis ``hyp`` (up to and including EOS)."""
    c = model.config
    tgt_in = torch.cat([torch.full((hyp.shape[0], 1), c.bos_id), hyp[:, :-1]], 1)
    with torch.no_grad():
        logp = model(src, tgt_in).log_softmax(-1).gather(-1, hyp[..., None])[..., 0]
    keep = torch.ones_like(hyp, dtype=torch.bool)
    for b in range(hyp.shape[0]):
        eos = (hyp[b] == c.eos_id).nonzero()
        if len(eos):
            keep[b, eos[0, 0] + 1:] = False
    return (logp * keep).sum(-1)


@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_greedy_equals_uncached_and_beam1(norm_first):
    model = tiny_seq2seq(norm_first=norm_first)
    src = torch.randint(3, 23, (3, 9))
    src[1, 6:] = 0  # padding
    a = model.greedy_decode(src, max_len=8)
    b = model.greedy_decode(src, max_len=8, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(model.beam_search(src, beam_size=1, max_len=8, length_penalty=0.0), a)


def test_beam_search_scores_at_least_greedy():
    model = tiny_seq2seq()
    src = torch.randint(3, 23, (4, 7))
    greedy = model.greedy_decode(src, max_len=6)
    beam = model.beam_search(src, beam_size=4, max_len=6, length_penalty=0.0)
    assert (_score(model, src, beam) >= _score(model, src, greedy) - 1e-5).all()


def test_seq2seq_loss_decreases_and_padding_is_ignored():
    model = tiny_seq2seq().train()
    src = torch.randint(3, 23, (8, 6))
    tgt = torch.randint(3, 19, (8, 5))
    tgt_in = torch.cat([torch.ones(8, 1, dtype=torch.long), tgt], 1)
    tgt_out = torch.cat([tgt, torch.full((8, 1), 2)], 1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(20):
        _, loss = model(src, tgt_in, tgt_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.6 * first
    with pytest.raises(ValueError, match="max_len"):
        model(src, torch.ones(1, 41, dtype=torch.long))


def test_timeseries_is_causal_and_forecasts():
    torch.manual_seed(0)
    model = TimeSeriesTransformer(n_features=2, window=16, d_model=32, num_heads=2, num_layers=2).eval()
    x = torch.randn(3, 16, 2)
    y = model(x)
    x2 = x.clone()
    x2[:, 10:] += 1.0
    y2 = model(x2)
    torch.testing.assert_close(y[:, :10], y2[:, :10])  # outputs before t=10 ignore later inputs
    assert not torch.allclose(y[:, 10:], y2[:, 10:])
    assert model.forecast(x, 5).shape == (3, 5, 2)
    series = torch.randn(100, 2)
    xs, ys = make_windows(series, 16, stride=4)
    assert xs.shape == ys.shape == (21, 16, 2) and torch.equal(xs[0, 1:], ys[0, :-1])
    assert persistence_forecast(x, 4).shape == (3, 4, 2)
    with pytest.raises(ValueError, match="window"):
        model(torch.randn(1, 17, 2))
