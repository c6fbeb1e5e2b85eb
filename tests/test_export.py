import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

import export
from configurator import UserError
from conftest import train_inference_tokenizer
from model import (LoRALinear, ModelArgs, Transformer, apply_lora, apply_rope, load_model, lora_state_dict,
                   read_checkpoint, rope_tables, save_checkpoint)
from tokenizer import Tokenizer, default_prompts


def tiny(**kw):
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=8, max_seq_len=64)
    args.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelArgs(**args)).eval()


def weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_v0_is_llama2c_legacy_layout(tmp_path):
    model = tiny()
    path = str(tmp_path / "m.bin")
    export.export(model, path, 0)
    data = open(path, "rb").read()
    a = model.args
    assert struct.unpack_from("<7i", data) == (32, a.hidden_dim, 2, 4, 2, 400, 64)
    # llama2.c's order: embedding, then kind by kind over the layers, final norm, RoPE tables
    expected = [model.tok_embeddings.weight, *[l.attention_norm.weight for l in model.layers]]
    for kind in ("wq", "wk", "wv", "wo"):
        expected += [getattr(l.attention, kind).weight for l in model.layers]
    expected += [l.ffn_norm.weight for l in model.layers]
    for kind in ("w1", "w2", "w3"):
        expected += [getattr(l.feed_forward, kind).weight for l in model.layers]
    expected += [model.norm.weight, model.rope_cos, model.rope_sin]
    body = b"".join(t.detach().numpy().astype("<f4").tobytes() for t in expected)
    assert data[28:] == body
    back, info = export.read_bin(path)
    assert info == {"version": 0, "flags": 0, "group_size": 0, "shared_classifier": True, "tok_crc": 0}
    assert weights_equal(back, model)


def test_v1_header_and_weights(tmp_path):
    model = tiny()
    path = str(tmp_path / "m.bin")
    export.export(model, path, 1, eos=True)
    data = open(path, "rb").read()
    magic, version = struct.unpack_from("<Ii", data)
    assert (magic, version) == (0x616B3432, 1) and data[:4] == b"24ka"
    assert struct.unpack_from("<7iB", data, 8) == (32, model.args.hidden_dim, 2, 4, 2, 400, 64, 1)
    assert struct.unpack_from("<If", data, 64) == (export.FLAG_EOS, pytest.approx(1e-5))
    n_params = sum(p.numel() for p in model.parameters())
    assert len(data) == 256 + 4 * n_params
    back, info = export.read_bin(path)
    assert info["version"] == 1 and info["flags"] == export.FLAG_EOS
    assert weights_equal(back, model)


def test_unshared_classifier_is_flagged(tmp_path):
    model = tiny(tie_embeddings=False)
    for version in (0, 1, 2):
        path = str(tmp_path / f"m{version}.bin")
        export.export(model, path, version)
        data = open(path, "rb").read()
        if version == 0:
            assert struct.unpack_from("<7i", data)[5] == -400
        else:
            assert data[36] == 0
        back, info = export.read_bin(path)
        assert not info["shared_classifier"]
        tolerance = 0.0 if version < 2 else 0.02
        assert torch.allclose(back.output.weight, model.output.weight, atol=tolerance, rtol=0)
        assert not torch.equal(back.output.weight, back.tok_embeddings.weight)


@pytest.mark.parametrize("shape, group", [
    (dict(dim=64, n_heads=8, n_kv_heads=4, multiple_of=4), 4),      # stories260K: hidden 172 = 4 * 43
    (dict(dim=288, n_heads=6, multiple_of=32), 32),                 # stories15M: hidden 768, dim 288
    (dict(dim=512, n_heads=8, multiple_of=32), 32),                 # stories42M: hidden 1376 = 32 * 43
    (dict(dim=768, n_heads=12, multiple_of=32), 64),                # stories110M: hidden 2048
])
def test_group_size_divides_every_row(shape, group):
    args = ModelArgs(n_layers=1, vocab_size=32, **shape)
    assert export.pick_group_size(args) == group
    assert args.dim % group == 0 and args.hidden_dim % group == 0


def test_requested_group_size_is_checked():
    args = ModelArgs(dim=288, n_heads=6, n_layers=1, vocab_size=32, multiple_of=32)
    assert export.pick_group_size(args, 16) == 16
    with pytest.raises(export.UserError, match="must divide"):
        export.pick_group_size(args, 64)


