import math

import pytest
import torch
import torch.nn.functional as F

from configurator import UserError
from model import (Linear, LoRALinear, ModelArgs, Transformer, apply_lora, apply_rope, lora_state_dict, merge_lora,
                   load_model, model_from_checkpoint, read_checkpoint, sample_next,
                   save_checkpoint)

SHAPES = {  # llama2.c's published models: (args, parameter count llama2.c reports)
    "stories260K": (dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                         max_seq_len=512), 260_032),
    "stories15M": (dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256),
                   15_191_712),
    "stories42M": (dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=32, max_seq_len=1024),
                   41_689_600),
    "stories110M": (dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=32, max_seq_len=1024),
                    109_529_856),
}


def tiny(**kw):
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=64)
    args.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelArgs(**args)).eval()


@pytest.mark.parametrize("name", SHAPES)
def test_published_shapes_have_llama2c_parameter_counts(name):
    kw, expected = SHAPES[name]
    a = ModelArgs(**kw)
    # llama2.c's count, from its shapes: tied embedding, 4 attention and 3 FFN matrices and 2 norms per layer
    kv = a.n_kv_heads * a.head_dim
    per_layer = 2 * a.dim * a.dim + 2 * a.dim * kv + 3 * a.dim * a.hidden_dim + 2 * a.dim
    assert a.vocab_size * a.dim + a.n_layers * per_layer + a.dim == expected
    with torch.device("meta"):
        model = Transformer(a)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_hidden_dim_rule_matches_llama2c():
    assert ModelArgs(dim=64, n_heads=8, multiple_of=4).hidden_dim == 172
    assert ModelArgs(dim=512, n_heads=8, multiple_of=32).hidden_dim == 1376
    assert ModelArgs(dim=288, n_heads=6, multiple_of=32).hidden_dim == 768
    assert ModelArgs(dim=64, n_heads=8, hidden_dim=100).hidden_dim == 100


def test_gqa_matches_explicit_repeat_kv():
    model = tiny(n_heads=4, n_kv_heads=2)
    attn = model.layers[0].attention
    x = torch.randn(2, 10, 32)
    freqs = torch.complex(model.rope_cos[:10], model.rope_sin[:10])
    q = apply_rope(attn.wq(x).view(2, 10, 4, 8), freqs).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(2, 10, 2, 8), freqs).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32))
    assert torch.allclose(attn(x, freqs), ref, atol=1e-6)


def test_rope_rotates_interleaved_pairs():
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])  # (B, T, H, D)
    freqs = torch.complex(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))  # pair 0 by 90 degrees, pair 1 by 0
    assert torch.allclose(apply_rope(x, freqs), torch.tensor([[[[0.0, 1.0, 0.0, 1.0]]]]))


def test_loss_ignores_label_minus_one():
    model = tiny()
    x = torch.randint(0, 64, (2, 12))
    y = torch.randint(0, 64, (2, 12))
    y[:, :5] = -1
    logits, loss = model(x, y)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 64), y[:, 5:].reshape(-1))
    assert torch.allclose(loss, expected)
    y2 = y.clone()
    y2[:, :5] = -1
    x2 = x.clone()
    assert model(x2, y2)[1].item() == pytest.approx(loss.item())


def test_forward_with_hidden_gives_logits_of_every_position():
    model = tiny()
    x = torch.randint(0, 64, (3, 9))
    logits, hidden = model.forward_with_hidden(x)
    assert logits.shape == (3, 9, 64) and hidden.shape == (3, 9, 32)
    assert torch.allclose(logits, model(x)[0])


@pytest.mark.parametrize("shape, own_path", [((1, 1, 512), True), ((3, 512), True), ((2, 4, 512), True),
                                             ((4, 5, 512), False)])
def test_linear_of_a_few_rows_equals_nn_linear_with_gradients(shape, own_path, monkeypatch):
    torch.manual_seed(0)
    ours, plain = Linear(512, 1024, bias=False), torch.nn.Linear(512, 1024, bias=False)  # 2^19 weights: large
    plain.weight.data.copy_(ours.weight.data)
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(1) or mm(*a))
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    assert bool(calls) == own_path
    assert y.shape == shape[:-1] + (1024,) and y.is_contiguous()
    assert torch.allclose(y, plain(x), atol=1e-5)
    y.square().sum().backward()
    grad_x, grad_w = x.grad.clone(), ours.weight.grad.clone()
    x.grad = None
    plain(x).square().sum().backward()
    assert torch.allclose(grad_x, x.grad, atol=1e-5) and torch.allclose(grad_w, plain.weight.grad, atol=1e-5)


