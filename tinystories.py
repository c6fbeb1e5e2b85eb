"""TinyStories data: download (or generate) the stories, train a vocabulary, pretokenize, and serve batches.

    python tinystories.py download                          # the real TinyStories (about 1.5 GB)
    python tinystories.py builtin                           # or: the built-in offline corpus, in seconds
    python tinystories.py train_vocab --vocab_size=512
    python tinystories.py pretokenize --vocab_size=512      # --vocab_size=0 --tokenizer=PATH: Llama 2's
    python tinystories.py pretokenize --vocab_size=512 --instruct=True

Files, under data_dir (default data/):
- TinyStories_all_data/dataNN.json: JSON lists of {"story", "instruction": {"prompt:", "words", "features"},
  "summary", "source"} (download and builtin write the same layout; builtin adds a .builtin stamp).
- tok{N}.model, tok{N}.vocab: the sentencepiece vocabulary train_vocab writes (N = vocab_size).
- tok{N}/dataNN.bin (tok0/ for the Llama 2 tokenizer): plain shards as llama2.c writes them, the stories'
  tokens back to back, each story BOS + story (+ EOS with --eos=True), flat uint16 (uint32 when the vocabulary
  exceeds 65535). Shard 0 is the validation split.
- tok{N}/instruct/dataNN.bin: instruct examples back to back, each prompt + BOS + story + EOS (the layout of
  tokenizer.instruct_example), same dtype; dataNN.idx: int64 rows (start, prompt_len, length) in tokens, one per
  example, where the prompt's prompt_len tokens end with that BOS and are masked (-1) in the labels;
  dataNN.json: a JSON list, one {"instruction", "words", "features", "summary"} per example.
- meta.json beside each set of shards: vocab_size (the tokenizer's), tokenizer (its path), tokenizer_sha256 (of
  its vocabulary), eos, instruct, prompt_style, dtype, bos_id, eos_id, num_shards, num_tokens, and "shards": one
  entry per shard in order {"name", "source" (its file in TinyStories_all_data/), "source_size", "source_mtime_ns",
  "stories", "tokens"}. It is written last: a folder without it is not finished. Until then progress.json, in
  the same layout, lists the shards done, so that a stopped pretokenize picks up where it was.
"""
import glob
import itertools
import json
import os
import re
import shutil
import sys
import tarfile
import time
import zlib

import numpy as np
import requests
import sentencepiece as spm
from tqdm import tqdm

from configurator import UserError, atomic_output, cli, configure_subcommand, map_in_processes, read_json, \
    remove_dead_temporaries
from story_corpus import write_corpus
from tokenizer import Tokenizer, instruct_example, same_path

DATA_DIR = "data"
CORPUS = "TinyStories_all_data"  # the folder of JSON shards, also the archive's name
BUILTIN_STAMP = ".builtin"  # in the corpus folder: the settings builtin wrote it with
LLAMA2_VOCAB = 32000  # Meta's Llama 2 tokenizer, whose data lives in tok0/
SUBCOMMANDS = ("download", "builtin", "train_vocab", "pretokenize")
SIMPLE_WORDS_INSTRUCTION = "Write a story."  # stands for TinyStories' "Write a short story (3-5 paragraphs)..."

# -----------------------------------------------------------------------------
# settings: python tinystories.py SUBCOMMAND [--key=value ...]
data_dir = DATA_DIR
url = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
retries = 5  # download: how often a dropped connection is resumed before giving up
num_shards = 10  # builtin: shards to write; train_vocab: train on the first num_shards shards
stories_per_shard = 2000  # builtin
seed = 0  # builtin
vocab_size = 0  # train_vocab, pretokenize; 0 means the Llama 2 tokenizer given by --tokenizer
tokenizer = ""  # pretokenize --vocab_size=0: the Llama 2 tokenizer.model
eos = False  # pretokenize: end every story with EOS as well as starting it with BOS
instruct = False  # pretokenize: write instruct examples (prompt, BOS, story, EOS) instead of plain stories
prompt_style = "default"  # instruct prompts: "default" (words and features) or "summary"
num_workers = 0  # pretokenize processes; 0 means one per core


# -----------------------------------------------------------------------------
# where things are

def corpus_dir(data_dir=DATA_DIR):
    return os.path.join(data_dir, CORPUS)


def story_shards(data_dir=DATA_DIR):
    """The corpus's JSON shards in order; a user error when there are none."""
    folder = corpus_dir(data_dir)
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")) \
        if os.path.isdir(folder) else []
    if not shards:
        raise UserError(f"no stories in {folder}: run python tinystories.py download or builtin first")
    return shards


