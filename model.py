"""The one Llama 2 model of the toolkit: training forward, KV-cache generation, sampling, LoRA, checkpoints."""
import hashlib
import inspect
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError, atomic_output


SETTING_KINDS = {"norm_eps": "number", "dropout": "number", "tie_embeddings": "boolean"}  # the rest: whole numbers


def is_kind(value, kind):
    if kind == "boolean":
        return isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return number and (kind == "number" or isinstance(value, int))


@dataclass
class ModelArgs:
    # defaults are llama2.c's (the Llama 2 7B shape)
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None
    multiple_of: int = 256  # hidden_dim is rounded up to a multiple of this when not given
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0
    tie_embeddings: bool = True  # the classifier is the token embedding (llama2.c's models; most larger Llamas not)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for f in fields(self):  # a damaged checkpoint or config.json gets a clear error here, not a TypeError later
            value, kind = getattr(self, f.name), SETTING_KINDS.get(f.name, "whole number")
            if not (value is None and f.name == "hidden_dim") and not is_kind(value, kind):
                raise UserError(f"model setting {f.name}={value!r} is not a {kind}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; pick n_heads dividing dim")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                            "pick n_kv_heads dividing n_heads")
        if (self.dim // self.n_heads) % 2:
            raise UserError(f"head size dim/n_heads={self.dim // self.n_heads} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_dim is None:
            # llama2.c's rule: 2/3 of 4*dim, rounded up to multiple_of
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's dict, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 even under autocast, as Llama does
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim, max_len, theta=10000.0):
    """cos and sin of each (position, frequency) pair, each of shape (max_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, freqs):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) as llama2.c and Meta's Llama do.

    freqs is the complex rotation of each (position, pair): (T, D/2), or (B, T, D/2) for per-row positions.
    One complex multiply is several times cheaper than rotating strided halves."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs.unsqueeze(-2)).flatten(-2).type_as(x)


QUERY_BLOCK = 32  # query rows per block in causal_attention's small-head path (measured best of 32 to 128)


def causal_attention(q, k, v, dropout_p=0.0, enable_gqa=False):
    """Causal scaled_dot_product_attention of q (B, H, T, D) over k, v (B, Hkv, T, D).

    With small heads on the CPU, the flash kernel's cost is per score and it computes whole blocks of keys
    past the diagonal too; queries taken in blocks against only the keys they can see skip that work."""
    T, head_dim = q.shape[2], q.shape[3]
    if q.device.type != "cpu" or head_dim > 16 or T < 2 * QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=enable_gqa)
    # for training, keys and values are split into chunks joined per block rather than sliced: each slice's
    # backward would write a zero-filled gradient of the whole sequence (attention fwd+bwd took 10-19% less time
    # at 250-512 tokens); without gradients slicing is free and joining is not
    joined = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    k_chunks, v_chunks = k.split(QUERY_BLOCK, dim=2), v.split(QUERY_BLOCK, dim=2)
    blocks = []
    for i, q_block in enumerate(q.split(QUERY_BLOCK, dim=2)):
        s = i * QUERY_BLOCK
        e = s + q_block.shape[2]
        visible = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(s)
        keys, values = ((torch.cat(k_chunks[:i + 1], dim=2), torch.cat(v_chunks[:i + 1], dim=2)) if joined
                        else (k[:, :, :e], v[:, :, :e]))
        blocks.append(F.scaled_dot_product_attention(q_block, keys, values, attn_mask=visible, dropout_p=dropout_p,
                                                     enable_gqa=enable_gqa))
    return torch.cat(blocks, dim=2)


def decode_attention(q, k, v, mask=None):
    """Attention of one new query per row, q (B, H, 1, D), over the cache k, v (B, Hkv, L, D) (mask (B, 1, 1, L)).

    On the CPU, from 8 rows up, two batched matmuls (the query heads that share a key head stacked as rows
    against it) beat the flash kernel: 1.2-2x at 8 to 400 rows, and PPO's rollouts took a quarter less time.
    With one row the kernel's single call costs less."""
    B, H, _, D = q.shape
    if q.device.type != "cpu" or B < 8:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)
    # the scores are the one large tensor here: scale the queries instead, and mask by adding a bias in place
    # (rollouts of 400 rows ran 15% faster than with a scaled copy masked by masked_fill)
    grouped = q.reshape(B, k.shape[1], H // k.shape[1], D) * D ** -0.5
    scores = torch.matmul(grouped, k.transpose(-1, -2))
    if mask is not None:
        scores += torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).reshape(B, H, 1, D)


