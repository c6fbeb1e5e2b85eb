import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--multiple_of=8"]  # a model of seconds


def train_in_two_processes(args, cwd):
    """train.py under torchrun with two processes; asserts it succeeds and that both end with the same weights,
    and returns its stdout."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *args, "--print_checksum=True"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(cwd),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    sums = dict(line.split()[1:4:2] for line in result.stdout.splitlines() if line.startswith("rank "))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], result.stdout
    return result.stdout


def pretrain_tiny(data_dir, out_dir, max_seq_len, max_iters, eval_every, eval_iters):
    """train.py on the plain shards of data_dir with a TINY model; returns out_dir."""
    import train
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--batch_size=8",
                f"--max_seq_len={max_seq_len}", f"--max_iters={max_iters}", f"--eval_interval={eval_every}",
                f"--eval_iters={eval_iters}", "--log_interval=20", "--learning_rate=3e-3", "--warmup_iters=20"])
    return out_dir


def dead_pid():
    """The id of a process that has ended, as a killed writer's would be."""
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


@pytest.fixture
def shared_data():
    """../shared/data: reference files written by llama2.c (skips where it is absent)."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"reference files not found at {SHARED_DATA} (../shared beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def story_data(tmp_path_factory):
    """A data_dir holding the built-in corpus, a 512-token vocabulary, and its plain and instruct shards.

    Made once per session through tinystories' own steps (builtin, train_vocab, pretokenize)."""
    import tinystories
    d = str(tmp_path_factory.mktemp("story_data"))
    tinystories.builtin(num_shards=3, stories_per_shard=300, seed=0, data_dir=d)
    tinystories.train_vocab(512, data_dir=d)
    tinystories.pretokenize(512, data_dir=d)
    tinystories.pretokenize(512, instruct=True, data_dir=d)
    return d


INFERENCE_CORPUS = """Once upon a time, there was a little cat named Tom. Tom liked to play with a red ball in the sun.
One day, Lily saw a big dog in the park. "Can I play with you?" she asked. The dog wagged its tail.
Mom made a cake with 3 eggs and 12 cherries. The café was warm and naïve Ben smiled at the jolly baker.
They ran, jumped and laughed until the stars came out. Then they went home and slept well.
"""
INFERENCE_STORY = "Tom liked to play with a red ball in the sun. Then they went home and slept well."
INFERENCE_INSTRUCTION = "Write a story about a cat and a ball."


def train_inference_tokenizer(directory, name="tok", **options):
    """A 400-token sentencepiece BPE vocabulary with llama2.c's settings (options override), and its .bin."""
    import sentencepiece as spm
    from tokenizer import Tokenizer
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(INFERENCE_CORPUS * 20)
    prefix = os.path.join(directory, name)
    settings = dict(model_type="bpe", vocab_size=400, byte_fallback=True, split_digits=True,
                    allow_whitespace_only_pieces=True, normalization_rule_name="identity",
                    character_coverage=1.0, minloglevel=2)
    settings.update(options)
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, **settings)
    Tokenizer(prefix + ".model").export(prefix + ".bin")
    return prefix + ".model", prefix + ".bin"


@pytest.fixture(scope="session")
def inference_models(tmp_path_factory):
    """For export, run.c and sample.py: a vocabulary (.model, .bin) and checkpoints in train.py's layout, one
    with random weights and one trained briefly on a story and an instruct example (peaked logits, EOS learned).

    Returns a dict of paths: tokenizer, tokenizer_bin, random, trained."""
    import torch
    from model import ModelArgs, Transformer, save_checkpoint
    from tokenizer import Tokenizer, instruct_example
    d = str(tmp_path_factory.mktemp("inference"))
    tok_model, tok_bin = train_inference_tokenizer(d)
    tok = Tokenizer(tok_model)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                     max_seq_len=128)
    paths = {"tokenizer": tok_model, "tokenizer_bin": tok_bin}
    story = tok.encode("Once upon a time, there was a little cat named Tom. " + INFERENCE_STORY, bos=True, eos=True)
    instruct_tokens, instruct_labels = instruct_example(tok, INFERENCE_INSTRUCTION, INFERENCE_STORY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread, and far faster on a busy machine
    for name, steps in (("random", 0), ("trained", 150)):
        torch.manual_seed(0)
        model = Transformer(args)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = (model(torch.tensor([story[:-1]]), torch.tensor([story[1:]]))[1]
                    + model(torch.tensor([instruct_tokens[:-1]]), torch.tensor([instruct_labels[1:]]))[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        paths[name] = os.path.join(d, f"{name}.pt")
        save_checkpoint({"model": model.state_dict(), "model_args": vars(args), "config": {"seed": 0},
                         "mode": "sft" if steps else "pretrain", "iter_num": steps, "best_val_loss": 0.0,
                         "optimizer": opt.state_dict(), "rng": None, "data_state": None,
                         "tokenizer": {"path": tok_model, "vocab_size": tok.vocab_size}, "eos": True,
                         "lora": None}, paths[name])
    torch.set_num_threads(threads)
    return paths


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: tiny models gain nothing from a second thread, and lose much
    when the machine is busy."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
