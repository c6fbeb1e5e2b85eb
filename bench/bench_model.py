"""Model speed on this machine: training-step tokens/s against a plain llama2.c-style model, and KV-cache
generation tokens/s by position.

    python bench/bench_model.py [--rounds=5] [--threads=2]

Training: batch 8, fp32, forward + backward + AdamW, ours and the reference interleaved round by round so
that a noisy machine slows both alike; medians are printed. Each round also times one large fp32 matmul, the
most FLOP/s this machine's torch reaches; a model's training FLOP/s as a share of it bounds any speed-up.
Generation: batch 1, greedy, the cost of one new token when the cache already holds 16, 128 and 512 tokens.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configurator import cli, configure  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from reference_model import RefTransformer  # noqa: E402

rounds = 5  # interleaved measurements per model; the median is reported
steps = 3  # training steps timed per round
threads = 2
SHAPES = {  # name: (model args, training batch, training sequence length)
    "260K": (dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512),
             8, 512),
    "15M/v512": (dict(dim=288, n_layers=6, n_heads=6, vocab_size=512, multiple_of=32, max_seq_len=256), 8, 256),
}
GEN_POSITIONS = (16, 128, 512)


def train_step_seconds(model, optimizer, x, y):
    t0 = time.perf_counter()
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def matmul_flops(n=2048):
    """FLOP/s of one n x n fp32 matmul: the ceiling for models whose time is mostly matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t0 = time.perf_counter()
    a @ b
    return 2 * n ** 3 / (time.perf_counter() - t0)


def bench_training(args_dict, batch, seq_len):
    args = ModelArgs(**args_dict)
    x = torch.randint(0, args.vocab_size, (batch, seq_len))
    y = torch.randint(0, args.vocab_size, (batch, seq_len))
    runs, peaks = {}, []
    matmul_flops()  # warm-up
    for cls in (RefTransformer, Transformer):
        torch.manual_seed(0)
        model = cls(args).train()
        opt = model.configure_optimizers(0.1, 5e-4, (0.9, 0.95), "cpu")
        train_step_seconds(model, opt, x, y)  # warm-up: allocator, kernels
        runs[cls] = (model, opt, [])
    for _ in range(rounds):
        for model, opt, times in runs.values():
            times.append(train_step_seconds(model, opt, x, y))
        peaks.append(matmul_flops())
    flops_per_token = runs[Transformer][0].flops_per_token(seq_len)
    return {cls.__name__: batch * seq_len / statistics.median(t) for cls, (_, _, t) in runs.items()}, \
        flops_per_token, statistics.median(peaks)


def bench_generation(args_dict):
    """Seconds per new token at each cache position: (generate n+k) - (generate n+1), over k - 1 tokens."""
    args = ModelArgs(**dict(args_dict, max_seq_len=max(GEN_POSITIONS) + 64))
    torch.manual_seed(0)
    model = Transformer(args).eval()
    extra = 33
    out = {}
    for pos in GEN_POSITIONS:
        prompt = [[1] + torch.randint(3, args.vocab_size, (pos - 1,)).tolist()]
        model.generate(prompt, 4, temperature=0.0)
        short, long = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            model.generate(prompt, 1, temperature=0.0)
            short.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(prompt, extra, temperature=0.0)
            long.append(time.perf_counter() - t0)
        out[pos] = (statistics.median(long) - statistics.median(short)) / (extra - 1)
    return out


@cli
def main(argv=None):
    configure(globals(), argv)
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds (medians)")
    for name, (args_dict, batch, seq_len) in SHAPES.items():
        tps, flops_per_token, peak = bench_training(args_dict, batch, seq_len)
        ref, ours = tps["RefTransformer"], tps["Transformer"]
        print(f"train {name:9s} batch {batch}x{seq_len}: reference {ref:8.0f} tok/s   ours {ours:8.0f} tok/s"
              f"   x{ours / ref:.2f}   (reference {ref * flops_per_token / peak:.0%}, ours"
              f" {ours * flops_per_token / peak:.0%} of the {peak / 1e9:.0f} GFLOP/s of a 2048^2 fp32 matmul)")
    for name, (args_dict, _, _) in SHAPES.items():
        per_token = bench_generation(args_dict)
        cells = "   ".join(f"pos {p}: {1 / s:7.0f} tok/s" for p, s in per_token.items())
        ratio = per_token[GEN_POSITIONS[-1]] / per_token[GEN_POSITIONS[0]]
        print(f"generate {name:9s} {cells}   cost(512)/cost(16) = {ratio:.2f}")


if __name__ == "__main__":
    main()
