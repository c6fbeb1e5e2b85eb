"""Training throughput through train.py's own step (data, forward, backward, clip, AdamW), eval excluded:
model.py against the plain llama2.c-style reference model, on llama2.c's 260K shape and the 15M shape.

    python bench/bench_train.py [--rounds=5] [--steps=5] [--threads=2] [--data_dir=data]

Batches come from tinystories.PretrainBatches when data_dir holds pretokenized 512-token data, else from
random tokens (said in the output). The two models alternate round by round, so a busy machine slows both
alike; medians are printed. Last, the wall time of `train.py --eval_only=True` with default settings (when
there is data): what the first eval costs a user.
"""
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tinystories  # noqa: E402
import train  # noqa: E402
from configurator import UserError, cli, configure  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from reference_model import RefTransformer  # noqa: E402

rounds = 5  # interleaved measurements per model; the median is reported
steps = 5  # training steps timed per round
threads = 2
data_dir = "data"
SHAPES = {  # name: (model args, batch size, sequence length)
    "260K": (dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512),
             8, 512),
    "15M/v512": (dict(dim=288, n_layers=6, n_heads=6, vocab_size=512, multiple_of=32, max_seq_len=256), 8, 256),
}


def random_batches(batch, seq_len, vocab):
    g = torch.Generator().manual_seed(0)
    while True:
        w = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        yield w[:, :-1], w[:, 1:]


def batch_stream(batch, seq_len):
    try:
        return tinystories.PretrainBatches("train", batch, seq_len, 512, data_dir=data_dir), "tinystories"
    except UserError:
        return random_batches(batch, seq_len, 512), "random tokens"


def tokens_per_second(model, optimizer, batches, batch, seq_len):
    t0 = time.perf_counter()
    for _ in range(steps):
        train.train_step(model, optimizer, batches, accum_steps=1)
    return steps * batch * seq_len / (time.perf_counter() - t0)


def bench_shape(args_dict, batch, seq_len):
    args = ModelArgs(**args_dict)
    runs = {}
    for cls in (RefTransformer, Transformer):
        torch.manual_seed(0)
        model = cls(args).train()
        optimizer = model.configure_optimizers(0.1, 5e-4, (0.9, 0.95), "cpu")
        batches, source = batch_stream(batch, seq_len)
        train.train_step(model, optimizer, batches, accum_steps=1)  # warm-up: allocator, kernels
        runs[cls.__name__] = (model, optimizer, batches, [])
    for _ in range(rounds):
        for model, optimizer, batches, results in runs.values():
            results.append(tokens_per_second(model, optimizer, batches, batch, seq_len))
    return {name: statistics.median(r[3]) for name, r in runs.items()}, source


def first_eval_seconds():
    """Wall time of train.py --eval_only=True with default settings, or None without data."""
    try:
        tinystories.read_meta(512, data_dir=data_dir)
    except UserError:
        return None
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train.main([f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_only=True"])
        return time.perf_counter() - t0


@cli
def main(argv=None):
    configure(globals(), argv)
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds of {steps} steps "
          "(medians), fp32, train.train_step")
    for name, (args_dict, batch, seq_len) in SHAPES.items():
        tps, source = bench_shape(args_dict, batch, seq_len)
        ref, ours = tps["RefTransformer"], tps["Transformer"]
        print(f"train {name:9s} batch {batch}x{seq_len} ({source}): reference {ref:8.0f} tok/s   "
              f"ours {ours:8.0f} tok/s   x{ours / ref:.2f}", flush=True)
    seconds = first_eval_seconds()
    if seconds is not None:
        print(f"train.py --eval_only=True with defaults (eval_iters={train.eval_iters}, batch "
              f"{train.batch_size}x{train.max_seq_len}): {seconds:.2f} s")


if __name__ == "__main__":
    main()
