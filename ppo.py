"""RLHF for the toolkit's Llama 2: PPO against programmatic or learned rewards, a reward model, and people
labelling preferences.

    python train.py --ppo=True --init_from=out260K/ckpt.pt --reward=length --target_len=200 --out_dir=out-ppo
    python train.py --ppo=True --init_from=out-sft/ckpt.pt --reward=words --out_dir=out-ppo-words
    python ppo.py label --checkpoint=out-sft/ckpt.pt --out=data/prefs.jsonl          # a person picks a or b
    python ppo.py label --checkpoint=out-sft/ckpt.pt --out=data/prefs.jsonl --auto=words --num_pairs=3000
    python train.py --reward_model=True --preferences=data/prefs.jsonl --init_from=out-sft/ckpt.pt --out_dir=out-rm
    python train.py --ppo=True --init_from=out-sft/ckpt.pt --reward=model:out-rm/ckpt.pt --out_dir=out-ppo-rm
    python ppo.py eval --checkpoint=out-ppo-words/ckpt.pt --reward=words             # on held-out prompts

train.py runs the loops (settings, optimizer, checkpoints, resume, metrics.jsonl); this file has the parts.
One PPO iteration: the policy answers `rollouts` prompts (temperature 1, no top-k/top-p: the log-probs must be those
of the distribution that drew the tokens); each response is scored, the score going on its last token; the final
normed hidden states the rollout drew from give the old log-probs and values (a value head on them) without another
pass of the policy, and one batched pass of the frozen reference its log-probs; every response token gets the reward
-kl_coef * KL(policy || reference); advantages by GAE, whitened over the valid tokens; then ppo_epochs over shuffled
minibatches of the clipped policy loss plus vf_coef times the clipped value loss. Padding is masked out of every
mean.

Rewards (--reward, terms joined by +, each with an optional weight: length+0.5*words):
  length       -|target_len - len(query + response)| / 100, the stop token not counted (the PPO fork's reward)
  words        share of the instruction's three required words the story uses, + 0.5 if it ends with EOS
  model:PATH   the score of a reward model train.py --reward_model=True wrote

Preference files are JSON lines {"prompt", "chosen", "rejected"} (texts; "tie": true for a tie), with the exact
tokens in "prompt_tokens", "chosen_tokens", "rejected_tokens" when label wrote them; without those, the prompt is
read as an instruction and each story is encoded in the instruct layout, ending with EOS.
"""
import hashlib
import json
import math
import os
import re
import shutil
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tinystories
from configurator import UserError, cli, configure_subcommand, require_file
from model import load_model, model_from_checkpoint, pick_device, read_checkpoint, weights_checksum, without_stop
from tokenizer import checkpoint_tokenizer, default_prompts, instruct_prompt, same_path

# -----------------------------------------------------------------------------
# settings of `python ppo.py label|eval` (PPO and the reward model train through train.py)
checkpoint = ""  # the model that writes the stories
tokenizer = ""  # its sentencepiece .model; default: the one the checkpoint names
out = ""  # label: the JSONL preference file to append to
auto = ""  # label: a reward spec that answers instead of a person (e.g. words); ties when scores are equal
num_pairs = 0  # label: stop after this many pairs in the file (0: until q, or end of input)
reward = ""  # eval: the reward spec to report; "" = words for instruct prompts, length for story starts
num_prompts = 200  # eval: held-out prompts
data_dir = tinystories.DATA_DIR
prompts = "auto"  # plain | instruct | auto (instruct for a model fine-tuned on instructions)
start_len = 30  # plain prompts: BOS + 1..start_len tokens of a story
target_len = 200  # the length reward's target
max_new_tokens = 300
batch_size = 50  # rows per generate call (label --auto: two per pair)
show = 3  # eval: samples to print
seed = 0
device = "cpu"
# -----------------------------------------------------------------------------