def tokenizer_path(vocab_size, data_dir=DATA_DIR):
    return os.path.join(data_dir, f"tok{vocab_size}.model")


def pretok_dir(vocab_size, instruct=False, data_dir=DATA_DIR):
    """data/tok{N} (tok0: the Llama 2 tokenizer), and its instruct/ subfolder for instruct shards."""
    folder = os.path.join(data_dir, f"tok{vocab_size}")
    return os.path.join(folder, "instruct") if instruct else folder


def _dtype_for(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


# -----------------------------------------------------------------------------
# download

class _TryAgain(Exception):
    """A download failure worth resuming: a short answer, a server error."""


def _fetch_once(url, part):
    """Continue (or start) the download into part; returns when part holds the whole file."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity"}  # the bytes as stored, never re-encoded in transit
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=60) as r:
        content_range = r.headers.get("Content-Range", "")
        if r.status_code == 416 and have:  # nothing after `have`: done already, or part is longer than the file
            if content_range.endswith(f"/{have}"):
                return
            os.remove(part)
            raise _TryAgain("the partial download was longer than the file; starting again")
        if r.status_code >= 400:
            if r.status_code >= 500:
                raise _TryAgain(f"HTTP {r.status_code} {r.reason}")
            raise UserError(f"download of {url} failed: HTTP {r.status_code} {r.reason}")
        resumed = r.status_code == 206
        if resumed and not content_range.startswith(f"bytes {have}-"):
            os.remove(part)
            raise _TryAgain("the server resumed at another place; starting again")
        if resumed:
            total = int(content_range.rsplit("/", 1)[1]) if not content_range.endswith("/*") else None
        else:  # a full answer (the server ignores Range): start the file again
            have = 0
            total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc="download") as bar:
            for chunk in r.iter_content(chunk_size=1 << 16):  # a cut connection loses at most one chunk
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise _TryAgain(f"got {size} of {total} bytes")


def fetch(url, path, retries=5):
    """Download url to path through path + ".part", resuming with HTTP Range after a dropped connection."""
    part = path + ".part"
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _TryAgain) as e:
            got = os.path.getsize(part) if os.path.exists(part) else 0
            why = str(e) if isinstance(e, _TryAgain) else type(e).__name__
            if attempt == retries:
                raise UserError(f"download of {url} stopped at {got} bytes ({why}); "
                                "run the same command again to resume") from None
            print(f"download interrupted at {got} bytes ({why}); resuming", file=sys.stderr)
            time.sleep(min(2 ** attempt - 1, 30))
        except requests.RequestException as e:
            raise UserError(f"download of {url} failed: {type(e).__name__}: {e}") from None
    os.replace(part, path)


def _unsafe(member, target):
    """Why a tar member may not be unpacked into target, or None."""
    if not (member.isfile() or member.isdir()):
        return "it is not a regular file or folder"
    dest = os.path.realpath(os.path.join(target, member.name))
    if os.path.isabs(member.name) or os.path.commonpath([dest, os.path.realpath(target)]) != \
            os.path.realpath(target):
        return "its path leads out of the target folder"
    return None


def check_archive(archive, target):
    """Read the whole .tar.gz (gzip's checksum included) and vet every member; returns the members."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            while tar.fileobj.read(1 << 20):  # to the end, so gzip checks its CRC and length
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        os.remove(archive)
        raise UserError(f"{archive} is truncated or corrupt ({e}); removed it: "
                        "run python tinystories.py download again") from None
    for m in members:
        why = _unsafe(m, target)
        if why:
            raise UserError(f"refusing to unpack {archive}: member {m.name!r} is unsafe ({why})")
    if not any(m.isfile() and m.name.endswith(".json") for m in members):
        raise UserError(f"{archive} holds no .json shards; is --url right?")
    return members


def download(url=url, data_dir=DATA_DIR, retries=retries):
    """Download the TinyStories archive and unpack it to data_dir/TinyStories_all_data; once only."""
    target = corpus_dir(data_dir)
    if os.path.isdir(target):
        if os.path.exists(os.path.join(target, BUILTIN_STAMP)):
            raise UserError(f"{target} holds the built-in corpus; delete it, or give another --data_dir, "
                            "to download TinyStories")
        print(f"{target} is already there; nothing to do")
        return target
    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, CORPUS + ".tar.gz")
    if not os.path.exists(archive):
        fetch(url, archive, retries)
    partial = target + ".partial"
    members = check_archive(archive, partial)
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive, "r:gz") as tar:
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(partial, members=tqdm(members, desc="unpack", unit="file"), **safety)
    os.replace(partial, target)
    print(f"unpacked {len(story_shards(data_dir))} shards to {target}")
    return target


