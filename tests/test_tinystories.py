import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import sentencepiece as spm
import torch

import tinystories as ts
from configurator import UserError
from tokenizer import Tokenizer, instruct_example, instruct_prompt
from conftest import ROOT, dead_pid

VOCAB = 512


# -----------------------------------------------------------------------------
# a small built-in corpus, its vocabulary and its pretokenized shards, shared by the module

@pytest.fixture(scope="module")
def data(story_data):
    """conftest's built-in corpus with a 512-token vocabulary and its plain and instruct shards (read only)."""
    return story_data


def corpus_settings(d):
    with open(os.path.join(ts.corpus_dir(d), ts.BUILTIN_STAMP)) as f:
        return json.load(f)  # num_shards, stories_per_shard, seed


@pytest.fixture(scope="module")
def tok(data):
    return Tokenizer(ts.tokenizer_path(VOCAB, data))


def records(d, index):
    with open(os.path.join(ts.corpus_dir(d), f"data{index:02d}.json")) as f:
        return json.load(f)


def copy_of(d, tmp_path):
    """A private copy of the data folder for tests that change it."""
    dest = str(tmp_path / "data")
    shutil.copytree(d, dest)
    return dest


def one_error_line(err):
    """The single "error: ..." line on stderr (progress bars may have drawn there before it)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def run_cli(capsys, *argv):
    """main(argv) in this process; returns (exit status, stdout, stderr)."""
    try:
        ts.main(list(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# -----------------------------------------------------------------------------
# download, against a server on 127.0.0.1

def make_archive(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def shard_bytes(index):
    rng = np.random.default_rng(index)  # random text, so the archive does not compress to nothing
    stories = [{"story": rng.bytes(600).hex(), "instruction": {"prompt:": "p", "words": ["a", "b", "c"],
                                                                "features": []}, "summary": "s", "source": "t"}
               for _ in range(300)]
    return json.dumps(stories).encode()


SHARDS = {f"data0{i}.json": shard_bytes(i) for i in range(2)}
ARCHIVE = make_archive(SHARDS)


class Server:
    """Serves one payload; honours Range or not; cuts the first `cuts` answers after `cut_at` bytes."""

    def __init__(self, payload, ranges=True, cuts=0, cut_at=20000, status=200):
        self.payload, self.ranges, self.cuts, self.cut_at, self.status = payload, ranges, cuts, cut_at, status
        self.requests = []  # the Range header of each request (None without one)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                server.requests.append(asked)
                data, start = server.payload, 0
                if server.status != 200:
                    self.send_error(server.status)
                    return
                if asked and server.ranges:
                    start = int(asked.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cuts:
                    server.cuts -= 1
                    body = body[:server.cut_at]  # then the connection closes early
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/TinyStories_all_data.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(payload=ARCHIVE, **kw):
        servers.append(Server(payload, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def unpacked(d):
    folder = ts.corpus_dir(d)
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_download_unpacks_and_second_run_does_nothing(serve, tmp_path, capsys):
    server, d = serve(), str(tmp_path / "data")
    status, out, err = run_cli(capsys, "download", f"--url={server.url}", f"--data_dir={d}")
    assert status == 0, err
    assert unpacked(d) == SHARDS and server.requests == [None]
    assert sorted(os.listdir(d)) == ["TinyStories_all_data", "TinyStories_all_data.tar.gz"]  # no temp names
    status, out, err = run_cli(capsys, "download", f"--url={server.url}", f"--data_dir={d}")
    assert status == 0 and "nothing to do" in out and server.requests == [None]


def test_download_resumes_a_cut_connection_with_range(serve, tmp_path):
    server, d = serve(cuts=1, cut_at=150000), str(tmp_path)
    ts.download(server.url, d, retries=3)
    assert len(server.requests) == 2 and server.requests[0] is None
    assert 0 < int(server.requests[1].split("=")[1].rstrip("-")) <= 150000  # kept what arrived
    assert unpacked(d) == SHARDS


def test_download_run_again_resumes_where_it_stopped(serve, tmp_path):
    server, d = serve(cuts=3, cut_at=100000), str(tmp_path)
    with pytest.raises(UserError, match="stopped at .* bytes .*run the same command again to resume"):
        ts.download(server.url, d, retries=2)
    part = os.path.getsize(os.path.join(d, "TinyStories_all_data.tar.gz.part"))
    assert 0 < part < len(ARCHIVE) and not os.path.exists(ts.corpus_dir(d))
    ts.download(server.url, d, retries=0)
    assert server.requests[-1] == f"bytes={part}-" and unpacked(d) == SHARDS


def test_download_from_server_without_range_restarts_cleanly(serve, tmp_path):
    server, d = serve(ranges=False, cuts=1, cut_at=150000), str(tmp_path)
    ts.download(server.url, d, retries=3)
    assert server.requests[0] is None and server.requests[1].startswith("bytes=")  # asked to resume,
    # got the whole file instead, and wrote it afresh
    assert open(os.path.join(d, "TinyStories_all_data.tar.gz"), "rb").read() == ARCHIVE
    assert unpacked(d) == SHARDS


@pytest.mark.parametrize("payload", [
    ARCHIVE[:len(ARCHIVE) // 2] + bytes(b ^ 0xFF for b in ARCHIVE[len(ARCHIVE) // 2:][:64])
    + ARCHIVE[len(ARCHIVE) // 2 + 64:],  # damaged in the middle
    ARCHIVE[:-200],  # truncated, though the server says that is all
], ids=["corrupt", "truncated"])
def test_bad_archive_is_reported_before_unpacking(serve, tmp_path, payload):
    server, d = serve(payload), str(tmp_path)
    with pytest.raises(UserError, match="truncated or corrupt .*download again"):
        ts.download(server.url, d)
    assert os.listdir(d) == []  # nothing unpacked, and the bad archive is gone


def test_unpacking_refuses_paths_out_of_the_folder(serve, tmp_path):
    server, d = serve(make_archive({"data00.json": b"[]", "../evil.json": b"[]"})), str(tmp_path / "data")
    with pytest.raises(UserError, match="'../evil.json' is unsafe"):
        ts.download(server.url, d)
    assert not os.path.exists(tmp_path / "evil.json") and not os.path.exists(ts.corpus_dir(d))


def test_download_http_error_is_one_line(serve, tmp_path):
    server = serve(status=404)
    with pytest.raises(UserError, match="HTTP 404"):
        ts.download(server.url, str(tmp_path))


# -----------------------------------------------------------------------------
# builtin

def test_builtin_is_deterministic_and_runs_once(data, tmp_path, capsys):
    d, settings = str(tmp_path), corpus_settings(data)
    ts.builtin(**settings, data_dir=d)
    assert unpacked(d) == unpacked(data)  # the same seed writes the same files
    first = records(d, 0)[0]
    assert set(first) == {"story", "instruction", "summary", "source"}
    assert set(first["instruction"]) == {"prompt:", "words", "features"}
    mtime = os.path.getmtime(os.path.join(ts.corpus_dir(d), "data00.json"))
    status, out, _ = run_cli(capsys, "builtin", *[f"--{k}={v}" for k, v in settings.items()], f"--data_dir={d}")
    assert status == 0 and "nothing to do" in out
    assert os.path.getmtime(os.path.join(ts.corpus_dir(d), "data00.json")) == mtime
    with open(os.path.join(ts.corpus_dir(d), ts.BUILTIN_STAMP), "w") as f:
        f.write('{"num_shards": ')  # a damaged stamp: the corpus is written again, the same
    ts.builtin(**settings, data_dir=d)
    assert unpacked(d) == unpacked(data) and corpus_settings(d) == settings
    for leftover in (".partial", ".old"):  # as a run killed while replacing a corpus leaves them
        shutil.copytree(ts.corpus_dir(d), ts.corpus_dir(d) + leftover)
    ts.builtin(num_shards=2, stories_per_shard=20, seed=settings["seed"] + 1, data_dir=d)  # a new corpus
    assert sorted(os.listdir(ts.corpus_dir(d))) == [".builtin", "data00.json", "data01.json"]
    assert records(d, 0) != records(data, 0) and os.listdir(d) == ["TinyStories_all_data"]


def test_builtin_and_download_do_not_overwrite_each_other(serve, tmp_path):
    downloaded, built = str(tmp_path / "a"), str(tmp_path / "b")
    ts.download(serve().url, downloaded)
    with pytest.raises(UserError, match="holds a downloaded corpus"):
        ts.builtin(num_shards=1, stories_per_shard=5, seed=0, data_dir=downloaded)
    assert unpacked(downloaded) == SHARDS
    ts.builtin(num_shards=1, stories_per_shard=5, seed=0, data_dir=built)
    with pytest.raises(UserError, match="holds the built-in corpus"):
        ts.download("http://127.0.0.1:9/never-asked", built)


# -----------------------------------------------------------------------------
# train_vocab

def test_train_vocab_has_llama2c_settings_and_leaves_no_temp_files(data, tok, monkeypatch, tmp_path):
    assert tok.vocab_size == VOCAB and (tok.bos_id, tok.eos_id) == (1, 2)
    assert sorted(os.listdir(data)) == ["TinyStories_all_data", f"tok{VOCAB}", f"tok{VOCAB}.model",
                                        f"tok{VOCAB}.vocab"]
    pieces = lambda t, text: [t.sp.id_to_piece(i) for i in t.encode(text, bos=False)]
    assert pieces(tok, "日") == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]  # byte fallback for unseen characters
    assert tok.decode(tok.encode("ﬁne ①")) == "ﬁne ①"  # identity normalisation: no NFKC folding
    # numbers everywhere still give single digits; and it never asks anything (input() is broken here)
    d = copy_of(data, tmp_path)
    with open(os.path.join(ts.corpus_dir(d), "data03.json"), "w") as f:
        json.dump([{"story": f"Tom had {n} apples and {n * 7} pears in 2024."} for n in range(2000)], f)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("train_vocab asked for input"))
    digits = Tokenizer(ts.train_vocab(VOCAB, data_dir=d))
    assert [p.strip("▁") for p in pieces(digits, "2024")] == ["", "2", "0", "2", "4"]
    assert [f for f in os.listdir(d) if "train_vocab" in f or ".tmp" in f] == []
    killed = os.path.join(d, f"tok{VOCAB}.tmp{dead_pid()}.txt")  # a run killed while it wrote the text
    open(killed, "w").close()
    ts.train_vocab(VOCAB, data_dir=d)
    assert not os.path.exists(killed)


def test_train_vocab_too_small_is_one_line(data, tmp_path):
    with pytest.raises(UserError, match="sentencepiece could not train 20 tokens"):
        ts.train_vocab(20, data_dir=copy_of(data, tmp_path))
    with pytest.raises(UserError, match="--vocab_size=512"):
        ts.train_vocab(0, data_dir=data)


def test_retrained_vocabulary_has_the_same_hash_and_data_stays_usable(data, tok, tmp_path):
    # a model file records where its training text was, so two trainings differ as files but not as vocabularies
    again = copy_of(data, tmp_path)
    ts.train_vocab(VOCAB, data_dir=again)
    retrained = Tokenizer(ts.tokenizer_path(VOCAB, again))
    with open(tok.model_path, "rb") as a, open(retrained.model_path, "rb") as b:
        assert a.read() != b.read()
    assert retrained.vocab_sha256() == tok.vocab_sha256()
    assert ts.read_meta(VOCAB, data_dir=data)["tokenizer_sha256"] == tok.vocab_sha256()
    ts.train_vocab(640, data_dir=again)
    assert Tokenizer(ts.tokenizer_path(640, again)).vocab_sha256() != tok.vocab_sha256()


# -----------------------------------------------------------------------------
# pretokenize: plain

def test_plain_shards_are_llama2c_layout(data, tok):
    meta = ts.read_meta(VOCAB, data_dir=data)
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16" and meta["eos"] is False
    n = corpus_settings(data)["num_shards"]
    assert meta["num_shards"] == n and [e["name"] for e in meta["shards"]] == [f"data{i:02d}" for i in range(n)]
    assert meta["tokenizer"] == os.path.abspath(ts.tokenizer_path(VOCAB, data)) and (meta["bos_id"], meta["eos_id"]) == (1, 2)
    for i in range(n):
        path = os.path.join(ts.pretok_dir(VOCAB, data_dir=data), f"data{i:02d}.bin")
        expected = [t for r in records(data, i) for t in tok.encode(r["story"].strip(), bos=True)]
        assert np.array_equal(np.fromfile(path, dtype=np.uint16), expected)
        assert np.array_equal(ts.load_shard(VOCAB, i, data_dir=data), expected)
        assert meta["shards"][i]["stories"] == len(records(data, i)) and meta["shards"][i]["tokens"] == len(expected)


ODD_TEXTS = ["Lily  had two spaces.", " leading space", "trailing space ", "", " ", "  ", "tab\tand\nnewline",
             "ümlaut, 日本, and 12345!", "   ", "a", "Once upon a time\n\nthere was a cat."]


def test_encode_stories_equals_encoding_each_story(data, tok):
    texts = [r["story"].strip() for r in records(data, 1)] + ODD_TEXTS
    for eos in (False, True):
        expected = [t for text in texts for t in tok.encode(text, bos=True, eos=eos)]
        assert np.array_equal(ts.encode_stories(tok, texts, eos=eos, check=0), expected)


def test_encode_stories_with_tokens_that_span_spaces(data, tmp_path):
    """A vocabulary trained without splitting at whitespace has pieces across spaces: encoded whole."""
    text = os.path.join(tmp_path, "t.txt")
    with open(text, "w") as f:
        f.write("\n".join(r["story"].strip() for r in records(data, 0)))
    spm.SentencePieceTrainer.train(input=text, model_prefix=str(tmp_path / "ws"), model_type="bpe",
                                   vocab_size=400, split_by_whitespace=False, byte_fallback=True,
                                   minloglevel=2)
    ws = Tokenizer(str(tmp_path / "ws.model"))
    assert not ts.splits_at_spaces(ws)
    texts = [r["story"].strip() for r in records(data, 2)]
    expected = [t for s in texts for t in ws.encode(s)]
    assert np.array_equal(ts.encode_stories(ws, texts, check=0), expected)


@pytest.mark.parametrize("model", ["llama2-tokenizer.model", "tok512-llama2c.model"])
def test_encode_stories_with_reference_tokenizers(shared_data, data, model):
    ref = Tokenizer(os.path.join(shared_data, model))
    texts = [r["story"].strip() for r in records(data, 0)] + ODD_TEXTS
    expected = [t for text in texts for t in ref.encode(text)]
    assert np.array_equal(ts.encode_stories(ref, texts, check=0), expected)


def test_pretokenize_llama2_tokenizer_into_tok0(shared_data, data, tmp_path):
    d = copy_of(data, tmp_path)
    model = os.path.join(shared_data, "llama2-tokenizer.model")
    ts.pretokenize(0, tokenizer_model=model, eos=True, data_dir=d)
    meta = ts.read_meta(0, data_dir=d)
    assert meta["vocab_size"] == 32000 and meta["tokenizer"] == os.path.abspath(model) and meta["eos"] is True
    shard = ts.load_shard(0, 2, data_dir=d)
    ref = Tokenizer(model)
    assert np.array_equal(shard, [t for r in records(d, 2) for t in ref.encode(r["story"].strip(), eos=True)])


def test_pretokenize_is_idempotent(data, tmp_path, capsys):
    d = copy_of(data, tmp_path)
    folder = ts.pretok_dir(VOCAB, data_dir=d)
    mtimes = lambda: {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)
                      if n.endswith(".bin")}
    before = mtimes()
    status, out, err = run_cli(capsys, "pretokenize", f"--vocab_size={VOCAB}", f"--data_dir={d}")
    assert status == 0 and "nothing to do" in out and mtimes() == before
    # a shard whose source changed is redone, and only that one
    fewer = records(d, 1)[:50]
    with open(os.path.join(ts.corpus_dir(d), "data01.json"), "w") as f:
        json.dump(fewer, f)
    ts.pretokenize(VOCAB, data_dir=d)
    after = mtimes()
    assert [n for n in before if after[n] != before[n]] == ["data01.bin"]
    assert ts.read_meta(VOCAB, data_dir=d)["shards"][1]["stories"] == 50
    # with EOS the signature differs: everything is redone, and every story ends with EOS
    ts.pretokenize(VOCAB, eos=True, data_dir=d)
    tokens = ts.load_shard(VOCAB, 0, data_dir=d)
    assert tokens[0] == 1 and tokens[-1] == 2 and np.sum(tokens == 1) == np.sum(tokens == 2) == len(records(d, 0))
    assert all(after[n] != t for n, t in mtimes().items())


def test_stopped_pretokenize_resumes_where_it_was(data, tmp_path, monkeypatch):
    d = copy_of(data, tmp_path)
    shutil.rmtree(ts.pretok_dir(VOCAB, data_dir=d))
    done = []

    def stopped_at_the_third(job):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(job["entry"]["name"])
        return tokenize(job)
    tokenize = ts._pretokenize_shard
    monkeypatch.setattr(ts, "_pretokenize_shard", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        ts.pretokenize(VOCAB, num_workers=1, data_dir=d)
    with pytest.raises(UserError, match="pretokenize"):  # unfinished: not for training yet
        ts.read_meta(VOCAB, data_dir=d)
    first = list(done)
    done.clear()
    monkeypatch.setattr(ts, "_pretokenize_shard", lambda job: done.append(job["entry"]["name"]) or tokenize(job))
    ts.pretokenize(VOCAB, num_workers=1, data_dir=d)
    assert len(first) == 2 and sorted(first + done) == [f"data{i:02d}" for i in range(len(ts.story_shards(d)))]
    folder = ts.pretok_dir(VOCAB, data_dir=d)
    assert "progress.json" not in os.listdir(folder)
    for i in range(len(ts.story_shards(d))):
        assert np.array_equal(ts.load_shard(VOCAB, i, data_dir=d), ts.load_shard(VOCAB, i, data_dir=data))


# -----------------------------------------------------------------------------
# pretokenize: instruct

def test_instruction_text():
    record = {"story": "s", "summary": "Lily finds a red ball. ",
              "instruction": {"prompt:": 'Write a short story (3-5 paragraphs) which only uses very simple words '
                                         'that a 3 year old child would understand. The story should use the verb '
                                         '"hang", the noun "foot" and the adjective "cute". The story has the '
                                         'following features: the story should contain at least one dialogue, '
                                         'the story has a bad ending. Remember to only use simple words!\n\n'
                                         'Possible story:',
                              "words": ["hang", "foot", "cute"], "features": ["Dialogue", "BadEnding"]}}
    assert ts.instruction_text(record) == (
        'Write a story. The story should use the verb "hang", the noun "foot" and the adjective "cute". The story '
        'has the following features: the story should contain at least one dialogue, the story has a bad ending.')
    assert ts.instruction_text(record, "summary") == "Write a story about Lily finds a red ball."
    record["instruction"]["prompt:"] = record["instruction"]["prompt:"].split(" The story has")[0] + \
        " Remember to only use simple words!\n\nPossible story:"
    assert ts.instruction_text(record).endswith('the adjective "cute".')  # no features, no features sentence


def test_instruct_examples_mask_the_prompt(data, tok):
    meta = ts.read_meta(VOCAB, instruct=True, data_dir=data)
    assert meta["instruct"] is True and meta["eos"] is True and meta["prompt_style"] == "default"
    examples = ts.instruct_examples("val", VOCAB, data_dir=data)
    assert len(examples) == len(records(data, 0))
    for ex, r in zip(examples, records(data, 0)):
        instruction = ts.instruction_text(r)
        assert ex["instruction"] == instruction and ex["words"] == r["instruction"]["words"]
        assert ex["features"] == r["instruction"]["features"] and ex["summary"] == r["summary"]
        assert ex["prompt"] == instruct_prompt(tok, instruction) and ex["prompt"][-1] == tok.bos_id
        assert ex["story"] == tok.encode(r["story"].strip(), bos=False, eos=True)
        assert instruction.startswith("Write a story. The story should use the verb")
        assert ("features:" in instruction) == bool(r["instruction"]["features"])
        assert "Possible story" not in instruction and "3 year old" not in instruction
    train = range(1, corpus_settings(data)["num_shards"])
    assert len(ts.instruct_examples("train", VOCAB, data_dir=data)) == sum(len(records(data, i)) for i in train)


def test_instruct_batches_are_whole_examples_with_masked_prompts(data, tok):
    examples, stories = ts.instruct_examples("val", VOCAB, data_dir=data), records(data, 0)
    batches = ts.InstructBatches("val", len(examples), 4096, VOCAB, seed=3, data_dir=data)
    x, y = next(batches)  # one epoch in one batch: every example once
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    assert x.shape[1] == max(len(e["prompt"]) + len(e["story"]) for e in examples) - 1
    index_of = {tuple(e["prompt"] + e["story"]): i for i, e in enumerate(examples)}
    seen = set()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        n = next(j for j in range(len(row_y), 0, -1) if row_y[j - 1] != -1)  # just past the last label
        i = index_of[tuple(row_x[:n] + [row_y[n - 1]])]
        seen.add(i)
        _, labels = instruct_example(tok, examples[i]["instruction"], stories[i]["story"].strip())
        assert row_y[:n] == labels[1:] and row_y[n:] == [-1] * (len(row_y) - n)
        assert row_x[n:] == [tok.eos_id] * (len(row_x) - n)  # padding
    assert seen == set(range(len(examples)))
    assert not torch.equal(next(batches)[0], x)  # the next epoch comes in another order


def test_instruct_batches_truncate_and_refuse_too_short(data):
    longest_prompt = max(len(e["prompt"]) for e in ts.instruct_examples("train", VOCAB, data_dir=data))
    batches = ts.InstructBatches("train", 8, longest_prompt + 3, VOCAB, data_dir=data)
    for _ in range(5):
        x, y = next(batches)
        assert x.shape == (8, longest_prompt + 3) and (y != -1).any(dim=1).all()
    with pytest.raises(UserError, match="raise max_seq_len"):
        ts.InstructBatches("train", 8, longest_prompt - 1, VOCAB, data_dir=data)


def test_summary_prompts(data, tok, tmp_path):
    d = copy_of(data, tmp_path)
    ts.pretokenize(VOCAB, instruct=True, prompt_style="summary", data_dir=d)
    ex = ts.instruct_examples("val", VOCAB, data_dir=d)[5]
    r = records(d, 0)[5]
    assert ex["instruction"] == f"Write a story about {r['summary'].strip()}"
    assert ex["prompt"] == instruct_prompt(tok, ex["instruction"])


# -----------------------------------------------------------------------------
# pretraining batches

def test_pretrain_batches_shapes_and_targets(data):
    x, y = next(ts.PretrainBatches("train", 4, 32, VOCAB, data_dir=data))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_pretrain_batches_are_deterministic_and_resume_continues(data):
    make = lambda **kw: ts.PretrainBatches("train", 4, 32, VOCAB, data_dir=data, **kw)
    first = [next(make(seed=7)) for _ in range(1)][0]
    original = make(seed=7)
    batches = [next(original) for _ in range(6)]
    assert torch.equal(batches[0][0], first[0])
    assert not torch.equal(batches[0][0], batches[1][0])
    resumed = make(seed=7)
    original_state = make(seed=7)
    for _ in range(3):
        next(original_state)
    resumed.load_state_dict(original_state.state_dict())
    for k in range(3, 6):  # continues with batch 3 rather than replaying batch 0
        x, y = next(resumed)
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    assert not torch.equal(next(make(seed=7, rank=1))[0], batches[0][0])
    assert not torch.equal(next(make(seed=8))[0], batches[0][0])


def occurs_in(shards, row):
    """Whether the tokens of row stand in a row in one of the shards."""
    needle = np.asarray(row, dtype=np.uint16).tobytes()
    for shard in shards:
        hay, at = np.asarray(shard).tobytes(), -1
        while (at := hay.find(needle, at + 1)) != -1:
            if at % 2 == 0:
                return True
    return False


def test_val_uses_shard_0_and_train_the_rest(data):
    shards = [ts.load_shard(VOCAB, i, data_dir=data) for i in range(corpus_settings(data)["num_shards"])]
    for split, inside, outside in (("val", shards[:1], shards[1:]), ("train", shards[1:], shards[:1])):
        batches = ts.PretrainBatches(split, 16, 32, VOCAB, data_dir=data)
        rows = [r for _ in range(4) for x, y in [next(batches)] for r in torch.cat([x, y[:, -1:]], 1).tolist()]
        assert all(occurs_in(inside, r) for r in rows)
        assert sum(not occurs_in(outside, r) for r in rows) > len(rows) // 2  # stories share phrases, not windows


def test_missing_pretokenized_data_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        ts.read_meta(512)
    assert str(e.value) == ("no pretokenized data in data/tok512: run python tinystories.py pretokenize "
                            "--vocab_size=512, or give the folder it is in with --data_dir=")
    with pytest.raises(UserError, match=r"in data/tok512/instruct: .* --vocab_size=512 --instruct=True, or give "
                                         r"the folder it is in with --data_dir=$"):
        ts.InstructBatches("train", 2, 64, 512)


def test_damaged_pretokenized_data_is_named_and_pretokenize_mends_it(data, tmp_path):
    d = copy_of(data, tmp_path)
    plain, instruct = ts.pretok_dir(VOCAB, data_dir=d), ts.pretok_dir(VOCAB, True, d)
    meta = ts.read_meta(VOCAB, data_dir=d)
    without_path = lambda m: {k: v for k, v in m.items() if k != "tokenizer"}  # a rewrite records the copy's path
    for damage, expected in [(lambda: open(os.path.join(plain, "meta.json"), "w").write('{"shards": [1'),
                              "meta.json is not what pretokenize writes"),
                             (lambda: open(os.path.join(plain, "meta.json"), "w").write('{"dtype": "uint16"}'),
                              "meta.json is not what pretokenize writes"),
                             (lambda: os.truncate(os.path.join(plain, "data01.bin"), 1001),
                              "data01.bin has 1001 bytes where meta.json's"),
                             (lambda: os.remove(os.path.join(plain, "data00.bin")), "data00.bin is missing")]:
        damage()
        with pytest.raises(UserError) as e:
            ts.PretrainBatches("train", 2, 8, VOCAB, data_dir=d)
        assert expected in str(e.value) and str(e.value).endswith(f"--vocab_size={VOCAB} --data_dir={d} again")
        ts.pretokenize(VOCAB, data_dir=d, num_workers=1)  # redoes what it cannot trust
        assert without_path(ts.read_meta(VOCAB, data_dir=d)) == without_path(meta)
    with open(os.path.join(instruct, "data01.idx"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 5)
    with pytest.raises(UserError, match=r"data01.idx or data01.json is missing or cut short.*--instruct=True"):
        ts.InstructBatches("train", 2, 64, VOCAB, data_dir=d)
    ts.pretokenize(VOCAB, instruct=True, data_dir=d, num_workers=1)
    with open(os.path.join(instruct, "data01.json"), "w") as f:
        f.write("[{}]")
    with pytest.raises(UserError, match=r"data01.json does not describe the \d+ examples of data01.idx"):
        ts.instruct_examples("train", VOCAB, data_dir=d)
    for i in range(len(ts.story_shards(d))):
        assert np.array_equal(ts.load_shard(VOCAB, i, data_dir=d), ts.load_shard(VOCAB, i, data_dir=data))


def test_training_needs_two_shards(data, tmp_path):
    d = str(tmp_path)
    ts.builtin(num_shards=1, stories_per_shard=30, seed=0, data_dir=d)
    shutil.copy(ts.tokenizer_path(VOCAB, data), ts.tokenizer_path(VOCAB, d))
    ts.pretokenize(VOCAB, data_dir=d, num_workers=1)
    assert next(ts.PretrainBatches("val", 2, 8, VOCAB, data_dir=d))[0].shape == (2, 8)
    with pytest.raises(UserError, match="at least 2"):
        ts.PretrainBatches("train", 2, 8, VOCAB, data_dir=d)


# -----------------------------------------------------------------------------
# bad input: one line, exit status 2

def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys):
    empty = str(tmp_path / "empty")
    d = copy_of(data, tmp_path)
    cases = [
        (("train_vocab", "--vocab_size=64", f"--data_dir={empty}"),
         "run python tinystories.py download or builtin first"),
        (("pretokenize", "--vocab_size=64", f"--data_dir={empty}"),
         "run python tinystories.py download or builtin first"),
        (("pretokenize", "--vocab_size=999", f"--data_dir={d}"),
         f"no tokenizer {d}/tok999.model: run python tinystories.py train_vocab --vocab_size=999 first"),
        (("pretokenize", f"--data_dir={d}"), "--tokenizer=path/to/tokenizer.model"),
        (("pretokenise", f"--vocab_size={VOCAB}"), "unknown subcommand 'pretokenise'"),
        ((), "say what to do"),
        (("pretokenize", "--vocab_sise=3"), "unknown setting --vocab_sise (did you mean --vocab_size?)"),
        (("pretokenize", f"--vocab_size={VOCAB}", "--prompt_style=haiku", f"--data_dir={d}"), "--prompt_style"),
    ]
    for argv, message in cases:
        status, out, err = run_cli(capsys, *argv)
        assert status == 2 and message in one_error_line(err), (argv, err)


def test_bad_shards_name_the_file_and_position(data, tmp_path, capsys):
    d = copy_of(data, tmp_path)
    shard = os.path.join(ts.corpus_dir(d), "data01.json")
    for content, message in [('{"story": "not a list"}', "data01.json is not a JSON list of stories"),
                             ('[{"story": "a"}, {"story": "b"} {"story": "c"}]',
                              "data01.json is not valid JSON: Expecting ',' delimiter at line 1 column 33 (char 32)"),
                             ('[{"story": "a"}, 3]', "data01.json: item 1 is not a story record")]:
        with open(shard, "w") as f:
            f.write(content)
        for command in ("pretokenize", "train_vocab"):
            status, out, err = run_cli(capsys, command, f"--vocab_size={VOCAB}", f"--data_dir={d}")
            assert status == 2 and message in one_error_line(err), err


def test_cli_exit_status_without_traceback():
    r = subprocess.run([sys.executable, "tinystories.py", "frobnicate"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: unknown subcommand 'frobnicate': use one of download, builtin, "
                                "train_vocab, pretokenize")


def test_a_checkpoint_names_the_vocabulary_of_its_data():
    assert ts.vocab_source_of({"config": {"vocab_source": "custom"}}, 32000) == "custom"
    # llama2.c's checkpoints and Hugging Face folders record none: 32000 tokens are Llama 2's, in tok0/
    assert ts.vocab_source_of({}, 32000) == "llama2"
    assert ts.vocab_source_of({"config": None}, 512) == "custom"