def test_quantisation_error_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 10, 64)).astype(np.float32)
    w[0, 0] = 0.0  # an all-zero group must not divide by zero
    q, scale = export.quantize_q80(w, 16)
    assert q.dtype == np.int8 and scale.shape == (3, 10, 4) and np.abs(q).max() == 127
    step = np.repeat(scale, 16, axis=-1)
    assert np.all(np.abs(export.dequantize_q80(q, scale) - w) <= step / 2 + 1e-7)
    assert np.all(q[0, 0] == 0)


def test_v2_is_llama2c_q80_layout(tmp_path):
    model = tiny(multiple_of=16)  # hidden 96: group size 32
    path = str(tmp_path / "m.bin")
    export.export(model, path, 2)
    data = open(path, "rb").read()
    group = 32
    assert struct.unpack_from("<Ii7iBi", data) == (0x616B3432, 2, 32, 96, 2, 4, 2, 400, 64, 1, group)
    # llama2.c's layout: fp32 norms, then each tensor's int8 values followed by its scales, layer by layer
    body = [t.detach().numpy() for t in [*[l.attention_norm.weight for l in model.layers],
                                         *[l.ffn_norm.weight for l in model.layers], model.norm.weight]]
    tensors = [model.tok_embeddings.weight]
    for path_in_layer in export.MATRICES:
        tensors += [l.get_parameter(path_in_layer + ".weight") for l in model.layers]
    for t in tensors:
        flat = t.detach().numpy().reshape(-1, group)
        scale = np.abs(flat).max(axis=1) / np.float32(127)
        body += [np.round(flat / scale[:, None]).astype(np.int8), scale.astype(np.float32)]
    assert data[256:] == b"".join(b.tobytes() for b in body)
    back, info = export.read_bin(path)
    assert info["group_size"] == group
    for a, b in zip(back.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=float(np.abs(b.detach().numpy()).max()) / 254 + 1e-7, rtol=0)


def checkpoint(net, path, **extra):
    ckpt = {"model": net.state_dict(), "model_args": vars(net.args), "config": {}, "mode": "pretrain",
            "iter_num": 0, "best_val_loss": 0.0, "optimizer": None, "tokenizer": None, "eos": False, "lora": None}
    ckpt.update(extra)
    save_checkpoint(ckpt, str(path))
    return str(path)


def test_cli_exports_every_version(tmp_path, capsys):
    model = tiny()
    ckpt = checkpoint(model, tmp_path / "ckpt.pt")
    for version in (0, 1, 2):
        out = str(tmp_path / "out" / f"m{version}.bin")
        export.main([out, f"--checkpoint={ckpt}", f"--version={version}"])
        assert export.read_bin(out)[1]["version"] == version
    export.main([f"--checkpoint={ckpt}", str(tmp_path / "flags_first.bin")])  # the output may come last
    assert open(tmp_path / "flags_first.bin", "rb").read() == open(tmp_path / "out" / "m0.bin", "rb").read()
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["m0.bin", "m1.bin", "m2.bin"]  # no temporary files left


