"""Pretrain a small Llama 2 on TinyStories, or fine-tune one on instructions (full or LoRA), on a CPU or GPUs.

    python train.py                         # pretrain the 260K shape on data/tok512, sized for a 2-core CPU
    python train.py config/stories260K.py   # llama2.c's stories260K recipe (128 x 512 tokens per iteration)
    python train.py --sft=True --init_from=out260K/ckpt.pt --out_dir=out-sft        # full SFT
    python train.py --sft=True --init_from=out260K/ckpt.pt --lora_rank=8 --out_dir=out-lora  # LoRA SFT
    python train.py --init_from=resume --out_dir=out260K                            # continue any run
    python train.py --ppo=True --init_from=out260K/ckpt.pt --reward=length --target_len=200 --out_dir=out-ppo
    python train.py --reward_model=True --preferences=data/prefs.jsonl --init_from=out-sft/ckpt.pt --out_dir=out-rm
    torchrun --standalone --nproc_per_node=2 train.py --gradient_accumulation_steps=2 ...   # DDP

In out_dir: ckpt.pt is the latest state, written at every eval and at the end of training, and is what
--init_from=resume continues (bit for bit on CPU: optimizer, RNG and data stream are restored). best.pt is
the checkpoint with the lowest val loss so far, unless always_save_checkpoint=True (then only the latest is
kept). metrics.jsonl gets one JSON row per log_interval ({"iter", "loss", "lr", "tokens_per_s", ...}) and one
per eval ({"iter", "val_loss"}). A resumed run keeps the settings of its checkpoint; settings given on its
command line (say a larger --max_iters) override them.

RLHF (ppo.py has the pieces): --ppo=True fine-tunes a checkpoint by PPO against --reward; each iteration rolls
out `rollouts` stories, and batch_size is its minibatch. Its checkpoints add the value head, the KL coefficient
and the reference model (path and weights checksum: resuming refuses a reference file that changed); its evals
report the score on held-out prompts (val_loss is minus that score). --reward_model=True trains a scalar head
and the transformer on --preferences with the Bradley-Terry loss; its evals report held-out accuracy. A fresh
run of either mode starts from MODE_DEFAULTS' settings (the PPO fork's for PPO) unless given otherwise.
"""
import dataclasses
import glob
import json
import math
import os
import re
import time
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ppo as rlhf
import tinystories
from configurator import UserError, atomic_output, cli, configure, current_config, refuse_overwriting, \
    refuse_read_only, remove_dead_temporaries
from model import ModelArgs, Transformer, apply_lora, autocast_context, lora_state_dict, model_from_checkpoint, \
    pick_device, read_checkpoint, save_checkpoint, weights_checksum
from tokenizer import Tokenizer, default_prompts

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 250  # evaluate val loss and write ckpt.pt every this many iterations
log_interval = 10
eval_iters = 10  # val batches per eval; llama2.c's 2 x 100 takes 15 s on a 2-core CPU
eval_only = False  # evaluate once and exit
always_save_checkpoint = False  # True: keep only the latest checkpoint, no best.pt
init_from = "scratch"  # scratch | resume (out_dir/ckpt.pt) | a checkpoint or Hugging Face Llama folder to fine-tune
# data
data_dir = "data"
vocab_source = "custom"  # custom: our tokenizer in data/tok{vocab_size}; llama2: Meta's 32000 tokens, data/tok0
vocab_size = 512
batch_size = 16  # micro-batch size; tokens per iteration = batch_size * max_seq_len * gradient_accumulation_steps
max_seq_len = 256
seed = 1337
# mode
sft = False  # train on the instruct shards; the loss counts story tokens only
ppo = False  # RLHF: PPO from --init_from against --reward
reward_model = False  # train a reward model on --preferences, from --init_from
# model (taken from the checkpoint when fine-tuning or resuming)
dim = 64
n_layers = 5
n_heads = 8
n_kv_heads = 4
multiple_of = 4
dropout = 0.0
# LoRA (fine-tuning only): freeze the model, train low-rank adapters on lora_targets
lora_rank = 0  # 0: no LoRA
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "wq,wk,wv,wo"
# AdamW and schedule
gradient_accumulation_steps = 1  # the total over all DDP processes
learning_rate = 1e-3
max_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0.0 disables clipping
decay_lr = True  # linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 100
lr_decay_iters = None  # None: max_iters
min_lr = 0.0
# PPO (ppo.py) and the reward model
reward = "length"  # PPO: terms joined by +, with weights: length, words, model:PATH (e.g. length+0.5*words)
prompts = "auto"  # plain (story starts) | instruct | auto: PPO instruct after SFT, else plain; RM: its pairs'
start_len = 30  # plain prompts: BOS + 1..start_len tokens of a story
target_len = 200  # the length reward's goal for len(query + response)
max_new_tokens = 300
rollouts = 400  # stories per PPO iteration (per process under torchrun); batch_size is the minibatch
ppo_epochs = 4
init_kl_coef = 0.2
kl_control = "adaptive"  # adaptive (Ziegler et al.: toward kl_target over kl_horizon rollouts) | fixed
kl_target = 6.0  # KL to the reference, summed over a response
kl_horizon = 10000
kl_estimator = "k1"  # k1: log p/q per sampled token | k3: (q/p - 1) - log q/p, never negative
gamma = 1.0
lam = 1.0  # GAE; below 1, a fresh value head leaves tokens far from the score with ~0 advantage, which
# whitening then lifts above the (negative) mean: lam=0.95 made stories longer under the length reward
cliprange = 0.2
cliprange_value = 0.2
vf_coef = 0.1
max_policy_kl = 0.3  # end an iteration's epochs when an epoch's policy KL exceeds this (the fork: 1.5 x 0.2)
group_by_length = True  # PPO minibatches of rollouts of similar length, in shuffled order: less padding
preferences = ""  # reward model: the JSONL file of {prompt, chosen, rejected}
val_fraction = 0.1  # reward model: share of the pairs held out
# system
device = "cpu"  # cpu | cuda | cuda:1 | mps
dtype = "float32"  # float32 | bfloat16 | float16 (autocast; float16 adds a GradScaler)
compile = False  # torch.compile the model
peak_flops = None  # the device's peak FLOP/s (e.g. 312e12 for an A100 in bf16): logs MFU when given
print_checksum = False  # debug: every process prints a hash of its weights at the end (DDP sync check)
# -----------------------------------------------------------------------------