# -----------------------------------------------------------------------------
# builtin: the offline corpus

def builtin(num_shards=num_shards, stories_per_shard=stories_per_shard, seed=seed, data_dir=DATA_DIR):
    """Write the built-in story corpus to data_dir/TinyStories_all_data, unless it is there already."""
    target = corpus_dir(data_dir)
    settings = {"num_shards": num_shards, "stories_per_shard": stories_per_shard, "seed": seed}
    stamp = os.path.join(target, BUILTIN_STAMP)
    partial, old = target + ".partial", target + ".old"
    for leftover in (partial, old):  # from a run killed before it finished
        shutil.rmtree(leftover, ignore_errors=True)
    if os.path.isdir(target):
        if not os.path.exists(stamp):
            raise UserError(f"{target} holds a downloaded corpus; move it away, or give another --data_dir, "
                            "for the built-in one")
        if read_json(stamp) == settings:  # a damaged stamp: the corpus is written again
            print(f"{target} already holds the built-in corpus with these settings; nothing to do")
            return target
    os.makedirs(partial)
    write_corpus(partial, num_shards, stories_per_shard, seed, progress=True)
    with open(os.path.join(partial, BUILTIN_STAMP), "w") as f:
        json.dump(settings, f)
    if os.path.isdir(target):  # an earlier built-in corpus: ours to replace, stamp and all, by one rename
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {num_shards} shards of {stories_per_shard} stories to {target}")
    return target


# -----------------------------------------------------------------------------
# train_vocab

def read_stories(path):
    """The records of one JSON shard; a user error naming the file and position when it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                        f"(char {e.pos})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: bad byte at position {e.start}") from None
    if not isinstance(records, list):
        raise UserError(f"{path} is not a JSON list of stories (it holds a {type(records).__name__})")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("story"), str)):
            raise UserError(f"{path}: item {i} is not a story record (a dict with a \"story\" string)")
    return records


def train_vocab(vocab_size, num_shards=num_shards, data_dir=DATA_DIR):
    """Train a sentencepiece BPE vocabulary with llama2.c's settings on the first shards: data/tok{N}.model."""
    if vocab_size <= 0:
        raise UserError("train_vocab needs the size of the vocabulary: --vocab_size=512, for example")
    shards = story_shards(data_dir)[:max(num_shards, 1)]
    prefix = os.path.join(data_dir, f"tok{vocab_size}")
    remove_dead_temporaries(glob.escape(prefix) + ".tmp*")
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    text_file = tmp_prefix + ".txt"
    try:
        with open(text_file, "w", encoding="utf-8") as f:
            for shard in tqdm(shards, desc="text for train_vocab", unit="shard"):
                for r in read_stories(shard):
                    f.write(r["story"].strip() + "\n")
        print(f"training a {vocab_size}-token vocabulary on {os.path.getsize(text_file) / 1e6:.1f} MB "
              f"of text from {len(shards)} shards")
        try:
            spm.SentencePieceTrainer.train(
                input=text_file, model_prefix=tmp_prefix, model_type="bpe", vocab_size=vocab_size,
                self_test_sample_size=0, input_format="text", character_coverage=1.0,
                num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
                byte_fallback=True, normalization_rule_name="identity",
                unk_surface=r" \342\201\207 ")  # raw, backslashes and all, exactly as llama2.c passes it
        except RuntimeError as e:
            raise UserError(f"sentencepiece could not train {vocab_size} tokens: "
                            f"{str(e).strip().splitlines()[-1]}") from None
        for ext in (".vocab", ".model"):  # the .model last: it is what later stages look for
            os.replace(tmp_prefix + ext, prefix + ext)
    finally:
        for leftover in (text_file, tmp_prefix + ".model", tmp_prefix + ".vocab"):
            if os.path.exists(leftover):
                os.remove(leftover)
    print(f"wrote {prefix}.model")
    return prefix + ".model"


# -----------------------------------------------------------------------------
# pretokenize

FEATURES_SENTENCE = re.compile(r"The story has the following features:.*?(?=\s*Remember to only use simple words"
                               r"|\s*Possible story:|\s*$)", re.S)


