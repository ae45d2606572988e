"""A naive, independent forward of the whole model and its MTP losses, written from the formulas
(docs/DESIGN.md, The MTP objectives): plain tensor ops on a full (TP=1) parameter dict, explicit
causal masks, repeated KV heads, full logits for every depth, a Python loop over depths. It shares no code with `model/`
except the parameter names and the two weight layouts it documents below."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, theta):
    # x [B, H, T, hd]; rotate pairs (i, i + hd/2) by angle pos · theta^(-2i/hd).
    hd, t = x.shape[-1], x.shape[-2]
    half = hd // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]  # [T, hd/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention(x, p, pre, cfg):
    b, t, _ = x.shape
    nq, nkv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    qpg = nq // nkv
    # QKV rows are grouped per key/value head: [q × qpg, k, v] for each group.
    qkv = (x @ p[pre + "qkv.weight"].t()).view(b, t, nkv, qpg + 2, hd)
    q = qkv[:, :, :, :qpg].reshape(b, t, nq, hd).transpose(1, 2)
    k = qkv[:, :, :, qpg].transpose(1, 2)
    v = qkv[:, :, :, qpg + 1].transpose(1, 2)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    k = k.repeat_interleave(qpg, dim=1)
    v = v.repeat_interleave(qpg, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nq * hd)
    return out @ p[pre + "proj.weight"].t()


def swiglu(x, p, pre, cfg):
    # The gate/up weight is [gate; up] stacked along the output rows.
    gu = x @ p[pre + "gate_up.weight"].t()
    f = cfg.ffn_size
    return (F.silu(gu[..., :f]) * gu[..., f:]) @ p[pre + "down.weight"].t()


def block(x, p, pre, cfg):
    x = x + attention(rms_norm(x, p[pre + "attn_norm.weight"], cfg.norm_eps), p, pre + "attn.", cfg)
    return x + swiglu(rms_norm(x, p[pre + "mlp_norm.weight"], cfg.norm_eps), p, pre + "mlp.", cfg)


def reference_losses(p, dcfg, input_ids, labels, loss_mask, mtp_weight, depths=None):
    """Returns (total, [loss per depth], [accuracy per depth]) for the depths trained."""
    cfg, mtp = dcfg.model, dcfg.mtp
    emb = p["embedding.word_embeddings.weight"]
    head = emb if cfg.tie_embeddings else p["embedding.head_weight"]
    eps = cfg.norm_eps

    h = emb[input_ids]
    for i in range(cfg.num_layers):
        h = block(h, p, f"blocks.{i}.", cfg)
    final_w = p["tail.final_norm.weight"]
    z = rms_norm(h, final_w, eps)

    outs = {0: z}
    if mtp.kind == "deepseek":
        prev = z.detach() if mtp.option("detach_trunk") else z
        for k in range(1, mtp.depth + 1):
            pre = f"tail.objective.layers.{k - 1}."
            e = emb[labels[:, k - 1]]
            x = torch.cat((rms_norm(prev, p[pre + "hidden_norm.weight"], eps),
                           rms_norm(e, p[pre + "embed_norm.weight"], eps)), dim=-1)
            x = x @ p[pre + "proj.weight"].t()
            prev = block(x, p, pre + "block.", cfg)
            outs[k] = rms_norm(prev, p[pre + "out_norm.weight"], eps)
    elif mtp.kind == "parallel":
        for j in range(1, mtp.depth + 1):
            outs[j] = rms_norm(block(h, p, f"tail.objective.heads.{j - 1}.", cfg), final_w, eps)
    elif mtp.kind == "blockwise":
        for j in range(1, mtp.depth + 1):
            outs[j] = z + swiglu(z, p, f"tail.objective.heads.{j - 1}.", cfg)

    depths = sorted(outs) if depths is None else depths
    losses, accs = [], []
    for j in depths:
        logits = outs[j] @ head.t()  # [B, T, V]
        ce = F.cross_entropy(logits.flatten(0, 1), labels[:, j].flatten(), reduction="none")
        m = loss_mask[:, j].flatten().float()
        losses.append((ce * m).sum() / m.sum())
        hit = (logits.argmax(-1).flatten() == labels[:, j].flatten()).float()
        accs.append((hit * m).sum() / m.sum())
    extra = losses[1:]
    total = losses[0] + (mtp_weight * sum(extra) / len(extra) if extra else 0.0)
    return total, losses, accs