MODEL_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "vocab_size")
FIXED_ON_RESUME = MODEL_KEYS + ("vocab_source", "dropout", "sft", "lora_rank", "lora_alpha", "lora_dropout",
                                "lora_targets", "ppo", "reward_model", "prompts", "reward", "preferences",
                                "val_fraction")
MODE_DEFAULTS = {  # a fresh run of these modes starts from these settings, unless given
    "ppo": {"batch_size": 50, "learning_rate": 1e-4, "weight_decay": 0.01, "beta2": 0.99, "decay_lr": False,
            "max_iters": 100, "eval_interval": 20, "eval_iters": 4, "log_interval": 1},
    "reward_model": {"batch_size": 32, "learning_rate": 3e-4, "weight_decay": 0.01, "max_iters": 1000,
                     "warmup_iters": 50, "eval_interval": 100},
}


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, whatever the mode."""
    mode: str
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    raw_model: Transformer  # the plain module: its weights are what a checkpoint saves
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ctx: Any  # autocast context (or nullcontext)
    device: str
    rank: int
    world_size: int
    accum_steps: int  # micro-steps per iteration in this process
    batches: Any  # the training stream; its state_dict goes into the checkpoint
    meta: dict  # the pretokenized data's meta.json
    base_checkpoint: Optional[str] = None  # a LoRA run's frozen base
    base_checksum: Optional[str] = None  # and its weights' hash, so that a base trained on since is noticed
    iter_num: int = 0
    best_val_loss: float = float("inf")
    resumed: bool = False
    extra_state: Callable[[], dict] = dict  # a mode's further checkpoint entries (e.g. a value head)
    head: Optional[torch.nn.Module] = None  # PPO's value head or the reward model's head

    @property
    def master(self):
        return self.rank == 0


# ----------------------------------------------------------------------------- settings

def absolute_paths(settings):
    """--preferences and the reward's model:PATH terms made absolute, as recorded, so a run resumes from any
    working directory (and the same file given either way compares equal)."""
    if settings.get("preferences"):
        settings["preferences"] = os.path.abspath(settings["preferences"])
    if settings.get("reward"):
        settings["reward"] = re.sub(r"model:(\S+?)(?=\s*(?:\+|$))",
                                    lambda m: "model:" + os.path.abspath(m.group(1)), settings["reward"])


def resolve_settings(changed):
    """Settle the settings of this run; returns (checkpoint dict or None, its path).

    Resume takes every setting from the checkpoint except those given now; fine-tuning takes the shape."""
    g = globals()
    ckpt, path = None, None
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            start = "a trained checkpoint" if mode_name() in ("ppo", "reward_model") else "scratch"
            raise UserError(f"nothing to resume: {path} does not exist (start with --init_from={start})")
        ckpt = read_checkpoint(path)
        if not {"config", "optimizer", "rng", "data_state"} <= set(ckpt):
            raise UserError(f"{path} lacks the training state to resume (not written by this train.py); "
                            f"fine-tune from it instead: --init_from={path}")
        saved = ckpt["config"]
        for k in FIXED_ON_RESUME:
            if k in changed and k in saved and changed[k] != saved[k]:
                raise UserError(f"--{k}={changed[k]!r} but {path} was trained with {k}={saved[k]!r}; "
                                "a resumed run keeps its model and mode")
        if "init_kl_coef" in changed and "kl_coef" in ckpt:
            raise UserError(f"a resumed PPO run goes on with its KL coefficient ({ckpt['kl_coef']:.4g}); "
                            "--init_kl_coef sets a fresh run's: leave it out")
        for k, v in saved.items():
            if k in g["_config_defaults"] and k not in changed and k not in ("init_from", "out_dir"):
                g[k] = v
    elif init_from != "scratch":
        path = init_from
        ckpt = read_checkpoint(path)
        if "model_args" not in ckpt:
            raise UserError(f"{path} has no model_args: not a checkpoint written by train.py")
        args = ModelArgs.from_dict(ckpt["model_args"])
        for k in MODEL_KEYS:
            theirs = getattr(args, k)
            resizable = k == "max_seq_len" and not lora_rank  # only the rope tables depend on it
            if k in changed and changed[k] != theirs and not resizable:
                raise UserError(f"--{k}={changed[k]} but {path} has {k}={theirs}; a fine-tuned model keeps its "
                                "checkpoint's shape and vocabulary (a LoRA run its max_seq_len too)")
            if k not in changed:
                g[k] = theirs
        if "dropout" not in changed:
            g["dropout"] = args.dropout
        elif lora_rank and dropout != args.dropout:
            raise UserError(f"a LoRA run keeps its base model's dropout ({args.dropout}): set --lora_dropout instead")
        if "vocab_source" not in changed:
            g["vocab_source"] = tinystories.vocab_source_of(ckpt, args.vocab_size)
    elif vocab_source == "llama2" and "vocab_size" not in changed:
        g["vocab_size"] = tinystories.LLAMA2_VOCAB
    if init_from != "resume":
        start_mode(changed, ckpt)
    check_settings(changed)
    return ckpt, path


def start_mode(changed, ckpt):
    """A fresh run's mode settings: MODE_DEFAULTS unless given, and the prompts that suit the checkpoint."""
    mode = mode_name()
    g = globals()
    for k, v in MODE_DEFAULTS.get(mode, {}).items():
        if k not in changed:
            g[k] = v
    if mode in ("ppo", "reward_model"):
        if init_from == "scratch":
            raise UserError(f"--{mode}=True starts from a trained model: give its checkpoint with "
                            "--init_from=path/to/ckpt.pt")
        if mode == "ppo":  # (a reward model's prompts come from its preference file, in run_training)
            rlhf.refuse_reward_model_policy(ckpt, init_from)
            if prompts == "auto":
                g["prompts"] = default_prompts(ckpt)


