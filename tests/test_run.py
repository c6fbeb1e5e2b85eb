import os
import struct
import subprocess

import numpy as np
import pytest
import sentencepiece as spm
import torch

import export
from conftest import INFERENCE_INSTRUCTION, INFERENCE_STORY, ROOT, train_inference_tokenizer
from model import ModelArgs, Transformer, load_model
from tokenizer import Tokenizer, instruct_prompt

BUILDS = ("run", "runfast", "runomp")


@pytest.fixture(scope="session")
def binaries(tmp_path_factory):
    """Each Makefile build of run.c, compiled once (in parallel); values are (path, compiler stderr)."""
    d = tmp_path_factory.mktemp("bin")
    procs = {t: subprocess.Popen(["make", "-s", "-C", ROOT, t, f"RUN_OUT={d / t}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for t in BUILDS + ("run_asan",)}
    out = {}
    for target, p in procs.items():
        stdout, stderr = p.communicate()
        assert p.returncode == 0, f"make {target} failed:\n{stderr}"
        out[target] = (str(d / target), stdout + stderr)
    return out


def run_c(binary, *args, stdin=None, env=None):
    # passive waiting keeps 2 threads from stalling each other on a busy machine; results do not depend on it
    full_env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="passive", ASAN_OPTIONS="detect_leaks=1",
                    **(env or {}))
    return subprocess.run([binary, *map(str, args)], input=stdin, capture_output=True, env=full_env, timeout=120)


def read_log(path, vocab_size):
    """run.c's -l file: per step (pos, token fed, token chosen) and the logits."""
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 12 + 4 * vocab_size)
    ints = raw[:, :12].copy().view(np.int32)
    return ints[:, 0], ints[:, 1], ints[:, 2], raw[:, 12:].copy().view(np.float32)


@pytest.fixture(scope="module")
def exported(inference_models, tmp_path_factory):
    """The random and trained checkpoints exported as versions 0, 1 and 2: {(name, version): path}."""
    d = tmp_path_factory.mktemp("bins")
    tok = Tokenizer(inference_models["tokenizer"])
    out = {}
    for name in ("random", "trained"):
        model, _ = load_model(inference_models[name], merge=True)
        for version in (0, 1, 2):
            out[name, version] = str(d / f"{name}_v{version}.bin")
            export.export(model, out[name, version], version, eos=True, tok=tok)
    return out


def test_builds_are_warning_free(binaries):
    for target in BUILDS:
        assert binaries[target][1] == "", f"make {target} printed:\n{binaries[target][1]}"


def test_llama2c_reference_model_prints_llama2c_greedy_text(binaries, shared_data):
    d = os.path.join(shared_data, "llama2c-260K")
    for i in range(3):
        with open(os.path.join(d, f"prompt_{i}.txt")) as f:
            prompt = f.read()
        with open(os.path.join(d, f"expected_greedy_{i}.txt"), "rb") as f:
            expected = f.read()
        r = run_c(binaries["run"][0], os.path.join(d, "model_v0.bin"), "-z", os.path.join(d, "tok512.bin"),
                  "-t", "0", "-n", "128", "-i", prompt)
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected


def test_llama2c_q80_file_with_groups_across_rows(binaries, shared_data, tmp_path):
    # llama2.c's own v2 export of the 260K model: its w2 groups straddle rows (hidden 172, groups of 64)
    d = os.path.join(shared_data, "llama2c-260K")
    model, info = export.read_bin(os.path.join(d, "model_v2.bin"))
    assert info["group_size"] == 64 and model.args.hidden_dim % 64
    log = tmp_path / "log.bin"
    r = run_c(binaries["runfast"][0], os.path.join(d, "model_v2.bin"), "-z", os.path.join(d, "tok512.bin"),
              "-t", "0", "-n", "60", "-i", "Lily saw a big dog", "-l", log)
    assert r.returncode == 0, r.stderr
    _, fed, chosen, logits = read_log(log, 512)
    with torch.no_grad():
        ref = model(torch.tensor(fed[None], dtype=torch.long))[0][0].numpy()
    # only the int8 rounding of activations separates the two
    assert np.abs(ref - logits).max() < 0.05 * np.abs(ref).max()


def pytorch_greedy(model, prompt, max_new, stops):
    return model.generate([prompt], max_new, temperature=0.0, stop_tokens=stops)[0]


@pytest.mark.parametrize("name", ["random", "trained"])
@pytest.mark.parametrize("version", [0, 1])
def test_fp32_greedy_tokens_and_logits_match_pytorch(binaries, inference_models, exported, name, version,
                                                     tmp_path):
    model, _ = load_model(inference_models[name], merge=True)
    tok = Tokenizer(inference_models["tokenizer"])
    log = tmp_path / "log.bin"
    r = run_c(binaries["runfast"][0], exported[name, version], "-z", inference_models["tokenizer_bin"],
              "-t", "0", "-n", "100", "-i", "Once upon a time", "-l", log)
    assert r.returncode == 0, r.stderr
    pos, fed, chosen, logits = read_log(log, tok.vocab_size)
    prompt = tok.encode("Once upon a time")
    assert list(fed[:len(prompt)]) == prompt and list(pos) == list(range(len(pos)))
    with torch.no_grad():
        ref = model(torch.tensor(fed[None], dtype=torch.long))[0][0].numpy()
    assert np.abs(ref - logits).max() < 1e-4
    new = pytorch_greedy(model, prompt, 101 - len(prompt), (tok.bos_id, tok.eos_id))  # -n counts positions
    assert list(chosen[len(prompt) - 1:]) == new
    if name == "trained":  # it learned to end the story, and run.c stopped there
        assert new[-1] == tok.eos_id and len(new) < 101 - len(prompt)
        assert r.stdout.decode() == tok.decode(prompt + new[:-1]) + "\n"


def test_unshared_classifier_matches_pytorch(binaries, inference_models, tmp_path):
    model, _ = load_model(inference_models["random"], merge=True)
    model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight) * 0.05)
    tok = Tokenizer(inference_models["tokenizer"])
    for version in (0, 1, 2):
        path = tmp_path / f"untied_v{version}.bin"
        export.export(model, str(path), version, tok=tok)
        log = tmp_path / "log.bin"
        r = run_c(binaries["run"][0], path, "-z", inference_models["tokenizer_bin"], "-t", "0", "-n", "20",
                  "-i", "Lily saw", "-l", log)
        assert r.returncode == 0, r.stderr
        _, fed, _, logits = read_log(log, tok.vocab_size)
        reference = export.read_bin(str(path))[0] if version == 2 else model
        with torch.no_grad():
            ref = reference(torch.tensor(fed[None], dtype=torch.long))[0][0].numpy()
        assert np.abs(ref - logits).max() < (0.05 * np.abs(ref).max() if version == 2 else 1e-4)


