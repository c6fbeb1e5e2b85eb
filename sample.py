"""Sample text from a checkpoint in PyTorch, with the model's KV-cache generate.

    python sample.py --checkpoint=out260K/ckpt.pt --start="Once upon a time" --num_samples=3
    python sample.py --checkpoint=out-sft/ckpt.pt --instruct=True --start="Write a story about a dog."
    python sample.py --checkpoint=out260K/ckpt.pt --start=FILE:prompt.txt --temperature=0

Any checkpoint train.py writes (LoRA adapters are merged, a PPO value head is ignored), or a Hugging Face Llama
folder (export.py's reader). A sample ends at EOS (or BOS: a new story) or after max_new_tokens. With --instruct
the start is the instruction, wrapped in the instruct layout, and only the story is printed.
"""
import os
import sys
from contextlib import nullcontext

import torch

from configurator import UserError, cli, configure
from model import AUTOCAST_DTYPES, autocast_context, load_model, pick_device, without_stop
from tokenizer import checkpoint_tokenizer, instruct_prompt

checkpoint = ""  # the ckpt.pt to sample from (or a Hugging Face Llama folder)
tokenizer = ""  # the sentencepiece .model; default: the one recorded in the checkpoint
start = "Once upon a time"  # the prompt, or FILE:path to read it from a file
instruct = False  # treat start as an instruction and print only the story
num_samples = 1
max_new_tokens = 256
temperature = 1.0  # 0.0 = greedy
top_k = 0  # keep only the k most likely tokens; 0 = off
top_p = 0.9  # nucleus sampling; 1.0 = off
seed = 1337
device = "cpu"  # cpu | cuda | mps
dtype = "float32"  # float32 | bfloat16 | float16 (autocast)


SAMPLES_PER_BATCH = 64  # rows generated together; more samples come batch after batch


def prompt_text(start_arg):
    """The start text, read from a file for FILE:path."""
    if not start_arg.startswith("FILE:"):
        return start_arg
    path = start_arg[len("FILE:"):]
    if not os.path.isfile(path):
        what = ("a directory" if os.path.isdir(path) else "not a regular file" if os.path.exists(path)
                else "no such file")
        raise UserError(f"--start=FILE:{path}: {what}; give a text file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UserError(f"--start=FILE:{path} is not UTF-8 text; save the prompt as UTF-8") from None


def sample(model, tok, text, as_instruction=False, n=1, new_tokens=256, temp=1.0, k=0, p=0.9, rng_seed=1337,
           ctx=nullcontext()):
    """Yield n decoded samples of text's continuation (of the story only, for an instruction), ended at BOS or EOS."""
    if as_instruction and not text.strip():
        raise UserError('the instruction is empty: say what story to write, e.g. --start="Write a story about a dog."')
    prompt = instruct_prompt(tok, text) if as_instruction else tok.encode(text, bos=True)
    stops = (tok.bos_id, tok.eos_id)
    context = model.args.max_seq_len
    if len(prompt) + new_tokens > context and len(prompt) < context:
        print(f"note: the model's context is {context} tokens, so samples stop after {context - len(prompt)} new "
              f"tokens, not {new_tokens}", file=sys.stderr)
    generator = torch.Generator(device=model.rope_cos.device).manual_seed(rng_seed)
    for first in range(0, n, SAMPLES_PER_BATCH):
        with ctx:
            rows = model.generate([prompt] * min(SAMPLES_PER_BATCH, n - first), new_tokens, temperature=temp,
                                  top_k=k or None, top_p=p if 0.0 < p < 1.0 else None, stop_tokens=stops,
                                  generator=generator)
        for row in rows:
            row = without_stop(row, stops)
            yield tok.decode(row) if as_instruction else tok.decode(prompt + row)


@cli
def main(argv=None):
    configure(globals(), argv)
    if not checkpoint:
        raise UserError("say which checkpoint to sample: --checkpoint=out/ckpt.pt")
    if dtype not in AUTOCAST_DTYPES:
        raise UserError(f"--dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r}")
    for name, value, ok in (("num_samples", num_samples, num_samples >= 1),
                            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
                            ("temperature", temperature, temperature >= 0.0), ("top_k", top_k, top_k >= 0),
                            ("top_p", top_p, 0.0 <= top_p <= 1.0), ("seed", seed, 0 <= seed < 2 ** 63)):
        if not ok:
            raise UserError(f"--{name}={value} is out of range")
    dev = pick_device(device)
    model, ckpt = load_model(checkpoint, merge=True)
    model = model.to(dev).eval()
    tok = checkpoint_tokenizer(ckpt, tokenizer, model.args.vocab_size, checkpoint)
    if ckpt.get("mode") == "reward_model":
        print(f"note: {checkpoint} is a reward model; its stories come from the language model its training moved "
              "along (the score head is not used)", file=sys.stderr)
    text = prompt_text(start)
    ctx = autocast_context(dev, dtype)
    for i, out in enumerate(sample(model, tok, text, instruct, num_samples, max_new_tokens, temperature, top_k,
                                   top_p, seed, ctx)):
        print(out, flush=True)
        if i + 1 < num_samples:
            print("---------------")


if __name__ == "__main__":
    main()