def check_settings(changed):
    """Refuse settings that cannot work, each with one line saying what to change."""
    if vocab_source not in ("custom", "llama2"):
        raise UserError(f"--vocab_source must be custom or llama2, got {vocab_source!r}")
    llama2_vocab = tinystories.LLAMA2_VOCAB
    if vocab_source == "llama2" and vocab_size != llama2_vocab:
        raise UserError(f"the Llama 2 tokenizer has {llama2_vocab} tokens: use --vocab_size={llama2_vocab} "
                        "or --vocab_source=custom")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    for k in ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval", "log_interval",
              "eval_iters"):
        if globals()[k] <= 0:
            raise UserError(f"--{k} must be positive, got {globals()[k]}")
    if max_iters < 0 or warmup_iters < 0:
        raise UserError("--max_iters and --warmup_iters must not be negative")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file; give a directory for checkpoints and metrics")
    if not eval_only:  # the checkpoints this run will write: refused now, not at the first save after the work
        for name in ("ckpt.pt", "best.pt"):
            refuse_read_only(os.path.join(out_dir, name))
            if init_from not in ("scratch", "resume"):
                refuse_overwriting(os.path.join(out_dir, name), init_from, "--init_from")
    if vocab_size <= 0:
        raise UserError(f"--vocab_size must be positive, got {vocab_size}")
    if min(learning_rate, min_lr, weight_decay, grad_clip) < 0:
        raise UserError("--learning_rate, --min_lr, --weight_decay and --grad_clip must not be negative "
                        "(--grad_clip=0 turns clipping off)")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must lie in [0, 1), got {beta1} and {beta2}")
    if lora_alpha <= 0 or not 0 <= lora_dropout < 1:
        raise UserError(f"--lora_alpha must be positive and --lora_dropout in [0, 1), got {lora_alpha} and "
                        f"{lora_dropout}")
    if lr_decay_iters is not None and (not isinstance(lr_decay_iters, int) or lr_decay_iters <= 0):
        raise UserError(f"--lr_decay_iters must be a positive integer (or None for max_iters), got {lr_decay_iters!r}")
    if peak_flops is not None and not (isinstance(peak_flops, (int, float)) and peak_flops > 0):
        raise UserError(f"--peak_flops must be a positive number of FLOP/s, got {peak_flops!r}")
    if lora_rank < 0:
        raise UserError(f"--lora_rank must be positive to train LoRA adapters (0: no LoRA), got {lora_rank}")
    if lora_rank == 0 and {"lora_alpha", "lora_dropout", "lora_targets"} & set(changed):
        raise UserError("LoRA settings were given but --lora_rank is 0: set --lora_rank=8 (or another rank > 0)")
    if lora_rank and init_from == "scratch":
        raise UserError("LoRA fine-tunes a trained model: give its checkpoint with --init_from=path/to/ckpt.pt")
    mode = mode_name()
    if mode == "ppo":
        check_ppo_settings()
    if mode == "reward_model" and not preferences:
        raise UserError("say which preferences to learn: --preferences=data/prefs.jsonl (write it with "
                        "python ppo.py label)")