@pytest.mark.parametrize("argv, message", [
    ([], "say where to write"),
    (["a.bin", "b.bin", "--checkpoint=x.pt"], "say where to write"),
    (["a.bin"], "say which checkpoint"),
    (["a.bin", "--checkpoint=missing.pt"], "checkpoint not found"),
    (["a.bin", "--checkpoint=CKPT", "--version=3"], "--version must be one of"),
    (["a.bin", "--checkpoint=CKPT", "--version=2", "--group_size=48"], "must divide"),
    (["a.bin", "--checkpoint=CKPT", "--version=1", "--group_size=8"], "--group_size is for --version=2"),
    (["a.bin", "--checkpoint=CKPT", "--versoin=1"], "did you mean --version"),
    (["a.bin", "--checkpoint=CKPT", "--version", "2"], "--version needs a value: write --version=VALUE"),
    (["CKPT", "--checkpoint=CKPT", "--hf=True"], "writes a folder"),
    (["CKPT", "--checkpoint=CKPT", "--version=1"], "is the --checkpoint being read"),
    (["./ckpt.pt", "--checkpoint=CKPT"], "is the --checkpoint being read"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint(tiny(), tmp_path / "ckpt.pt")
    before = open(ckpt, "rb").read()
    with pytest.raises(SystemExit) as e:
        export.main([a.replace("CKPT", ckpt) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "a.bin") and open(ckpt, "rb").read() == before


def test_v0_refuses_a_norm_eps_it_cannot_record(tmp_path):
    model = tiny(norm_eps=1e-6)
    with pytest.raises(export.UserError, match="norm_eps"):
        export.export(model, str(tmp_path / "m.bin"), 0)
    assert os.listdir(tmp_path) == []  # nothing half-written
    export.export(model, str(tmp_path / "m.bin"), 1)
    assert export.read_bin(str(tmp_path / "m.bin"))[0].args.norm_eps == pytest.approx(1e-6)


def test_lora_and_ppo_checkpoints_export_their_merged_language_model(tmp_path):
    base = tiny()
    base_path = checkpoint(base, tmp_path / "base.pt")
    apply_lora(base, rank=2, alpha=4.0)
    for m in base.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b)
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}
    adapters = checkpoint(base, tmp_path / "lora.pt", model=lora_state_dict(base), base_checkpoint=base_path,
                          lora=lora, mode="sft")
    full_lora = checkpoint(base, tmp_path / "lora_full.pt", lora=lora, mode="sft")
    merged, _ = load_model(adapters, merge=True)
    merged_path = checkpoint(merged, tmp_path / "merged.pt")
    ppo = checkpoint(merged, tmp_path / "ppo.pt", mode="ppo", value_head={"weight": torch.randn(1, 32)})
    outputs = {}
    for name, path in (("adapters", adapters), ("full", full_lora), ("merged", merged_path), ("ppo", ppo)):
        out = str(tmp_path / f"{name}.bin")
        export.main([out, f"--checkpoint={path}", "--version=1"])
        outputs[name] = open(out, "rb").read()
    assert outputs["adapters"] == outputs["merged"] == outputs["ppo"]
    assert outputs["full"] == outputs["merged"]
    exported_wq = export.read_bin(str(tmp_path / "adapters.bin"))[0].layers[0].attention.wq.weight
    assert torch.equal(exported_wq, merged.layers[0].attention.wq.weight)
    assert not torch.equal(exported_wq, tiny().layers[0].attention.wq.weight)  # the adapter is in it


def test_header_records_eos_and_tokenizer_space_handling(tmp_path, capsys):
    strip_model, _ = train_inference_tokenizer(str(tmp_path), "strip")
    keep_model, _ = train_inference_tokenizer(str(tmp_path), "keep", remove_extra_whitespaces=False)
    model = tiny()
    for tok_path, eos, flags in ((strip_model, True, export.FLAG_EOS | export.FLAG_STRIP_SPACES),
                                 (keep_model, False, 0)):
        ckpt = checkpoint(model, tmp_path / "ckpt.pt", eos=eos, tokenizer={"path": tok_path, "vocab_size": 400})
        export.main([str(tmp_path / "m.bin"), f"--checkpoint={ckpt}", "--version=2"])
        info = export.read_bin(str(tmp_path / "m.bin"))[1]
        assert info["flags"] == flags
        assert info["tok_crc"] == zlib.crc32(open(Tokenizer(tok_path).export(str(tmp_path / "t.bin")), "rb").read())
    # no tokenizer around (llama2.c's checkpoints record none): llama2.c's behaviour, with a note
    ckpt = checkpoint(model, tmp_path / "ckpt.pt", tokenizer={"path": str(tmp_path / "gone.model"), "vocab_size": 400})
    export.main([str(tmp_path / "m.bin"), f"--checkpoint={ckpt}", "--version=1"])
    info = export.read_bin(str(tmp_path / "m.bin"))[1]
    assert info["flags"] == info["tok_crc"] == 0
    assert "tokenizer is not available" in capsys.readouterr().err
    # a tokenizer of another vocabulary is refused
    small = tiny(vocab_size=300)
    ckpt = checkpoint(small, tmp_path / "ckpt.pt", tokenizer={"path": strip_model, "vocab_size": 400})
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "bad.bin"), f"--checkpoint={ckpt}"])
    assert f"has 400 tokens but the model of {ckpt} has 300" in capsys.readouterr().err
    assert Tokenizer(strip_model).vocab_size == 400
    # and one of the same size but another vocabulary, here the recorded file retrained since (the header would
    # name the wrong tokenizer for run.c)
    ckpt = checkpoint(model, tmp_path / "ckpt.pt", tokenizer={"path": strip_model, "vocab_size": 400,
                                                              "sha256": "0" * 64})
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "bad.bin"), f"--checkpoint={ckpt}"])
    assert (f"tokenizer {strip_model} is not the one {ckpt} was trained with (another vocabulary of the same size, "
            "the same file retrained since)") in capsys.readouterr().err


def hf_rope(x, cos, sin):
    """transformers' Llama rotary embedding of x (T, H, D): dimension i pairs with i + D/2."""
    half = x.shape[-1] // 2
    c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s