def instruction_text(record, prompt_style="default"):
    """The instruction for a story: TinyStories' own, with the simple-words sentence cut to "Write a story."

    prompt_style "summary" gives "Write a story about <summary>". tokenizer.instruct_prompt adds the rest."""
    if prompt_style == "summary":
        return f"Write a story about {record['summary'].strip()}"
    verb, noun, adjective = record["instruction"]["words"]
    parts = [SIMPLE_WORDS_INSTRUCTION,
             f'The story should use the verb "{verb}", the noun "{noun}" and the adjective "{adjective}".']
    features = FEATURES_SENTENCE.search(record["instruction"].get("prompt:", ""))
    if features:
        sentence = features.group(0).strip()
        parts.append(sentence if sentence.endswith(".") else sentence + ".")
    return " ".join(parts)


def splits_at_spaces(tok):
    """True when no token has a "▁" (a space) after its first letter: then BPE never merges across a space."""
    return all("\u2581" not in tok.sp.id_to_piece(i).lstrip("\u2581") for i in range(tok.vocab_size))


def encode_stories(tok, texts, eos=False, dtype=np.uint16, check=32, block=1024):
    """BOS + text (+ EOS) for every text, back to back in one array; each distinct word is encoded once.

    BPE never merges across a space, and a word encoded alone gets the same leading "▁" a space gives it, so a
    text's tokens are its words' tokens in a row. Texts with doubled or outer spaces are encoded whole, and the
    first `check` texts are compared with a whole-text encode. Works through `block` texts at a time."""
    fast = splits_at_spaces(tok)
    begin, end = object(), object()  # keys no text can be, standing for BOS and EOS
    known = {begin: [tok.bos_id], end: [tok.eos_id]}  # word -> its tokens
    tail = [end] if eos else []
    parts = [np.zeros(0, dtype)]
    for i in range(0, len(texts), block):
        words = list(itertools.chain.from_iterable(
            itertools.chain([begin], t.split(" ") if fast and "  " not in t and t.strip(" ") == t else [t], tail)
            for t in texts[i:i + block]))
        distinct = list(dict.fromkeys(words))
        new = [w for w in distinct if w not in known]
        known.update(zip(new, tok.encode_batch(new, bos=False, num_threads=1)))
        pieces = [known[w] for w in distinct]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        table = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=int(lengths.sum()))
        ids = np.fromiter(map({w: k for k, w in enumerate(distinct)}.__getitem__, words), np.int64, len(words))
        # output token p, of the j-th word, is table[where that word's tokens start + (p - where word j starts)]
        n = lengths[ids]
        shift = np.cumsum(lengths)[ids] - n - (np.cumsum(n) - n)
        parts.append(table[np.repeat(shift, n) + np.arange(n.sum())])
    flat = np.concatenate(parts)
    expected = [t for text in texts[:check] for t in tok.encode(text, bos=True, eos=eos)]
    if not np.array_equal(flat[:len(expected)], expected):  # a tokenizer this shortcut does not fit
        print(f"warning: {tok.model_path} does not split at spaces; encoding whole stories", file=sys.stderr)
        flat = np.fromiter(itertools.chain.from_iterable(tok.encode_batch(texts, eos=eos, num_threads=1)),
                           dtype=dtype)
    return flat


_worker_tokenizer = None


def _load_tokenizer(path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _instruct_examples(tok, records, source, prompt_style):
    """Tokens of one shard's instruct examples back to back, their (start, prompt_len, length) rows, and what
    each instruction asked for."""
    tokens, index, about = [], np.zeros((len(records), 3), dtype=np.int64), []
    for i, r in enumerate(records):
        try:
            instruction = instruction_text(r, prompt_style)
            asked = {"instruction": instruction, "words": r["instruction"]["words"],
                     "features": r["instruction"].get("features", []), "summary": r.get("summary", "")}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source}: story {i} lacks the instruction fields for instruct data ({e!r})") from None
        example, labels = instruct_example(tok, instruction, r["story"].strip())
        index[i] = len(tokens), labels.count(-1), len(example)
        tokens += example
        about.append(asked)
    return tokens, index, about


def _pretokenize_shard(job):
    """Worker: tokenize one JSON shard and write its files; returns its meta.json entry."""
    tok, out, dtype = _worker_tokenizer, job["out"], np.dtype(job["dtype"])
    records = read_stories(job["source"])
    if job["instruct"]:
        tokens, index, about = _instruct_examples(tok, records, job["source"], job["prompt_style"])
        tokens = np.array(tokens, dtype=dtype)
        with atomic_output(out + ".idx") as f:
            index.tofile(f)
        with atomic_output(out + ".json", "w") as f:
            json.dump(about, f)
    else:
        tokens = encode_stories(tok, [r["story"].strip() for r in records], eos=job["eos"], dtype=dtype)
    with atomic_output(out + ".bin") as f:
        tokens.tofile(f)
    return {**job["entry"], "stories": len(records), "tokens": int(tokens.size)}