def check_ppo_settings():
    rlhf.parse_reward(reward)
    if prompts not in ("plain", "instruct"):
        raise UserError(f"--prompts must be plain, instruct or auto, got {prompts!r}")
    if kl_control not in ("adaptive", "fixed"):
        raise UserError(f"--kl_control must be adaptive or fixed, got {kl_control!r}")
    if kl_estimator not in ("k1", "k3"):
        raise UserError(f"--kl_estimator must be k1 or k3, got {kl_estimator!r}")
    for k in ("rollouts", "ppo_epochs", "max_new_tokens", "start_len", "kl_horizon", "target_len"):
        if globals()[k] <= 0:
            raise UserError(f"--{k} must be positive, got {globals()[k]}")
    if kl_control == "adaptive" and kl_target <= 0:
        raise UserError(f"--kl_target must be positive for adaptive KL control, got {kl_target}")
    steps = rollouts * int(os.environ.get("WORLD_SIZE", 1))  # the adaptive update moves by up to 20% x steps/horizon
    if kl_control == "adaptive" and 5 * kl_horizon <= steps:
        raise UserError(f"--kl_horizon={kl_horizon} is too short for {steps} rollouts per iteration: the KL "
                        f"coefficient could fall to zero or below; use --kl_horizon={steps // 5 + 1} or more")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise UserError(f"--gamma and --lam must be between 0 and 1, got {gamma} and {lam}")
    if init_kl_coef < 0 or cliprange <= 0 or cliprange_value <= 0 or vf_coef < 0 or max_policy_kl < 0:
        raise UserError("--init_kl_coef, --vf_coef and --max_policy_kl must not be negative, --cliprange and "
                        "--cliprange_value must be positive")


def get_lr(it):
    """Learning rate of iteration it: linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# ----------------------------------------------------------------------------- data

def data_vocab():
    """The vocab_size tinystories uses to name the data folder (0 is the Llama 2 tokenizer)."""
    return tinystories.folder_vocab(vocab_source, vocab_size)


def uses_instruct_data():
    return sft or (ppo and prompts == "instruct")


def read_data_meta(ckpt=None):
    """meta.json of the data this run trains on, with a clear error when it is missing. A reward model learns
    from a preference file: its "meta" is the tokenizer record of its checkpoint."""
    if reward_model:
        recorded = (ckpt or {}).get("tokenizer") or {}
        if not recorded.get("path"):
            raise UserError(f"{init_from} records no tokenizer, which the preference file needs; train the model "
                            "with this train.py")
        return {"tokenizer": recorded["path"], "vocab_size": recorded["vocab_size"],
                "tokenizer_sha256": recorded.get("sha256"), "eos": bool(ckpt.get("eos", False))}
    return tinystories.read_meta(data_vocab(), instruct=uses_instruct_data(), data_dir=data_dir)


def make_batches(split, rank=0, meta=None):
    """The batch stream of a split: pretraining windows, instruct examples under --sft, rollout prompts under
    --ppo, preference pairs under --reward_model (meta: read_data_meta's)."""
    if ppo:  # one batch of val prompts serves every eval
        return rlhf.PromptStream(prompts, split, rollouts if split == "train" else eval_iters * batch_size,
                                 data_vocab(), start_len, seed=seed, rank=rank, data_dir=data_dir,
                                 max_len=max_seq_len)
    if reward_model:
        pairs = rlhf.read_preferences(preferences, Tokenizer(meta["tokenizer"]), max_seq_len)
        train_pairs, val_pairs = rlhf.split_pairs(pairs, val_fraction, preferences)
        return rlhf.PreferenceBatches(train_pairs if split == "train" else val_pairs, batch_size, seed, rank,
                                      held_out=val_pairs)
    cls = tinystories.InstructBatches if sft else tinystories.PretrainBatches
    return cls(split, batch_size, max_seq_len, data_vocab(), seed=seed, rank=rank, data_dir=data_dir)


# ----------------------------------------------------------------------------- model

def build_model(ckpt, path):
    """The model to train and, for LoRA runs, the path of its frozen base checkpoint and the base's checksum."""
    if init_from == "scratch":
        return Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                     vocab_size=vocab_size, multiple_of=multiple_of, max_seq_len=max_seq_len,
                                     dropout=dropout)), None, None
    if init_from == "resume":
        return model_from_checkpoint(ckpt, path=path), ckpt.get("base_checkpoint"), ckpt.get("base_checksum")
    model = model_from_checkpoint(ckpt, merge=True, path=path)
    if lora_rank:  # adapters on the base exactly as saved, so that its checkpoint can rebuild it
        checksum = weights_checksum(model)
        apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
        return model, os.path.abspath(path), checksum
    return reshaped(model, dropout, max_seq_len), None, None


def reshaped(model, new_dropout, new_max_seq_len):
    """model, or a copy of it with another dropout and max_seq_len (only its rope tables depend on that)."""
    if (model.args.dropout, model.args.max_seq_len) == (new_dropout, new_max_seq_len):
        return model
    rebuilt = Transformer(dataclasses.replace(model.args, dropout=new_dropout, max_seq_len=new_max_seq_len))
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def build_head(mode, ckpt, model):
    """PPO's value head or the reward model's head (None in other modes): the checkpoint's when it has one."""
    key = {"ppo": "value_head", "reward_model": "reward_head"}.get(mode)
    if key is None:
        return None
    head = rlhf.scalar_head(model.args.dim)
    if ckpt is not None and key in ckpt:
        head.load_state_dict(ckpt[key])
    return head


