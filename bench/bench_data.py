"""Pretokenize throughput (MB of story text per second) against llama2.c's way: per-story encode in a process pool.

    python bench/bench_data.py                    # ~100 MB built-in corpus in data/bench, 2 processes, 3 rounds

The corpus and its 512-token vocabulary are made once and kept in data/bench. Each round runs the baseline and
tinystories.pretokenize one after the other on the same shards (interleaved, so machine noise hits both) and
checks that they wrote the same tokens; the medians are printed.
"""
import json
import os
import resource
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tinystories  # noqa: E402
from configurator import cli, configure  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

data_dir = "data/bench"
num_shards = 10
stories_per_shard = 7000  # about 10 MB of JSON per shard
vocab_size = 512
workers = 2
rounds = 3


def baseline_shard(args):
    """llama2.c's process_shard: json.load, then encode each story on its own and collect a Python list."""
    shard, model_path, out_path = args
    enc = Tokenizer(model_path)
    with open(shard) as f:
        data = json.load(f)
    all_tokens = []
    for example in data:
        text = example["story"].strip()
        all_tokens.extend(enc.encode(text, bos=True, eos=False))
    with open(out_path, "wb") as f:
        f.write(np.array(all_tokens, dtype=np.uint16).tobytes())


def cpu_seconds():
    """CPU time of this process and its finished children: less swayed by a busy machine than the clock."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def timed(work):
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def baseline(shards, model_path, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(s, model_path, os.path.join(out_dir, os.path.basename(s).replace(".json", ".bin"))) for s in shards]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(baseline_shard, jobs))


@cli
def main(argv=None):
    configure(globals(), argv)
    tinystories.builtin(num_shards, stories_per_shard, seed=0, data_dir=data_dir)
    model_path = tinystories.tokenizer_path(vocab_size, data_dir)
    if not os.path.exists(model_path):
        tinystories.train_vocab(vocab_size, num_shards=2, data_dir=data_dir)
    shards = tinystories.story_shards(data_dir)
    text_mb = sum(len(r["story"].strip().encode()) for s in shards for r in tinystories.read_stories(s)) / 1e6
    json_mb = sum(os.path.getsize(s) for s in shards) / 1e6
    ours_dir, base_dir = tinystories.pretok_dir(vocab_size, data_dir=data_dir), os.path.join(data_dir, "baseline")
    runs = {"baseline": [], "pretokenize": []}  # (wall s, CPU s) per round
    for r in range(rounds):
        shutil.rmtree(base_dir, ignore_errors=True)
        runs["baseline"].append(timed(lambda: baseline(shards, model_path, base_dir)))
        shutil.rmtree(ours_dir, ignore_errors=True)  # or it would find the shards done and do nothing
        runs["pretokenize"].append(timed(lambda: tinystories.pretokenize(vocab_size, num_workers=workers,
                                                                         data_dir=data_dir)))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s ({v[-1][1]:.1f} CPU s)" for k, v in runs.items()))
    same = all(np.array_equal(np.fromfile(os.path.join(base_dir, n), np.uint16),
                              np.fromfile(os.path.join(ours_dir, n), np.uint16))
               for n in sorted(os.listdir(base_dir)))
    print(f"corpus: {len(shards)} shards, {json_mb:.1f} MB of JSON, {text_mb:.1f} MB of story text; "
          f"vocab {vocab_size}; {workers} processes; medians of {rounds} rounds")
    (base, base_cpu), (ours, ours_cpu) = [[statistics.median(x) for x in zip(*runs[k])] for k in runs]
    print(f"baseline (llama2.c, per-story encode): {text_mb / base:5.1f} MB/s ({base:.2f} s, {base_cpu:.1f} CPU s)")
    print(f"tinystories.pretokenize:               {text_mb / ours:5.1f} MB/s ({ours:.2f} s, {ours_cpu:.1f} CPU s)")
    print(f"speedup {base / ours:.2f}x in wall time, {base_cpu / ours_cpu:.2f}x in CPU time; "
          f"identical tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