def pretokenize(vocab_size, tokenizer_model="", eos=False, instruct=False, prompt_style="default",
                num_workers=0, data_dir=DATA_DIR):
    """Tokenize every shard into data/tok{N}[/instruct] in a process pool; shards already done are kept."""
    if prompt_style not in ("default", "summary"):
        raise UserError(f"--prompt_style must be default or summary, got {prompt_style!r}")
    sources = story_shards(data_dir)
    if vocab_size == 0:
        if not tokenizer_model:
            raise UserError("--vocab_size=0 means the Llama 2 tokenizer: give its path with "
                            "--tokenizer=path/to/tokenizer.model (or train one: train_vocab --vocab_size=512)")
        model_path = tokenizer_model
    else:
        if tokenizer_model:
            raise UserError(f"--tokenizer is for --vocab_size=0 only; --vocab_size={vocab_size} reads "
                            f"{tokenizer_path(vocab_size, data_dir)}")
        model_path = tokenizer_path(vocab_size, data_dir)
        if not os.path.exists(model_path):
            raise UserError(f"no tokenizer {model_path}: run python tinystories.py train_vocab "
                            f"--vocab_size={vocab_size} first")
    tok = Tokenizer(model_path)
    if vocab_size:
        tok.check_vocab(vocab_size, f"--vocab_size={vocab_size}")
    dtype = _dtype_for(tok.vocab_size)
    out_dir = pretok_dir(vocab_size, instruct, data_dir)
    os.makedirs(out_dir, exist_ok=True)
    # absolute, so that train.py, and the checkpoints it writes, find the tokenizer from any working directory
    meta = {"vocab_size": tok.vocab_size, "tokenizer": os.path.abspath(model_path),
            "tokenizer_sha256": tok.vocab_sha256(), "eos": bool(eos or instruct), "instruct": bool(instruct),
            "prompt_style": prompt_style if instruct else None, "dtype": np.dtype(dtype).name,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    old = {}
    meta_path = os.path.join(out_dir, "meta.json")
    progress_path = os.path.join(out_dir, "progress.json")  # shards done by a run that was stopped
    for path in (meta_path, progress_path):
        previous = read_json(path)
        if _well_formed(previous) and all(previous.get(k) == v for k, v in meta.items() if k != "tokenizer"):
            old.update((e["name"], e) for e in previous["shards"] if "tokens" in e)  # a damaged file: redo all
    entries, jobs = [], []
    for source in sources:
        st = os.stat(source)
        entry = {"name": os.path.splitext(os.path.basename(source))[0], "source": os.path.basename(source),
                 "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
        done = old.get(entry["name"])
        if done and all(done[k] == entry[k] for k in entry) and \
                not _shard_damage(out_dir, done, np.dtype(dtype).itemsize, instruct):
            entries.append(done)
        else:
            entries.append(entry)
            jobs.append({"source": source, "out": os.path.join(out_dir, entry["name"]), "entry": entry,
                         "eos": bool(eos), "instruct": bool(instruct), "prompt_style": prompt_style,
                         "dtype": np.dtype(dtype).name})
    if not jobs and os.path.exists(meta_path):
        print(f"{out_dir}: all {len(entries)} shards up to date; nothing to do")
        return out_dir
    if os.path.exists(meta_path):
        os.replace(meta_path, progress_path)  # until the new meta.json, readers see the folder as unfinished
    jobs.sort(key=lambda j: -j["entry"]["source_size"])  # largest first, so the pool finishes together
    workers = max(1, min(num_workers or os.cpu_count(), len(jobs)))
    finished = {}
    with tqdm(total=sum(j["entry"]["source_size"] for j in jobs), unit="B", unit_scale=True,
              desc="pretokenize") as bar:
        for result in map_in_processes(_pretokenize_shard, jobs, workers, _load_tokenizer, (model_path,)):
            finished[result["name"]] = result
            bar.update(result["source_size"])
            with atomic_output(progress_path, "w") as f:  # so that a stopped run resumes where it was
                json.dump({**meta, "shards": list(old.values()) + list(finished.values())}, f)
    entries = [finished.get(e["name"], e) for e in entries]
    keep = {e["name"] + ext for e in entries for ext in (".bin", ".idx", ".json")}
    for name in os.listdir(out_dir):  # shards of an earlier, larger corpus
        if name.startswith("data") and name.endswith((".bin", ".idx", ".json")) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    meta.update(num_shards=len(entries), num_tokens=sum(e["tokens"] for e in entries), shards=entries)
    with atomic_output(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    stories = sum(e["stories"] for e in entries)
    print(f"{out_dir}: {stories} {'examples' if instruct else 'stories'}, {meta['num_tokens']} tokens, "
          f"{meta['num_tokens'] / max(stories, 1):.1f} per {'example' if instruct else 'story'}")
    return out_dir


# -----------------------------------------------------------------------------
# reading the shards (used by train.py and ppo.py)

def read_meta(vocab_size, instruct=False, data_dir=DATA_DIR):
    """The meta.json pretokenize writes beside the shards, once the shards' sizes are checked against it; a user
    error saying how to make the data when it is missing or damaged."""
    folder = pretok_dir(vocab_size, instruct, data_dir)
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"no pretokenized data in {folder}: run {_pretokenize_command(vocab_size, instruct, data_dir)}"
                        + (", or give the folder it is in with --data_dir=" if data_dir == DATA_DIR else ""))
    meta = read_json(path)
    damage = _damage(folder, meta, instruct)
    if damage:
        raise _damaged(damage, vocab_size, instruct, data_dir)
    return meta


def vocab_source_of(ckpt, vocab_size):
    """The vocabulary a checkpoint's data was tokenized with, "llama2" (data in tok0/) or "custom", as its run
    recorded it; a checkpoint recording none (llama2.c's, a Hugging Face folder) of 32000 tokens has Llama 2's."""
    return (ckpt.get("config") or {}).get("vocab_source", "llama2" if vocab_size == LLAMA2_VOCAB else "custom")


def folder_vocab(vocab_source, vocab_size):
    """The N of the data folder tok{N}: 0 for Llama 2's tokenizer, else the vocabulary's size."""
    return 0 if vocab_source == "llama2" else vocab_size


def check_tokenizer(meta, recorded, vocab_size, name, folder):
    """Refuse a model (vocab_size, the tokenizer record of its checkpoint, named name) on the data of folder
    (its meta) when the data was tokenized with another vocabulary."""
    if meta["vocab_size"] != vocab_size:
        raise UserError(f"the data in {folder} has {meta['vocab_size']} tokens but the model has {vocab_size}")
    recorded = recorded or {}  # llama2.c's checkpoints record none
    if recorded.get("vocab_size", meta["vocab_size"]) != meta["vocab_size"]:
        raise UserError(f"{name} was trained with a {recorded['vocab_size']}-token tokenizer but the data uses "
                        f"{meta['vocab_size']} tokens")
    if recorded.get("sha256") and meta.get("tokenizer_sha256") and recorded["sha256"] != meta["tokenizer_sha256"]:
        same = " (the same file, retrained since)" if same_path(recorded.get("path"), meta["tokenizer"]) else ""
        raise UserError(f"{name} was trained with the vocabulary of {recorded.get('path')}, but the data was "
                        f"tokenized with another vocabulary, {meta['tokenizer']}{same}; pretokenize with the "
                        "checkpoint's tokenizer")


def _pretokenize_command(vocab_size, instruct, data_dir):
    command = f"python tinystories.py pretokenize --vocab_size={vocab_size}"
    command += " --tokenizer=path/to/tokenizer.model" if vocab_size == 0 else ""
    command += " --instruct=True" if instruct else ""
    return command + (f" --data_dir={data_dir}" if data_dir != DATA_DIR else "")


def _damaged(what, vocab_size, instruct, data_dir):
    return UserError(f"the pretokenized data in {pretok_dir(vocab_size, instruct, data_dir)} is damaged ({what}): "
                     f"run {_pretokenize_command(vocab_size, instruct, data_dir)} again")


def _well_formed(meta):
    """Whether a parsed meta.json or progress.json has the fields that pretokenize and the readers use."""
    return (isinstance(meta, dict) and meta.get("dtype") in ("uint16", "uint32")
            and isinstance(meta.get("shards"), list)
            and all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("tokens", 0), int)
                    for e in meta["shards"]))