def test_wide_heads_match_pytorch_in_every_build(binaries, inference_models, tmp_path):
    # head size 44 takes each path of run.c's attention sum: 32 columns at a time, then 8, then one
    tok = Tokenizer(inference_models["tokenizer"])
    torch.manual_seed(1)
    model = Transformer(ModelArgs(dim=88, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size,
                                  multiple_of=8, max_seq_len=128)).eval()
    path = tmp_path / "wide.bin"
    export.export(model, str(path), 1, tok=tok)
    outputs = set()
    for build in BUILDS:
        log = tmp_path / f"{build}.bin"
        r = run_c(binaries[build][0], path, "-z", inference_models["tokenizer_bin"], "-t", "0", "-n", "120",
                  "-i", "Once upon a time", "-l", log)
        assert r.returncode == 0, r.stderr
        _, fed, _, logits = read_log(log, tok.vocab_size)
        with torch.no_grad():
            ref = model(torch.tensor(fed[None], dtype=torch.long))[0][0].numpy()
        assert len(fed) == 120 and np.abs(ref - logits).max() < 1e-4
        outputs.add(r.stdout)
    assert len(outputs) == 1


def test_q80_is_close_to_fp32_and_greedy_equals_dequantised_pytorch(binaries, inference_models, exported,
                                                                   tmp_path):
    tok = Tokenizer(inference_models["tokenizer"])
    fp32, _ = load_model(inference_models["trained"], merge=True)
    dequantised, info = export.read_bin(exported["trained", 2])
    assert info["version"] == 2
    log = tmp_path / "log.bin"
    r = run_c(binaries["runfast"][0], exported["trained", 2], "-z", inference_models["tokenizer_bin"],
              "-t", "0", "-n", "100", "-i", "Once upon a time", "-l", log)
    assert r.returncode == 0, r.stderr
    _, fed, chosen, logits = read_log(log, tok.vocab_size)
    tokens = torch.tensor(fed[None], dtype=torch.long)
    with torch.no_grad():
        ref_deq = dequantised(tokens)[0][0].numpy()
        ref_fp32 = fp32(tokens)[0][0].numpy()
    scale = np.abs(ref_fp32).max()
    assert np.abs(ref_deq - logits).max() < 0.02 * scale  # int8 activations only
    assert np.abs(ref_fp32 - logits).max() < 0.05 * scale  # int8 weights and activations
    prompt = tok.encode("Once upon a time")
    new = pytorch_greedy(dequantised, prompt, 101 - len(prompt), (tok.bos_id, tok.eos_id))
    assert list(chosen[len(prompt) - 1:]) == new
    assert r.stdout.decode() == tok.decode(prompt + new[:-1]) + "\n"