def available_memory(device_name, local_world_size):
    """Bytes this process may still allocate on its device, or None when unknown."""
    if device_name.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device_name))[0]
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return kb * 1024 // local_world_size


def training_memory(args: ModelArgs, n_params, n_trainable, batch, seq_len, bytes_per_float=4):
    """Bytes a training step needs (weights, grads, AdamW state, activations), estimated on the low side."""
    # per token and layer: about 16 dim-wide and 5 hidden-wide tensors are kept for backward; the logits
    # and their gradient are vocab-wide
    per_token = args.n_layers * (16 * args.dim + 5 * args.hidden_dim) + 3 * args.vocab_size
    return (n_params + 3 * n_trainable) * 4 + batch * seq_len * per_token * bytes_per_float


def check_memory(model, device_name, local_world_size):
    """Refuse, before allocating anything, a batch that certainly cannot fit."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = training_memory(model.args, n_params, n_trainable, batch_size, max_seq_len,
                           4 if dtype == "float32" else 2)
    have = available_memory(device_name, local_world_size)
    if have is not None and need > have:
        raise UserError(f"batch_size={batch_size} x max_seq_len={max_seq_len} needs about {need / 2**30:.1f} GiB "
                        f"but {have / 2**30:.1f} GiB is free: {oom_hint()}")


def oom_hint():
    return (f"lower --batch_size (now {batch_size}) and raise --gradient_accumulation_steps to keep the tokens "
            "per iteration, or lower --max_seq_len")


# ----------------------------------------------------------------------------- the shared loop

def lm_loss(model, x, y):
    return model(x, y)[1]


def train_step(model, optimizer, batches, accum_steps, device="cpu", ctx=nullcontext(), scaler=None,
               grad_clip=1.0, loss_of=lm_loss):
    """One optimizer step over accum_steps micro-batches; returns (mean loss tensor, tokens seen).

    loss_of(model, *batch) is the loss of a batch of tensors (the first holds the tokens). The loss stays a
    tensor (no sync per micro-step). A DDP model all-reduces on the last micro-step only."""
    total = torch.zeros((), device=device)
    tokens = 0
    for micro in range(accum_steps):
        batch = [t.to(device, non_blocking=True) for t in next(batches)]
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro == accum_steps - 1
        with ctx:
            loss = loss_of(model, *batch)
        loss_part = loss / accum_steps
        (scaler.scale(loss_part) if scaler is not None else loss_part).backward()
        total += loss_part.detach()
        tokens += batch[0].numel()
    optimizer_step(optimizer, scaler, grad_clip)
    return total, tokens


def optimizer_step(optimizer, scaler, grad_clip):
    """Clip the gradients (unscaled first under float16), step, and clear them."""
    if scaler is not None and grad_clip:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def estimate_val_loss(run):
    """Mean loss over eval_iters val batches; the same batches at every eval, so evals compare."""
    model = run.model.module if isinstance(run.model, DDP) else run.model
    model.eval()
    batches = make_batches("val")
    losses = torch.zeros(eval_iters)
    for k in range(eval_iters):
        x, y = next(batches)
        with run.ctx:
            _, loss = model(x.to(run.device), y.to(run.device))
        losses[k] = loss.detach()
    model.train()
    return losses.mean().item()


def rng_states(run):
    """Each process's RNG state (dropout draws from it), gathered so that resume restores all of them."""
    state = {"torch": torch.get_rng_state()}
    if run.device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    if run.world_size == 1:
        return [state]
    states = [None] * run.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(run, states):
    state = states[run.rank % len(states)]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and run.device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], run.device)


def checkpoint(run, rng):
    """The checkpoint dict of the run as it stands (see the contract in the docs)."""
    lora = None
    if lora_rank:
        lora = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout,
                "targets": [t.strip() for t in lora_targets.split(",") if t.strip()]}
    ckpt = {
        "model": lora_state_dict(run.raw_model) if lora else run.raw_model.state_dict(),
        "model_args": dataclasses.asdict(run.raw_model.args),
        "config": current_config(globals()),
        "mode": run.mode,
        "iter_num": run.iter_num,
        "best_val_loss": run.best_val_loss,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng,
        "data_state": run.batches.state_dict(),
        "tokenizer": {"path": os.path.abspath(run.meta["tokenizer"]), "vocab_size": run.meta["vocab_size"],
                      "sha256": run.meta.get("tokenizer_sha256")},
        "eos": bool(run.meta.get("eos", False)),
        "lora": lora,
    }
    if lora:
        ckpt["base_checkpoint"], ckpt["base_checksum"] = run.base_checkpoint, run.base_checksum
    ckpt.update(run.extra_state())
    return ckpt


def save(run, improved):
    """Write ckpt.pt (and best.pt when val improved); every process joins, rank 0 writes."""
    rng = rng_states(run)
    if not run.master:
        return
    ckpt = checkpoint(run, rng)
    if improved and not always_save_checkpoint:  # best.pt first: a kill between the two must not leave ckpt.pt
        save_checkpoint(ckpt, os.path.join(out_dir, "best.pt"))  # counting a best that best.pt does not hold
    save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))


