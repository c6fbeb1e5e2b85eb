"""A plain eager llama2.c-style Llama (separate q/k/v, repeat_kv, Python RMSNorm, foreach AdamW): the speed baseline."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def ref_rope(xq, xk, cos, sin):
    def rot(x):
        xr, xi = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3).type_as(x)
    return rot(xq), rot(xk)


class RefBlock(nn.Module):
    def __init__(self, a):
        super().__init__()
        hd = a.dim // a.n_heads
        self.a, self.hd = a, hd
        self.wq = nn.Linear(a.dim, a.n_heads * hd, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(a.n_heads * hd, a.dim, bias=False)
        self.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.n1, self.n2 = RefRMSNorm(a.dim, a.norm_eps), RefRMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a, hd = self.a, self.hd
        h = self.n1(x)
        q = self.wq(h).view(B, T, a.n_heads, hd)
        k = self.wk(h).view(B, T, a.n_kv_heads, hd)
        v = self.wv(h).view(B, T, a.n_kv_heads, hd)
        q, k = ref_rope(q, k, cos[:T], sin[:T])
        rep = a.n_heads // a.n_kv_heads
        if rep > 1:
            k = k[:, :, :, None, :].expand(B, T, a.n_kv_heads, rep, hd).reshape(B, T, a.n_heads, hd)
            v = v[:, :, :, None, :].expand(B, T, a.n_kv_heads, rep, hd).reshape(B, T, a.n_heads, hd)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class RefTransformer(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(RefBlock(a) for _ in range(a.n_layers))
        self.norm = RefRMSNorm(a.dim, a.norm_eps)
        self.out = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.out.weight = self.emb.weight
        hd = a.dim // a.n_heads
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(a.max_seq_len).float(), freqs)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        h = self.emb(tokens)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        logits = self.out(self.norm(h))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = list(self.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
