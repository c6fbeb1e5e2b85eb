"""Write a checkpoint as the .bin file that run.c reads, or as a Hugging Face folder.

    python export.py out260K/model.bin --checkpoint=out260K/ckpt.pt               # version 0 (llama2.c legacy)
    python export.py out260K/model_q80.bin --checkpoint=out260K/ckpt.pt --version=2
    python export.py out260K/hf --checkpoint=out260K/ckpt.pt --hf=True                # a Hugging Face folder
    python export.py model.bin --checkpoint=path/to/hf_llama_folder                    # and back, for run.c

Any checkpoint train.py writes: pretrained, SFT, LoRA (merged on the way out), PPO (the value head is not
exported), reward model (only its transformer), and llama2.c's own.

- version 0: llama2.c's legacy file: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  max_seq_len; a negative vocab_size means an unshared classifier), then fp32 weights.
- version 1: a 256-byte header (uint32 magic 0x616b3432, int32 version, the seven int32, uint8 shared
  classifier), then fp32 weights, norms first.
- version 2: as 1 with an int32 group size at byte 37; norms in fp32, every matrix in Q8_0: int8 values, then
  one fp32 scale per group of group_size consecutive values. Groups never straddle rows (llama2.c's runq
  assumes so), so the group size divides both dim and hidden_dim.
Versions 1 and 2 use spare header bytes that llama2.c ignores: uint32 flags at byte 64 (1: the model was
trained with EOS, 2: the tokenizer drops leading, trailing and repeated spaces, 4: it adds no dummy prefix
space), float32 norm_eps at byte 68 and the CRC-32 of the tokenizer .bin at byte 72 (0: not known), so that
run.c can refuse any other tokenizer.

--hf=True writes a folder that transformers' LlamaForCausalLM.from_pretrained reads instead: config.json (with
our "prompts": "instruct" for a model trained on instructions, which PPO, label and eval read back),
model.safetensors (fp32, HF's parameter names, the q and k rows of each head reordered from Meta's interleaved
rotary pairs to HF's halves) and the sentencepiece tokenizer.model with a tokenizer_config.json. A folder as
--checkpoint is read the other way (a Llama with Llama 2's rotary settings; weights in safetensors or
pytorch_model.bin, fp32, fp16 or bf16).
"""
import glob
import json
import os
import shutil
import struct
import sys
from dataclasses import asdict

import numpy as np
import torch

from configurator import UserError, atomic_output, cli, configure, read_json, refuse_overwriting, refuse_read_only
from model import load_model
from tokenizer import Tokenizer, checkpoint_tokenizer, default_prompts

checkpoint = ""  # the ckpt.pt to export
version = 0  # 0, 1 or 2, as above
group_size = 0  # version 2: values per scale; 0 = the largest power of two <= 64 dividing every row
tokenizer = ""  # the .model whose space handling run.c must follow; default: the one the checkpoint names
hf = False  # write a Hugging Face Llama folder instead of a .bin (--version is then not used)

MAGIC = 0x616B3432
FLAG_EOS, FLAG_STRIP_SPACES, FLAG_NO_DUMMY_PREFIX = 1, 2, 4
MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _f32(t):
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def per_layer(model, name):
    """One array (n_layers, ...) of parameter name ("attention.wq.weight") of every layer."""
    return np.stack([_f32(layer.get_parameter(name)) for layer in model.layers])


def shares_classifier(model):
    """Whether the classifier is the token embedding itself (an untied one is written apart even when equal)."""
    return model.output.weight is model.tok_embeddings.weight


def shape_ints(model):
    a = model.args
    return [a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len]


def header_v1(model, file_version, flags, shared, tok_crc, group=0):
    """The 256-byte header of versions 1 and 2; tok_crc is the tokenizer .bin's CRC-32 (0: not known)."""
    header = bytearray(256)
    struct.pack_into("<Ii7iB", header, 0, MAGIC, file_version, *shape_ints(model), int(shared))
    if file_version == 2:
        struct.pack_into("<i", header, 37, group)
    struct.pack_into("<IfI", header, 64, flags, model.args.norm_eps, tok_crc)
    return bytes(header)