class KVCache:
    """Preallocated keys and values of every layer, so a decode step never copies the prefix."""

    def __init__(self, args, batch_size, max_len, device, dtype):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len

    def keep_rows(self, index):
        """Keep only the given batch rows (a new, smaller cache in place of this one's tensors)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]


class Linear(nn.Linear):
    """nn.Linear that multiplies one to eight rows (decoding) by a large matrix on the CPU as W @ x^T: MKL's
    x @ W^T path streams such weights at half the speed or less (13 against 29 GB/s measured on a 2-core EPYC),
    and one row goes as two, because its matrix-vector path is as slow. Below 2^19 weights the extra ops cost
    more than they save: such a matrix is read in a few microseconds, often from the cache."""

    def forward(self, x):
        if (x.device.type != "cpu" or self.bias is not None or x.numel() > 8 * self.in_features
                or self.weight.numel() < 1 << 19):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        padded = rows if len(rows) > 1 else torch.cat([rows, torch.zeros_like(rows)])
        out = torch.mm(self.weight, padded.t())[:, :len(rows)].t().contiguous()
        return out.reshape(*x.shape[:-1], self.out_features)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, freqs, cache=None, layer=0, start=0, mask=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        gqa = self.n_kv_heads != self.n_heads
        if T == 1:  # one new token sees the whole cache
            y = decode_attention(q, k, v, mask)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            if start:
                raise ValueError("a multi-token step after the prefill needs an explicit mask")
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0, gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs, **cache_kw):
        h = x + self.attention(self.attention_norm(x), freqs, **cache_kw)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.head_dim, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, tokens, positions=None, **cache_kw):
        """Final normed hidden state (B, T, dim); positions (B, T) give per-row RoPE positions."""
        T = tokens.shape[1]
        if positions is None:
            start = cache_kw.get("start", 0)
            if start + T > self.args.max_seq_len:
                raise UserError(f"sequence of {start + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        freqs = torch.complex(cos.float(), sin.float())
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, layer=i, **cache_kw) if cache_kw else layer(h, freqs)
        return self.norm(h)

    def forward(self, tokens, targets=None):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy over labels that are not -1."""
        logits = self.output(self.hidden_states(tokens))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_with_hidden(self, tokens):
        """Logits and final normed hidden state of every position (what PPO's value head reads)."""
        h = self.hidden_states(tokens)
        return self.output(h), h

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_tokens=(), generator=None, seed=None, return_hidden=False):
        """Continue each prompt (a list of token lists, lengths may differ) by up to max_new_tokens.

        Returns the new tokens of each row; a row ends after its first stop token, which is included.
        With return_hidden, also each row's (n_new, dim) final hidden states, whose logits (self.output) its tokens
        were drawn from: what PPO's value head and log-probs read, without a second forward pass."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate needs at least one non-empty prompt")
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.rope_cos.device).manual_seed(seed)
        device = self.rope_cos.device
        B, lengths = len(prompts), [len(p) for p in prompts]
        T0 = max(lengths)
        # a row's positions start after its left padding, so a shorter prompt may run past max_seq_len cache slots
        total = min(T0 + max_new_tokens, self.args.max_seq_len + T0 - min(lengths))
        if T0 > self.args.max_seq_len or (T0 == self.args.max_seq_len and max_new_tokens > 0):
            raise UserError(f"prompt of {T0} tokens leaves no room in max_seq_len={self.args.max_seq_len}")
        # left-pad so that every row's next token is written at the same cache index
        pad = torch.tensor([T0 - n for n in lengths], device=device)
        tokens = torch.zeros(B, T0, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        dtype = self.tok_embeddings.weight.dtype
        cache = KVCache(self.args, B, total, device, dtype)
        idx = torch.arange(total, device=device)
        key_valid = idx[None, :] >= pad[:, None]  # (B, total)
        # clamped: a row whose context is full may run on in the batch (its tokens unused) until it is dropped
        positions = (idx[None, :] - pad[:, None]).clamp(0, self.args.max_seq_len - 1)
        causal = idx[:T0, None] >= idx[None, :T0]
        # a pad query may see itself so that no softmax row is empty
        prefill_mask = causal & (key_valid[:, None, :T0] | torch.eye(T0, dtype=torch.bool, device=device))
        padded = bool(pad.any())
        mask = prefill_mask[:, None] if padded else None
        h = self.hidden_states(tokens, positions[:, :T0], cache=cache, start=0, mask=mask)
        h = h[:, -1]
        logits = self.output(h)
        if not bool(torch.isfinite(logits).all()):  # no sampler can draw from them: say why instead
            raise UserError("the model's logits are not finite: its weights hold NaN or infinity (a training run "
                            "that diverged)")
        out = [[] for _ in range(B)]
        hidden = h.new_zeros(B, total - T0, h.size(-1)) if return_hidden else None
        rows = list(range(B))  # the prompt each row of the batch continues
        done = torch.zeros(B, dtype=torch.bool, device=device)
        last_slot = pad + self.args.max_seq_len - 1  # where each row's context is full
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        for t in range(T0, T0 + max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            drawn = nxt.tolist()
            running = (~done).nonzero().flatten().tolist()
            for i in running:
                out[rows[i]].append(drawn[i])
            if return_hidden:
                hidden[[rows[i] for i in running], t - T0] = h[running]
            if len(stop):
                done |= torch.isin(nxt, stop)
            done |= last_slot <= t
            if bool(done.all()) or t + 1 >= total:
                break
            if int(done.sum()) * 8 >= len(rows):  # drop finished rows, now and then: every step of theirs is waste
                keep = (~done).nonzero().flatten()
                cache.keep_rows(keep)
                rows = [rows[i] for i in keep.tolist()]
                nxt, key_valid, positions, done = nxt[keep], key_valid[keep], positions[keep], done[keep]
                last_slot = last_slot[keep]
            mask = key_valid[:, None, None, :t + 1] if padded else None
            h = self.hidden_states(nxt[:, None], positions[:, t:t + 1], cache=cache, start=t, mask=mask)[:, -1]
            logits = self.output(h)
        if return_hidden:
            return out, [hidden[b, :len(row)] for b, row in enumerate(out)]
        return out

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over trainable parameters; weight decay only on matrices and embeddings."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cpu", "cuda")
        kwargs = {"fused": True} if fused_ok else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **kwargs)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), as in the PaLM appendix."""
        a = self.args
        T = seq_len or a.max_seq_len
        n = sum(p.numel() for p in self.parameters())
        return 6 * n + 12 * a.n_layers * a.n_heads * a.head_dim * T

    def estimate_mfu(self, tokens_per_s, peak_flops, seq_len=None):
        """Share of the device's peak FLOP/s achieved, or None when the peak is unknown."""
        if not peak_flops:
            return None
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


