"""timm: fastformer's Attention layer (timm's constructor and state_dict) and convert on timm ViTs.

The layer is checked on CPU against the math of timm's non-fused path written
out here (timm itself is often not installable next to this torch); the tests
with timm's own ``VisionTransformer`` run where timm imports (the GPU box).
"""

import pytest
import torch
from torch import nn

from fastformer.integrations.timm import Attention, convert_attention
from advertised import require_integration
from nn_parity import check_parity, single_thread

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

DIM, HEADS, B, N = 32, 4, 2, 9


class TimmMathAttention(nn.Module):
    """timm's Attention (fused_attn=False) written out: same submodules, explicit softmax."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, scale_norm=False, proj_bias=True, norm_layer=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            attn = attn + torch.full((n, n), float("-inf"), dtype=attn.dtype).triu_(1)
        elif attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))


@pytest.mark.parametrize("variant", ["plain", "qkv_bias", "qk_norm", "scale_norm", "no_proj_bias"])
@pytest.mark.parametrize("masking", ["none", "bool", "float", "causal"])
def test_attention_layer_matches_timm_math(variant, masking):
    kw = dict(qkv_bias=variant != "plain", qk_norm=variant == "qk_norm", scale_norm=variant == "scale_norm",
              proj_bias=variant != "no_proj_bias", norm_layer=nn.LayerNorm)
    ref, ours = TimmMathAttention(DIM, HEADS, **kw), Attention(DIM, HEADS, **kw)
    assert list(ref.state_dict()) == list(ours.state_dict())
    fwd = {}
    if masking == "bool":
        m = torch.rand(B, 1, N, N) > 0.3
        m[..., 0] = True
        fwd["attn_mask"] = m
    elif masking == "float":
        fwd["attn_mask"] = torch.randn(B, HEADS, N, N)
    elif masking == "causal":
        fwd["is_causal"] = True
    check_parity(ref, ours, [torch.randn(B, N, DIM, requires_grad=True)], fwd)


def test_convert_attention_shares_submodules():
    ref = TimmMathAttention(DIM, HEADS, qkv_bias=True)
    new = convert_attention(ref)
    assert new.qkv is ref.qkv and new.proj is ref.proj
    x = torch.randn(B, N, DIM)
    torch.testing.assert_close(new(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(DIM, HEADS, qk_norm=True)
    with pytest.raises(TypeError, match="unsupported"):
        Attention(DIM, HEADS, rope=True)
    Attention(DIM, HEADS, fused_attn=None)  # neutral extra arguments are tolerated


# ----------------------------------------------------------------------------- with timm itself


def _tiny_vit(**kw):
    timm = require_integration("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return timm, VisionTransformer(img_size=32, patch_size=8, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=5, **kw)


def test_timm_vit_attn_layer():
    timm, model = _tiny_vit()
    try:
        ours = _tiny_vit(attn_layer=Attention)[1]
    except TypeError as exc:  # older timm without attn_layer
        pytest.skip(f"this timm's VisionTransformer takes no attn_layer: {exc}")
    ours.load_state_dict(model.state_dict())
    check_parity(model, ours, [torch.randn(2, 3, 32, 32, requires_grad=True)], train=False)


def test_convert_timm_vit():
    import fastformer

    timm, model = _tiny_vit()
    model.eval()
    new, report = fastformer.convert(model)
    assert sum(isinstance(m, Attention) for m in new.modules()) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_timm_vit_bf16_cuda():
    timm, model = _tiny_vit()
    import fastformer

    model = model.cuda()
    new, _ = fastformer.convert(model)
    check_parity(model, new, [torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)], dtype=torch.bfloat16)