def greedy_outputs(programs, model_bin, tok_bin, steps, tmp_path):
    """Each program's greedy text and logits file from the same prompt, as a list of (stdout, log bytes)."""
    results = []
    for i, program in enumerate(programs):
        log = tmp_path / f"{i}.log"
        r = run_c(program, model_bin, "-z", tok_bin, "-t", "0", "-n", steps, "-i", "One day", "-l", log)
        assert r.returncode == 0, r.stderr
        results.append((r.stdout, log.read_bytes()))
    return results


@pytest.mark.parametrize("name, version", [("random", 0), ("trained", 1), ("random", 2), ("trained", 2)])
def test_every_build_gives_identical_output(binaries, inference_models, exported, name, version, tmp_path):
    results = greedy_outputs([binaries[target][0] for target in BUILDS], exported[name, version],
                             inference_models["tokenizer_bin"], 120, tmp_path)
    assert results[0] == results[1] == results[2]  # text and every logit, bit for bit


def cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory):
    """run.c built for AVX2 alone, its int8 path also on a CPU whose runfast build takes VNNI; None without AVX2."""
    if not cpu_has("avx2"):
        return None
    program = str(tmp_path_factory.mktemp("avx2") / "run_avx2")
    subprocess.run(["make", "-s", "-C", ROOT, "run", f"RUN_OUT={program}", f"CC={os.environ.get('CC', 'gcc')} -mavx2"],
                   check=True)
    return program


@pytest.mark.parametrize("group", [32, 64, 96])
def test_int8_vector_paths_give_identical_output(binaries, avx2_build, inference_models, tmp_path, group):
    # groups of 64 take the AVX-512 VNNI dot product where the CPU has it, groups of 32 and 96 (and 64 without
    # VNNI) the AVX2 one; the portable build sums the same lanes in plain C, so every logit must agree bit for bit,
    # and the sanitized (portable) build fails on any read past a group
    tok = Tokenizer(inference_models["tokenizer"])
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=192, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  hidden_dim=384, max_seq_len=64))
    path = tmp_path / "model.bin"
    export.export(model, str(path), 2, eos=True, tok=tok, group=group)
    assert export.read_bin(str(path))[1]["group_size"] == group
    programs = [binaries[target][0] for target in BUILDS + ("run_asan",)] + [avx2_build] * (avx2_build is not None)
    results = greedy_outputs(programs, path, inference_models["tokenizer_bin"], 40, tmp_path)
    assert all(result == results[0] for result in results)


TRICKY = ["", " ", "   ", "Hello world", "  two leading spaces", "trailing  ", "a  b   c", "tab\there",
          "new\nline\n\nand more", "café naïve", "日本語 text", "emoji 🎉 ok", "lit\u2581eral mark", "a\u2581\u2581b",
          "12345 apples", "'quotes' \"double\"", "<s> and </s> and <unk>", "<0x41>", "!!!...???",
          "Once upon a time, there was a little cat named Tom.", "ÿ\u00a0nbsp Ω≈ç√", " \u2581 ", "\u2581", "x \u2581", "\u2581a", " \u2581\u2581 x",
          "\u3000a", "x" * 300]


def encoding_check(binary, model_bin, tok_bin, sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    for text in TRICKY:
        r = run_c(binary, model_bin, "-z", tok_bin, "-m", "encode", "-i", text)
        assert r.returncode == 0, r.stderr
        assert [int(t) for t in r.stdout.split()] == [sp.bos_id()] + sp.encode(text), text


def tiny_bin(path, vocab_size, tok):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=vocab_size, multiple_of=8,
                                  max_seq_len=512))
    export.export(model, str(path), 1, tok=tok)
    return path