def _damage(folder, meta, instruct):
    """What is wrong with a folder of shards and its parsed meta.json, or None: sizes are checked, not tokens."""
    if not _well_formed(meta) or not all("tokens" in e for e in meta["shards"]):
        return "meta.json is not what pretokenize writes"
    itemsize = np.dtype(meta["dtype"]).itemsize
    return next(filter(None, (_shard_damage(folder, e, itemsize, instruct) for e in meta["shards"])), None)


def _shard_damage(folder, entry, itemsize, instruct):
    """What is wrong with the files of one shard's meta.json entry, or None."""
    name, tokens = entry["name"], entry["tokens"]
    base = os.path.join(folder, name)
    size = os.path.getsize(base + ".bin") if os.path.isfile(base + ".bin") else None
    if size != tokens * itemsize:
        found = "is missing" if size is None else f"has {size} bytes"
        return f"{name}.bin {found} where meta.json's {tokens} tokens take {tokens * itemsize}"
    if instruct and not (os.path.isfile(base + ".idx") and os.path.getsize(base + ".idx") % 24 == 0
                         and os.path.isfile(base + ".json")):
        return f"{name}.idx or {name}.json is missing or cut short"
    return None


def _split_names(meta, split, folder):
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    names = [e["name"] for e in meta["shards"]]
    if split == "train" and len(names) < 2:
        raise UserError(f"{folder} has only one shard; training needs at least 2 (shard 0 is the "
                        "validation split): write a corpus with --num_shards=2 or more")
    return names[1:] if split == "train" else names[:1]


