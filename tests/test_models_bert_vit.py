"""BERT and ViT against Hugging Face transformers (hidden states / logits under the
error rule, with the float64 HF model as reference), export round trips, padding
masks, ViT position-embedding resampling and timm-style options."""

import copy

import pytest
import torch

from error_rule import assert_close_by_rule
from fastformer.models import BERT, BERTConfig, ViT

from advertised import require_integration

transformers = require_integration("transformers")


def tiny_hf_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg).eval()


def tiny_hf_vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=7,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg).eval()


def test_bert_hidden_states_and_mlm_logits_match_hf_with_padding():
    hf = tiny_hf_bert()
    ours = BERT.from_hf(hf).eval()
    ids = torch.randint(1, 101, (3, 19))
    types = torch.randint(0, 2, (3, 19))
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        out = ours(ids, types, mask)
        hf64 = copy.deepcopy(hf).double()
        ref = hf64(ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        same = hf(ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()  # padded positions' states are unspecified by the padding contract
    assert_close_by_rule(out.last_hidden_state[keep], ref.hidden_states[-1][keep], same.hidden_states[-1][keep], "hidden")
    assert_close_by_rule(out.logits[keep], ref.logits[keep], same.logits[keep], "mlm logits")


def test_from_hf_returns_eval_mode(tmp_path):
    """As transformers' from_pretrained: BERT's dropout (0.1 here) must not make a freshly loaded
    model's outputs random."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    hf = transformers.BertModel(cfg)  # left in training mode on purpose
    hf.save_pretrained(tmp_path)
    ids = torch.randint(1, 50, (2, 11))
    for ours in (BERT.from_hf(hf), BERT.from_hf(str(tmp_path)), ViT.from_hf(tiny_hf_vit())):
        assert not ours.training and not any(m.training for m in ours.modules())
    bert = BERT.from_hf(hf)
    with torch.no_grad():
        torch.testing.assert_close(bert(ids).last_hidden_state, bert(ids).last_hidden_state, atol=0, rtol=0)


def test_bert_too_long_input_names_the_limit():
    hf = tiny_hf_bert()
    ours = BERT.from_hf(hf)
    n = hf.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"input_ids has {n + 1} positions, more than max_position_embeddings"):
        ours(torch.randint(1, 50, (1, n + 1)))


def test_bert_pooler_matches_hf_bert_model_and_export_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    hf = transformers.BertModel(cfg).eval()
    ours = BERT.from_hf(hf).eval()
    assert ours.mlm_head is None and ours.pooler is not None
    ids = torch.randint(1, 50, (2, 11))
    with torch.no_grad():
        out = ours(ids)
        ref = copy.deepcopy(hf).double()(ids)
        same = hf(ids)
    assert_close_by_rule(out.pooler_output, ref.pooler_output, same.pooler_output, "pooled")
    back = ours.to_hf()
    back.save_pretrained(tmp_path)
    again = BERT.from_hf(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, out.last_hidden_state)


def test_bert_mlm_loss_trains():
    torch.manual_seed(0)
    model = BERT(BERTConfig(vocab_size=30, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            max_position_embeddings=16, dropout=0.0, attention_dropout=0.0))
    ids = torch.randint(1, 30, (4, 12))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_vit_logits_match_hf_and_round_trip():
    hf = tiny_hf_vit()
    ours = ViT.from_hf(hf).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = ours(x)
        ref = copy.deepcopy(hf).double()(x.double()).logits
        same = hf(x).logits
    assert_close_by_rule(out, ref, same, "logits")
    with torch.no_grad():
        torch.testing.assert_close(ours.to_hf()(x).logits, out, atol=1e-5, rtol=1e-5)


def test_vit_options_and_resampled_positions():
    torch.manual_seed(0)
    m = ViT(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=1, num_heads=2,
            global_pool="avg", class_token=False, qkv_bias=False).eval()
    assert m.pos_embed.shape == (1, 16, 32) and m.blocks[0].attn.qkv.bias is None
    assert isinstance(m.norm, torch.nn.Identity)  # avg pooling normalises after pooling, as timm
    with torch.no_grad():
        assert m(torch.randn(2, 1, 16, 16)).shape == (2, 5)
        assert m(torch.randn(2, 1, 24, 32)).shape == (2, 5)  # positions resampled on the fly
        y = m(torch.randn(1, 1, 16, 16))
    m.set_img_size(32)
    assert m.pos_embed.shape == (1, 64, 32) and m.grid == (8, 8)
    feats = ViT(img_size=8, patch_size=2, num_classes=0, embed_dim=16, depth=1, num_heads=2)(torch.randn(2, 3, 8, 8))
    assert feats.shape == (2, 16)
    with pytest.raises(ValueError, match="global_pool"):
        ViT(global_pool="max")
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 1, 15, 16))
    assert torch.isfinite(y).all()


def test_vit_loads_timm_state_dict_names():
    timm = require_integration("timm")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    ours = ViT(img_size=32, patch_size=16, num_classes=10, embed_dim=192, depth=12, num_heads=3).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_bert_and_vit_bf16_cuda():
    hf = tiny_hf_bert()
    ours = BERT.from_hf(hf).eval().cuda().to(torch.bfloat16)
    ids = torch.randint(1, 101, (2, 33))
    with torch.no_grad():
        out = ours(ids.cuda()).last_hidden_state.float().cpu()
        ref = copy.deepcopy(hf).double()(ids, output_hidden_states=True).hidden_states[-1]
        same = copy.deepcopy(hf).cuda().to(torch.bfloat16)(ids.cuda(), output_hidden_states=True).hidden_states[-1]
    assert_close_by_rule(out, ref, same.float().cpu(), "bert hidden", atol=3e-2)
    hfv = tiny_hf_vit()
    vit = ViT.from_hf(hfv).eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = vit(x.cuda().bfloat16()).float().cpu()
        ref = copy.deepcopy(hfv).double()(x.double()).logits
        same = copy.deepcopy(hfv).cuda().to(torch.bfloat16)(x.cuda().bfloat16()).logits.float().cpu()
    assert_close_by_rule(out, ref, same, "vit logits", atol=3e-2)


def test_vit_loads_transformers4_checkpoint_names(tmp_path):
    """A directory saved by transformers 4 ("encoder.layer.0.attention.attention.query") loads too."""
    import json

    from safetensors.torch import save_file

    from fastformer.models.hf_convert import _vit_to_old_names

    hf = tiny_hf_vit()
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    old = _vit_to_old_names({k: v.contiguous() for k, v in hf.state_dict().items()})
    assert any(".attention.attention.query." in k for k in old)
    save_file(old, str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ViT.from_hf(str(tmp_path)).eval()(x), ViT.from_hf(hf).eval()(x))


def test_feed_forward_width_is_the_configured_one():
    """intermediate_size / dim_feedforward reach the MLP as given: as a ratio through timm's
    int(dim * ratio) rule, 30 / 22 * 22 = 29.99... built a 29-wide layer that no checkpoint of
    the configured width would load into (found reviewing the forward docstrings)."""
    from fastformer.models import BERT, BERTConfig
    from fastformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    bert = BERT(BERTConfig(vocab_size=50, hidden_size=22, intermediate_size=30, num_heads=2, num_layers=1))
    assert tuple(bert.layers[0].mlp.fc1.weight.shape) == (30, 22)
    s2s = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=22, num_heads=2,
                                           num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=30))
    widths = {tuple(p.shape) for n, p in s2s.named_parameters() if n.endswith("fc1.weight")}
    assert widths == {(30, 22)}