def test_kv_cache_logits_equal_full_forward_for_unequal_prompts():
    model = tiny()
    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 9], [1, 3, 4, 5]]
    out, step_hidden = model.generate(prompts, 15, temperature=0.0, return_hidden=True)
    worst = 0.0
    for p, new, h in zip(prompts, out, step_hidden):
        lg = model.output(h)
        assert len(new) == 15 and lg.shape == (15, 64)
        full, _ = model(torch.tensor([p + new]))
        ref = full[0, len(p) - 1:len(p) - 1 + len(new)]
        worst = max(worst, (ref - lg).abs().max().item())
    assert worst <= 1e-5


def test_generate_sampling_batched_equals_one_at_a_time():
    model = tiny()
    prompts = [[1, 5, 6, 7], [1, 9]]
    both = model.generate(prompts, 10, temperature=0.0)
    assert both == [model.generate([p], 10, temperature=0.0)[0] for p in prompts]


def test_generate_seed_reproduces_and_stop_token_ends_row():
    model = tiny()
    a = model.generate([[1, 2], [1, 3, 4]], 20, temperature=1.0, seed=7)
    assert a == model.generate([[1, 2], [1, 3, 4]], 20, temperature=1.0, seed=7)
    stop = a[0][3]
    b = model.generate([[1, 2], [1, 3, 4]], 20, temperature=1.0, seed=7, stop_tokens=[stop])
    assert b[0] == a[0][:a[0].index(stop) + 1]


def test_rows_that_stopped_leave_the_batch_and_the_rest_run_on_unchanged():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 64, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (16,))]
    free = model.generate(prompts, 24, temperature=0.0)
    stops = {row[i] for i, row in zip(range(2, 14), free)}  # rows end at many different steps
    batch_sizes = []
    orig = model.hidden_states
    model.hidden_states = lambda tokens, *a, **kw: batch_sizes.append(tokens.shape[0]) or orig(tokens, *a, **kw)
    out, step_hidden = model.generate(prompts, 24, temperature=0.0, stop_tokens=stops, return_hidden=True)
    model.hidden_states = orig
    assert batch_sizes[0] == 16 and min(batch_sizes) < 16  # finished rows were dropped on the way
    for p, row, h in zip(prompts, out, step_hidden):
        assert row == model.generate([p], 24, temperature=0.0, stop_tokens=stops)[0]
        full, _ = model(torch.tensor([p + row]))
        assert torch.allclose(full[0, len(p) - 1:len(p) - 1 + len(row)], model.output(h), atol=1e-5)


def test_generate_stops_at_max_seq_len():
    model = tiny(max_seq_len=16)
    out = model.generate([[1] * 10], 50, temperature=0.0)
    assert len(out[0]) == 6
    with pytest.raises(UserError):
        model.generate([[1] * 16], 5)
    with pytest.raises(UserError, match="leaves no room"):
        model.generate([[1] * 17], 0)
    # each row fills its own context: a long prompt beside it does not cut a short one's story (nor change it)
    prompts = [[1, 7, 8], [1] * 12, [1]]
    out, hidden = model.generate(prompts, 50, temperature=0.0, return_hidden=True)
    assert [len(row) for row in out] == [13, 4, 15] and [len(h) for h in hidden] == [13, 4, 15]
    assert out == [model.generate([p], 50, temperature=0.0)[0] for p in prompts]
    many = [[1] * 12] + [[1, 7, 8]] * 9  # the full row stays in the batch (too few done to drop) and runs on
    assert [len(row) for row in model.generate(many, 50, temperature=0.0)] == [4] + [13] * 9


def test_generate_cost_does_not_rerun_prefix():
    model = tiny()
    calls = []
    orig = model.hidden_states

    def spy(tokens, *a, **kw):
        calls.append(tokens.shape[1])
        return orig(tokens, *a, **kw)
    model.hidden_states = spy
    model.generate([[1, 2, 3, 4, 5]], 10, temperature=0.0)
    assert calls == [5] + [1] * 9


def test_top_k_and_top_p_never_leave_the_allowed_set():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50) * 3
    probs = logits.softmax(-1)
    allowed_k = torch.topk(logits, 5, dim=-1).indices
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < 0.6
    for _ in range(300):
        tk = sample_next(logits, 1.0, top_k=5, generator=g)
        assert all(tk[b] in allowed_k[b] for b in range(4))
        tp = sample_next(logits, 1.0, top_p=0.6, generator=g)
        assert all(tp[b] in order[b][keep[b]] for b in range(4))
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))
    # a temperature so small that logits / temperature overflows still means greedy, not NaN
    for tiny_t in (1e-38, 1e-45):
        assert torch.equal(sample_next(logits * 1e3, tiny_t, generator=g), logits.argmax(-1))