@pytest.mark.parametrize("strip", [True, False])
def test_encoding_equals_sentencepiece(binaries, tmp_path, strip):
    options = {} if strip else {"remove_extra_whitespaces": False}
    sp_model, tok_bin = train_inference_tokenizer(str(tmp_path), **options)
    tok = Tokenizer(sp_model)
    assert tok.sp.normalize("a  b") == ("\u2581a\u2581b" if strip else "\u2581a\u2581\u2581b")
    encoding_check(binaries["run"][0], tiny_bin(tmp_path / "m.bin", tok.vocab_size, tok), tok_bin, sp_model)


@pytest.mark.parametrize("name", ["llama2-tokenizer", "tok512-llama2c"])
def test_encoding_equals_sentencepiece_on_reference_vocabularies(binaries, shared_data, tmp_path, name):
    sp_model = os.path.join(shared_data, f"{name}.model")
    tok = Tokenizer(sp_model)
    tok_bin = tok.export(str(tmp_path / "tok.bin"))
    encoding_check(binaries["run"][0], tiny_bin(tmp_path / "m.bin", tok.vocab_size, tok), tok_bin, sp_model)


def test_instruct_mode_prints_the_story_only(binaries, inference_models, exported, tmp_path):
    tok = Tokenizer(inference_models["tokenizer"])
    expected_prompt = instruct_prompt(tok, INFERENCE_INSTRUCTION)
    # whitespace as Python's strip() sees it, Unicode's included (no-break, ideographic, line separator)
    for instruction in (INFERENCE_INSTRUCTION, f"  {INFERENCE_INSTRUCTION} Possible story: \n",
                        f"\u3000\u00a0{INFERENCE_INSTRUCTION}\u2028\x1f\u00a0"):
        log = tmp_path / "log.bin"
        r = run_c(binaries["run"][0], exported["trained", 0], "-z", inference_models["tokenizer_bin"],
                  "-m", "instruct", "-t", "0", "-i", instruction, "-l", log)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == INFERENCE_STORY + "\n"
        _, fed, chosen, _ = read_log(log, tok.vocab_size)
        assert list(fed[:len(expected_prompt)]) == expected_prompt
        assert chosen[-1] == tok.eos_id  # generated until EOS; the context (128) was not the limit
        assert len(fed) < 128
    # an overlong encoding of a space is not UTF-8, so not whitespace: kept, as Python keeps it
    r = run_c(binaries["run"][0], exported["trained", 0], "-z", inference_models["tokenizer_bin"], "-m", "instruct",
              "-t", "0", "-i", os.fsdecode(b"\xc0\xa0"))
    assert r.returncode == 0, r.stderr


def test_eos_flag_decides_stopping_in_generate_mode(binaries, inference_models, tmp_path):
    model, _ = load_model(inference_models["trained"], merge=True)
    tok = Tokenizer(inference_models["tokenizer"])
    outputs = {}
    for eos in (True, False):
        path = tmp_path / f"eos{eos}.bin"
        export.export(model, str(path), 1, eos=eos, tok=tok)
        r = run_c(binaries["run"][0], path, "-z", inference_models["tokenizer_bin"], "-t", "0", "-n", "120",
                  "-i", "Once upon a time")
        assert r.returncode == 0, r.stderr
        outputs[eos] = r.stdout.decode()
    assert outputs[True].endswith("slept well.\n") and "</s>" not in outputs[True]
    assert outputs[False].startswith(outputs[True].rstrip("\n") + "\n</s>\n")  # a model without EOS runs on


def top_p_set(logits, temperature, p):
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, -1).numpy()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    return set(order[before <= p + 1e-5].tolist()), probs