def log_metrics(row):
    if eval_only:  # a look at a checkpoint, printed: the run's metrics stay as they were
        return
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def check_finite(name, value, it, saved):
    """Stop a run that diverged before it writes a checkpoint of NaN weights over the last good one (saved: this
    run's ckpt.pt exists)."""
    if not math.isfinite(value):
        then = (f"{os.path.join(out_dir, 'ckpt.pt')} keeps the last finite eval: resume from it" if saved else
                "nothing was saved: start again")
        raise UserError(f"training diverged: the {name} is {value} at iteration {it}; {then} with a lower "
                        "--learning_rate (or more --warmup_iters)")


def train_loop(run, step, evaluate, summary=None):
    """Iterate from run.iter_num to max_iters: set the LR, eval and checkpoint, step, log. Shared by all modes.

    step(run) returns (loss tensor, tokens) or (loss, tokens, stats for the log row); evaluate(run) the val
    loss, or a dict of it ("val_loss", what best.pt minimises) and more; summary(row) the log line's middle."""
    first, saved = True, run.resumed
    t_last, iters_since, tokens_since = time.perf_counter(), 0, 0
    while True:
        it = run.iter_num
        lr = get_lr(it)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        at_end = it >= max_iters or eval_only
        just_resumed = first and run.resumed and not eval_only  # ckpt.pt was written after this eval
        if at_end and just_resumed:
            if run.master:
                print(f"{out_dir}/ckpt.pt is already at iteration {it}: raise --max_iters to train on")
            return
        if (it % eval_interval == 0 or at_end) and not just_resumed:
            improved = False
            if run.master:
                evals = evaluate(run)
                evals = evals if isinstance(evals, dict) else {"val_loss": evals}
                val_loss = evals["val_loss"]
                improved = val_loss < run.best_val_loss
                run.best_val_loss = min(run.best_val_loss, val_loss)
                log_metrics({"iter": it, **evals})
                more = "".join(f" | {k.removeprefix('val_')} {v:.4g}" for k, v in evals.items() if k != "val_loss")
                print(f"iter {it}: val loss {val_loss:.4f}" + (" (best)" if improved else "") + more, flush=True)
                check_finite("val loss", val_loss, it, saved)
            if (it > 0 or at_end) and not eval_only:
                save(run, improved)
                saved = True
            t_last, iters_since, tokens_since = time.perf_counter(), 0, 0
        if at_end:
            return
        first = False
        loss, tokens, *stats = step(run)
        run.iter_num += 1
        iters_since, tokens_since = iters_since + 1, tokens_since + tokens * run.world_size
        if it % log_interval == 0 and run.master:
            now = time.perf_counter()
            dt = (now - t_last) / iters_since
            tokens_per_s = tokens_since / (now - t_last)
            row = {"iter": it, "loss": loss.item(), "lr": lr, "tokens_per_s": tokens_per_s, "ms_per_iter": dt * 1e3}
            mfu = run.raw_model.estimate_mfu(tokens_per_s / run.world_size, peak_flops)
            if mfu is not None:
                row["mfu"] = mfu
            row.update(*stats)
            log_metrics(row)
            print(f"iter {it} | {summary(row) if summary else f'loss {loss.item():.4f}'} | lr {lr:.2e} | "
                  f"{dt * 1e3:.1f} ms/iter | "
                  f"{tokens_per_s:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu is not None else ""), flush=True)
            check_finite("loss", row["loss"], it, saved)
            t_last, iters_since, tokens_since = now, 0, 0


def lm_step(run):
    """Pretraining and SFT: next-token loss on the run's batches (SFT labels are -1 over the prompt)."""
    return train_step(run.model, run.optimizer, run.batches, run.accum_steps, run.device, run.ctx, run.scaler,
                      grad_clip)


# ----------------------------------------------------------------------------- RLHF modes (ppo.py)

def ppo_recipe(run, ckpt, ckpt_path):
    """PPO's step, evaluate and log summary, which share the frozen reference, the reward and the KL controller."""
    tok = Tokenizer(run.meta["tokenizer"])
    stops = (tok.bos_id, tok.eos_id)  # EOS ends an instruct story, BOS starts the next plain one
    if init_from == "resume":
        reference, record = load_reference(ckpt["reference"]["path"], run.device, ckpt["reference"]["checksum"])
        kl_coef = ckpt["kl_coef"]
    else:
        reference, record = load_reference(ckpt_path, run.device, ckpt=ckpt)
        kl_coef = init_kl_coef
    kl_ctl = rlhf.KLController(kl_coef, kl_target if kl_control == "adaptive" else None, kl_horizon)
    score = rlhf.make_reward(reward, tok, prompts, target_len, stops, max_seq_len, run.meta.get("tokenizer_sha256"),
                             run.ctx, prompt_style=run.meta.get("prompt_style"))
    retrained = [name for name, checksum in score.checksums.items()
                 if init_from == "resume" and ckpt.get("reward_models", {}).get(name, checksum) != checksum]
    if retrained:  # iterated RLHF retrains the reward model on purpose; scores from before do not compare
        ckpt["best_val_loss"] = float("inf")  # what the resume below restores: best.pt is judged afresh
        if run.master:
            print(f"note: {', '.join(retrained)} changed since this run last saved: its scores are the reward from "
                  "here on, and best.pt is chosen by them")
    settings = rlhf.PPOSettings(**{f.name: globals()[f.name] for f in dataclasses.fields(rlhf.PPOSettings)})
    val_batches = [next(make_batches("val"))]
    run.extra_state = lambda: {"value_head": run.head.state_dict(), "kl_coef": kl_ctl.value, "reference": record,
                               "reward_models": score.checksums}

    def update(loss):
        run.scaler.scale(loss).backward()
        optimizer_step(run.optimizer, run.scaler, grad_clip)

    def step(run):
        stats, tokens = rlhf.ppo_iteration(run.model, reference, run.batches, score, kl_ctl, settings, update, stops,
                                           run.ctx)
        return torch.tensor(stats["ppo/loss/total"]), tokens, stats

    def evaluate(run):
        result, _ = rlhf.evaluate_policy(run.raw_model, tok, val_batches, score, max_new_tokens, stops, seed, run.ctx)
        # 0.0 - score rather than -score: a score of 0 logs as 0.0000, not -0.0000
        return {"val_loss": 0.0 - result["score"], **{f"val_{k}": v for k, v in result.items()}}

    def summary(row):
        return (f"score {row['env/reward_mean']:.4f} | len {row['tokens/total_len_mean']:.1f} | "
                f"kl {row['ppo/kl_ref']:.3f} (coef {row['ppo/kl_coef']:.4f})")
    return step, evaluate, summary


def load_reference(path, dev, expected_checksum=None, ckpt=None):
    """PPO's frozen reference (a head-less TransformerWithHead) and its record {"path", "checksum"}.

    A resumed run rebuilds it from the recorded path and refuses weights that changed since (the file was
    trained further or replaced): the reference must stay the model PPO started from."""
    if ckpt is None:
        if not os.path.exists(path):
            raise UserError(f"the reference model of this PPO run, {path}, is gone; restore it to resume")
        ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, merge=True, path=path)
    checksum = weights_checksum(model)
    if expected_checksum and checksum != expected_checksum:
        raise UserError(f"the reference model {path} has other weights than when this PPO run started (trained "
                        "further or replaced since); restore that checkpoint to resume")
    model = reshaped(model, 0.0, max_seq_len).to(dev)
    return rlhf.TransformerWithHead(rlhf.frozen(model)), {"path": os.path.abspath(path), "checksum": checksum}


