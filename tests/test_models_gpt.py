"""GPT: Hugging Face GPT-2 parity (logits under the error rule, greedy tokens), export
round trip, KV-cache generation equal to cache-free generation, sampling options, the
attention-variant options (sliding window, ALiBi, soft-cap) against the float64 explicit-mask
reference."""

import copy

import pytest
import torch

from fastformer.ops.decode_attention import use_decode_backend

from error_rule import assert_close_by_rule
from fastformer.models import GPT, GPTConfig
from fastformer.models.sampling import sample_next, warp_logits

from advertised import require_integration

transformers = require_integration("transformers")


def tiny_hf_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gpt2_logits_match_hf_under_error_rule():
    hf = tiny_hf_gpt2()
    ours = GPT.from_hf(hf).eval()
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        out = ours(ids)
    ref64 = hf_logits(copy.deepcopy(hf).double(), ids)
    assert_close_by_rule(out, ref64, hf_logits(hf, ids), "logits")


@pytest.fixture
def decode_in_torch():
    """decode_attention's PyTorch path (the interpreted kernel is slow; the cache tests cover it)."""
    with use_decode_backend("torch"):
        yield


def test_greedy_generation_matches_hf_generate(decode_in_torch):
    hf = tiny_hf_gpt2(1)
    ours = GPT.from_hf(hf).eval()
    ids = torch.randint(0, 97, (2, 7))
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    mine = ours.generate(ids, max_new_tokens=12, temperature=0.0)
    assert torch.equal(mine, theirs)


def test_to_hf_round_trip_and_local_directory(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    hf = ours.to_hf()
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    back = GPT.from_hf(str(tmp_path))
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("cfg", [
    dict(pos_embedding="learned"),
    dict(pos_embedding="rotary", n_head=4, n_kv_head=2),  # GQA through the decode kernel
    dict(pos_embedding="rotary", sliding_window=4),  # generation runs past the window
    dict(pos_embedding="alibi", n_head=4, attn_softcap=2.0),
    dict(pos_embedding="alibi", n_head=4, n_kv_head=1, sliding_window=5, attn_softcap=3.0),
], ids=["learned", "rotary_gqa", "rotary_window", "alibi_softcap", "alibi_window_softcap_gqa"])
def test_cached_greedy_generation_equals_uncached(cfg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=53, block_size=48, n_layer=2, n_head=cfg.pop("n_head", 2), n_embd=32,
                          **cfg)).eval()
    ids = torch.randint(0, 53, (2, 6))
    with_cache = model.generate(ids, 10, temperature=0.0)
    without = model.generate(ids, 10, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without)


def test_cache_prefill_then_decode_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
                          pos_embedding="rotary")).eval()
    ids = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 12)
        part = [model(ids[:, :8], cache=cache), model(ids[:, 8:10], cache=cache), model(ids[:, 10:], cache=cache)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(part, 1), full, atol=1e-5, rtol=1e-5)


VARIANT_CONFIGS = {
    "window": dict(sliding_window=3),
    "rotary_window_gqa": dict(pos_embedding="rotary", sliding_window=4, n_head=4, n_kv_head=2),
    "alibi_softcap": dict(pos_embedding="alibi", attn_softcap=1.5, n_head=4),
}


def _explicit_attention(work_dtype):
    """``fastformer.ops.attention`` written out with the explicit-mask reference, in ``work_dtype``."""
    from variant_reference import reference_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                  window_size=(-1, -1), alibi_slopes=None, softcap=0.0):
        assert attn_mask is None and dropout_p == 0.0
        out, _ = reference_attention(q.to(work_dtype), k.to(work_dtype), v.to(work_dtype), is_causal=is_causal,
                                     scale=scale, window=window_size, alibi_slopes=alibi_slopes, softcap=softcap)
        return out.to(q.dtype)

    return attention


@pytest.mark.parametrize("name", list(VARIANT_CONFIGS))
def test_variant_model_matches_explicit_float64_reference(name, monkeypatch):
    """The config options mean what they say: logits and every gradient equal the same model with
    its attention replaced by the explicit-mask reference, in float64, under the error rule
    (float32 explicit math as "PyTorch's own error")."""
    import fastformer.ops as ops

    cfg = dict(VARIANT_CONFIGS[name])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=32, n_layer=2, n_head=cfg.pop("n_head", 2), n_embd=24, **cfg))
    with torch.no_grad():  # larger scores, so that the soft-cap bites
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(6.0)
    ids, tgt = torch.randint(0, 31, (2, 13)), torch.randint(0, 31, (2, 13))
    ref64, same = copy.deepcopy(model).double(), copy.deepcopy(model)
    logits, loss = model(ids, tgt)
    loss.backward()
    real = ops.attention
    for m, work in ((ref64, torch.float64), (same, torch.float32)):
        monkeypatch.setattr(ops, "attention", _explicit_attention(work))
        _, m_loss = m(ids, tgt)
        m_loss.backward()
        monkeypatch.setattr(ops, "attention", real)
    with torch.no_grad():
        monkeypatch.setattr(ops, "attention", _explicit_attention(torch.float64))
        ref_logits = ref64(ids)
        monkeypatch.setattr(ops, "attention", _explicit_attention(torch.float32))
        same_logits = same(ids)
        monkeypatch.setattr(ops, "attention", real)
    assert_close_by_rule(logits, ref_logits, same_logits, "logits")
    for (pname, p), p64, p32 in zip(model.named_parameters(), ref64.parameters(), same.parameters()):
        assert_close_by_rule(p.grad, p64.grad, p32.grad, f"grad of {pname}")
    if "sliding_window" in cfg:  # 2 layers of window W: token 0 no longer reaches positions >= 2 (W - 1) + 1
        reach = 2 * (cfg["sliding_window"] - 1) + 1
        ids2 = ids.clone()
        ids2[:, 0] = (ids[:, 0] + 1) % 31
        with torch.no_grad():
            torch.testing.assert_close(model(ids2)[:, reach:], logits[:, reach:].detach())
            assert not torch.allclose(model(ids2)[:, 1:reach], logits[:, 1:reach].detach())