def _open(path, dtype):
    return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


def _tensors(*arrays):
    import torch  # here, not at the top, so the data commands start without loading torch
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _read_index(folder, name):
    """An instruct shard's rows of (start, prompt_len, length)."""
    return np.fromfile(os.path.join(folder, name + ".idx"), dtype=np.int64).reshape(-1, 3)


def load_shard(vocab_size, index, data_dir=DATA_DIR):
    """A plain pretraining shard, memory-mapped: its stories' tokens back to back."""
    meta = read_meta(vocab_size, data_dir=data_dir)
    name = meta["shards"][index]["name"]
    return _open(os.path.join(pretok_dir(vocab_size, False, data_dir), name + ".bin"), meta["dtype"])


def split_shards(vocab_size, split, data_dir=DATA_DIR):
    """meta.json and the memory-mapped plain shards of a split ("train": shards 1.., "val": shard 0)."""
    meta = read_meta(vocab_size, data_dir=data_dir)
    folder = pretok_dir(vocab_size, False, data_dir)
    return meta, [_open(os.path.join(folder, n + ".bin"), meta["dtype"]) for n in _split_names(meta, split, folder)]


class BatchStream:
    """An endless batch iterator whose batch i depends only on (seed, rank, i): its state is next_batch."""
    next_batch = 0

    def __iter__(self):
        return self

    def batch_rng(self):
        """The generator of the next batch (and a step forward)."""
        rng = np.random.default_rng([self.seed % 2 ** 63, self.rank, self.next_batch])
        self.next_batch += 1
        return rng

    def ordered_batch(self, order):
        """The item indices of the next batch when epochs visit every item in an EpochOrder (and a step forward)."""
        first = self.next_batch * self.batch_size
        self.next_batch += 1
        return [order[p] for p in range(first, first + self.batch_size)]

    def state_dict(self):
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state):
        self.next_batch = int(state["next_batch"])


class PretrainBatches(BatchStream):
    """(x, y) batches of random max_seq_len+1 windows from memory-mapped shards; batch i depends only on
    (seed, rank, i), so a resumed run continues the stream. split "train" = shards 1.., "val" = shard 0."""

    def __init__(self, split, batch_size, max_seq_len, vocab_size, seed=0, rank=0, data_dir=DATA_DIR):
        _, self.shards = split_shards(vocab_size, split, data_dir)
        folder = pretok_dir(vocab_size, False, data_dir)
        windows = np.array([max(0, len(m) - max_seq_len) for m in self.shards], dtype=np.int64)
        if windows.sum() == 0:
            raise UserError(f"the {split} shards in {folder} are shorter than max_seq_len+1={max_seq_len + 1} "
                            "tokens; lower max_seq_len or write more stories")
        # the windows of all shards numbered in a row: shard k's are ends[k] - windows[k] .. ends[k] - 1
        self.ends = np.cumsum(windows)
        self.firsts = self.ends - windows
        self.batch_size, self.max_seq_len, self.seed, self.rank = batch_size, max_seq_len, seed, rank

    def __next__(self):
        rng = self.batch_rng()
        picks = rng.integers(0, self.ends[-1], size=self.batch_size)
        shards = np.searchsorted(self.ends, picks, side="right")
        starts = picks - self.firsts[shards]
        windows = np.stack([self.shards[k][i:i + self.max_seq_len + 1] for k, i in zip(shards, starts)])
        windows = windows.astype(np.int64)
        return _tensors(windows[:, :-1], windows[:, 1:])