SUBCOMMANDS = ("label", "eval")
ANSWERS = {"a": "a", "b": "b", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip", "q": "quit", "quit": "quit"}


# ----------------------------------------------------------------------------- the model with a scalar head

def scalar_head(dim):
    """Linear(dim, 1) starting at zero, so values (or rewards) start at 0 and are learned from there."""
    head = nn.Linear(dim, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class TransformerWithHead(nn.Module):
    """A Transformer and a scalar head (PPO's value head, a reward model's) on its final normed hidden state.

    forward reads only the given positions (B, P) of each row: logits and head are computed there alone."""

    def __init__(self, transformer, head=None):
        super().__init__()
        self.transformer, self.head = transformer, head

    def forward(self, tokens, positions, logits=True):
        h = self.transformer.hidden_states(tokens)
        return self.read(h.gather(1, positions[..., None].expand(-1, -1, h.size(-1))), logits)

    def read(self, h, logits=True):
        """Logits and head of final hidden states h (B, P, dim)."""
        return (self.transformer.output(h) if logits else None,
                self.head(h).squeeze(-1).float() if self.head is not None else None)


def refuse_reward_model_policy(ckpt, path):
    """A reward model's transformer was trained to score stories, not to write them: no policy."""
    if ckpt.get("mode") == "reward_model":
        raise UserError(f"{path} is a reward model, which scores stories but does not write them: give the "
                        "language model (pretrained or SFT) here, and the reward model as --reward=model:PATH")


def frozen(model):
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- prompts

class PromptStream(tinystories.BatchStream):
    """Rollout prompts, batch i depending only on (seed, rank, i), so a resumed run continues the stream.

    kind "plain": BOS + 1..start_len tokens of a story of the pretraining shards; "instruct": an instruct prompt
    (instruction, then BOS) with the words it asks for. Split "train" = shards 1.., "val" = shard 0. Each prompt
    is {"tokens", "words" (None for plain), "instruction" (None for plain)}. max_len: the model's context."""

    def __init__(self, kind, split, batch_size, vocab_size, start_len=30, seed=0, rank=0,
                 data_dir=tinystories.DATA_DIR, max_len=None):
        if kind not in ("plain", "instruct"):
            raise UserError(f"--prompts must be plain or instruct, got {kind!r}")
        if start_len < 1:
            raise UserError(f"--start_len must be at least 1, got {start_len}")
        if kind == "plain" and max_len and start_len + 1 >= max_len:
            raise UserError(f"--start_len={start_len} leaves no room for a story in the model's context of {max_len} "
                            f"tokens: use --start_len={min(30, max_len // 2)}")
        self.kind, self.start_len = kind, start_len
        if kind == "instruct":
            self.examples = [{"tokens": e["prompt"], "words": e["words"], "instruction": e["instruction"]}
                             for e in tinystories.instruct_examples(split, vocab_size, data_dir)]
            count = len(self.examples)
            longest = max((len(e["tokens"]) for e in self.examples), default=0)
            if max_len and longest + 1 >= max_len:  # refused now, not at the iteration that first draws it
                raise UserError(f"the longest {split} instruction is {longest} tokens, leaving no room for a story "
                                f"in a context of {max_len}: raise --max_seq_len (at most the model's)")
        else:
            meta, self.shards = tinystories.split_shards(vocab_size, split, data_dir)
            self.starts = [np.flatnonzero(s == meta["bos_id"]) for s in self.shards]  # every story opens with BOS
            self.ends = np.cumsum([len(s) for s in self.starts])
            count = int(self.ends[-1]) if len(self.ends) else 0
        if count == 0:
            raise UserError(f"no {split} stories for {kind} prompts in {data_dir}: write a larger corpus")
        self.count, self.batch_size, self.seed, self.rank = count, batch_size, seed, rank

    def __next__(self):
        rng = self.batch_rng()
        picks = rng.integers(0, self.count, size=self.batch_size)
        if self.kind == "instruct":
            return [self.examples[i] for i in picks]
        lengths = rng.integers(1, self.start_len + 1, size=self.batch_size)
        batch = []
        for pick, n in zip(picks, lengths):
            k = int(np.searchsorted(self.ends, pick, side="right"))
            i = pick - (self.ends[k - 1] if k else 0)
            starts, shard = self.starts[k], self.shards[k]
            end = starts[i + 1] if i + 1 < len(starts) else len(shard)
            batch.append({"tokens": shard[starts[i]:min(starts[i] + 1 + n, end)].tolist(), "words": None,
                          "instruction": None})
        return batch


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def rollout(model, queries, max_new_tokens, stop_tokens, temperature=1.0, generator=None, ctx=nullcontext(),
            return_hidden=False):
    """Each query's response from one batched KV-cache generate; a response that stopped ends with its stop token.
    With return_hidden, also the final hidden state each response token was drawn from."""
    model.eval()
    with ctx:
        return model.generate(queries, max_new_tokens, temperature=temperature, stop_tokens=stop_tokens,
                              generator=generator, return_hidden=return_hidden)


@dataclass
class Rollouts:
    """Queries and responses packed for the model: tokens (N, L) is each query + response without its last
    token, right-padded; targets and mask (N, R) are the response tokens and which of them are real."""
    tokens: torch.Tensor
    query_len: torch.Tensor
    response_len: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def pack(cls, queries, responses):
        if any(len(r) == 0 for r in responses):
            raise ValueError("every response needs at least one token")
        query_len = torch.tensor([len(q) for q in queries])
        response_len = torch.tensor([len(r) for r in responses])
        tokens, _ = pad_right([(list(q) + list(r))[:-1] for q, r in zip(queries, responses)])
        targets, _ = pad_right(responses)
        mask = torch.arange(targets.shape[1])[None] < response_len[:, None]
        return cls(tokens, query_len, response_len, targets, mask)

    def rows(self, index):
        """(tokens, positions, targets, mask) of some rows, only as wide as their own lengths need.

        positions[b, j] is the input position whose output predicts response token j of row b."""
        q, r = self.query_len[index], self.response_len[index]
        width, resp = int((q + r).max()) - 1, int(r.max())
        positions = ((q - 1)[:, None] + torch.arange(resp)[None]).clamp(max=width - 1)
        return self.tokens[index, :width], positions, self.targets[index, :resp], self.mask[index, :resp]


def token_logprobs(logits, targets):
    """log p(target) of each position, in float32."""
    return -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)


@torch.no_grad()
def score_responses(model, data, batch_size, ctx=nullcontext(), hidden=None):
    """Log-probs (N, R) of the response tokens under model (a TransformerWithHead), its values (N, R) if it has
    a head, and the entropy of each position's distribution; zero on padding. Rows go in batches of similar
    length, so little padding is computed. hidden: the model's own final hidden states of each response (as
    its rollout returned them), read instead of running the model again."""
    model.eval()
    dev = device_of(model)
    n, width = data.mask.shape
    logp, entropy = torch.zeros(n, width), torch.zeros(n, width)
    values = torch.zeros(n, width) if model.head is not None else None
    for index in torch.argsort(data.query_len + data.response_len).split(batch_size):
        tokens, positions, targets, mask = (t.to(dev) for t in data.rows(index))
        with ctx:
            if hidden is None:
                logits, v = model(tokens, positions)
            else:
                logits, v = model.read(nn.utils.rnn.pad_sequence([hidden[i] for i in index], batch_first=True))
        logits = logits.float()
        r = targets.shape[1]
        logp[index, :r] = token_logprobs(logits, targets).masked_fill(~mask, 0.0).cpu()
        probs = logits.softmax(-1)
        entropy[index, :r] = (torch.logsumexp(logits, -1) - (probs * logits).sum(-1)).masked_fill(~mask, 0.0).cpu()
        if values is not None:
            values[index, :r] = v.masked_fill(~mask, 0.0).cpu()
    return logp, values, entropy


def device_of(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- rewards

REWARD_TERM = re.compile(r"\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?(length|words|model:\S+)\s*")


def parse_reward(spec, flag="reward"):
    """[(weight, name)] of a reward spec: terms such as length, 0.5*words or model:out-rm/ckpt.pt joined by +."""
    terms = []
    for part in re.split(r"(?<![0-9.][eE])\+", spec):  # not the + of an exponent, as in 1e+1*length
        m = REWARD_TERM.fullmatch(part)
        if not m or not math.isfinite(float(m.group(1) or 1)):
            raise UserError(f"--{flag}={spec!r}: cannot read {part.strip()!r}; write terms such as length, "
                            "0.5*words or model:out-rm/ckpt.pt joined by + (a negative weight: length+-0.5*words)")
        terms.append((float(m.group(1)) if m.group(1) else 1.0, m.group(2)))
    return terms


def length_score(query, response, stop_tokens, target):
    """The PPO fork's reward: -|target - len(query + response)| / 100, not counting the stop token."""
    return -abs(target - len(query) - len(without_stop(response, stop_tokens))) / 100


def uses_word(text, word):
    """Whether text holds word or a regular form of it (jump: jumps, jumped, jumping; happy: happier...)."""
    w = re.escape(word.lower())
    forms = [rf"{w}(?:s|es|d|ed|ing|er|est|ly)?"]
    if len(word) > 2 and word[-1] in "eE":
        forms.append(rf"{w[:-1]}(?:ing|ed|er|est)")
    if len(word) > 2 and word[-1] in "yY":
        forms.append(rf"{w[:-1]}i(?:es|ed|er|est|ly)")
    if len(word) > 2 and word[-1].lower() not in "aeiouwxy":
        forms.append(rf"{w}{re.escape(word[-1].lower())}(?:ed|ing|er|est)")
    return re.search(rf"\b(?:{'|'.join(forms)})\b", text.lower()) is not None


def words_score(story, words, ended):
    """Share of the required words the story uses, plus 0.5 when it ended with EOS (a finished story)."""
    return sum(uses_word(story, w) for w in words) / len(words) + (0.5 if ended else 0.0)


def load_reward_model(path, tok, prompts_kind, max_len=None, tokenizer_sha256=None):
    """A frozen reward model (TransformerWithHead) from a checkpoint train.py --reward_model=True wrote, checked
    against the policy's tokenizer (tok, and its sha256 when known) and prompts."""
    ckpt = read_checkpoint(path)
    if ckpt.get("mode") != "reward_model" or "reward_head" not in ckpt:
        raise UserError(f"model:{path} is not a reward model (its mode is {ckpt.get('mode')!r}); train one with "
                        "python train.py --reward_model=True --preferences=... --init_from=...")
    recorded = ckpt.get("tokenizer") or {}
    if recorded.get("vocab_size", tok.vocab_size) != tok.vocab_size or (
            recorded.get("sha256") and tokenizer_sha256 and recorded["sha256"] != tokenizer_sha256):
        same = same_path(recorded.get("path"), tok.model_path)
        raise UserError(f"model:{path} was trained with tokenizer {recorded.get('path')}, another vocabulary than "
                        f"the policy's {tok.model_path}" + (" (the same file, retrained since)" if same else ""))
    trained_on = default_prompts(ckpt)
    if trained_on != prompts_kind:
        raise UserError(f"model:{path} scores stories for {trained_on} prompts but this run uses {prompts_kind} "
                        f"prompts (--prompts={trained_on}, or a reward model for {prompts_kind} prompts)")
    transformer = model_from_checkpoint(ckpt, merge=True, path=path)
    if max_len and transformer.args.max_seq_len < max_len:
        raise UserError(f"model:{path} reads at most {transformer.args.max_seq_len} tokens but rollouts reach "
                        f"{max_len}; lower --max_new_tokens or --max_seq_len")
    head = scalar_head(transformer.args.dim)
    head.load_state_dict(ckpt["reward_head"])
    return frozen(TransformerWithHead(transformer, head))


def pad_right(sequences):
    """Token lists as a right-padded (B, T) tensor and the index of each one's last token."""
    tokens = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    for row, s in enumerate(sequences):
        tokens[row, :len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) - 1 for s in sequences])