def test_sampling_seed_and_nucleus(binaries, inference_models, exported, tmp_path):
    tok = Tokenizer(inference_models["tokenizer"])
    runs = {}
    for seed in (7, 7, 8):
        log = tmp_path / f"log{len(runs)}.bin"
        r = run_c(binaries["runomp"][0], exported["random", 1], "-z", inference_models["tokenizer_bin"],
                  "-t", "1.5", "-p", "0.5", "-s", seed, "-n", "128", "-l", log)
        assert r.returncode == 0, r.stderr
        runs[len(runs)] = (r.stdout, read_log(log, tok.vocab_size))
    assert runs[0][0] == runs[1][0] != runs[2][0]
    distinct = set()
    for _, (_, _, chosen, logits) in runs.values():
        for step_logits, token in zip(logits, chosen):
            allowed, probs = top_p_set(step_logits, 1.5, 0.5)
            assert token in allowed
            distinct.add(int(token))
    assert len(distinct) > 20  # sampled, not greedy
    # a trained model leaves few candidates: the sorted path
    log = tmp_path / "trained.bin"
    r = run_c(binaries["runomp"][0], exported["trained", 1], "-z", inference_models["tokenizer_bin"],
              "-t", "1.0", "-p", "0.9", "-s", 5, "-n", "128", "-l", log)
    assert r.returncode == 0, r.stderr
    for step_logits, token in zip(*read_log(log, tok.vocab_size)[3:1:-1]):
        assert token in top_p_set(step_logits, 1.0, 0.9)[0]
    # a temperature so small that logits / temperature overflows still means greedy, not uniform draws
    texts = [run_c(binaries["runomp"][0], exported["trained", 1], "-z", inference_models["tokenizer_bin"],
                   "-t", t, "-s", 5, "-n", "60").stdout for t in ("0", "1e-38", "1e-45")]
    assert texts[0] == texts[1] == texts[2]