class EpochOrder:
    """Positions 0, 1, 2, ... over n items, each epoch in its own order drawn from (seed, rank, epoch)."""

    def __init__(self, n, seed, rank):
        self.n, self.seed, self.rank = n, seed, rank
        self._epoch, self._permutation = None, None

    def __getitem__(self, position):
        epoch, i = divmod(position, self.n)
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed % 2 ** 63, self.rank, epoch])
            self._epoch, self._permutation = epoch, rng.permutation(self.n)
        return self._permutation[i]


class InstructBatches(BatchStream):
    """Batches of whole instruct examples (prompt + BOS + story + EOS), padded to the longest in the batch
    (at most max_seq_len; longer examples truncated); y is -1 on the prompt and on padding (x there is EOS).
    Same determinism: batch i depends only on (seed, rank, i); each epoch visits the examples in a new order."""

    def __init__(self, split, batch_size, max_seq_len, vocab_size, seed=0, rank=0, data_dir=DATA_DIR):
        meta = read_meta(vocab_size, instruct=True, data_dir=data_dir)
        folder = pretok_dir(vocab_size, True, data_dir)
        self.shards, rows = [], []
        for n in _split_names(meta, split, folder):
            index = _read_index(folder, n)
            shard_column = np.full((len(index), 1), len(self.shards), dtype=np.int64)
            rows.append(np.hstack([shard_column, index]))
            self.shards.append(_open(os.path.join(folder, n + ".bin"), meta["dtype"]))
        self.examples = np.concatenate(rows)  # rows of (shard, start, prompt_len, length)
        if len(self.examples) == 0:
            raise UserError(f"no {split} examples in {folder}: write a corpus with more stories")
        longest_prompt = int(self.examples[:, 2].max())
        if longest_prompt > max_seq_len:
            raise UserError(f"max_seq_len={max_seq_len} leaves no story after the longest instruct prompt "
                            f"({longest_prompt} tokens): raise max_seq_len above it")
        self.pad_id = meta["eos_id"]
        self.batch_size, self.max_seq_len, self.seed, self.rank = batch_size, max_seq_len, seed, rank
        self._order = EpochOrder(len(self.examples), seed, rank)

    def __next__(self):
        rows = [self.examples[i] for i in self.ordered_batch(self._order)]
        tokens = [self.shards[s][start:start + min(length, self.max_seq_len + 1)].astype(np.int64)
                  for s, start, _, length in rows]
        width = max(len(t) for t in tokens) - 1
        x = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), width), -1, dtype=np.int64)
        for row, (t, (_, _, prompt_len, _)) in enumerate(zip(tokens, rows)):
            x[row, :len(t) - 1] = t[:-1]
            y[row, prompt_len - 1:len(t) - 1] = t[prompt_len:]  # y[j] is the label of token j+1
        return _tensors(x, y)


def instruct_examples(split, vocab_size, data_dir=DATA_DIR):
    """Every instruct example of a split with its prompt and story tokens and what its instruction asked for."""
    meta = read_meta(vocab_size, instruct=True, data_dir=data_dir)
    folder = pretok_dir(vocab_size, True, data_dir)
    examples = []
    for n in _split_names(meta, split, folder):
        tokens = _open(os.path.join(folder, n + ".bin"), meta["dtype"])
        index = _read_index(folder, n)
        about = read_json(os.path.join(folder, n + ".json"))
        if not isinstance(about, list) or len(about) != len(index) or not all(isinstance(a, dict) for a in about):
            raise _damaged(f"{n}.json does not describe the {len(index)} examples of {n}.idx", vocab_size, True,
                           data_dir)
        for (start, prompt_len, length), info in zip(index.tolist(), about):
            examples.append({"prompt": tokens[start:start + prompt_len].tolist(),
                             "story": tokens[start + prompt_len:start + length].tolist(), **info})
    return examples


# -----------------------------------------------------------------------------

@cli
def main(argv=None):
    command = configure_subcommand(globals(), SUBCOMMANDS, argv)
    if command == "download":
        download(url, data_dir, retries)
    elif command == "builtin":
        builtin(num_shards, stories_per_shard, seed, data_dir)
    elif command == "train_vocab":
        train_vocab(vocab_size, num_shards, data_dir)
    else:
        pretokenize(vocab_size, tokenizer, eos, instruct, prompt_style, num_workers, data_dir)


if __name__ == "__main__":
    main()
