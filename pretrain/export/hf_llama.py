"""Layout conversion between our full (TP=1) parameters and a Hugging Face Llama checkpoint.

Our decoder is a Llama (pre-norm RMSNorm, SwiGLU, GQA, rotate-half RoPE), so the conversion is a
renaming plus two re-layouts:
* the fused QKV weight is grouped per key/value head, `[g0: q…q, k, v | g1: …]` (model/attention.py),
  HF keeps separate `q_proj`/`k_proj`/`v_proj` with heads in order;
* the SwiGLU weight is `[gate; up]` stacked along rows (model/mlp.py), HF keeps `gate_proj`/`up_proj`.
RoPE already uses HF's rotate-half layout and RMSNorm HF's order (fp32 normalise, cast, gain), so no
q/k permutation or norm change is needed (tests/test_hf_export.py checks logits against transformers).

Only plain Python, torch and dicts here: no file I/O (pretrain/export/files.py owns the files).
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch

from model.config import DecoderConfig, ModelConfig
from model.tail import TAIL_PREFIX
from model.transformer import meta_parameters

# Our block parameter suffix → HF's suffix under `model.layers.{i}.` (q/k/v and gate/up are split).
_BLOCK_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_QKV = "attn.qkv.weight"
_GATE_UP = "mlp.gate_up.weight"
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_HF_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
# Non-parameter entries some transformers versions saved; they carry nothing we need.
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --- expected parameter shapes (TP=1) ---------------------------------------------------------

def main_shapes(dcfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every main-model parameter of MTPLanguageModel at TP=1, by name."""
    return {n: tuple(p.shape) for n, p in meta_parameters(dcfg).items()
            if not n.startswith(TAIL_PREFIX)}


def tail_shapes(dcfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the MTP objective at TP=1, by name (`tail.objective.*`)."""
    return {n: tuple(p.shape) for n, p in meta_parameters(dcfg).items()
            if n.startswith(TAIL_PREFIX)}


def check_shapes(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """ValueError unless `tensors` holds exactly the expected names with the expected shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model config: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' …' if len(unexpected) > 5 else ''}; check that the weights and the config come "
            "from the same model")
    wrong = [f"{n}: {tuple(tensors[n].shape)} (expected {s})"
             for n, s in expected.items() if tuple(tensors[n].shape) != s]
    if wrong:
        raise ValueError(f"{where} has tensors of the wrong shape for the model config: "
                         f"{wrong[:5]}; check that the weights and the config match")


# --- weight re-layouts ------------------------------------------------------------------------

def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-group QKV [(Hq+2·Hkv)·hd, d] → q [Hq·hd, d], k [Hkv·hd, d], v [Hkv·hd, d].

    Query head g·q_per_group + j belongs to kv head g, which is exactly HF's repeat_kv grouping."""
    q_per_group = cfg.num_heads // cfg.kv_heads
    d = qkv.shape[1]
    grouped = qkv.view(cfg.kv_heads, q_per_group + 2, cfg.head_dim, d)  # [Hkv, qpg+2, hd, d]
    q = grouped[:, :q_per_group].reshape(cfg.num_heads * cfg.head_dim, d)  # [Hq·hd, d]
    k = grouped[:, q_per_group].reshape(cfg.kv_heads * cfg.head_dim, d)  # [Hkv·hd, d]
    v = grouped[:, q_per_group + 1].reshape(cfg.kv_heads * cfg.head_dim, d)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    q_per_group = cfg.num_heads // cfg.kv_heads
    d = q.shape[1]
    qg = q.reshape(cfg.kv_heads, q_per_group, cfg.head_dim, d)  # [Hkv, qpg, hd, d]
    kg = k.reshape(cfg.kv_heads, 1, cfg.head_dim, d)
    vg = v.reshape(cfg.kv_heads, 1, cfg.head_dim, d)
    fused = torch.cat((qg, kg, vg), dim=1)  # [Hkv, qpg+2, hd, d]
    return fused.reshape(-1, d)  # [(Hq+2·Hkv)·hd, d]


