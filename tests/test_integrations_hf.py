"""Hugging Face: attn_implementation="fastformer" against "eager" on small random GPT-2, BERT, ViT, Llama (GQA),
Mistral (sliding window) and Gemma 2 (sliding window + logit soft-cap)."""

import copy

import pytest
import torch

from advertised import require_integration

transformers = require_integration("transformers")

import fastformer.integrations.hf as ff_hf  # noqa: E402
from error_rule import assert_close_by_rule  # noqa: E402
from nn_parity import single_thread  # noqa: E402

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def _config(name):
    t = transformers
    if name == "gpt2":
        return t.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if name == "bert":
        return t.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=97,
                            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "vit":
        return t.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=32,
                           patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "llama":
        return t.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, vocab_size=97, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    if name == "mistral":  # a window shorter than the sequences, so it matters
        return t.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, vocab_size=97, max_position_embeddings=64, sliding_window=4,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "gemma2":  # layer 0 sliding (window 4), layer 1 global; soft-cap 5 (the scores reach it)
        return t.Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, intermediate_size=64, vocab_size=97, max_position_embeddings=64,
                              sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=None,
                              query_pre_attn_scalar=8, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                              attention_dropout=0.0)
    raise ValueError(name)


def _inputs(name, device, padded: bool):
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 32, 32, device=device))
    ids = torch.randint(0, 97, (2, 11), device=device)
    kw = dict(input_ids=ids)
    if padded:
        mask = torch.ones(2, 11, dtype=torch.long, device=device)
        mask[1, 8:] = 0  # right padding on the second sequence
        kw["attention_mask"] = mask
    return kw


def _models(name, device, dtype):
    ff_hf.register()
    cfg = _config(name)
    torch.manual_seed(0)
    eager = transformers.AutoModel.from_config(cfg, attn_implementation="eager").to(device)
    ours = transformers.AutoModel.from_config(cfg, attn_implementation="fastformer").to(device)
    assert ours.config._attn_implementation == "fastformer"
    ours.load_state_dict(eager.state_dict())
    ref = copy.deepcopy(eager).double()
    return ref, eager.to(dtype), ours.to(dtype)


def _run(model, kw, dtype):
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
    out = model(**kw).last_hidden_state
    return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama", "mistral", "gemma2"])
def test_matches_eager_fp32(name, train, padded, device="cpu", dtype=torch.float32):
    if name == "vit" and padded:
        pytest.skip("ViT takes no attention mask")
    ref, eager, ours = _models(name, device, dtype)
    for m in (ref, eager, ours):
        m.train(train)
    kw = _inputs(name, device, padded)
    outs = {}
    for key, m, dt in (("ref", ref, torch.float64), ("eager", eager, dtype), ("ours", ours, dtype)):
        out = _run(m, kw, dt)
        out.backward(torch.ones_like(out) / out.numel() * 1e3)
        outs[key] = out
    keep = (slice(None),) if not padded else (kw["attention_mask"].bool(),)  # padded rows are not compared
    assert_close_by_rule(outs["ours"][keep], outs["ref"][keep], outs["eager"][keep])
    grads = {k: dict(m.named_parameters()) for k, m in (("ref", ref), ("eager", eager), ("ours", ours))}
    for pname, p in grads["ours"].items():
        if grads["ref"][pname].grad is None:
            continue
        assert_close_by_rule(p.grad, grads["ref"][pname].grad, grads["eager"][pname].grad, name=f"grad of {pname}")


def test_causal_masking_is_not_lost():
    """Changing a later token must not change earlier outputs (the mask interface is registered)."""
    _, _, ours = _models("gpt2", "cpu", torch.float32)
    ours.eval()
    ids = torch.randint(0, 97, (1, 9))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 97
    with torch.no_grad():
        a, b = ours(input_ids=ids).last_hidden_state, ours(input_ids=ids2).last_hidden_state
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_generate_with_kv_cache_matches_eager():
    ff_hf.register()
    cfg = _config("gpt2")
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    ours = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="fastformer").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        a = eager.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_window_generation_matches_eager(name):
    """Cached greedy generation well past the window: the same tokens as eager."""
    ff_hf.register()
    cfg = _config(name)
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastformer").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        a = eager.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        b = ours.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_window_runs_natively_without_a_dense_mask(name):
    """Sliding-window layers get no dense mask (the kernels' window runs), yet changing a token
    outside the window of later ones changes nothing there; the soft-cap reaches the kernels."""
    ff_hf.register()
    cfg = _config(name)
    seen = []
    original = ff_hf.fastformer_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs.get("sliding_window"), attention_mask, kwargs.get("softcap")))
        return original(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register(ff_hf.NAME, spy)
    try:
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(cfg, attn_implementation="fastformer").eval()
        ids = torch.randint(1, 97, (1, 12))
        with torch.no_grad():
            a = model(input_ids=ids).last_hidden_state
    finally:
        ff_hf.register()
    windowed = [mask for window, mask, _ in seen if window is not None]
    assert windowed and all(m is None for m in windowed), "a dense mask was built for the sliding window"
    if name == "gemma2":
        assert all(cap == 5.0 for _, _, cap in seen)
        return  # its global layer sees everything
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():
        b = model(input_ids=ids2).last_hidden_state
    # Two layers of window 4: position 0 reaches at most position 6.
    torch.testing.assert_close(a[:, 7:], b[:, 7:])
    assert not torch.allclose(a[:, 1:4], b[:, 1:4])


def test_padding_keeps_the_dense_sliding_window_mask():
    ff_hf.register()
    from transformers.masking_utils import sliding_window_causal_mask_function

    mask = torch.ones(2, 9, dtype=torch.bool)  # transformers hands the builder a bool padding mask
    mask[1, :3] = False
    kw = dict(batch_size=2, q_length=9, kv_length=9, mask_function=sliding_window_causal_mask_function(4),
              local_size=4, allow_is_causal_skip=True)
    assert ff_hf.fastformer_mask(attention_mask=torch.ones(2, 9, dtype=torch.bool), **kw) is None
    dense = ff_hf.fastformer_mask(attention_mask=mask, **kw)
    assert dense is not None and dense.dtype == torch.bool
    assert not bool(dense[1, 0, 5, 0]) and not bool(dense[0, 0, 5, 1]) and bool(dense[0, 0, 5, 2])
    # Queries that are not the last keys (a chunk in the middle of a longer cache) keep the dense mask.
    assert ff_hf.fastformer_mask(batch_size=1, q_length=3, kv_length=9, q_offset=2,
                                 mask_function=sliding_window_causal_mask_function(4), local_size=4) is not None


def test_chunked_attention_keeps_its_dense_mask():
    """Llama 4's chunked attention also passes a local_size: it is no sliding window, so the
    builder must not leave its mask out."""
    ff_hf.register()
    from transformers.masking_utils import chunked_causal_mask_function, sdpa_mask

    kw = dict(batch_size=1, q_length=9, kv_length=9, local_size=4, allow_is_causal_skip=True,
              mask_function=chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)))
    ours = ff_hf.fastformer_mask(**kw)
    assert ours is not None and torch.equal(ours, sdpa_mask(**kw))
    assert not bool(ours[0, 0, 4, 3])  # position 4 starts a new chunk


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama", "mistral", "gemma2"])
def test_matches_eager_bf16_cuda(name):
    test_matches_eager_fp32(name, train=True, padded=name != "vit", device="cuda", dtype=torch.bfloat16)
