"""Hugging Face ⇄ fastformer weight conversion for GPT-2, BERT and ViT.

``load_hf`` reads a transformers model object or a local directory
(``config.json`` + ``*.safetensors``, or ``pytorch_model.bin``) without any
network access; the ``*_from_hf`` functions map the config and rename / fuse /
transpose the weights; the ``*_to_hf`` functions go back to a transformers
model (transformers needed only there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import Tensor

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def load_hf(model_or_path) -> Tuple[dict, Dict[str, Tensor]]:
    """``(config dict, state dict)`` of a transformers model object or a local directory."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json (a local Hugging Face model directory is needed; "
                                    "nothing is downloaded)")
        config = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors"))
        state: Dict[str, Tensor] = {}
        if files:
            from safetensors.torch import load_file

            for f in files:
                state.update(load_file(str(f)))
        elif (path / "pytorch_model.bin").is_file():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path} holds no *.safetensors or pytorch_model.bin weights")
        return config, state
    if hasattr(model_or_path, "config") and hasattr(model_or_path, "state_dict"):
        return model_or_path.config.to_dict(), model_or_path.state_dict()
    raise TypeError(f"model_or_path must be a transformers model or a directory path, got {type(model_or_path).__name__}")


def _strip(state: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _act(config: dict, key: str) -> str:
    name = config.get(key, "gelu")
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported Hugging Face activation {name!r}")
    return _ACTIVATIONS[name]


def _load_into(model, state: Dict[str, Tensor]):
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights appear once in the converted dict
    missing = [k for k in missing if k not in ("lm_head.weight", "mlm_head.decoder.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
    # In eval mode, as transformers' from_pretrained returns it (BERT's dropout would otherwise
    # make every forward random until the caller remembered .eval()).
    return model.eval()


# ----------------------------------------------------------------------------- GPT-2

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_from_hf(cls, model_or_path, **overrides):
    GPTConfig = cls.config_class  # from the model class: this module imports no model (no cycle)
    hf, state = load_hf(model_or_path)
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("only GPT-2's standard 1/sqrt(head_dim) attention scaling is supported")
    n_embd = hf["n_embd"]
    config = GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=n_embd, mlp_ratio=(hf.get("n_inner") or 4 * n_embd) / n_embd, dropout=0.0, bias=True,
        pos_embedding="learned", tie_embeddings=hf.get("tie_word_embeddings", True),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_act(hf, "activation_function"),
    )
    for k, v in overrides.items():
        setattr(config, k, v)
    state = _strip(state, "transformer.")
    ours = {}
    for k, v in state.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if k.endswith(_CONV1D):
            v = v.t()  # GPT-2's Conv1D stores (in, out)
        if k == "lm_head.weight":
            if config.tie_embeddings:
                continue
            ours[k] = v
        else:
            ours["transformer." + k] = v
    return _load_into(cls(config), ours)


def gpt2_to_hf(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if c.pos_embedding != "learned" or (c.n_kv_head or c.n_head) != c.n_head or not c.bias:
        raise ValueError("GPT-2 export needs learned positions, full multi-head attention and biases")
    if c.sliding_window is not None or c.attn_softcap:
        raise ValueError("GPT-2 export needs full attention: GPT2Config has no sliding_window or attn_softcap")
    inverse = {v: k for k, v in _ACTIVATIONS.items() if k in ("gelu_new", "gelu", "relu", "silu")}
    hf = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                    n_head=c.n_head, n_inner=int(c.mlp_ratio * c.n_embd), activation_function=inverse[c.activation],
                    layer_norm_epsilon=c.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    tie_word_embeddings=c.tie_embeddings)
    if c.vocab_size <= 50256:  # GPT-2's <|endoftext|> id would lie outside a smaller vocabulary
        hf.bos_token_id = hf.eos_token_id = None
    out = GPT2LMHeadModel(hf)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if k.endswith(_CONV1D):
            v = v.t().contiguous()
        state[k] = v
    out.load_state_dict(state, strict=False)
    return out.eval()


# ----------------------------------------------------------------------------- BERT

def _bert_layer_map(i: int):
    hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
    return [
        (hf + "attention.output.dense", ours + "attn.proj"),
        (hf + "attention.output.LayerNorm", ours + "norm1"),
        (hf + "intermediate.dense", ours + "mlp.fc1"),
        (hf + "output.dense", ours + "mlp.fc2"),
        (hf + "output.LayerNorm", ours + "norm2"),
    ]


_BERT_FIXED = [
    ("embeddings.word_embeddings", "embeddings.word_embeddings"),
    ("embeddings.position_embeddings", "embeddings.position_embeddings"),
    ("embeddings.token_type_embeddings", "embeddings.token_type_embeddings"),
    ("embeddings.LayerNorm", "embeddings.norm"),
    ("pooler.dense", "pooler"),
    ("cls.predictions.transform.dense", "mlm_head.dense"),
    ("cls.predictions.transform.LayerNorm", "mlm_head.norm"),
]


def bert_from_hf(cls, model_or_path, **overrides):
    BERTConfig = cls.config_class
    hf, state = load_hf(model_or_path)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    state = _strip(state, "bert.")
    config = BERTConfig(
        vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_act(hf, "hidden_act"),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        mlm_head="cls.predictions.bias" in state, pooler="pooler.dense.weight" in state,
    )
    for k, v in overrides.items():
        setattr(config, k, v)
    pairs = list(_BERT_FIXED)
    for i in range(config.num_layers):
        pairs += _bert_layer_map(i)
    ours = {}
    for hf_name, our_name in pairs:
        for leaf in ("weight", "bias"):
            if f"{hf_name}.{leaf}" in state:
                ours[f"{our_name}.{leaf}"] = state[f"{hf_name}.{leaf}"]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}.attention.self."
        for leaf in ("weight", "bias"):
            ours[f"layers.{i}.attn.qkv.{leaf}"] = torch.cat([state[p + n + "." + leaf] for n in ("query", "key", "value")])
    if config.mlm_head:
        ours["mlm_head.bias"] = state["cls.predictions.bias"]
    return _load_into(cls(config), ours)


def bert_to_hf(model):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    c = model.config
    inverse = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
    hf = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                    num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                    hidden_act=inverse[c.activation], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
                    layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_token_id)
    with_head = c.mlm_head
    out = BertForMaskedLM(hf) if with_head else BertModel(hf, add_pooling_layer=c.pooler)
    prefix = "bert." if with_head else ""
    ours = model.state_dict()
    pairs = list(_BERT_FIXED)
    for i in range(c.num_layers):
        pairs += _bert_layer_map(i)
    state = {}
    for hf_name, our_name in pairs:
        for leaf in ("weight", "bias"):
            if f"{our_name}.{leaf}" in ours:
                key = hf_name if hf_name.startswith("cls.") else prefix + hf_name
                state[f"{key}.{leaf}"] = ours[f"{our_name}.{leaf}"]
    for i in range(c.num_layers):
        for leaf in ("weight", "bias"):
            q, k, v = ours[f"layers.{i}.attn.qkv.{leaf}"].chunk(3)
            for n, t in (("query", q), ("key", k), ("value", v)):
                state[f"{prefix}encoder.layer.{i}.attention.self.{n}.{leaf}"] = t
    if with_head:
        state["cls.predictions.bias"] = ours["mlm_head.bias"]
        state["cls.predictions.decoder.bias"] = ours["mlm_head.bias"]
    # BertForMaskedLM has no pooler, so a model with both exports without its pooler.
    missing, unexpected = out.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "decoder.weight"))]
    if missing or unexpected:
        raise ValueError(f"BERT export mismatch: missing {missing}, unexpected {unexpected}")
    return out.eval()


