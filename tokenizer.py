"""Sentencepiece tokenizer wrapper, the instruct prompt layout, and export to the .bin that run.c reads.

    python tokenizer.py --tokenizer-model=data/tok512.model      # writes data/tok512.bin
"""
import hashlib
import os
import struct
import zlib

import numpy as np
from sentencepiece import SentencePieceProcessor

from configurator import UserError, atomic_output, cli, configure, refuse_overwriting, require_file

INSTRUCT_SUFFIX = " Possible story:"


class Tokenizer:
    def __init__(self, model_path):
        require_file(model_path, "tokenizer model", "give the path of a sentencepiece .model, or train one with: "
                     "python tinystories.py train_vocab --vocab_size=512")
        self.model_path = model_path
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{model_path} is not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    def encode(self, text, bos=True, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts, bos=True, eos=False, num_threads=-1):
        """Encode many texts at once with sentencepiece's own thread pool."""
        batch = self.sp.encode(list(texts), num_threads=num_threads)
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in batch]

    def vocab_sha256(self):
        """A hash of the vocabulary (pieces, scores, types): equal for two trainings of the same vocabulary, whose
        files differ (a model file also records where its training text was)."""
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            kind = 1 if self.sp.is_control(i) else 2 if self.sp.is_unknown(i) else 3 if self.sp.is_byte(i) else 0
            h.update(self.sp.id_to_piece(i).encode() + struct.pack("<fB", self.sp.get_score(i), kind))
        return h.hexdigest()

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def check_vocab(self, vocab_size, what="the model"):
        """Refuse to pair this tokenizer with a model of another vocabulary size."""
        if vocab_size != self.vocab_size:
            raise UserError(f"tokenizer {self.model_path} has {self.vocab_size} tokens but {what} has "
                            f"{vocab_size}; use the tokenizer the model was trained with")

    def bin_bytes(self):
        """llama2.c's tokenizer .bin: max token length, then per token score, length and bytes."""
        pieces, scores = [], np.zeros(self.vocab_size, dtype=np.float32)
        for i in range(self.vocab_size):
            if i == self.bos_id:
                piece = "\n<s>\n"
            elif i == self.eos_id:
                piece = "\n</s>\n"
            else:
                piece = self.sp.id_to_piece(i).replace("\u2581", " ")
            pieces.append(piece.encode("utf-8"))
            scores[i] = self.sp.get_score(i)
        parts = [struct.pack("<I", max(len(p) for p in pieces))]
        for score, piece in zip(scores, pieces):
            parts += [score.tobytes(), struct.pack("<i", len(piece)), piece]
        return b"".join(parts)

    def bin_crc32(self):
        """CRC-32 of bin_bytes(): model .bin headers record it so run.c can tell a wrong tokenizer of the same size."""
        return zlib.crc32(self.bin_bytes())

    def export(self, out_path=None):
        """Write bin_bytes() beside the .model (or to out_path)."""
        out_path = out_path or os.path.splitext(self.model_path)[0] + ".bin"
        refuse_overwriting(out_path, self.model_path, "tokenizer model")
        with atomic_output(out_path) as f:
            f.write(self.bin_bytes())
        return out_path


def same_path(recorded, path):
    """Whether a recorded tokenizer path names the file at path: a vocabulary that differs is then that file
    retrained since, which the errors say."""
    return bool(recorded and path) and os.path.abspath(recorded) == os.path.abspath(path)


def checkpoint_tokenizer(ckpt, path_override, vocab_size, ckpt_path, required=True):
    """The tokenizer a checkpoint names (or path_override), refused unless its vocabulary is the model's.

    When not required, None if the checkpoint names none or its file is gone (export.py writes the model anyway)."""
    path = path_override or (ckpt.get("tokenizer") or {}).get("path")
    if not required and not path_override and not (path and os.path.isfile(path)):
        return None
    if not path:
        raise UserError("the checkpoint records no tokenizer (a llama2.c checkpoint, or a Hugging Face folder without "
                        "tokenizer.model?): pass --tokenizer=PATH.model")
    if not path_override and not os.path.isfile(path):
        raise UserError(f"{ckpt_path} was trained with tokenizer {path}, which is not there (moved, or a relative "
                        "path from another directory?): pass --tokenizer=PATH.model")
    tok = Tokenizer(path)
    tok.check_vocab(vocab_size, f"the model of {ckpt_path}")
    recorded = ckpt.get("tokenizer") or {}
    if recorded.get("sha256") and recorded["sha256"] != tok.vocab_sha256():  # same size, other pieces: gibberish
        same = same_path(recorded.get("path"), path)
        raise UserError(f"tokenizer {path} is not the one {ckpt_path} was trained with (another vocabulary of the "
                        f"same size{', the same file retrained since' if same else ''}): pass --tokenizer= the "
                        ".model it was trained with")
    return tok


def instruct_prompt(tokenizer, instruction):
    """Tokens of an instruct prompt: the instruction ending in " Possible story:", then BOS.

    The story follows and ends with EOS. Training data, sample.py and run.c's -m instruct all use this layout."""
    text = instruction.strip()
    if not text.endswith(INSTRUCT_SUFFIX.strip()):
        text += INSTRUCT_SUFFIX
    return tokenizer.encode(text, bos=False) + [tokenizer.bos_id]


def default_prompts(ckpt):
    """The prompts that suit a checkpoint: "instruct" for one fine-tuned on instructions (or a run on them), else
    "plain". A Hugging Face folder that export.py wrote says which in config.json's "prompts"."""
    if ckpt.get("mode") == "sft":
        return "instruct"
    chosen = (ckpt.get("config") or {}).get("prompts")
    return chosen if chosen in ("plain", "instruct") else "plain"


def instruct_example(tokenizer, instruction, story):
    """Tokens and labels of one instruct example; the prompt's labels are -1 so only the story is learned."""
    prompt = instruct_prompt(tokenizer, instruction)
    story_tokens = tokenizer.encode(story, bos=False, eos=True)
    return prompt + story_tokens, [-1] * len(prompt) + story_tokens


tokenizer_model = ""  # the sentencepiece .model to export
out = ""  # the .bin to write; default: beside the model


@cli
def main(argv=None):
    configure(globals(), argv)
    if not tokenizer_model:
        raise UserError("say which tokenizer to export: python tokenizer.py --tokenizer-model=data/tok512.model")
    print(f"wrote {Tokenizer(tokenizer_model).export(out or None)}")


if __name__ == "__main__":
    main()
