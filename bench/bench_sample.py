"""sample.py's generation speed: tokens/s for 256 new tokens from a random-weight model of llama2.c's 15M shape,
with the KV cache (Transformer.generate, what sample.py uses) against llama2.c's sample.py way, which re-runs
the whole prefix for every new token. Runs interleave; the figures are medians.

    python bench/bench_sample.py [--reps=3] [--new_tokens=256] [--threads=2]
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import cli, configure  # noqa: E402
from model import ModelArgs, Transformer, sample_next  # noqa: E402

reps = 3
new_tokens = 256
threads = 2
temperature = 1.0
top_k = 300  # llama2.c's sample.py default


@torch.no_grad()
def generate_rerunning_prefix(model, prompt, n, generator):
    """llama2.c's sample.py loop: the full forward over the (cropped) sequence for each new token."""
    idx = torch.tensor([prompt])
    for _ in range(n):
        logits = model(idx[:, -model.args.max_seq_len:])[0][:, -1]
        idx = torch.cat([idx, sample_next(logits, temperature, top_k, None, generator)[:, None]], dim=1)
    return idx[0, len(prompt):].tolist()


def kv_cache(model, prompt, n, generator):
    return model.generate([prompt], n, temperature=temperature, top_k=top_k, generator=generator)[0]


@cli
def main(argv=None):
    configure(globals(), argv)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32,
                                  max_seq_len=256)).eval()
    prompt = [1, 9038, 2501, 263, 931]  # BOS "Once upon a time" in the Llama 2 vocabulary
    n = min(new_tokens, model.args.max_seq_len - len(prompt))
    rates = {"KV cache (sample.py)": [], "re-run prefix (llama2.c)": []}
    for rep in range(reps):
        for name, fn in (("KV cache (sample.py)", kv_cache), ("re-run prefix (llama2.c)", generate_rerunning_prefix)):
            t0 = time.perf_counter()
            out = fn(model, prompt, n, torch.Generator().manual_seed(rep))
            rates[name].append(len(out) / (time.perf_counter() - t0))
        print(f"round {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()),
              file=sys.stderr)
    print(f"15M-shaped model, {n} new tokens, {threads} threads, median of {reps} interleaved rounds")
    for name, values in rates.items():
        print(f"{name:26s} {statistics.median(values):8.1f} tok/s")
    speedup = statistics.median(rates["KV cache (sample.py)"]) / statistics.median(rates["re-run prefix (llama2.c)"])
    print(f"speed-up {speedup:.1f}x")


if __name__ == "__main__":
    main()
