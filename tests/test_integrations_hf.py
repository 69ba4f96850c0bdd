"""Hugging Face: attn_implementation="fastformer" against "eager" on small random GPT-2, BERT, ViT and Llama (GQA)."""

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
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama"])
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


def test_softcap_is_rejected():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        ff_hf.fastformer_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama"])
def test_matches_eager_bf16_cuda(name):
    test_matches_eager_fp32(name, train=True, padded=name != "vit", device="cuda", dtype=torch.bfloat16)