def preference_loss_of(model, tokens, last, tie):
    _, scores = model(tokens, last[:, None], logits=False)
    return rlhf.preference_loss(scores[:, 0], tie)[0]


def reward_model_recipe(run):
    """The reward model's step (Bradley-Terry on pairs of its preference file) and evaluate (held-out loss and
    accuracy)."""
    val_pairs = run.batches.held_out  # read with the training pairs: the file is parsed once
    scorer = rlhf.TransformerWithHead(run.raw_model, run.head)
    record = rlhf.file_record(preferences)  # a resume checks it (run_training)
    run.extra_state = lambda: {"reward_head": run.head.state_dict(), "preferences": record}

    def step(run):
        return train_step(run.model, run.optimizer, run.batches, run.accum_steps, run.device, run.ctx, run.scaler,
                          grad_clip, loss_of=preference_loss_of)

    def evaluate(run):
        result = rlhf.evaluate_preferences(scorer, val_pairs, batch_size, run.ctx)
        scorer.train()
        return result
    return step, evaluate, None


# ----------------------------------------------------------------------------- setup

def all_finished(rank, world_size):
    """Wait until every process is done, meeting through torchrun's store: a process that tore down its
    connections while another still used them aborted it, and after a barrier on those connections its last
    message could still be on its way (1 run in 30 or so of the DDP test)."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"finished/{rank}", "1")
    store.wait([f"finished/{r}" for r in range(world_size)])


def setup_distributed():
    """(rank, local world size, world size, device) of this process; under torchrun joins the process group."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, 1, pick_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size, local_world = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if gradient_accumulation_steps % world_size and mode_name() != "ppo":  # PPO steps once per minibatch
        raise UserError(f"--gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
                        f"{world_size} processes: try --gradient_accumulation_steps={world_size}")
    dev = pick_device(device)
    if device.startswith("cuda"):
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return rank, local_world, world_size, dev


def start_metrics(run):
    """A new run starts metrics.jsonl afresh; a resumed one drops rows after its checkpoint."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = []
    if run.resumed and os.path.isfile(path):
        with open(path) as f:
            rows = [parse_metrics_row(line) for line in f if line.strip()]
        rows = [r for r in rows if r is not None and
                (r["iter"] < run.iter_num or ("val_loss" in r and r["iter"] == run.iter_num))]
    with atomic_output(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def parse_metrics_row(line):
    """One row of metrics.jsonl, or None for a line a killed run left half-written."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("iter"), int) else None