def test_sampling_draws_each_token_at_its_probability():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]])
    probs = (logits / 0.7).softmax(-1)[0]
    draws = torch.cat([sample_next(logits.expand(1000, -1), 0.7, generator=g) for _ in range(100)])
    share = torch.bincount(draws, minlength=6).float() / len(draws)
    assert (share - probs).abs().max() < 0.005  # 100,000 draws: a few standard errors
    topped = sample_next(logits.expand(20000, -1), 0.7, top_k=2, generator=g)
    assert (torch.bincount(topped, minlength=6)[:2].float() / 20000 - probs[:2] / probs[:2].sum()).abs().max() < 0.015


def test_lora_only_adapters_get_gradients_and_rank_is_used():
    model = tiny()
    apply_lora(model, rank=3, alpha=6.0, dropout=0.0)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 4 * 2 and all(m.lora_a.shape[0] == 3 and m.lora_b.shape[1] == 3 for m in lora)
    assert all(m.scaling == 2.0 for m in lora)
    model.train()
    x = torch.randint(0, 64, (2, 8))
    # b starts at zero, so give it values for a gradient to reach a
    for m in lora:
        torch.nn.init.normal_(m.lora_b, std=0.1)
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert set(lora_state_dict(model)) == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_lora_alpha_and_dropout_are_used():
    model = tiny()
    apply_lora(model, rank=2, alpha=2.0, dropout=0.5, targets="wq")
    layer = model.layers[0].attention.wq
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 32)
    layer.eval()
    delta = layer(x) - layer.base(x)
    layer.scaling = 4.0
    assert torch.allclose(layer(x) - layer.base(x), 4 * delta, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_merged_lora_output_equals_unmerged():
    model = tiny()
    apply_lora(model, rank=4, alpha=8.0, targets=("wq", "wv", "w2"))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.05)
    x = torch.randint(0, 64, (2, 10))
    before = model(x)[0]
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x)[0], before, atol=1e-5)
    assert model.output.weight is model.tok_embeddings.weight


def test_untied_classifier_survives_a_checkpoint_and_a_merged_classifier_adapter_unties():
    model = tiny(tie_embeddings=False)
    assert model.output.weight is not model.tok_embeddings.weight
    state = model.state_dict()
    back = model_from_checkpoint({"model": state, "model_args": vars(model.args)})
    assert torch.equal(back.output.weight, model.output.weight) and not back.args.tie_embeddings
    with pytest.raises(UserError, match="missing output.weight"):
        model_from_checkpoint({"model": {k: v for k, v in state.items() if k != "output.weight"},
                               "model_args": vars(model.args)})
    # llama2.c's checkpoints name no tie_embeddings: tied
    old_args = {k: v for k, v in vars(model.args).items() if k != "tie_embeddings"}
    tied = model_from_checkpoint({"model": {k: v for k, v in state.items() if k != "output.weight"},
                                  "model_args": old_args})
    assert tied.output.weight is tied.tok_embeddings.weight
    # an adapter on a tied classifier changes the classifier only, so merging it unties the two
    apply_lora(tied, rank=2, targets=("output",))
    torch.nn.init.normal_(tied.output.lora_b, std=0.05)
    x = torch.randint(0, 64, (1, 8))
    before = tied(x)[0]
    merge_lora(tied)
    assert not tied.args.tie_embeddings and torch.allclose(tied(x)[0], before, atol=1e-5)
    assert torch.equal(tied.tok_embeddings.weight, state["tok_embeddings.weight"])


def test_lora_unknown_target_and_bad_rank_are_user_errors():
    with pytest.raises(UserError, match="match no Linear"):
        apply_lora(tiny(), rank=2, targets=("wqq",))
    with pytest.raises(UserError, match="positive"):
        apply_lora(tiny(), rank=0)


def test_checkpoint_roundtrip_with_lora(tmp_path):
    model = tiny()
    apply_lora(model, rank=2, alpha=4.0)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "model_args": vars(model.args),
                     "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}}, path)
    x = torch.randint(0, 64, (1, 6))
    ckpt = read_checkpoint(path)
    assert torch.allclose(model_from_checkpoint(ckpt).eval()(x)[0], model(x)[0], atol=1e-6)
    assert torch.allclose(model_from_checkpoint(ckpt, merge=True).eval()(x)[0], model(x)[0], atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(dim=30, n_heads=4), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(dim=0), "must be positive"),
])
def test_bad_model_args_are_clear_errors(kw, message):
    args = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64)
    args.update(kw)
    with pytest.raises(UserError, match=message):
        ModelArgs(**args)