def write_v0(path, model, flags, tok_crc):
    """llama2.c's legacy layout; it has no room for flags or tok_crc, so run.c assumes llama2.c's behaviour."""
    if not np.isclose(model.args.norm_eps, 1e-5, rtol=0, atol=1e-12):
        raise UserError(f"version 0 cannot record norm_eps={model.args.norm_eps} (run.c would use 1e-5); "
                        "export with --version=1")
    shared = shares_classifier(model)
    ints = shape_ints(model)
    if not shared:
        ints[5] = -ints[5]
    parts = [np.array(ints, dtype=np.int32), _f32(model.tok_embeddings.weight),
             per_layer(model, "attention_norm.weight"),
             *[per_layer(model, f"{m}.weight") for m in MATRICES[:4]],
             per_layer(model, "ffn_norm.weight"),
             *[per_layer(model, f"{m}.weight") for m in MATRICES[4:]],
             _f32(model.norm.weight), _f32(model.rope_cos), _f32(model.rope_sin)]
    if not shared:
        parts.append(_f32(model.output.weight))
    _write(path, parts)


def layout_v1(model):
    """Whether the classifier is shared, the norms and the matrix stacks (layers first) of versions 1 and 2,
    in file order."""
    shared = shares_classifier(model)
    norms = [per_layer(model, "attention_norm.weight"), per_layer(model, "ffn_norm.weight"), _f32(model.norm.weight)]
    matrices = [_f32(model.tok_embeddings.weight)[None]] + [per_layer(model, f"{m}.weight") for m in MATRICES]
    if not shared:
        matrices.append(_f32(model.output.weight)[None])
    return shared, norms, matrices


def write_v1(path, model, flags, tok_crc):
    shared, norms, matrices = layout_v1(model)
    _write(path, [header_v1(model, 1, flags, shared, tok_crc), *norms, *matrices])


def pick_group_size(args, requested=0):
    """Values per Q8_0 scale: requested, or the largest power of two <= 64 dividing every row length."""
    rows = (args.dim, args.hidden_dim)  # every matrix's rows are dim or hidden_dim long
    if requested:
        if requested <= 0 or any(n % requested for n in rows):
            raise UserError(f"--group_size={requested} must divide dim={args.dim} and hidden_dim={args.hidden_dim}")
        return requested
    size = 64
    while any(n % size for n in rows):
        size //= 2
    return size