def mode_name():
    """The one place that picks the mode from the flags."""
    chosen = [name for name, on in (("sft", sft), ("ppo", ppo), ("reward_model", reward_model)) if on]
    if len(chosen) > 1:
        raise UserError(f"--{chosen[0]}=True and --{chosen[1]}=True: choose one mode")
    return chosen[0] if chosen else "pretrain"


@cli
def main(argv=None):
    changed = configure(globals(), argv)
    for settings in (changed, globals()):
        absolute_paths(settings)
    ckpt, ckpt_path = resolve_settings(changed)
    rank, local_world, world_size, dev = setup_distributed()
    try:
        run = run_training(ckpt, ckpt_path, rank, local_world, world_size, dev)
        if world_size > 1:
            all_finished(rank, world_size)
        return run
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run_training(ckpt, ckpt_path, rank, local_world, world_size, dev):
    mode = mode_name()
    meta = read_data_meta(ckpt)
    if mode == "reward_model":
        grown = init_from == "resume" and "preferences" in ckpt and rlhf.preferences_grown(preferences,
                                                                                        ckpt["preferences"])
        if grown and rank == 0:
            print(f"note: {preferences} has grown since this run last saved; the pairs labelled since join the "
                  "training (held-out pairs stay held out)")
        # the prompts it scores stories for, recorded for PPO (on resume: pairs appended since are of that kind too)
        globals()["prompts"] = rlhf.preference_prompts(preferences, Tokenizer(meta["tokenizer"]).bos_id, prompts)
    tinystories.check_tokenizer(meta, (ckpt or {}).get("tokenizer"), vocab_size, ckpt_path,
                                tinystories.pretok_dir(data_vocab(), uses_instruct_data(), data_dir))
    torch.manual_seed(seed + rank)
    raw_model, base_checkpoint, base_checksum = build_model(ckpt, ckpt_path)
    head = build_head(mode, ckpt, raw_model)
    check_memory(raw_model, dev, local_world)
    raw_model.to(dev)
    device_type = dev.split(":")[0]
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = autocast_context(dev, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    model = raw_model
    if head is not None:  # groups after the model's, as in the checkpoint's optimizer state
        head.to(dev)
        optimizer.add_param_group({"params": [head.weight], "weight_decay": weight_decay})
        optimizer.add_param_group({"params": [head.bias], "weight_decay": 0.0})
        model = rlhf.TransformerWithHead(raw_model, head)
    model = torch.compile(model) if compile else model
    if world_size > 1:
        # the rope tables never change: no need to broadcast buffers before every forward
        model = DDP(model, device_ids=[dev] if dev.startswith("cuda") else None, forward_sync_buffers=False,
                    gradient_as_bucket_view=True)
    run = Run(mode=mode, model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler, ctx=ctx, device=dev,
              rank=rank, world_size=world_size, accum_steps=gradient_accumulation_steps // world_size,
              batches=make_batches("train", rank, meta), meta=meta, base_checkpoint=base_checkpoint,
              base_checksum=base_checksum, head=head)
    step, evaluate, summary = lm_step, estimate_val_loss, None  # pretrain and sft differ only in their batches
    if mode == "ppo":
        step, evaluate, summary = ppo_recipe(run, ckpt, ckpt_path)
    elif mode == "reward_model":
        step, evaluate, summary = reward_model_recipe(run)
    if init_from == "resume":  # last: building models above draws from the RNG
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        run.batches.load_state_dict(ckpt["data_state"])
        run.iter_num, run.best_val_loss, run.resumed = ckpt["iter_num"], ckpt["best_val_loss"], True
        restore_rng(run, ckpt["rng"])
    ckpt = None  # free the checkpoint's tensors
    if run.master:
        os.makedirs(out_dir, exist_ok=True)
        remove_dead_temporaries(os.path.join(glob.escape(out_dir), "*.tmp*"))  # from a killed run
        if not eval_only:
            start_metrics(run)
        n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        tokens_per_iter = gradient_accumulation_steps * batch_size * max_seq_len
        each = f"{world_size} x " if world_size > 1 else ""  # per process under torchrun
        per_iter = {"ppo": f"{each}{rollouts} rollouts of up to {max_new_tokens} new tokens per iteration, "
                           f"{ppo_epochs} epochs of minibatches of {each}{batch_size}, reward {reward}",
                    "reward_model": f"{gradient_accumulation_steps * batch_size} preference pairs per iteration"}
        print(f"{mode}: {sum(p.numel() for p in raw_model.parameters()):,} parameters ({n_trainable:,} trained), "
              f"{'resuming at iteration ' + str(run.iter_num) if run.resumed else 'from ' + init_from}; "
              + per_iter.get(mode, f"up to {tokens_per_iter:,} tokens per iteration "
                                   f"({world_size} x {run.accum_steps} x {batch_size} x {max_seq_len})")
              + f" on {dev}", flush=True)
    try:
        train_loop(run, step, evaluate, summary)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory: {oom_hint()}") from None
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or "out of memory" in str(e):
            raise UserError(f"out of memory: {oom_hint()}") from None
        raise
    if print_checksum:
        print(f"rank {rank} weights {weights_checksum(raw_model)}", flush=True)
    return run


if __name__ == "__main__":
    main()