def without_stop(row, stop_tokens):
    """A row generate returned, without the stop token it ended on (if it stopped)."""
    return row[:-1] if row and row[-1] in stop_tokens else row


AUTOCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_context(device, dtype_name):
    """Mixed precision for a dtype setting (float32: none) on device ("cpu", "cuda:1", ...)."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=AUTOCAST_DTYPES[dtype_name])


def pick_device(name):
    """name, checked to be a device this machine has (cpu, cuda[:N], mps)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available; use --device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available; use --device=cpu")
    if not name.startswith(("cpu", "cuda", "mps")):
        raise UserError(f"--device must be cpu, cuda[:N] or mps, got {name!r}")
    return name


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else sampled after top-k and top-p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shifted so the largest is 0 first: divided by a tiny temperature, logits would overflow to inf and NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p; the first token is always kept
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # inverse CDF: one uniform per row (torch.multinomial draws one exponential per token: 30x slower on the CPU);
    # the coin stays below the total, so it lands on a token of nonzero probability
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    coin = torch.rand(total.shape, generator=generator, device=probs.device) * total
    coin = torch.minimum(coin, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, coin, right=True).squeeze(-1)


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        super().__init__()
        if rank <= 0:
            raise UserError(f"lora rank must be positive, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        base.weight.requires_grad_(False)

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (self.lora_dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def merged(self):
        """A plain Linear whose weight includes the adapter."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=False,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scaling * (self.lora_b @ self.lora_a))
        return lin


DEFAULT_LORA_TARGETS = ("wq", "wk", "wv", "wo")


def _linears_named(model, targets):
    """(parent, attribute, linear) for every nn.Linear whose name or last name part is in targets."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, nn.Linear) and (attr in targets or full in targets):
                found.append((module, attr, child))
    return found


def apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_LORA_TARGETS):
    """Freeze every weight of model and wrap each targeted Linear with a LoRA adapter."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if rank <= 0:
        raise UserError(f"lora_rank must be positive, got {rank}")
    found = _linears_named(model, set(targets))
    missing = set(targets) - {a for _, a, _ in found} - {f"{n}" for n, _ in model.named_modules()}
    if not found or missing:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"lora targets {sorted(missing or targets)} match no Linear layer; choose among {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, lin in found:
        setattr(parent, attr, LoRALinear(lin, rank, alpha, dropout))
    return model


def merge_lora(model):
    """Fold every adapter into its base weight, leaving a plain model."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attr, child.merged())
    if model.args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
        model.args = replace(model.args, tie_embeddings=False)  # an adapter on the classifier was merged into it
    return model


def lora_state_dict(model):
    """Only the adapter weights (what a LoRA run needs to save)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a" in k or ".lora_b" in k}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    """torch.save to a temporary name, then rename, so a kill never leaves a half-written file."""
    with atomic_output(path) as f:
        torch.save(obj, f)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, with a clear error for a missing or unreadable file. A Hugging Face Llama
    folder reads as a checkpoint too, so that every script can start from one."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from export import hf_checkpoint  # export.py holds the Hugging Face format, both ways
        return hf_checkpoint(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; give the checkpoint in it, e.g. {os.path.join(path, 'ckpt.pt')}, "
                        "or a Hugging Face folder (with config.json)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        raise UserError(f"{path} holds weights without their shapes: give the Hugging Face folder that holds it "
                        "with config.json")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # any unpickling failure means the file is not a checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    for key, kind in (("model_args", dict), ("model", dict), ("tokenizer", (dict, type(None))),
                      ("config", (dict, type(None)))):
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise UserError(f"{path} is damaged or not a checkpoint: its {key} is a {type(ckpt[key]).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt.get("model", {}).values()):
        raise UserError(f"{path} is damaged or not a checkpoint: its model holds more than tensors")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", merge=False, path="checkpoint"):
    """Rebuild the Transformer of a checkpoint dict (ours or llama2.c's), LoRA adapters included.

    A LoRA checkpoint may hold only its adapters and name its base checkpoint ("base_checkpoint");
    the base is then loaded first. With merge=True adapters are folded into the weights."""
    if "model_args" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} has no model_args/model: not a checkpoint written by train.py")
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    lora = ckpt.get("lora")
    base_path = ckpt.get("base_checkpoint")
    if base_path:
        base = model_from_checkpoint(read_checkpoint(_resolve_base(base_path, path)), merge=True, path=base_path)
        model = base.cpu()
        if model.args != ModelArgs.from_dict(ckpt["model_args"]):
            raise UserError(f"{path}: its base checkpoint {base_path} has another model shape")
        if ckpt.get("base_checksum") and weights_checksum(model) != ckpt["base_checksum"]:
            raise UserError(f"{path}: its base checkpoint {base_path} has been trained on since these adapters were "
                            "(its weights changed); restore that base, or train the adapters again")
    else:
        args = ModelArgs.from_dict(ckpt["model_args"])
        emb = state.get("tok_embeddings.weight")
        if emb is None or tuple(emb.shape) != (args.vocab_size, args.dim):  # checked before a wrong shape is built
            raise UserError(f"{path}: its weights do not match its model_args (vocab_size={args.vocab_size}, "
                            f"dim={args.dim}); the file is damaged or not written by train.py")
        model = Transformer(args)
    if lora:
        apply_lora(model, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), lora["targets"])
    expected = model.state_dict()
    if base_path:  # only the adapters come from this file
        expected = {k: v for k, v in expected.items() if ".lora_" in k}
    missing = [k for k in expected if k not in state and not (k == "output.weight" and model.args.tie_embeddings)]
    unexpected = [k for k in state if k not in model.state_dict()]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (wrong or [f"missing {k}" for k in missing] or [f"unexpected {k}" for k in unexpected])[0]
        raise UserError(f"{path}: weights do not match its model_args ({detail})")
    heads = {f"{name}.{k}": v for name in ("value_head", "reward_head") if isinstance(ckpt.get(name), dict)
             for k, v in ckpt[name].items()}  # PPO's value head and a reward model's score head
    broken = next((k for k, v in {**state, **heads}.items()
                   if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken:
        raise UserError(f"{path}: {broken} holds NaN or infinite values (a training run that diverged); use an "
                        "earlier checkpoint, e.g. best.pt, or train again with a lower learning_rate")
    model.load_state_dict(state, strict=False)
    if merge:
        merge_lora(model)
    return model.to(device)


def weights_checksum(model):
    """A short hash of a model's weights, to notice when a file it depends on has changed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve_base(base_path, ckpt_path):
    """A base checkpoint path as recorded, or relative to the LoRA checkpoint's folder."""
    if os.path.exists(base_path):  # a file, or a Hugging Face folder
        return base_path
    beside = os.path.join(os.path.dirname(ckpt_path), os.path.basename(base_path))
    if os.path.exists(beside) and not (os.path.exists(ckpt_path) and os.path.samefile(beside, ckpt_path)):
        return beside  # (never the adapters' own file, when base and adapters are both named ckpt.pt)
    raise UserError(f"{ckpt_path} is a LoRA checkpoint whose base {base_path} is missing; restore it or "
                    "export the merged model where the base exists")


def load_model(path, device="cpu", merge=False):
    """Read a checkpoint file and rebuild its model; returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device, merge=merge, path=path), ckpt