@torch.no_grad()
def last_token_scores(model, sequences, batch_size=64, ctx=nullcontext()):
    """The head's output at the last token of each sequence (a reward model's score), in batches of similar length."""
    model.eval()
    scores = torch.empty(len(sequences))
    for index in torch.argsort(torch.tensor([len(s) for s in sequences])).split(batch_size):
        tokens, last = (t.to(device_of(model)) for t in pad_right([sequences[i] for i in index]))
        with ctx:
            _, s = model(tokens, last[:, None], logits=False)
        scores[index] = s[:, 0].cpu()
    return scores


def make_reward(spec, tok, prompts_kind, target=200, stop_tokens=(), max_len=None, tokenizer_sha256=None,
                ctx=nullcontext(), flag="reward", prompt_style="default"):
    """A function scoring rollouts by a reward spec: (prompts, responses) -> (scores (N,), {term: mean}); its
    attribute checksums is {term: weights checksum} of the reward models it loaded.

    max_len: the longest query + response; tokenizer_sha256: the policy's tokenizer, checked against a reward
    model's; flag: the setting the spec came from, named in errors; prompt_style: the instruct data's."""
    terms = []
    for weight, name in parse_reward(spec, flag):
        if name == "words" and prompts_kind != "instruct":
            raise UserError(f"--{flag}=words needs instruct prompts, which say the words to use: fine-tune on "
                            "instructions (train.py --sft=True) and use --prompts=instruct")
        if name == "words" and prompt_style == "summary":
            raise UserError(f"--{flag}=words needs instructions that name the words, and this data's are summaries: "
                            "pretokenize it with --instruct=True and the default --prompt_style")
        model = None
        if name.startswith("model:"):
            model = load_reward_model(name[len("model:"):], tok, prompts_kind, max_len, tokenizer_sha256)
        terms.append((weight, name, model))

    def term_scores(name, model, batch, responses):
        if name == "length":
            return [length_score(p["tokens"], r, stop_tokens, target) for p, r in zip(batch, responses)]
        if name == "words":
            return [words_score(tok.decode(without_stop(r, stop_tokens)), p["words"], r[-1] == tok.eos_id)
                    for p, r in zip(batch, responses)]
        return last_token_scores(model, [p["tokens"] + r for p, r in zip(batch, responses)], ctx=ctx).tolist()

    def score(batch, responses):
        parts = {name: torch.tensor(term_scores(name, model, batch, responses), dtype=torch.float32)
                 for _, name, model in terms}
        total = sum(weight * parts[name] for weight, name, _ in terms)
        return total, {name: v.mean().item() for name, v in parts.items()}
    score.checksums = {name: weights_checksum(model) for _, name, model in terms if model is not None}
    return score