# ----------------------------------------------------------------------------- ViT
# transformers 5 names ViT layers "layers.{i}.attention.q_proj" / "mlp.fc1"; checkpoints
# saved by transformers 4 say "encoder.layer.{i}.attention.attention.query" /
# "intermediate.dense". Both load; export uses whatever the installed version builds.

_VIT_OLD_TO_NEW = [
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm_before", "layernorm_before"),
    ("layernorm_after", "layernorm_after"),
]


def _vit_to_new_names(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            for old, new in _VIT_OLD_TO_NEW:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            k = f"layers.{i}.{rest}"
        out[k] = v
    return out


def _vit_to_old_names(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("vit.layers."):
            i, rest = k[len("vit.layers."):].split(".", 1)
            for old, new in _VIT_OLD_TO_NEW:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            k = f"vit.encoder.layer.{i}.{rest}"
        out[k] = v
    return out


def _vit_layer_map(i: int):
    hf, ours = f"layers.{i}.", f"blocks.{i}."
    return [
        (hf + "layernorm_before", ours + "norm1"),
        (hf + "attention.o_proj", ours + "attn.proj"),
        (hf + "layernorm_after", ours + "norm2"),
        (hf + "mlp.fc1", ours + "mlp.fc1"),
        (hf + "mlp.fc2", ours + "mlp.fc2"),
    ]


def vit_from_hf(cls, model_or_path, **overrides):
    hf, state = load_hf(model_or_path)
    state = _vit_to_new_names(_strip(state, "vit."))
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
    kwargs = dict(
        img_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=hf.get("num_channels", 3),
        num_classes=num_classes, embed_dim=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_ratio=hf["intermediate_size"] / hf["hidden_size"],
        qkv_bias=hf.get("qkv_bias", True), global_pool="token", class_token=True,
        eps=hf.get("layer_norm_eps", 1e-12),
    )
    if _act(hf, "hidden_act") != "gelu":
        raise ValueError("only ViTs with exact GELU are supported")
    kwargs.update(overrides)
    model = cls(**kwargs)
    ours = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    if num_classes:
        ours["head.weight"], ours["head.bias"] = state["classifier.weight"], state["classifier.bias"]
    for i in range(kwargs["depth"]):
        for hf_name, our_name in _vit_layer_map(i):
            for leaf in ("weight", "bias"):
                ours[f"{our_name}.{leaf}"] = state[f"{hf_name}.{leaf}"]
        p = f"layers.{i}.attention."
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat([state[p + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")])
        if kwargs["qkv_bias"]:
            ours[f"blocks.{i}.attn.qkv.bias"] = torch.cat([state[p + n + ".bias"] for n in ("q_proj", "k_proj", "v_proj")])
    return _load_into(model, ours)


def vit_to_hf(model):
    from transformers import ViTConfig, ViTForImageClassification

    if model.global_pool != "token" or model.cls_token is None or model.num_classes == 0:
        raise ValueError("Hugging Face ViTForImageClassification needs class-token pooling and a classifier")
    if model.img_size[0] != model.img_size[1]:
        raise ValueError("Hugging Face ViT needs a square image size")
    blk = model.blocks[0]
    hf = ViTConfig(image_size=model.img_size[0], patch_size=model.patch_embed.patch_size[0],
                   num_channels=model.patch_embed.proj.in_channels, hidden_size=model.embed_dim,
                   num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
                   intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, layer_norm_eps=model.norm.eps,
                   qkv_bias=blk.attn.qkv.bias is not None, num_labels=model.num_classes)
    out = ViTForImageClassification(hf)
    ours = model.state_dict()
    state = {
        "vit.embeddings.cls_token": ours["cls_token"],
        "vit.embeddings.position_embeddings": ours["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
        "vit.layernorm.weight": ours["norm.weight"],
        "vit.layernorm.bias": ours["norm.bias"],
        "classifier.weight": ours["head.weight"],
        "classifier.bias": ours["head.bias"],
    }
    for i in range(len(model.blocks)):
        for hf_name, our_name in _vit_layer_map(i):
            for leaf in ("weight", "bias"):
                state[f"vit.{hf_name}.{leaf}"] = ours[f"{our_name}.{leaf}"]
        p = f"vit.layers.{i}.attention."
        for leaf in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{leaf}" in ours:
                for n, t in zip(("q_proj", "k_proj", "v_proj"), ours[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3)):
                    state[p + n + "." + leaf] = t
    if not any(k.startswith("vit.layers.") for k in out.state_dict()):
        state = _vit_to_old_names(state)  # transformers 4
    missing, unexpected = out.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if "pooler" not in k]:
        raise ValueError(f"ViT export mismatch: missing {missing}, unexpected {unexpected}")
    return out.eval()
