"""Random-weight models of llama2.c's 15M and 110M shapes, and a 32000-token tokenizer .bin, for bench_run.sh.

    python bench/bench_models.py OUT_DIR     # writes 15M_v1.bin, 110M_v1.bin, 110M_v2.bin, tok32000.bin once
    python bench/bench_models.py OUT_DIR v0  # and the same weights as version 0, 15M_v0.bin and 110M_v0.bin
"""
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from export import export  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256),
    "110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=32, max_seq_len=1024),
}
FILES = {"15M_v1.bin": ("15M", 1), "110M_v1.bin": ("110M", 1), "110M_v2.bin": ("110M", 2)}
LEGACY_FILES = {"15M_v0.bin": ("15M", 0), "110M_v0.bin": ("110M", 0)}  # what llama2.c's run.c reads


def write_tokenizer(path, vocab_size=32000):
    """A valid llama2.c tokenizer .bin: unk, BOS, EOS, the 256 byte tokens, then made-up pieces."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [f" w{i}".encode() for i in range(vocab_size - len(pieces))]
    body = b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces))
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)) + body)


def main(out_dir, legacy=False):
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(os.path.join(out_dir, "tok32000.bin")):
        write_tokenizer(os.path.join(out_dir, "tok32000.bin"))
    models = {}
    for name, (shape, version) in {**FILES, **(LEGACY_FILES if legacy else {})}.items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            continue
        if shape not in models:
            torch.manual_seed(0)
            models[shape] = Transformer(ModelArgs(**SHAPES[shape])).eval()
        export(models[shape], path, version)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out-bench", sys.argv[2:] == ["v0"])