def test_variant_cache_prefill_then_decode_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          pos_embedding="alibi", sliding_window=5, attn_softcap=2.0)).eval()
    ids = torch.randint(0, 40, (3, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 14)
        part = [model(ids[:, :6], cache=cache), model(ids[:, 6:7], cache=cache), model(ids[:, 7:11], cache=cache),
                model(ids[:, 11:], cache=cache)]
    torch.testing.assert_close(torch.cat(part, 1), full, atol=1e-5, rtol=1e-5)


def test_alibi_model_has_no_position_embedding():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16, pos_embedding="alibi"))
    assert not any("wpe" in k for k in model.state_dict())
    assert model.transformer.h[0].attn.alibi_slopes is not None
    model(torch.zeros(1, 20, dtype=torch.long))  # no position table: longer than block_size is fine
    with pytest.raises(ValueError, match="GPT-2 export"):
        GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, sliding_window=4)).to_hf()


def test_variant_config_is_checked():
    with pytest.raises(ValueError, match="sliding_window"):
        GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, sliding_window=0))
    with pytest.raises(ValueError, match="sliding_window"):
        GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, sliding_window=2.5))
    with pytest.raises(ValueError, match="attn_softcap"):
        GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, attn_softcap=-1.0))
    with pytest.raises(ValueError, match="attn_softcap"):
        GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, attn_softcap=float("inf")))
    with pytest.raises(ValueError, match="pos_embedding"):
        GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, pos_embedding="sinusoidal"))


def test_eos_stops_and_pads(decode_in_torch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 20, (2, 3))
    free = model.generate(ids, 10, temperature=0.0)
    eos = int(free[0, 4])
    out = model.generate(ids, 10, temperature=0.0, eos_token_id=eos)
    assert (out[0, 4:] == eos).all()
    assert torch.equal(out[:, :5], free[:, :5])


def test_sampling_top_k_top_p(decode_in_torch):
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert torch.equal(sample_next(logits, 0.0), torch.zeros(200, dtype=torch.long))
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)
    model = GPT(GPTConfig(vocab_size=20, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    a = model.generate(torch.zeros(1, 2, dtype=torch.long), 5, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(torch.zeros(1, 2, dtype=torch.long), 5, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
@pytest.mark.parametrize("top_k", [None, 0, 3, 50])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.8, 0.95, 1.0])
def test_warpers_match_transformers(temperature, top_k, top_p):
    """Temperature, top-k and top-p keep exactly the tokens transformers' warpers keep (its order
    and arithmetic; top_p=1.0 and top_k=0 filter nothing; transformers#18976's boundary), with the
    same warped logits."""
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.cat([torch.randn(6, 40) * 3, torch.tensor([[20.0] + [0.0] * 39]),
                        torch.tensor([[0.3, 0.1, 0.1, 0.5] + [1e-9] * 36]).log()])
    expected = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = lp.TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None and top_p < 1.0:
        expected = lp.TopPLogitsWarper(top_p)(None, expected)
    ours = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours, expected)


def test_sampling_rejects_bad_arguments():
    logits = torch.randn(2, 5)
    for kw, match in (({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=match):
            sample_next(logits, **kw)
    model = GPT(GPTConfig(vocab_size=20, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with pytest.raises(ValueError, match="ids must be"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)


def test_training_loss_and_checkpointing_give_same_gradients():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_embedding="rotary")
    model = GPT(cfg)
    ckpt = copy.deepcopy(model)
    ckpt.config.use_checkpoint = True
    ids, tgt = torch.randint(0, 31, (2, 16)), torch.randint(0, 31, (2, 16))
    _, loss = model(ids, tgt)
    _, loss_c = ckpt(ids, tgt)
    loss.backward()
    loss_c.backward()
    assert torch.equal(loss, loss_c)
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pos_embedding"):
        GPT(GPTConfig(pos_embedding="absolute"))
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        model(torch.zeros(9, dtype=torch.long))


@pytest.mark.cuda
def test_gpt2_bf16_cuda_matches_hf():
    hf = tiny_hf_gpt2()
    ours = GPT.from_hf(hf).eval().cuda().to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        out = ours(ids.cuda()).float().cpu()
    ref64 = hf_logits(copy.deepcopy(hf).double(), ids)
    same = hf_logits(copy.deepcopy(hf).cuda().to(torch.bfloat16), ids.cuda()).float().cpu()
    assert_close_by_rule(out, ref64, same, "logits", atol=2e-2)
    a = ours.generate(ids[:, :8].cuda(), 24, temperature=0.0)
    b = ours.generate(ids[:, :8].cuda(), 24, temperature=0.0, use_cache=False)
    assert (a == b).float().mean() > 0.9  # bf16: the split-K sum order may flip a near-tie