def test_checkpoint_whose_shapes_do_not_match_args_is_an_error(tmp_path):
    model = tiny()
    args = dict(vars(model.args), dim=64)
    with pytest.raises(UserError, match="do not match"):
        model_from_checkpoint({"model": model.state_dict(), "model_args": args})
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_checkpoint(str(bad))
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(str(tmp_path / "missing.pt"))
    # files torch reads that are not checkpoints, or damaged ones, are named as such (no TypeError, AttributeError)
    good = {"model": model.state_dict(), "model_args": vars(model.args), "tokenizer": None}
    odd = {"holds a Tensor": torch.zeros(3), "its model_args is a str": {**good, "model_args": "dim=64"},
           "its model is a list": {**good, "model": [1, 2]}, "its tokenizer is a str": {**good, "tokenizer": "x"},
           "its model holds more than tensors": {**good, "model": {"tok_embeddings.weight": [0.0]}}}
    for message, content in odd.items():
        torch.save(content, bad)
        with pytest.raises(UserError, match=message):
            read_checkpoint(str(bad))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="give the Hugging Face folder that holds it"):
        read_checkpoint(str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="model setting dim='64' is not a whole number"):
        model_from_checkpoint({**good, "model_args": {**good["model_args"], "dim": "64"}})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_weights_that_are_not_finite_is_an_error(value):
    model = tiny()
    state = model.state_dict()
    state["layers.1.feed_forward.w2.weight"][3, 4] = value
    with pytest.raises(UserError, match="layers.1.feed_forward.w2.weight holds NaN or infinite"):
        model_from_checkpoint({"model": state, "model_args": vars(model.args)})
    head = {"weight": torch.tensor([[1.0, value]]), "bias": torch.zeros(1)}  # PPO's and the reward model's heads
    for name in ("value_head", "reward_head"):
        with pytest.raises(UserError, match=f"{name}.weight holds NaN or infinite"):
            model_from_checkpoint({"model": tiny().state_dict(), "model_args": vars(model.args), name: head})


def test_generate_from_weights_that_are_not_finite_is_an_error():
    model = tiny()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(UserError, match="logits are not finite"):
        model.generate([[1, 5, 7]], max_new_tokens=4)


def test_optimizer_decays_only_matrices():
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_mfu_needs_a_peak():
    model = tiny()
    assert model.estimate_mfu(1000.0, None) is None
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000.0 / 1e12)


def test_adapter_only_lora_checkpoint_loads_its_base(tmp_path):
    base = tiny()
    base_path = str(tmp_path / "base.pt")
    save_checkpoint({"model": base.state_dict(), "model_args": vars(base.args)}, base_path)
    apply_lora(base, rank=2, alpha=2.0)
    for m in base.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b)
    lora_path = str(tmp_path / "lora.pt")
    save_checkpoint({"model": lora_state_dict(base), "model_args": vars(base.args), "base_checkpoint": base_path,
                     "lora": {"rank": 2, "alpha": 2.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}},
                    lora_path)
    x = torch.randint(0, 64, (1, 6))
    model, ckpt = load_model(lora_path, merge=True)
    assert torch.allclose(model.eval()(x)[0], base(x)[0], atol=1e-5)
    import os
    os.remove(base_path)
    with pytest.raises(UserError, match="base .* is missing"):
        load_model(lora_path)
    # base and adapters both named ckpt.pt (train.py's name), the base gone: the adapters are not their own base
    named_alike = tmp_path / "lora_run" / "ckpt.pt"
    named_alike.parent.mkdir()
    adapters = read_checkpoint(lora_path)
    save_checkpoint({**adapters, "base_checkpoint": str(tmp_path / "pretrain" / "ckpt.pt")}, str(named_alike))
    with pytest.raises(UserError, match=f"{named_alike} is a LoRA checkpoint whose base .*pretrain/ckpt.pt is missing"):
        load_model(str(named_alike))


@pytest.mark.parametrize("T, head_dim", [(300, 8), (64, 8), (40, 8), (300, 32)])
def test_causal_attention_equals_sdpa_causal(T, head_dim):
    from model import causal_attention
    torch.manual_seed(0)
    q = torch.randn(2, 4, T, head_dim, requires_grad=True)
    k = torch.randn(2, 2, T, head_dim, requires_grad=True)
    v = torch.randn(2, 2, T, head_dim, requires_grad=True)
    ours = causal_attention(q, k, v, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(ours, ref, atol=1e-5)
    with torch.no_grad():  # the path without gradients slices the keys instead of joining chunks
        assert torch.allclose(causal_attention(q, k, v, enable_gqa=True), ref, atol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_ours, g_ref))


@pytest.mark.parametrize("rows", [1, 9])
def test_decode_attention_equals_sdpa(rows):
    from model import decode_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(rows, 4, 1, 8), torch.randn(rows, 2, 20, 8), torch.randn(rows, 2, 20, 8)
    visible = torch.rand(rows, 1, 1, 20) > 0.3
    visible[..., -1] = True  # a row's own new key
    for mask in (None, visible):
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
        assert torch.allclose(decode_attention(q, k, v, mask), ref, atol=1e-5)
