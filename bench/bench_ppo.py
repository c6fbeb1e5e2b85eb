"""Seconds per PPO iteration in the PPO fork's configuration, split into rollout, scoring, advantages and update:
the 260K shape, 400 rollouts of up to 300 new tokens from prompts of BOS + 1..30 story tokens, the length
reward, 4 epochs of minibatches of 50, AdamW. Every epoch runs (no early stop), so iterations compare.

    python bench/bench_ppo.py [--checkpoint=out260K/ckpt.pt] [--data_dir=data] [--iters=3] [--threads=2]

With a checkpoint the stories are that model's (a pretrained model stops at story ends); without one the
weights are random (then nearly every rollout runs to the 300-token cap, the slowest case). Prompts come from
data_dir's 512-token pretraining shards when there are some, else are random tokens. Two ways of cutting the
minibatches alternate iteration by iteration, so a busy machine slows both alike: rollouts of similar length
together (train.py's default, --group_by_length=True) against random minibatches. Medians are printed; the
PPO fork takes about 58 s per iteration on this kind of machine (the issue's figure).
"""
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402
from configurator import UserError, cli, configure  # noqa: E402
from model import ModelArgs, Transformer, load_model  # noqa: E402

checkpoint = ""  # a 512-token model to roll out; "" = random weights of the 260K shape
data_dir = "data"
iters = 3  # measured iterations per variant (after one warm-up iteration each)
threads = 2
rollouts = 400
max_new_tokens = 300
batch_size = 50
start_len = 30
SHAPE_260K = dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512)
SPLIT = ("rollout", "scoring", "advantages", "update", "total")


class RandomPrompts:
    """BOS + 1..start_len random tokens, for a machine without pretokenized data."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def __next__(self):
        lengths = torch.randint(1, start_len + 1, (rollouts,), generator=self.g).tolist()
        return [{"tokens": [1] + torch.randint(3, 512, (n,), generator=self.g).tolist(), "words": None,
                 "instruction": None} for n in lengths]


def prompt_source():
    try:
        return ppo.PromptStream("plain", "train", rollouts, 512, start_len, data_dir=data_dir), "tinystories shards"
    except UserError:
        return RandomPrompts(), "random tokens"


def make_variant(model, group):
    """A policy with its value head, a frozen reference, an optimizer, and an update function."""
    policy = ppo.TransformerWithHead(copy.deepcopy(model), ppo.scalar_head(model.args.dim))
    reference = ppo.TransformerWithHead(ppo.frozen(copy.deepcopy(model)))
    optimizer = policy.transformer.configure_optimizers(0.01, 1e-4, (0.9, 0.99), "cpu")
    optimizer.add_param_group({"params": list(policy.head.parameters()), "weight_decay": 0.0})

    def update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    settings = ppo.PPOSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, max_policy_kl=0.0,
                               group_by_length=group)
    return policy, reference, update, settings


@cli
def main(argv=None):
    configure(globals(), argv)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_model(checkpoint)[0] if checkpoint else Transformer(ModelArgs(**SHAPE_260K))
    if model.args.vocab_size != 512:
        raise UserError(f"{checkpoint} has {model.args.vocab_size} tokens; the fork's configuration uses 512")
    stops = (1, 2)  # BOS starts the next story, EOS ends one
    reward = ppo.make_reward("length", None, "plain", 200, stops)
    variants = {"grouped by length": True, "random minibatches": False}
    runs = {}
    for name, group in variants.items():
        prompts, source = prompt_source()
        runs[name] = (*make_variant(model, group), prompts, ppo.KLController(0.2, 6.0, 10000), [])
    print(f"{'checkpoint ' + checkpoint if checkpoint else 'random 260K weights'}, prompts from {source}, "
          f"{rollouts} rollouts x up to {max_new_tokens} tokens, 4 epochs of {batch_size}, {threads} threads")
    for i in range(iters + 1):  # the first round warms up (allocator, kernels) and is not counted
        for name, (policy, reference, update, settings, prompts, kl, results) in runs.items():
            stats, _ = ppo.ppo_iteration(policy, reference, prompts, reward, kl, settings, update, stops)
            times = {k: stats[f"time/ppo/{k}"] for k in SPLIT}
            print(f"  {'warm-up' if i == 0 else f'iter {i}'} {name}: "
                  + " ".join(f"{k} {v:.1f}s" for k, v in times.items())
                  + f" | mean length {stats['tokens/total_len_mean']:.0f}", flush=True)
            if i:
                results.append(times)
    print(f"medians of {iters} iterations (seconds per iteration):")
    for name, run in runs.items():
        results = run[-1]
        print(f"  {name:>20}: " + "  ".join(f"{k} {statistics.median(r[k] for r in results):6.2f}"
                                          for k in SPLIT))


if __name__ == "__main__":
    main()