def attention_scores(q, k):
    """q.k of every (head, query, key), each query head against its key head (grouped-query attention)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("thd,shd->hts", q, k)


@pytest.mark.parametrize("shared", [True, False])
def test_hf_folder_holds_hf_names_and_rotary_order(tmp_path, capsys, shared):
    model = tiny(tie_embeddings=shared)
    tok_path, _ = train_inference_tokenizer(str(tmp_path), "tok")
    out = tmp_path / "hf"
    ckpt = checkpoint(model, tmp_path / "ckpt.pt", tokenizer={"path": tok_path, "vocab_size": 400})
    export.main([str(out), f"--checkpoint={ckpt}", "--hf=True"])
    assert "Hugging Face" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    a = model.args
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (a.dim, a.hidden_dim,
                                                                                                 a.n_layers)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 400)
    assert config["tie_word_embeddings"] == shared and config["model_type"] == "llama"
    assert (out / "tokenizer.model").read_bytes() == open(tok_path, "rb").read()
    weights = hf_weights(out)
    assert ("lm_head.weight" in weights) != shared and len(weights) == 3 + 9 * a.n_layers - shared
    layer = model.layers[1]
    assert torch.equal(weights["model.layers.1.mlp.gate_proj.weight"], layer.feed_forward.w1.weight)
    assert torch.equal(weights["model.layers.1.self_attn.v_proj.weight"], layer.attention.wv.weight)
    # the reordered q and k rows under transformers' rotation give the same attention scores as ours
    T, hd = 10, a.head_dim
    x = torch.randn(T, a.dim)
    cos, sin = rope_tables(hd, T)
    freqs = torch.complex(cos, sin)
    with torch.no_grad():
        ours = attention_scores(apply_rope((x @ layer.attention.wq.weight.T).view(1, T, 4, hd), freqs)[0],
                                apply_rope((x @ layer.attention.wk.weight.T).view(1, T, 2, hd), freqs)[0])
        hf_q, hf_k = (weights[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qk")
        theirs = attention_scores(hf_rope((x @ hf_q.T).view(T, 4, hd), cos, sin),
                                  hf_rope((x @ hf_k.T).view(T, 2, hd), cos, sin))
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(hf_q, layer.attention.wq.weight)


def write_safetensors(path, tensors):
    """A .safetensors file of float32 (and, for names ending in .bf16, bfloat16) tensors, written by hand."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = (t.to(torch.bfloat16).view(torch.int16) if name.endswith(".bf16") else t).numpy().tobytes()
        header[name] = {"dtype": "BF16" if name.endswith(".bf16") else "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def hf_weights(folder):
    return {k: torch.from_numpy(v) for k, v in export.read_safetensors(str(folder / "model.safetensors")).items()}


def test_safetensors_reader(tmp_path):
    a, b = torch.randn(3, 5), torch.randn(4)
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, {"a": a, "b.bf16": b})
    back = export.read_safetensors(path)
    assert np.array_equal(back["a"], a.numpy()) and back["a"].shape == (3, 5)
    assert np.array_equal(back["b.bf16"], b.to(torch.bfloat16).float().numpy())
    data = open(path, "rb").read()
    entry = json.dumps({"a": [1, 2]}).encode()  # a header entry that is not {dtype, shape, data_offsets}
    for damaged, message in ((data[:-4], "cut short"), (b"\xff" * 16, "not a safetensors file"),
                             (struct.pack("<Q", len(entry)) + entry, "has no dtype, shape and offsets")):
        open(path, "wb").write(damaged)
        with pytest.raises(UserError, match=message):
            export.read_safetensors(path)


def test_hf_folder_reads_back_and_exports_the_same_bin(tmp_path, capsys):
    untied = tiny(dim=48, n_heads=6, n_kv_heads=2, tie_embeddings=False)
    export.write_hf(str(tmp_path / "untied"), untied)
    back, _ = load_model(str(tmp_path / "untied"))
    assert weights_equal(back, untied) and not torch.equal(back.output.weight, back.tok_embeddings.weight)
    # the same folder with pytorch_model.bin, as older transformers saved it, reads the same
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "untied" / "config.json").read_text())
    torch.save(hf_weights(tmp_path / "untied"), folder / "pytorch_model.bin")
    assert weights_equal(load_model(str(folder))[0], untied)
    # through the command line: checkpoint -> folder -> .bin is the .bin of the checkpoint, byte for byte
    # (a model trained without EOS too: the folder names the tokenizer's EOS either way)
    tok_path, _ = train_inference_tokenizer(str(tmp_path), "tok", remove_extra_whitespaces=False)
    for eos in (True, False):
        ckpt = checkpoint(tiny(), tmp_path / "ckpt.pt", eos=eos, tokenizer={"path": tok_path, "vocab_size": 400})
        export.main([str(tmp_path / f"hf{eos}"), f"--checkpoint={ckpt}", "--hf=True"])
        export.main([str(tmp_path / "direct.bin"), f"--checkpoint={ckpt}", "--version=1"])
        export.main([str(tmp_path / "via_hf.bin"), f"--checkpoint={tmp_path / f'hf{eos}'}", "--version=1"])
        assert open(tmp_path / "via_hf.bin", "rb").read() == open(tmp_path / "direct.bin", "rb").read()
        assert export.read_bin(str(tmp_path / "via_hf.bin"))[1]["flags"] & export.FLAG_EOS == eos