def quantize_q80(w, group):
    """Symmetric int8 in groups of `group` consecutive values along the last axis: w ~= q * scale.

    Returns q (int8, shape of w) and scale (float32, w.shape[:-1] + (w.shape[-1] // group,))."""
    groups = w.reshape(-1, group)
    scale = (np.abs(groups).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(groups / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale.reshape(w.shape[:-1] + (-1,))


def dequantize_q80(q, scale):
    group = q.shape[-1] // scale.shape[-1]
    return (q.reshape(-1, group).astype(np.float32) * scale.reshape(-1, 1)).reshape(q.shape)


def write_v2(path, model, flags, tok_crc, group=0):
    group = pick_group_size(model.args, group)
    shared, norms, matrices = layout_v1(model)
    parts = [header_v1(model, 2, flags, shared, tok_crc, group), *norms]
    max_err = 0.0
    for stack in matrices:  # llama2.c's order: each tensor's int8 values, then its scales, layer by layer
        q, scale = quantize_q80(stack, group)
        max_err = max(max_err, float(np.abs(dequantize_q80(q, scale) - stack).max()))
        for layer in range(stack.shape[0]):
            parts += [q[layer], scale[layer]]
    _write(path, parts)
    print(f"Q8_0 with group size {group}: largest weight error {max_err:.2e}")
    if group < 16:  # 1 + 4/group bytes per weight
        print(f"note: groups of {group} (the largest power of two dividing dim {model.args.dim} and hidden_dim "
              f"{model.args.hidden_dim}) make this file {(1 + 4 / group) / 4:.0%} of the fp32 size, with a scale "
              "to apply every few values: expect it to be no faster than --version=1", file=sys.stderr)


def _write(path, parts):
    """Arrays and bytes, back to back, to a temporary file renamed to path once complete."""
    with atomic_output(path) as f:
        for part in parts:
            f.write(part if isinstance(part, bytes) else np.ascontiguousarray(part).data)


# a new format is one more function taking (path, model, flags, tok_crc)
WRITERS = {0: write_v0, 1: write_v1, 2: write_v2}

HF_NAMES = {  # a layer's parameters: ours -> transformers' Llama
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


ROTARY_HEADS = {"attention.wq": "n_heads", "attention.wk": "n_kv_heads"}  # rows to reorder, and their head count


def rotary_halves(w, n_heads):
    """Rows of a q or k projection reordered per head from interleaved rotary pairs (x0, y0, x1, y1, ...), as
    Meta and llama2.c rotate them, to halves (x0, x1, ..., y0, y1, ...), as transformers' Llama does."""
    return w.view(n_heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def rotary_pairs(w, n_heads):
    """rotary_halves undone: halves back to interleaved pairs."""
    return w.view(n_heads, 2, -1, w.shape[1]).transpose(1, 2).reshape(w.shape)


def write_hf(folder, model, tok=None, prompts="plain", eos=False):
    """A Hugging Face Llama folder: config.json, model.safetensors and, given tok, its tokenizer files.

    config.json also says which prompts the model was trained for ("prompts": "plain" or "instruct") and whether
    its stories end with EOS ("trained_with_eos"; transformers' eos_token_id is there for any tokenizer)."""
    a, shared = model.args, shares_classifier(model)
    weights = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not shared:
        weights["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        for ours, theirs in HF_NAMES.items():
            w = layer.get_parameter(ours + ".weight")
            if ours in ROTARY_HEADS:
                w = rotary_halves(w, getattr(a, ROTARY_HEADS[ours]))
            weights[f"model.layers.{i}.{theirs}.weight"] = w
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size, "max_position_embeddings": a.max_seq_len,
              "rms_norm_eps": a.norm_eps, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": shared,
              "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", "prompts": prompts,
              "trained_with_eos": eos}
    if tok is not None:
        config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        refuse_read_only(os.path.join(folder, name))  # before any is written: no folder half old, half new
    with atomic_output(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_safetensors(os.path.join(folder, "model.safetensors"), weights)
    if tok is not None:
        with atomic_output(os.path.join(folder, "tokenizer.model")) as f, open(tok.model_path, "rb") as src:
            shutil.copyfileobj(src, f)
        with atomic_output(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": tok.sp.id_to_piece(tok.bos_id),
                       "eos_token": tok.sp.id_to_piece(tok.eos_id), "unk_token": tok.sp.id_to_piece(tok.sp.unk_id()),
                       "add_bos_token": True, "add_eos_token": False}, f, indent=2)


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def write_safetensors(path, tensors):
    """Tensors as float32 in a .safetensors file (read_safetensors' format), with the metadata transformers
    expects of a PyTorch one."""
    arrays = {name: _f32(t) for name, t in tensors.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with atomic_output(path) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for a in arrays.values():
            f.write(a.tobytes())


def read_safetensors(path):
    """The tensors of a .safetensors file as float32 arrays. The format: a little-endian uint64 header size, a
    JSON header giving each tensor's dtype, shape and byte range, then the bytes."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(data[:8].view(np.uint64)[0]) if len(data) >= 8 else -1
    try:
        header = json.loads(bytes(data[8:8 + size])) if 0 < size <= len(data) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header does not parse)")
    start, tensors = 8 + size, {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or len(t.get("data_offsets") or ()) != 2 or "shape" not in t:
            raise UserError(f"{path} is not a safetensors file (tensor {name} has no dtype, shape and offsets)")
        if t.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} is {t.get('dtype')}; only F32, F16 and BF16 are read")
        begin, end = (start + int(o) for o in t["data_offsets"])
        if not start <= begin <= end <= len(data):
            raise UserError(f"{path} is cut short: tensor {name} runs past its end; download it again")
        values = np.asarray(data[begin:end]).view(SAFETENSORS_DTYPES[t["dtype"]])
        if t["dtype"] == "BF16":  # the top half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = values.astype(np.float32).reshape(t["shape"])
    return tensors


def hf_weight_files(folder):
    """The weight files of a Hugging Face folder: (its *.safetensors, its pytorch_model*.bin), each sorted."""
    return tuple(sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
                 for pattern in ("*.safetensors", "pytorch_model*.bin"))


def read_hf(folder):
    """The Llama of a Hugging Face folder (config.json, then *.safetensors or pytorch_model*.bin) as our state
    dict of fp32 weights, q and k rows put back in Meta's interleaved rotary order, its ModelArgs and its config;
    write_hf's inverse."""
    from model import ModelArgs, Transformer
    config = read_json(os.path.join(folder, "config.json"))
    if not isinstance(config, dict):
        raise UserError(f"{folder} has no readable config.json: give a Hugging Face model folder")
    if config.get("model_type") != "llama":
        raise UserError(f"{folder} holds a {config.get('model_type')!r} model; only Llama models are read")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                           "intermediate_size", "max_position_embeddings") if not isinstance(config.get(k), int)]
    if missing:
        raise UserError(f"{folder}/config.json lacks {', '.join(missing)}")
    n_heads, dim = config["num_attention_heads"], config["hidden_size"]
    unsupported = {"rope_theta": config.get("rope_theta", 10000.0) != 10000.0,
                   "rope_scaling": config.get("rope_scaling"),
                   "attention_bias": config.get("attention_bias"), "mlp_bias": config.get("mlp_bias"),
                   "hidden_act": config.get("hidden_act", "silu") != "silu",
                   "head_dim": config.get("head_dim", dim // n_heads) * n_heads != dim}
    if any(unsupported.values()):
        raise UserError(f"{folder}: its {', '.join(k for k, v in unsupported.items() if v)} differ from this "
                        "toolkit's Llama 2 (rope_theta 10000, no rope scaling, no biases, SiLU, dim = heads x "
                        "head_dim)")
    files, bins = hf_weight_files(folder)
    if not files and not bins:
        raise UserError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")
    weights = {}
    for f in files:
        weights.update(read_safetensors(f))
    for f in [] if files else bins:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and unpickling errors alike: the file is not a state dict
            raise UserError(f"{f} is not a readable state dict ({type(e).__name__}); download it again") from None
        weights.update({k: v.float().numpy() for k, v in state.items()})
    args = ModelArgs(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads", n_heads), vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], max_seq_len=config["max_position_embeddings"],
                     norm_eps=config.get("rms_norm_eps", 1e-5),
                     tie_embeddings="lm_head.weight" not in weights or bool(config.get("tie_word_embeddings")))

    def weight(name, shape):
        if name not in weights:
            raise UserError(f"{folder} lacks the weight {name}: is the download complete?")
        if tuple(weights[name].shape) != tuple(shape):
            raise UserError(f"{folder}: {name} has shape {tuple(weights[name].shape)}, but config.json makes it "
                            f"{tuple(shape)}")
        return torch.from_numpy(weights[name])
    with torch.device("meta"):  # the shapes alone: model_from_checkpoint builds the model, once
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state = {"tok_embeddings.weight": weight("model.embed_tokens.weight", shapes["tok_embeddings.weight"]),
             "norm.weight": weight("model.norm.weight", shapes["norm.weight"])}
    if not args.tie_embeddings:
        state["output.weight"] = weight("lm_head.weight", shapes["output.weight"])
    for i in range(args.n_layers):
        for ours, theirs in HF_NAMES.items():
            key = f"layers.{i}.{ours}.weight"
            w = weight(f"model.layers.{i}.{theirs}.weight", shapes[key])
            state[key] = rotary_pairs(w, getattr(args, ROTARY_HEADS[ours])) if ours in ROTARY_HEADS else w
    return state, args, config


def hf_checkpoint(folder):
    """A Hugging Face Llama folder as a checkpoint dict like train.py's, naming the folder's tokenizer.model."""
    state, args, config = read_hf(folder)
    tok_path = os.path.join(folder, "tokenizer.model")
    tok = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    return {"model_args": asdict(args), "model": state, "mode": "Hugging Face",
            "config": {"prompts": config["prompts"]} if "prompts" in config else {},
            "tokenizer": tok and {"path": tok_path, "vocab_size": tok.vocab_size, "sha256": tok.vocab_sha256()},
            # a Llama from elsewhere that names EOS ends its texts with it
            "eos": bool(config.get("trained_with_eos", config.get("eos_token_id") is not None))}


def read_bin(path):
    """The model in a .bin of any version (ours or llama2.c's) as a Transformer with fp32 weights, Q8_0 ones
    dequantised, and the header's extras {"version", "flags", "group_size", "shared_classifier", "tok_crc"}."""
    from model import ModelArgs, Transformer
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) < 28:
        raise UserError(f"{path} is too small to be a model .bin")
    file_version, flags, group, norm_eps, tok_crc = 0, 0, 0, 1e-5, 0
    if int(data[:4].view(np.uint32)[0]) == MAGIC:
        file_version = int(data[4:8].view(np.int32)[0])
        ints = data[8:36].view(np.int32).tolist()
        shared = bool(data[36])
        group = int(data[37:41].copy().view(np.int32)[0]) if file_version == 2 else 0
        flags = int(data[64:68].view(np.uint32)[0])
        norm_eps = float(data[68:72].view(np.float32)[0]) or 1e-5
        tok_crc = int(data[72:76].view(np.uint32)[0])
        offset = 256
    else:
        ints = data[:28].view(np.int32).tolist()
        shared, ints[5] = ints[5] > 0, abs(ints[5])
        offset = 28
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = ints
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     hidden_dim=hidden, max_seq_len=seq_len, norm_eps=norm_eps, tie_embeddings=shared)
    kv = n_kv_heads * (dim // n_heads)
    shapes = {"attention.wq": (dim, dim), "attention.wk": (kv, dim), "attention.wv": (kv, dim),
              "attention.wo": (dim, dim), "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden),
              "feed_forward.w3": (hidden, dim)}

    def take(count, dtype=np.float32):
        nonlocal offset
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > len(data):
            raise UserError(f"{path} is shorter than its header says ({len(data)} bytes)")
        out = data[offset:offset + nbytes].copy().view(dtype)
        offset += nbytes
        return out

    def matrix(shape, layers=1):  # groups of a Q8_0 tensor may run across rows, as llama2.c writes them
        if file_version != 2:
            return take(layers * shape[0] * shape[1]).reshape(layers, *shape)
        n = shape[0] * shape[1]
        return np.stack([dequantize_q80(take(n, np.int8), take(n // group)).reshape(shape) for _ in range(layers)])

    w = {}
    if file_version == 0:
        w["tok_embeddings"] = matrix((vocab, dim))[0]
        w["attention_norm"] = take(n_layers * dim).reshape(n_layers, dim)
        for name in MATRICES[:4]:
            w[name] = matrix(shapes[name], n_layers)
        w["ffn_norm"] = take(n_layers * dim).reshape(n_layers, dim)
        for name in MATRICES[4:]:
            w[name] = matrix(shapes[name], n_layers)
        w["norm"] = take(dim)
        take(seq_len * (dim // n_heads))  # llama2.c's RoPE tables
    else:
        w["attention_norm"] = take(n_layers * dim).reshape(n_layers, dim)
        w["ffn_norm"] = take(n_layers * dim).reshape(n_layers, dim)
        w["norm"] = take(dim)
        w["tok_embeddings"] = matrix((vocab, dim))[0]
        for name in MATRICES:
            w[name] = matrix(shapes[name], n_layers)
    w["output"] = w["tok_embeddings"] if shared else matrix((vocab, dim))[0]
    if offset != len(data):
        raise UserError(f"{path} has {len(data)} bytes but its header describes {offset}")
    model = Transformer(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.from_numpy(w["tok_embeddings"]))
        if not shared:
            model.output.weight.copy_(torch.from_numpy(w["output"]))
        model.norm.weight.copy_(torch.from_numpy(w["norm"]))
        for i, layer in enumerate(model.layers):
            for name in ("attention_norm", "ffn_norm", *MATRICES):
                layer.get_parameter(f"{name}.weight").copy_(torch.from_numpy(w[name][i]))
    return model, {"version": file_version, "flags": flags, "group_size": group, "shared_classifier": shared,
                   "tok_crc": tok_crc}


def tokenizer_flags(tok):
    """The header bits saying how the tokenizer treats spaces, which run.c's encoder must copy."""
    flags = 0
    if tok.sp.normalize("a  b") == tok.sp.normalize("a b"):
        flags |= FLAG_STRIP_SPACES
    if not tok.sp.normalize("a").startswith("\u2581"):
        flags |= FLAG_NO_DUMMY_PREFIX
    return flags


def export(model, path, file_version=0, eos=False, tok=None, group=0):
    """Write model (a merged Transformer) to path in file_version; tok supplies the tokenizer flags."""
    if file_version not in WRITERS:
        raise UserError(f"--version must be one of {sorted(WRITERS)}, got {file_version}")
    flags = (FLAG_EOS if eos else 0) | (tokenizer_flags(tok) if tok is not None else 0)
    model, tok_crc = model.float().eval(), tok.bin_crc32() if tok is not None else 0
    if file_version == 2:
        write_v2(path, model, flags, tok_crc, group)
    else:
        WRITERS[file_version](path, model, flags, tok_crc)
    return flags


def input_files(path):
    """What reading a checkpoint path reads: the file, or a Hugging Face folder and the files in it."""
    if not path or not os.path.isdir(path):
        return [path]
    files, bins = hf_weight_files(path)
    return [path, os.path.join(path, "config.json"), os.path.join(path, "tokenizer.model"), *files, *bins]


@cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    configure(globals(), [a for a in argv if a.startswith("-")])  # first: --help, and "--version 2" named as such
    outs = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]
    if len(outs) != 1:
        raise UserError("say where to write, once: python export.py OUT.bin --checkpoint=PATH [--version=0|1|2] "
                        "(or OUT_FOLDER ... --hf=True)")
    out = outs[0]
    argv.remove(out)
    configure(globals(), argv)
    if not checkpoint:
        raise UserError("say which checkpoint to export: --checkpoint=out/ckpt.pt")
    if version not in WRITERS:
        raise UserError(f"--version must be one of {sorted(WRITERS)}, got {version}")
    if group_size and (version != 2 or hf):
        raise UserError("--group_size is for --version=2 (int8) only; leave it out")
    if hf and os.path.isfile(out):
        raise UserError(f"--hf=True writes a folder, and {out} is a file: give a folder name")
    refuse_overwriting(out, tokenizer, "--tokenizer")
    model, ckpt = load_model(checkpoint, merge=True)
    for source, what in ((checkpoint, "--checkpoint"), (ckpt.get("base_checkpoint"), "LoRA base checkpoint")):
        for path in input_files(source):
            refuse_overwriting(out, path, what if path == source else f"{what}'s {os.path.basename(path)}")
    tok = checkpoint_tokenizer(ckpt, tokenizer, model.args.vocab_size, checkpoint, required=False)
    mode = ckpt.get("mode", "pretrain")
    dropped = {"ppo": " (value head not exported)", "reward_model": " (reward head not exported)"}.get(mode, "")
    n_params = sum(p.numel() for p in model.parameters())
    if hf:
        write_hf(out, model.float().eval(), tok, default_prompts(ckpt), bool(ckpt.get("eos")))
        print(f"wrote {out}/: a Hugging Face Llama folder, {mode} model{dropped}, {n_params / 1e6:.2f}M parameters"
              + ("" if tok else " (no tokenizer: the checkpoint's is not available; pass --tokenizer=PATH.model)"))
        if tok is not None and tokenizer_flags(tok) & FLAG_STRIP_SPACES:
            print("note: this tokenizer drops leading, trailing and repeated spaces; transformers' Llama tokenizer "
                  "keeps them, so give it prompts with single spaces and none at the ends", file=sys.stderr)
        return
    if tok is None:
        print("note: the checkpoint's tokenizer is not available; run.c will encode prompts as llama2.c does "
              "(pass --tokenizer=PATH.model to record its space handling)", file=sys.stderr)
    flags = export(model, out, version, bool(ckpt.get("eos")), tok, group_size)
    if version == 0 and flags & (FLAG_STRIP_SPACES | FLAG_NO_DUMMY_PREFIX):
        print("note: version 0 cannot record how the tokenizer treats spaces, so run.c will keep repeated spaces "
              "in prompts; --version=1 or 2 records it", file=sys.stderr)
    print(f"wrote {out}: version {version}, {mode} model{dropped}, {n_params / 1e6:.2f}M parameters, "
          f"{os.path.getsize(out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
