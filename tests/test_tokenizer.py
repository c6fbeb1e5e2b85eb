import filecmp
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from configurator import UserError
from tokenizer import INSTRUCT_SUFFIX, Tokenizer, instruct_example, instruct_prompt
from conftest import ROOT

TEXT = """Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog.
One day, Lily saw a big red ball under a tree. "Can I play with you?" asked a small bird.
Tom and Sue went to the beach. They built a sand castle and ate 3 apples and 12 grapes.
The cat was sad because it lost its toy. Mom helped the cat find the toy, and they were happy.
"""


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT * 20)
    prefix = str(d / "tok")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, model_type="bpe", vocab_size=400,
                                   byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   character_coverage=1.0, minloglevel=2)
    return prefix + ".model"


def test_round_trip_on_own_vocabulary(small_vocab):
    tok = Tokenizer(small_vocab)
    assert tok.vocab_size == 400 and tok.bos_id == 1 and tok.eos_id == 2
    for text in ["Lily saw a big dog.", "  two leading spaces", "ümlaut and 日本 bytes", "12345 apples"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text.lstrip(" ") or tok.decode(ids) == text
    batch = tok.encode_batch(["a cat", "the dog"], bos=True, eos=False)
    assert batch == [tok.encode("a cat"), tok.encode("the dog")]


def test_export_is_llama2c_layout(small_vocab, tmp_path):
    import struct
    tok = Tokenizer(small_vocab)
    out = tok.export(str(tmp_path / "tok.bin"))
    data = open(out, "rb").read()
    (max_len,) = struct.unpack_from("<I", data, 0)
    pos, pieces = 4, []
    for _ in range(tok.vocab_size):
        score, n = struct.unpack_from("<fi", data, pos)
        pieces.append(data[pos + 8:pos + 8 + n])
        pos += 8 + n
    assert pos == len(data)
    assert pieces[tok.bos_id] == b"\n<s>\n" and pieces[tok.eos_id] == b"\n</s>\n"
    assert max_len == max(len(p) for p in pieces)
    assert all(b"\xe2\x96\x81" not in p for p in pieces)  # the '▁' marker became a space


def test_llama2_tokenizer_export_is_byte_identical(shared_data, tmp_path):
    out = Tokenizer(os.path.join(shared_data, "llama2-tokenizer.model")).export(str(tmp_path / "t.bin"))
    assert filecmp.cmp(out, os.path.join(shared_data, "llama2-tokenizer.bin"), shallow=False)


def test_cli_writes_bin_beside_model(small_vocab, tmp_path):
    model = tmp_path / "tok400.model"
    model.write_bytes(open(small_vocab, "rb").read())
    r = subprocess.run([sys.executable, "tokenizer.py", f"--tokenizer-model={model}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok400.bin").exists()


def test_missing_or_bad_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(UserError, match="is a folder, not a file"):
        Tokenizer(str(tmp_path))
    junk = tmp_path / "junk.model"
    junk.write_text("this is not a sentencepiece model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer(str(junk))
    r = subprocess.run([sys.executable, "tokenizer.py", f"--tokenizer-model={junk}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not a sentencepiece model" in r.stderr


def test_an_output_path_that_cannot_be_written_is_one_line(small_vocab, tmp_path):
    (tmp_path / "a_file").write_bytes(b"")
    r = subprocess.run([sys.executable, "tokenizer.py", f"--tokenizer-model={small_vocab}",
                        f"--out={tmp_path / 'a_file' / 'tok.bin'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "a_file" in r.stderr


def test_the_model_itself_is_never_the_output(small_vocab, tmp_path):
    before = open(small_vocab, "rb").read()
    with pytest.raises(UserError, match="is the tokenizer model being read"):
        Tokenizer(small_vocab).export(small_vocab)
    named_bin = tmp_path / "tok.bin"  # a .model saved as .bin: its default output would be itself
    named_bin.write_bytes(before)
    with pytest.raises(UserError, match="is the tokenizer model being read"):
        Tokenizer(str(named_bin)).export()
    assert open(small_vocab, "rb").read() == before == named_bin.read_bytes()


def test_vocab_mismatch_is_an_error(small_vocab):
    with pytest.raises(UserError, match="400 tokens but the model has 512"):
        Tokenizer(small_vocab).check_vocab(512)


def test_instruct_layout(small_vocab):
    tok = Tokenizer(small_vocab)
    prompt = instruct_prompt(tok, "Write a story about a dog.")
    assert prompt[-1] == tok.bos_id and tok.bos_id not in prompt[:-1]
    assert tok.decode(prompt[:-1]) == "Write a story about a dog." + INSTRUCT_SUFFIX
    assert instruct_prompt(tok, "Write a story about a dog." + INSTRUCT_SUFFIX) == prompt
    tokens, labels = instruct_example(tok, "Write a story about a dog.", "The dog ran.")
    assert tokens[:len(prompt)] == prompt and tokens[-1] == tok.eos_id
    assert labels[:len(prompt)] == [-1] * len(prompt) and labels[len(prompt):] == tokens[len(prompt):]