def test_export_never_writes_over_a_file_it_reads(tmp_path, capsys):
    folder = tmp_path / "hf"
    export.write_hf(str(folder), tiny())
    tok_path, _ = train_inference_tokenizer(str(tmp_path), "tok")
    ckpt = checkpoint(tiny(), tmp_path / "ckpt.pt")
    for argv in ([str(folder / "model.safetensors"), f"--checkpoint={folder}"],
                 [str(folder / "config.json"), f"--checkpoint={folder}", "--version=1"],
                 [tok_path, f"--checkpoint={ckpt}", f"--tokenizer={tok_path}"]):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        assert e.value.code == 2 and "being read" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_hf_folder_keeps_the_prompts_its_model_was_trained_for(tmp_path):
    for mode, prompts in [("sft", "instruct"), ("pretrain", "plain")]:
        folder = tmp_path / mode
        export.main([str(folder), f"--checkpoint={checkpoint(tiny(), tmp_path / f'{mode}.pt', mode=mode)}",
                     "--hf=True"])
        assert default_prompts(read_checkpoint(str(folder))) == prompts
    # a folder from elsewhere names no prompts: story starts
    config_path = tmp_path / "sft" / "config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items() if k != "prompts"}))
    assert default_prompts(read_checkpoint(str(tmp_path / "sft"))) == "plain"


@pytest.mark.parametrize("edit, message", [
    (lambda c, w: c.update(model_type="mistral"), "only Llama models are read"),
    (lambda c, w: c.pop("vocab_size"), "lacks vocab_size"),
    (lambda c, w: c.update(rope_theta=500000.0), "its rope_theta differ"),
    (lambda c, w: w.pop("model.layers.1.mlp.up_proj.weight"), "lacks the weight model.layers.1.mlp.up_proj"),
    (lambda c, w: c.update(intermediate_size=96), "has shape"),
    (lambda c, w: c.update(num_key_value_heads="2"), "n_kv_heads='2' is not a whole number"),
    (lambda c, w: c.update(rms_norm_eps="x"), "norm_eps='x' is not a number"),
])
def test_hf_folder_problems_are_clear_errors(tmp_path, edit, message):
    folder = tmp_path / "hf"
    export.write_hf(str(folder), tiny())
    config = json.loads((folder / "config.json").read_text())
    weights = hf_weights(folder)
    edit(config, weights)
    (folder / "config.json").write_text(json.dumps(config))
    export.write_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(UserError, match=message):
        export.read_hf(str(folder))


def test_hf_folder_runs_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers "
                                                              "to check the Hugging Face export against it)")
    model = tiny()
    out = tmp_path / "hf"
    export.main([str(out), f"--checkpoint={checkpoint(model, tmp_path / 'ckpt.pt')}", "--hf=True"])
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0], theirs(tokens).logits, atol=1e-4)
    # and the other way: a Llama that transformers saved (safetensors, bf16, untied, GQA) reads as itself
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    theirs = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    theirs.save_pretrained(str(tmp_path / "saved"))
    ours, _ = load_model(str(tmp_path / "saved"))
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(tokens)[0], theirs.float()(tokens).logits, atol=1e-4)


def test_llama2c_files_read_back(shared_data):
    d = os.path.join(shared_data, "llama2c-260K")
    v0, info0 = export.read_bin(os.path.join(d, "model_v0.bin"))
    v2, info2 = export.read_bin(os.path.join(d, "model_v2.bin"))
    assert (info0["version"], info2["version"], info2["group_size"]) == (0, 2, 64)
    assert v0.args.hidden_dim == 172 and v0.args.n_kv_heads == 4
    for a, b in zip(v0.parameters(), v2.parameters()):  # the same model, int8 within a step of 1/127
        assert torch.allclose(a, b, atol=float(a.detach().abs().max()) / 127, rtol=0)