# ----------------------------------------------------------------------------- PPO's arithmetic

def masked_mean(x, mask):
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of the valid entries."""
    n = mask.sum().clamp(min=2)
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask) * n / (n - 1)


def whiten(x, mask):
    """x shifted and scaled to mean 0 and variance 1 over the valid entries; 0 elsewhere."""
    return torch.where(mask, (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + 1e-8), 0.0)


def kl_per_token(logp, ref_logp, estimator="k1"):
    """KL(policy || reference) estimated at each sampled token (Schulman, "Approximating KL divergence"):
    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, never negative)."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise UserError(f"--kl_estimator must be k1 or k3, got {estimator!r}")


def token_rewards(scores, kl, mask, kl_coef):
    """-kl_coef * KL on every response token, plus each row's score on its last valid token."""
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    last = mask.sum(1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(values, rewards, mask, gamma, lam):
    """Advantages and returns by generalised advantage estimation over each row's valid tokens (B, T)."""
    values, rewards = torch.where(mask, values, 0.0), torch.where(mask, rewards, 0.0)
    advantages = torch.zeros_like(values)
    running = torch.zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else 0.0  # 0 after a row's last token
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


class KLController:
    """The coefficient of the KL penalty: fixed, or adaptive (Ziegler et al. 2019), moved each iteration by
    at most 20% x n_steps / horizon toward the coefficient that gives the target KL."""

    def __init__(self, value, target=None, horizon=10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl, n_steps):
        if self.target is None:
            return
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon


def ppo_loss(logp, values, old_logp, old_values, advantages, returns, mask, cliprange, cliprange_value, vf_coef):
    """The clipped policy loss plus vf_coef times the clipped value loss, over the valid tokens; and its stats."""
    logp = torch.where(mask, logp, old_logp)  # padding: ratio 1, never an overflow
    values = torch.where(mask, values, old_values)
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value_losses = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_losses, mask)
    ratio = torch.exp(logp - old_logp)
    policy_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    policy_loss = masked_mean(policy_losses, mask)
    loss = policy_loss + vf_coef * value_loss
    with torch.no_grad():
        log_ratio = logp - old_logp
        stats = {
            "ppo/loss/policy": policy_loss, "ppo/loss/value": value_loss, "ppo/loss/total": loss,
            "ppo/policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
            "ppo/policy/policykl": masked_mean(-log_ratio, mask),
            "ppo/policy/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
            "ppo/val/vpred": masked_mean(values, mask),
            "ppo/val/error": masked_mean((values - returns) ** 2, mask),
            "ppo/val/clipfrac": masked_mean(((values - old_values).abs() > cliprange_value).float(), mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------- one PPO iteration

@dataclass
class PPOSettings:
    """PPO's hyperparameters (train.py's settings of the same names); defaults are the PPO fork's but for lam
    (1.0, not 0.95: train.py says why)."""
    max_new_tokens: int = 300
    batch_size: int = 50  # the minibatch
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 1.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_estimator: str = "k1"
    max_policy_kl: float = 0.3  # stop the iteration's epochs once an epoch's policy KL exceeds this; 0: never
    group_by_length: bool = True  # minibatches of rollouts of similar length (less padding), in shuffled order


def processes():
    """How many torchrun processes share this PPO run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_processes(x, dev="cpu"):
    """x (a tensor, or a dict of floats) averaged over the torchrun processes: each rolls out its own prompts,
    and whatever steers the run (early stop, the KL coefficient) must be the same in all of them."""
    if processes() == 1:
        return x
    if isinstance(x, dict):
        return dict(zip(x, mean_over_processes(torch.tensor(list(x.values()), dtype=torch.float64), dev).tolist()))
    total = x.detach().to(dev, copy=True)
    dist.all_reduce(total)
    return (total / processes()).cpu()


def minibatches(lengths, size, group_by_length=True):
    """Row indices of each minibatch of an epoch, drawn from torch's RNG. Grouped by length, the rows sorted by
    length (ties in random order) are cut into minibatches, which then come in random order."""
    order = torch.randperm(len(lengths))
    if not group_by_length:
        return list(order.split(size))
    order = order[torch.argsort(lengths[order], stable=True)]
    batches = list(order.split(size))
    return [batches[i] for i in torch.randperm(len(batches))]


def ppo_iteration(model, reference, prompts, reward, kl_ctl, cfg, update, stop_tokens, ctx=nullcontext()):
    """Roll out, score, compute advantages, and update; returns the iteration's stats (the fork's names) and the
    number of response tokens.

    model is the policy with its value head (a TransformerWithHead, or DDP around one under torchrun: then each
    process rolls out its own prompts and the stats are means over processes), reference the frozen
    TransformerWithHead without a head, prompts a PromptStream, reward make_reward's function, update(loss) one
    optimizer step."""
    dev = device_of(model)
    policy = getattr(model, "module", model)  # DDP's wrapper only for the update: its backward syncs gradients
    t0 = time.perf_counter()
    batch = next(prompts)
    queries = [p["tokens"] for p in batch]
    responses, hidden = rollout(policy.transformer, queries, cfg.max_new_tokens, stop_tokens, ctx=ctx,
                                return_hidden=True)
    t1 = time.perf_counter()
    scores, reward_parts = reward(batch, responses)
    data = Rollouts.pack(queries, responses)
    old_logp, old_values, entropy = score_responses(policy, data, cfg.batch_size, ctx, hidden)
    ref_logp, _, _ = score_responses(reference, data, cfg.batch_size, ctx)
    t2 = time.perf_counter()
    mask = data.mask
    kl = torch.where(mask, kl_per_token(old_logp, ref_logp, cfg.kl_estimator), 0.0)
    kl_coef = kl_ctl.value
    rewards = token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = gae(old_values, rewards, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)
    t3 = time.perf_counter()
    model.eval()  # dropout would make the ratio of new to old probabilities noise
    minibatch_stats, epochs = [], 0
    for epochs in range(1, cfg.ppo_epochs + 1):
        epoch_stats = []
        for index in minibatches(data.query_len + data.response_len, cfg.batch_size, cfg.group_by_length):
            tokens, positions, targets, mb_mask = (t.to(dev) for t in data.rows(index))
            r = targets.shape[1]
            with ctx:
                logits, values = model(tokens, positions)
            old = (t[index, :r].to(dev) for t in (old_logp, old_values, advantages, returns))
            loss, stats = ppo_loss(token_logprobs(logits, targets), values, *old, mb_mask, cfg.cliprange,
                                   cfg.cliprange_value, cfg.vf_coef)
            update(loss)
            epoch_stats.append(stats)
        minibatch_stats += epoch_stats
        epoch_kl = mean_over_processes(torch.stack([s["ppo/policy/policykl"] for s in epoch_stats]).mean(), dev)
        if cfg.max_policy_kl and epoch_kl.item() > cfg.max_policy_kl:
            break  # the policy moved too far from the one that rolled out
    t4 = time.perf_counter()
    kl_ref = mean_over_processes(kl.sum(1).mean(), dev).item()
    kl_ctl.update(kl_ref, n_steps=len(queries) * processes())
    lengths = (data.query_len + data.response_len).float()
    stopped = torch.tensor([r[-1] in stop_tokens for r in responses], dtype=torch.float32)
    stats = {k: torch.stack([s[k] for s in minibatch_stats]).mean().item() for k in minibatch_stats[0]}
    stats.update({
        "ppo/policy/entropy": masked_mean(entropy, mask).item(),
        "ppo/policy/advantages_mean": masked_mean(advantages, mask).item(),
        "ppo/returns/mean": masked_mean(returns, mask).item(), "ppo/returns/var": masked_var(returns, mask).item(),
        "ppo/val/mean": masked_mean(old_values, mask).item(), "ppo/val/var": masked_var(old_values, mask).item(),
        "ppo/kl_ref": kl_ref, "ppo/kl_coef": kl_coef, "ppo/epochs": epochs,
        "ppo/reward_all": (rewards * mask).sum(1).mean().item(),
        "env/reward_mean": scores.mean().item(), "env/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        **{f"env/reward/{name}": v for name, v in reward_parts.items()},
        "tokens/query_len_mean": data.query_len.float().mean().item(),
        "tokens/response_len_mean": data.response_len.float().mean().item(),
        "tokens/total_len_mean": (lengths - stopped).mean().item(),  # what the length reward counts
        "tokens/stopped": stopped.mean().item(),
        "time/ppo/rollout": t1 - t0, "time/ppo/scoring": t2 - t1, "time/ppo/advantages": t3 - t2,
        "time/ppo/update": t4 - t3, "time/ppo/total": t4 - t0,
    })
    return mean_over_processes(stats, dev), int(data.response_len.sum())


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_policy(model, tok, batches, reward, max_new_tokens, stop_tokens, seed=0, ctx=nullcontext()):
    """Mean score, length and ended share of the model's stories for the prompt batches (and, for instruct
    prompts, the share using all their words and the mean share of words used), drawn at temperature 1 from a
    fixed seed so that evaluations compare; and the (prompt, story) texts."""
    generator = torch.Generator(device=model.rope_cos.device).manual_seed(seed)
    scores, lengths, ended, all_words, word_share, samples = [], [], [], [], [], []
    for batch in batches:
        responses = rollout(model, [p["tokens"] for p in batch], max_new_tokens, stop_tokens, generator=generator,
                            ctx=ctx)
        scores += reward(batch, responses)[0].tolist()
        for p, r in zip(batch, responses):
            story_ids = without_stop(r, stop_tokens)
            story = tok.decode(story_ids)
            lengths.append(len(p["tokens"]) + len(story_ids))
            ended.append(r[-1] in stop_tokens)
            if p["words"]:
                used = [uses_word(story, w) for w in p["words"]]
                all_words.append(all(used))
                word_share.append(np.mean(used))
            samples.append((prompt_text(p, tok), story))
    result = {"score": float(np.mean(scores)), "length": float(np.mean(lengths)), "ended": float(np.mean(ended))}
    if all_words:
        result["all_words"] = float(np.mean(all_words))
        result["word_share"] = float(np.mean(word_share))
    return result, samples


def prompt_text(prompt, tok):
    return prompt["instruction"] if prompt["instruction"] is not None else tok.decode(prompt["tokens"])


# ----------------------------------------------------------------------------- the reward model

def read_preferences(path, tok, max_len):
    """The pairs of a JSONL preference file: [{"chosen", "rejected": prompt + story tokens, "tie": bool}].

    Skipped answers are left out; a line that is not a preference is an error naming the line."""
    pairs = [pair_tokens(row, tok, where, max_len) for where, row in preference_rows(path)]
    if not pairs:
        raise UserError(f"{path} holds no preference pairs: label some with python ppo.py label "
                        f"--checkpoint=... --out={path}")
    return pairs


def preference_prompts(path, bos_id, asked="auto"):
    """The prompts a preference file's stories answer: "plain" when its prompts are story starts (recorded tokens
    starting with BOS), else "instruct" (the instruct layout; every row given as text). One kind per file; a
    --prompts that is not "auto" must agree with it."""
    kinds = {"plain" if has_tokens(row) and row["prompt_tokens"][:1] == [bos_id] else "instruct"
             for _, row in preference_rows(path)}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes stories for plain prompts (story starts) with stories for instructions; a "
                        "reward model learns one kind: keep the pairs of one")
    kind = kinds.pop() if kinds else "instruct"
    if asked not in ("auto", kind):
        raise UserError(f"--prompts={asked} but the pairs of {path} answer {kind} prompts; leave --prompts out")
    return kind


def file_record(path):
    """{"bytes", "sha256"} of a file as it is now, so that a resumed run can tell whether it changed or only grew."""
    size = os.path.getsize(path)
    return {"bytes": size, "sha256": prefix_sha256(path, size)}


def prefix_sha256(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while size > 0:
            chunk = f.read(min(size, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            size -= len(chunk)
    return h.hexdigest()


def preferences_grown(path, record):
    """Bytes appended to a preference file since record (file_record's) was taken: pairs labelled since, which a
    resumed reward-model run trains on too. A file changed otherwise is refused."""
    size = os.path.getsize(path)
    if size < record["bytes"] or prefix_sha256(path, record["bytes"]) != record["sha256"]:
        raise UserError(f"{path} has changed since this reward model last saved (pairs edited, removed or reordered, "
                        "not only appended): restore it, or train a new reward model from the start")
    return size - record["bytes"]


def preference_rows(path):
    """(where, row) of each answer of a preference file that is not a skip; where names the line for errors."""
    require_file(path, "preference file", f"label pairs with python ppo.py label --checkpoint=... --out={path}")
    for n, row in json_lines(path):
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n} is not a JSON object with prompt, chosen and rejected")
        if not isinstance(row.get("skipped", False), bool):
            raise UserError(f"{path} line {n}: \"skipped\" must be true or false, got {row['skipped']!r}")
        if not row.get("skipped"):
            yield f"{path} line {n}", row


def has_tokens(row):
    return all(isinstance(row.get(f"{k}_tokens"), list) for k in ("prompt", "chosen", "rejected"))


def json_lines(path):
    """(line number, value) of each non-blank line of a JSON-lines file; a line that does not parse is an error
    naming it."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except ValueError as e:  # bad JSON, or bytes that are not UTF-8
                    where = f" ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
                    raise UserError(f"{path} line {n} is not valid JSON{where}; fix or remove that line") from None


def pair_tokens(row, tok, where, max_len):
    """A preference row's chosen and rejected sequences: its recorded tokens, else its texts in the instruct layout."""
    keys = ("prompt", "chosen", "rejected")
    if has_tokens(row):
        prompt, chosen, rejected = (row[f"{k}_tokens"] for k in keys)
        if not all(type(t) is int and 0 <= t < tok.vocab_size for t in prompt + chosen + rejected):  # no bools
            raise UserError(f"{where}: its tokens are not all ids of the {tok.vocab_size}-token vocabulary")
    elif all(isinstance(row.get(k), str) for k in keys):
        if not all(row[k].strip() for k in keys):
            raise UserError(f"{where}: an empty prompt or story")
        prompt = instruct_prompt(tok, row["prompt"])
        chosen, rejected = (tok.encode(row[k], bos=False, eos=True) for k in ("chosen", "rejected"))
    else:
        raise UserError(f"{where}: a preference needs \"prompt\", \"chosen\" and \"rejected\" texts")
    if not prompt or not chosen or not rejected:
        raise UserError(f"{where}: an empty prompt or story")
    if len(prompt) + max(len(chosen), len(rejected)) > max_len:
        raise UserError(f"{where}: {len(prompt) + max(len(chosen), len(rejected))} tokens exceed the model's "
                        f"max_seq_len={max_len}")
    tie = row.get("tie", False)
    if not isinstance(tie, bool):
        raise UserError(f"{where}: \"tie\" must be true or false, got {tie!r}")
    return {"chosen": prompt + chosen, "rejected": prompt + rejected, "tie": tie}


def split_pairs(pairs, val_fraction, path="the preference file"):
    """(train, val): pair i is held out when the count ceil(i * val_fraction) steps up at it, so val_fraction = 1/k
    holds out pairs 0, k, 2k..., and pairs appended to the file later never move from one side to the other."""
    if not 0 < val_fraction <= 0.5:
        raise UserError(f"--val_fraction must be above 0 and at most 0.5 (every other pair), got {val_fraction}")
    share = Fraction(val_fraction).limit_denominator(10 ** 6)  # exact: 30 * 0.1 is not 3 in floats
    held = [math.ceil(i * share) < math.ceil((i + 1) * share) for i in range(len(pairs))]
    train, val = [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]
    if not train:
        raise UserError(f"{path} has {len(pairs)} pair(s): too few to hold some out; label more")
    if not val:
        raise UserError(f"--val_fraction={val_fraction} holds out none of the {len(pairs)} pairs; raise it")
    return train, val


def preference_batch(pairs):
    """(tokens (2B, T) right-padded: the chosen sequences, then the rejected; index of each last token; tie (B,))."""
    tokens, last = pad_right([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    return tokens, last, torch.tensor([p["tie"] for p in pairs])


class PreferenceBatches(tinystories.BatchStream):
    """Batches of preference pairs, each epoch in a new order; batch i depends only on (seed, rank, i)."""

    def __init__(self, pairs, batch_size, seed=0, rank=0, held_out=()):
        self.pairs, self.batch_size, self.seed, self.rank = pairs, batch_size, seed, rank
        self.held_out = held_out  # the file's val split, for evals
        self._order = tinystories.EpochOrder(len(pairs), seed, rank)

    def __next__(self):
        return preference_batch([self.pairs[i] for i in self.ordered_batch(self._order)])


def preference_loss(scores, tie):
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (a tie: the loss of a 50:50 preference), and how
    many of the decided pairs are ranked right (equal scores: half right, a coin toss), of how many. scores: the
    chosen rows' scores, then the rejected."""
    chosen, rejected = scores.float().chunk(2)
    margin = chosen - rejected
    loss = torch.where(tie, -0.5 * (F.logsigmoid(margin) + F.logsigmoid(-margin)), -F.logsigmoid(margin)).mean()
    right = ((margin > 0) & ~tie).sum() + 0.5 * ((margin == 0) & ~tie).sum()
    return loss, float(right), int((~tie).sum())


@torch.no_grad()
def evaluate_preferences(model, pairs, batch_size, ctx=nullcontext()):
    """Mean Bradley-Terry loss and accuracy (share of decided pairs ranked right) of a reward model on pairs; no
    accuracy when every pair is a tie."""
    model.eval()
    total, right, decided = 0.0, 0.0, 0
    for start in range(0, len(pairs), batch_size):
        tokens, last, tie = (t.to(device_of(model)) for t in preference_batch(pairs[start:start + batch_size]))
        with ctx:
            _, scores = model(tokens, last[:, None], logits=False)
        loss, r, d = preference_loss(scores[:, 0], tie)
        total += loss.item() * len(tie)
        right, decided = right + r, decided + d
    return {"val_loss": total / len(pairs), **({"val_accuracy": right / decided} if decided else {})}


# ----------------------------------------------------------------------------- people in the loop

def answered(path):
    """The index of the next pair to show: one past the last answer in the preference file (0 when none).

    A last line cut short by a crash never held a whole answer: it is dropped, with a note. Any other file is
    refused untouched."""
    if not os.path.exists(path):
        return 0
    if not os.path.isfile(path):
        raise UserError(f"--out={path} is a directory; give a .jsonl file to append answers to")
    with open(path, "rb") as f:
        data = f.read()
    whole = data.rfind(b"\n") + 1 if data and not data.endswith(b"\n") else len(data)
    next_index = 0
    for n, line in enumerate(data[:whole].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        index = row.get("index", n - 1) if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise UserError(f"{path} line {n} is not an answer of ppo.py label (a JSON object with a whole-number "
                            "\"index\"); give a new --out file")
        next_index = max(next_index, index + 1)
    tail = data[whole:]
    if tail:
        try:
            json.loads(tail)
            with open(path, "ab") as f:  # whole, only its newline missing
                f.write(b"\n")
            return answered(path)
        except ValueError:
            if not tail.startswith(b'{"index": '):
                raise UserError(f"{path} does not end in answers of ppo.py label; give a new --out file") from None
            with open(path, "r+b") as f:
                f.truncate(whole)
            print(f"note: dropped an unfinished last line of {path}", file=sys.stderr)
    return next_index


def side_by_side(left, right, width):
    """Two texts in columns of the terminal's width."""
    col = (width - 3) // 2

    def wrap(text, cols):
        return [line for para in text.split("\n") for line in (textwrap.wrap(para, cols) or [""])]
    if col < 20:  # too narrow for two columns: one story above the other
        return "\n".join(wrap(left, max(width, 20)) + [""] + wrap(right, max(width, 20)))
    a, b = wrap(left, col), wrap(right, col)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b))


def ask(index, prompt, stories, read, write):
    """Show a pair and return the person's answer: a, b, tie, skip or quit (quit also at the end of input)."""
    width = shutil.get_terminal_size((100, 24)).columns
    write.write("\n" + textwrap.fill(f"=== pair {index} === {prompt}", max(width, 20)) + "\n")
    write.write(side_by_side(*(f"[{k}] {s}" for k, s in zip("ab", stories)), width) + "\n")
    while True:
        write.write("better story? a / b / t(ie) / s(kip) / q(uit): ")
        write.flush()
        line = read.readline()
        if not line:
            write.write("\n")
            return "quit"
        answer = ANSWERS.get(line.strip().lower())
        if answer:
            return answer
        write.write(f"{line.strip()!r} is not an answer: type a, b, t, s or q\n")


def label(model, tok, stream, path, max_new_tokens, stop_tokens, num_pairs=0, auto_reward=None, seed=0,
          chunk=25, read=None, write=None, ctx=nullcontext()):
    """Show pairs of stories for one prompt and append each answer to path at once, flushed to disk; resumes at
    the pair after the file's last answer. Pair k's prompt and stories depend only on (seed, k) (with auto_reward,
    on the chunk of pairs drawn together). auto_reward(prompts, responses) answers instead of a person, who
    otherwise answers on read (stdin) to what is shown on write (stdout). Returns the number of answers written."""
    read, write = read or sys.stdin, write or sys.stdout
    index = answered(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = 0
    with open(path, "a", encoding="utf-8") as f:
        while not num_pairs or index < num_pairs:
            n = chunk if auto_reward else 1
            n = min(n, num_pairs - index) if num_pairs else n
            batch = []
            for k in range(index, index + n):
                stream.load_state_dict({"next_batch": k})
                batch.append(next(stream)[0])
            queries = [p["tokens"] for p in batch for _ in range(2)]
            generator = torch.Generator(device=model.rope_cos.device).manual_seed(seed * 1_000_003 + index)
            responses = rollout(model, queries, max_new_tokens, stop_tokens, generator=generator, ctx=ctx)
            if auto_reward:
                scores = auto_reward([p for p in batch for _ in range(2)], responses)[0].view(-1, 2)
                answers = ["a" if a > b else "b" if b > a else "tie" for a, b in scores.tolist()]
            for k, p in enumerate(batch):
                pair = responses[2 * k:2 * k + 2]
                stories = [tok.decode(without_stop(r, stop_tokens)) + ("" if r[-1] in stop_tokens else " [cut off]")
                           for r in pair]
                answer = answers[k] if auto_reward else ask(index, prompt_text(p, tok), stories, read, write)
                if answer == "quit":
                    return written
                f.write(json.dumps(preference_row(index, p, pair, answer, tok, stop_tokens)) + "\n")
                f.flush()
                os.fsync(f.fileno())
                index, written = index + 1, written + 1
    return written


def preference_row(index, prompt, pair, answer, tok, stop_tokens):
    """The JSON line of one answer: texts for people, tokens for the reward model."""
    row = {"index": index, "prompt": prompt_text(prompt, tok)}
    if answer == "skip":
        return {**row, "skipped": True}
    chosen, rejected = pair if answer in ("a", "tie") else pair[::-1]
    row.update(chosen=tok.decode(without_stop(chosen, stop_tokens)),
               rejected=tok.decode(without_stop(rejected, stop_tokens)),
               prompt_tokens=list(prompt["tokens"]), chosen_tokens=list(chosen), rejected_tokens=list(rejected))
    if answer == "tie":
        row["tie"] = True
    return row


# ----------------------------------------------------------------------------- command line

@cli
def main(argv=None):
    command = configure_subcommand(globals(), SUBCOMMANDS, argv)
    if not checkpoint:
        raise UserError("say which model writes the stories: --checkpoint=out-sft/ckpt.pt")
    if max_new_tokens < 1 or batch_size < 1 or num_prompts < 1 or num_pairs < 0 or show < 0:
        raise UserError("--max_new_tokens, --batch_size and --num_prompts must be positive, --num_pairs and --show "
                        "not negative")
    if command == "label" and not out:
        raise UserError("say where the answers go: --out=data/prefs.jsonl")
    model, ckpt = load_model(checkpoint, merge=True)
    refuse_reward_model_policy(ckpt, checkpoint)
    model = frozen(model.to(pick_device(device)))
    vocab = model.args.vocab_size
    tok = checkpoint_tokenizer(ckpt, tokenizer, vocab, checkpoint)
    kind = default_prompts(ckpt) if prompts == "auto" else prompts
    data_vocab = tinystories.folder_vocab(tinystories.vocab_source_of(ckpt, vocab), vocab)
    instruct = kind == "instruct"
    meta = tinystories.read_meta(data_vocab, instruct, data_dir)
    tinystories.check_tokenizer(meta, ckpt.get("tokenizer"), vocab, checkpoint,
                                tinystories.pretok_dir(data_vocab, instruct, data_dir))
    stops = (tok.bos_id, tok.eos_id)
    sha = (ckpt.get("tokenizer") or {}).get("sha256")
    if command == "label":
        stream = PromptStream(kind, "train", 1, data_vocab, start_len, seed, data_dir=data_dir,
                              max_len=model.args.max_seq_len)
        auto_reward = make_reward(auto, tok, kind, target_len, stops, model.args.max_seq_len, sha, flag="auto",
                                  prompt_style=meta.get("prompt_style")) if auto else None
        if not auto:
            print(f"labelling {out}: for each pair, say which story is better (answers are saved at once)")
        written = label(model, tok, stream, out, max_new_tokens, stops, num_pairs, auto_reward, seed,
                        chunk=max(1, batch_size // 2))
        print(f"{written} answer(s) appended to {out}; it now reaches pair {answered(out)}")
        return
    spec = reward or ("words" if instruct else "length")
    score = make_reward(spec, tok, kind, target_len, stops, model.args.max_seq_len, sha,
                        prompt_style=meta.get("prompt_style"))
    stream = PromptStream(kind, "val", batch_size, data_vocab, start_len, seed, data_dir=data_dir,
                          max_len=model.args.max_seq_len)
    batches = [next(stream) for _ in range(-(-num_prompts // batch_size))]
    batches[-1] = batches[-1][:num_prompts - batch_size * (len(batches) - 1)]
    result, samples = evaluate_policy(model, tok, batches, score, max_new_tokens, stops, seed)
    print(f"{checkpoint}: {num_prompts} held-out {kind} prompts | reward {spec}: {result['score']:.4f} | "
          f"length {result['length']:.1f} | ended {result['ended']:.1%}"
          + (f" | all words used {result['all_words']:.1%} | words used {result['word_share']:.1%}"
             if "all_words" in result else ""))
    for prompt, story in samples[:show]:
        print(f"--- {prompt}\n{story}")


if __name__ == "__main__":
    main()