def test_chat_mode_with_long_prompts_and_turns(binaries, inference_models, exported):
    binary = binaries["run_asan"][0]
    long_text = "tell me a story " * 400  # far beyond the fixed buffers of llama2.c's chat
    r = run_c(binary, exported["random", 1], "-z", inference_models["tokenizer_bin"], "-m", "chat",
              "-y", long_text, "-i", long_text)
    assert r.returncode == 2 and b"shorten it" in r.stderr and b"Sanitizer" not in r.stderr, r.stderr
    r = run_c(binary, exported["trained", 1], "-z", inference_models["tokenizer_bin"], "-m", "chat", "-n", "128",
              "-t", "0", stdin=b"\nhello\nmore\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"Assistant:") >= 1 and b"Enter system prompt" in r.stdout


def test_chat_turns_until_the_context_is_full(binaries, inference_models, tmp_path):
    model, _ = load_model(inference_models["random"], merge=True)
    eos = Tokenizer(inference_models["tokenizer"]).eos_id
    with torch.no_grad():  # a model that answers every turn with EOS at once: dimension 0 alone makes the logits
        model.tok_embeddings.weight[:, 0] = 1.0
        model.tok_embeddings.weight[eos, 0] = 2.0
        model.norm.weight.zero_()[0] = 1.0
        for layer in model.layers:  # nothing but the embedding writes dimension 0, so it stays positive
            layer.attention.wo.weight[0].zero_()
            layer.feed_forward.w2.weight[0].zero_()
    path = str(tmp_path / "eos.bin")
    export.export(model, path, 1, eos=True, tok=Tokenizer(inference_models["tokenizer"]))
    r = run_c(binaries["run_asan"][0], path, "-z", inference_models["tokenizer_bin"], "-m", "chat", "-n", "60",
              "-t", "0", "-y", "", stdin=b"hi\nand again\n" + b"tell me a much longer story " * 8 + b"\n")
    assert r.returncode == 0 and b"Sanitizer" not in r.stderr, r.stderr
    # each answer is its EOS alone, and nothing the model would say after it is printed
    assert r.stdout.decode() == "User: Assistant: \nUser: Assistant: \nUser: \n"
    assert r.stderr.strip() == b"the conversation has reached the context of 60 tokens"


def good_runs(models, tok_bin):
    return [[models["trained", 0], "-z", tok_bin, "-t", "0", "-n", "60", "-i", "Once upon a time"],
            [models["random", 1], "-z", tok_bin, "-t", "0.9", "-p", "0.9", "-s", "3", "-i", "café 🎉  x"],
            [models["random", 2], "-z", tok_bin, "-t", "1", "-p", "1", "-s", "3", "-n", "0"],
            [models["trained", 2], "-z", tok_bin, "-m", "instruct", "-t", "0", "-i", INFERENCE_INSTRUCTION],
            [models["trained", 1], "-z", tok_bin, "-m", "encode", "-i", "x" * 5000]]


def test_good_inputs_are_clean_under_sanitizers(binaries, inference_models, exported):
    for args in good_runs(exported, inference_models["tokenizer_bin"]):
        r = run_c(binaries["run_asan"][0], *args)
        assert r.returncode == 0 and b"Sanitizer" not in r.stderr and b"runtime error" not in r.stderr, r.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_stop_with_an_error(binaries, inference_models, tmp_path, value):
    """A diverged model's file passes every size check; its logits say what is wrong, never gibberish."""
    model, _ = load_model(inference_models["random"], merge=True)
    with torch.no_grad():
        model.layers[0].attention_norm.weight[0] = value
    tok = Tokenizer(inference_models["tokenizer"])
    for version in (0, 1, 2):
        path = str(tmp_path / f"broken_v{version}.bin")
        export.export(model, path, version, eos=True, tok=tok)
        for flags in (["-t", "0"], ["-t", "1", "-p", "0.9"], ["-t", "1", "-p", "1"]):
            r = run_c(binaries["run_asan"][0], path, "-z", inference_models["tokenizer_bin"], "-n", "20", *flags)
            err = r.stderr.decode(errors="replace")
            assert r.returncode == 2 and "Sanitizer" not in err and "runtime error" not in err, err
            assert err.startswith("error: the logits at position 0 are not finite") and err.count("\n") == 1, err


def corrupt_files(d, model_bin, tok_bin):
    """Broken model and tokenizer files, each with a word the error message must contain."""
    data = open(model_bin, "rb").read()
    tok = open(tok_bin, "rb").read()

    def put(name, blob):
        (d / name).write_bytes(blob)
        return str(d / name)

    def header(**fields):  # version 1 header with fields replaced
        ints = dict(zip(["dim", "hidden", "layers", "heads", "kv", "vocab", "seq"],
                        struct.unpack_from("<7i", data, 8)))
        ints.update(fields)
        return data[:8] + struct.pack("<7i", *ints.values()) + data[36:]

    models = {
        "empty": (put("empty.bin", b""), "too small"),
        "header only": (put("head.bin", data[:256]), "truncated"),
        "cut short": (put("short.bin", data[:-4]), "truncated"),
        "one byte more": (put("long.bin", data + b"\0"), "bytes"),
        "version 3": (put("v3.bin", data[:4] + struct.pack("<i", 3) + data[8:]), "version 3"),
        "zero dim": (put("dim0.bin", header(dim=0)), "out of range"),
        "negative layers": (put("neg.bin", header(layers=-2)), "out of range"),
        "huge shapes": (put("huge.bin", header(dim=1 << 20, hidden=1 << 20, layers=4096)), "bytes"),
        "heads not dividing": (put("heads.bin", header(heads=3)), "inconsistent"),
        "kv heads not dividing": (put("kv.bin", header(kv=3)), "inconsistent"),
        "directory": (str(d), "not a regular file"),
        "missing": (str(d / "nope.bin"), "cannot open"),
        "text file": (put("text.bin", b"hello, this is not a model at all" * 4), "out of range"),
    }
    toks = {
        "truncated tokenizer": (put("tok_short.bin", tok[:-3]), "truncated"),
        "negative length": (put("tok_neg.bin", tok[:8] + struct.pack("<i", -5) + tok[12:]), "length"),
        "length past the end": (put("tok_big.bin", tok[:8] + struct.pack("<i", 1 << 30) + tok[12:]), "length"),
        "tiny tokenizer": (put("tok_tiny.bin", b"\1\0"), "not a tokenizer"),
        # same size, one score changed: gibberish if run.c took it, so the model's header names its tokenizer
        "another tokenizer of the same size": (put("tok_other.bin", tok[:4] + struct.pack("<f", 1.5) + tok[8:]),
                                               "is not the one"),
    }
    return models, toks


def test_bad_inputs_fail_cleanly_under_sanitizers(binaries, inference_models, exported, shared_data_or_none,
                                                  tmp_path):
    binary = binaries["run_asan"][0]
    tok_bin = inference_models["tokenizer_bin"]
    model_bin = exported["random", 1]
    v2_bin = open(exported["random", 2], "rb").read()
    (tmp_path / "gs0.bin").write_bytes(v2_bin[:37] + struct.pack("<i", 0) + v2_bin[41:])
    (tmp_path / "gs7.bin").write_bytes(v2_bin[:37] + struct.pack("<i", 7) + v2_bin[41:])
    big_tok = tmp_path / "tok32000.bin"
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"p%d" % i for i in range(31997)]
    big_tok.write_bytes(struct.pack("<I", 6) + b"".join(struct.pack("<fi", 0.0, len(p)) + p for p in pieces))
    cases = [
        ([], "Usage"),
        ([model_bin, "-z", tok_bin, "-q", "1"], "unknown option -q"),
        ([model_bin, "-z", tok_bin, "-t"], "needs a value"),
        ([model_bin, "-z", tok_bin, "-tt", "1"], "expected an option"),
        ([model_bin, "-z", tok_bin, "-t", "abc"], "-t expects"),
        ([model_bin, "-z", tok_bin, "-t", "-1"], "-t expects"),
        ([model_bin, "-z", tok_bin, "-p", "1.5"], "-p expects"),
        ([model_bin, "-z", tok_bin, "-n", "-3"], "-n expects"),
        ([model_bin, "-z", tok_bin, "-n", "12x"], "-n expects"),
        ([model_bin, "-z", tok_bin, "-s", "seed"], "-s expects"),
        ([model_bin, "-z", tok_bin, "-s", "99999999999999999999"], "-s expects"),
        ([model_bin, "-z", tok_bin, "-n", " 5"], "-n expects"),
        ([model_bin, "-z", tok_bin, "-n", "129"], "beyond the model's context"),
        ([model_bin, "-z", tok_bin, "-i", "Tom and Lily ran " * 40], "fills the model's context of 128"),
        ([model_bin, "-z", tok_bin, "-n", "1"], "(1 token) fills the -n 1 positions"),
        ([model_bin, "-z", tok_bin, "-n", "5", "-i", "Tom and Lily ran to the park"], "no room"),
        ([model_bin, "-z", tok_bin, "-m", "poems"], "unknown mode"),
        ([model_bin, "-z", tok_bin, "-m", "instruct"], "needs the instruction"),
        ([model_bin, "-z", tok_bin, "-m", "instruct", "-i", " \t "], "needs the instruction"),
        ([model_bin, "-z", tok_bin, "-m", "instruct", "-i", "\u00a0\u3000"], "needs the instruction"),
        ([model_bin, "-z", tok_bin, "-m", "chat", "-y", "", "-n", "5", "-i", "Tom and Lily ran"],
         "raise -n (at most 128)"),
        ([model_bin, "-z", tok_bin, "-m", "chat", "-y", "", "-i", "Tom and Lily ran " * 40],
         "fills the model's context of 128; shorten it"),
        ([model_bin, "-z", tok_bin, "-y", "be nice"], "only used with -m chat"),
        ([model_bin, "-z", tok_bin, "-l", "/nonexistent/dir/log.bin"], "cannot write"),
        (["-t", "1"], "first argument"),
        ([model_bin, "-z", str(big_tok)], "has 32000 tokens but the model has"),
        ([model_bin, "-z", str(tmp_path / "missing.bin")], "cannot open tokenizer"),
        ([str(tmp_path / "gs0.bin"), "-z", tok_bin], "group size"),
        ([str(tmp_path / "gs7.bin"), "-z", tok_bin], "group size"),
    ]
    models, toks = corrupt_files(tmp_path, model_bin, tok_bin)
    cases += [([path, "-z", tok_bin], word) for path, word in models.values()]
    cases += [([model_bin, "-z", path], word) for path, word in toks.values()]
    if shared_data_or_none:  # a 32000-token tokenizer with a 400-token model: an error, never gibberish
        cases.append(([model_bin, "-z", os.path.join(shared_data_or_none, "llama2-tokenizer.bin")], "32000 tokens"))
    for args, word in cases:
        r = run_c(binary, *args)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 2, (args[1:4], r.returncode, err)
        assert "Sanitizer" not in err and "runtime error" not in err, err
        assert word in err, (word, err)
        if word != "Usage":
            assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_output_that_cannot_be_written_is_an_error(binaries, inference_models, exported):
    for mode in (["-n", "40", "-t", "0"], ["-m", "encode"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([binaries["run"][0], exported["trained", 1], "-z", inference_models["tokenizer_bin"],
                                "-i", "Once upon a time", *mode], stdout=full, stderr=subprocess.PIPE)
        assert r.returncode == 2 and b"cannot write the output (No space left on device)" in r.stderr, r.stderr


@pytest.fixture
def shared_data_or_none():
    from conftest import SHARED_DATA
    return SHARED_DATA if os.path.isdir(SHARED_DATA) else None