def to_hf_tensors(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our main-model parameters (validated names/shapes) → HF Llama names. MTP tail ignored."""
    hf = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
          "model.norm.weight": full["tail.final_norm.weight"]}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = full["embedding.head_weight"]
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for name, hf_name in _BLOCK_RENAMES.items():
            hf[theirs + hf_name] = full[ours + name]
        for hf_name, t in zip(_HF_QKV, split_qkv(full[ours + _QKV], cfg)):
            hf[theirs + hf_name] = t
        for hf_name, t in zip(_HF_GATE_UP, full[ours + _GATE_UP].chunk(2, dim=0)):
            hf[theirs + hf_name] = t  # [gate; up] rows → gate [f, d], up [f, d]
    return hf


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor shapes for `cfg`, by HF name."""
    v, d, hd, f = cfg.vocab_size, cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d),
                                          "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    per_layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        _HF_QKV[0]: (cfg.num_heads * hd, d), _HF_QKV[1]: (cfg.kv_heads * hd, d),
        _HF_QKV[2]: (cfg.kv_heads * hd, d), "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
        _HF_GATE_UP[0]: (f, d), _HF_GATE_UP[1]: (f, d), "mlp.down_proj.weight": (d, f),
    }
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def from_hf_tensors(hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """HF Llama tensors → our main-model parameter names (inverse of `to_hf_tensors`)."""
    hf = {n: t for n, t in hf.items() if not n.endswith(_HF_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        # Some writers store the tied head anyway; accept it only if it really is the embedding.
        if not torch.equal(hf["lm_head.weight"], hf.get("model.embed_tokens.weight")):
            raise ValueError(f"{where}: tie_word_embeddings is true but lm_head.weight differs "
                             "from model.embed_tokens.weight; set tie_word_embeddings to false")
        hf = {n: t for n, t in hf.items() if n != "lm_head.weight"}
    check_shapes(hf, hf_shapes(cfg), where)
    full = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
            "tail.final_norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        full["embedding.head_weight"] = hf["lm_head.weight"]
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for name, hf_name in _BLOCK_RENAMES.items():
            full[ours + name] = hf[theirs + hf_name]
        full[ours + _QKV] = fuse_qkv(*(hf[theirs + n] for n in _HF_QKV), cfg)
        full[ours + _GATE_UP] = torch.cat([hf[theirs + n] for n in _HF_GATE_UP], dim=0)
    return full


# --- config.json ------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: torch.dtype, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """The config.json of a LlamaForCausalLM equal to our main model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads `rope_theta`, 5.x reads `rope_parameters` (and still accepts the
        # old key), so both are written.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
    }


def _refuse(where: str, key: str, value: Any, why: str) -> NoReturn:
    raise ValueError(f"{where}: {key} = {value!r} cannot be represented by this project's decoder "
                     f"({why}); only plain Llama checkpoints can be loaded")


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """The rope base of a config that uses plain (unscaled) RoPE; refuses any scaling."""
    if hf.get("rope_scaling") not in (None, {}):
        _refuse(where, "rope_scaling", hf["rope_scaling"], "RoPE scaling is not implemented")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        _refuse(where, "rope_parameters.rope_type", params["rope_type"],
                "only the default rotary embedding is implemented")
    extra = sorted(set(params) - {"rope_type", "rope_theta"})
    if extra:
        _refuse(where, "rope_parameters", params, f"unsupported keys {extra}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, "partial_rotary_factor", hf["partial_rotary_factor"],
                "rotary embeddings cover the whole head")
    # transformers' Llama default base when neither key is present.
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig from a Llama config.json; ValueError for anything we cannot represent."""
    if hf.get("model_type") != "llama":
        _refuse(where, "model_type", hf.get("model_type"), "not a Llama config")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    absent = [k for k in required if k not in hf]
    if absent:
        raise ValueError(f"{where} lacks {absent}; it is not a complete Llama config.json")
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)),
                         ("mlp_bias", (False,)), ("pretraining_tp", (None, 1))):
        if hf.get(key, allowed[0]) not in allowed:
            _refuse(where, key, hf[key], f"only {allowed[0]!r} is implemented")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads):
        _refuse(where, "head_dim", hf["head_dim"], f"head_dim must be hidden_size / "
                f"num_attention_heads = {width // heads}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=width, num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(hf, where), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )
