import io
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppo
import tinystories
import train
from conftest import ROOT, pretrain_tiny, train_in_two_processes
from configurator import UserError
from model import ModelArgs, Transformer, load_model, read_checkpoint, save_checkpoint
from tokenizer import Tokenizer, instruct_prompt

# PPO at toy scale: 8 stories of up to 24 tokens per iteration, 2 epochs of minibatches of 4
SMALL_PPO = ["--rollouts=8", "--batch_size=4", "--max_new_tokens=24", "--ppo_epochs=2", "--start_len=8",
             "--target_len=20", "--eval_iters=1", "--learning_rate=1e-3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest's one_torch_thread)."""


@pytest.fixture(scope="module")
def pretrained(story_data, tmp_path_factory):
    """A tiny model pretrained on the plain shards, with room for prompts and responses."""
    out = pretrain_tiny(story_data, str(tmp_path_factory.mktemp("ppo_pretrain")), max_seq_len=128, max_iters=150,
                        eval_every=150, eval_iters=2)
    return os.path.join(out, "ckpt.pt")


def rows(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def one_error_line(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- the arithmetic

def test_gae_matches_a_hand_computed_example():
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 7.0]])
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.3, 0.5, 9.0]])  # row 2's last entry is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = ppo.gae(values, rewards, mask, gamma=0.9, lam=0.8)
    # row 1: deltas 0.1 + 0.9*0.4 - 0.5 = -0.04, -0.2 + 0.9*0.3 - 0.4 = -0.33, 1.0 - 0.3 = 0.7; gamma*lam = 0.72
    # A2 = 0.7, A1 = -0.33 + 0.72*0.7 = 0.174, A0 = -0.04 + 0.72*0.174 = 0.08528
    # row 2 ends at t=1: A1 = 0.5 - 0.1 = 0.4, A0 = 0.3 + 0.9*0.1 - 0.2 + 0.72*0.4 = 0.478
    assert advantages[0].tolist() == pytest.approx([0.08528, 0.174, 0.7], abs=1e-6)
    assert advantages[1, :2].tolist() == pytest.approx([0.478, 0.4], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([0.58528, 0.574, 1.0], abs=1e-6)
    assert returns[1, :2].tolist() == pytest.approx([0.678, 0.5], abs=1e-6)
    # gamma = lam = 1: each advantage is the rest of the row's rewards minus the value here
    advantages, _ = ppo.gae(values, rewards, mask, 1.0, 1.0)
    assert advantages[0].tolist() == pytest.approx([0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3], abs=1e-6)


def test_whitening_and_means_see_only_valid_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, float("nan"), float("inf"), 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(2.5)
    assert ppo.masked_var(x, mask).item() == pytest.approx(valid.var().item())  # unbiased, as torch.var
    white = ppo.whiten(x, mask)
    assert white[mask].tolist() == pytest.approx(((valid - 2.5) / valid.std()).tolist(), abs=1e-5)
    assert (white[~mask] == 0).all()


def test_kl_estimators_are_unbiased_and_k3_never_negative():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    true_kl = (p * (p / q).log()).sum().item()
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[draws], q.log()[draws]
    k1, k3 = ppo.kl_per_token(logp, logq, "k1"), ppo.kl_per_token(logp, logq, "k3")
    assert torch.equal(k1, logp - logq)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k1 is negative where q > p; k3 never
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.var() < k1.var()  # why k3 exists: the lower variance
    with pytest.raises(UserError):
        ppo.kl_per_token(logp, logq, "k2")


def test_rewards_put_the_score_on_the_last_token_and_the_penalty_on_every_token():
    kl = torch.tensor([[0.5, 1.0, 2.0], [1.0, -1.0, 3.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = ppo.token_rewards(torch.tensor([10.0, 20.0]), kl, mask, kl_coef=0.1)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, -0.1, 9.8, -0.1, 20.1, 0.0])


def test_adaptive_kl_controller_moves_toward_the_target():
    kl = ppo.KLController(0.2, target=6.0, horizon=10000)
    kl.update(12.0, n_steps=400)  # twice the target: the error is clipped to +20%
    assert kl.value == pytest.approx(0.2 * (1 + 0.2 * 400 / 10000))
    kl.update(6.6, n_steps=400)  # 10% above
    assert kl.value == pytest.approx(0.2 * 1.008 * (1 + 0.1 * 400 / 10000))
    before = kl.value
    kl.update(0.0, n_steps=400)  # far below: down by 20% x 400 / 10000
    assert kl.value == pytest.approx(before * (1 - 0.2 * 0.04))
    fixed = ppo.KLController(0.2)
    fixed.update(100.0, n_steps=400)
    assert fixed.value == 0.2


def test_clipped_losses_by_hand():
    mask = torch.tensor([[True, True]])
    old_logp = torch.log(torch.tensor([[0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, 1.0]])
    old_v, v, ret = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, -0.1]]), torch.tensor([[1.0, 1.0]])
    loss, stats = ppo.ppo_loss(logp, v, old_logp, old_v, adv, ret, mask, cliprange=0.2, cliprange_value=0.2,
                               vf_coef=0.1)
    # policy: max(-A r, -A clip(r)) = max(-1.5, -1.2) = -1.2 and max(-0.5, -0.8) = -0.5
    assert stats["ppo/loss/policy"].item() == pytest.approx((-1.2 - 0.5) / 2)
    # value: max((0.5-1)^2, (0.2-1)^2) = 0.64 and max((-0.1-1)^2, (-0.1-1)^2) = 1.21; halved
    assert stats["ppo/loss/value"].item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert loss.item() == pytest.approx(-0.85 + 0.1 * 0.4625)
    assert stats["ppo/policy/clipfrac"].item() == 1.0 and stats["ppo/val/clipfrac"].item() == 0.5


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=64)
    head = ppo.scalar_head(args.dim)
    torch.nn.init.normal_(head.weight)  # a head that is not all zero, so values differ by position
    return ppo.TransformerWithHead(Transformer(args), head)


def test_rollout_hidden_states_score_as_a_forward_pass_does():
    model = tiny_policy()
    queries = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8]]
    responses, hidden = ppo.rollout(model.transformer, queries, 20, stop_tokens=(5, 6), return_hidden=True,
                                    generator=torch.Generator().manual_seed(0))
    assert len({len(r) for r in responses}) > 1  # rows stopped at different steps
    data = ppo.Rollouts.pack(queries, responses)
    forward = ppo.score_responses(model, data, batch_size=2)
    read = ppo.score_responses(model, data, batch_size=2, hidden=hidden)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(forward, read))


def test_padding_changes_nothing():
    model = tiny_policy()
    rng = random.Random(0)
    queries = [[1] + [rng.randrange(3, 64) for _ in range(n)] for n in (3, 7, 1, 12)]
    responses = [[rng.randrange(3, 64) for _ in range(n)] for n in (5, 2, 30, 9)]
    data = ppo.Rollouts.pack(queries, responses)
    logp, values, entropy = ppo.score_responses(model, data, batch_size=4)
    for i in range(4):  # each rollout scored alone: no padding at all
        alone = ppo.Rollouts.pack(queries[i:i + 1], responses[i:i + 1])
        lp, v, e = ppo.score_responses(model, alone, batch_size=1)
        n = len(responses[i])
        assert torch.allclose(logp[i, :n], lp[0], atol=1e-5) and torch.allclose(values[i, :n], v[0], atol=1e-5)
        assert (logp[i, n:] == 0).all() and (values[i, n:] == 0).all()
    # the loss and its gradient: a minibatch as tight as it can be, then with wider padding full of garbage
    index = torch.tensor([0, 1])
    tokens, positions, targets, mask = data.rows(index)
    r = targets.shape[1]
    old_logp, old_values = logp[index, :r] - 0.1, values[index, :r] + 0.05
    advantages, returns = torch.randn(2, r), torch.randn(2, r)
    width = tokens.shape[1]
    real = torch.arange(width) < (data.query_len[index] + data.response_len[index] - 1)[:, None]
    wide = torch.randint(3, 64, (2, width + 15))  # other tokens in the padding, and more of it
    wide[:, :width] = torch.where(real, tokens, wide[:, :width])
    garbage = torch.where(mask, 0.0, 1e4)  # huge numbers where there is no token: still no effect
    results = []
    for toks, extra in ((tokens, 0.0), (wide, garbage)):
        model.zero_grad()
        logits, v = model(toks, positions)
        loss, _ = ppo.ppo_loss(ppo.token_logprobs(logits, targets), v, old_logp + extra, old_values + extra,
                               advantages + extra, returns + extra, mask, 0.2, 0.2, 0.1)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0][1], results[1][1]))


def test_minibatches_group_similar_lengths_in_shuffled_order():
    torch.manual_seed(0)
    lengths = torch.randint(10, 300, (400,))
    batches = ppo.minibatches(lengths, 50)
    assert sorted(torch.cat(batches).tolist()) == list(range(400)) and len(batches) == 8
    spans = [(lengths[b].min().item(), lengths[b].max().item()) for b in batches]
    assert all(hi < lo2 or hi2 < lo for (lo, hi), (lo2, hi2) in zip(spans, spans[1:]))  # no overlap...
    assert spans != sorted(spans)  # ...and not in length order
    plain = ppo.minibatches(lengths, 50, group_by_length=False)
    assert sum(lengths[b].max() for b in plain) > 1.3 * sum(lengths[b].max() for b in batches)


# ----------------------------------------------------------------------------- rewards and prompts

def test_reward_spec_parser():
    assert ppo.parse_reward("length") == [(1.0, "length")]
    assert ppo.parse_reward("length+0.5*words") == [(1.0, "length"), (0.5, "words")]
    assert ppo.parse_reward(" 2 * model:out-rm/ckpt.pt + -1e-1*length") == [(2.0, "model:out-rm/ckpt.pt"),
                                                                            (-0.1, "length")]
    assert ppo.parse_reward("1e+1*length+2E+0*words") == [(10.0, "length"), (2.0, "words")]
    for bad in ("", "lenght", "0.5*", "length+", "words*2", "model:", "half*words"):
        with pytest.raises(UserError, match="cannot read"):
            ppo.parse_reward(bad)


def test_reward_functions(story_data):
    stops = (1, 2)
    assert ppo.length_score([1] * 10, [5] * 189 + [1], stops, 200) == pytest.approx(-0.01)  # the stop not counted
    assert ppo.length_score([1] * 10, [5] * 200, stops, 200) == pytest.approx(-0.1)
    assert ppo.uses_word("He jumped high.", "jump") and ppo.uses_word("Jumps!", "jump")
    assert ppo.uses_word("They were running.", "run") and ppo.uses_word("She was happier.", "happy")
    assert ppo.uses_word("He is hoping.", "hope") and ppo.uses_word("Two balls", "ball")
    assert not ppo.uses_word("It was bumpy.", "jump") and not ppo.uses_word("a football", "ball")
    assert ppo.words_score("The happy dog ran to the ball.", ["run", "ball", "happy"], ended=True) == \
        pytest.approx(2 / 3 + 0.5)
    assert ppo.words_score("Nothing here", ["run", "ball", "happy"], ended=False) == 0.0
    tok = Tokenizer(tinystories.tokenizer_path(512, story_data))
    reward = ppo.make_reward("length+0.5*words", tok, "instruct", target=20, stop_tokens=(tok.bos_id, tok.eos_id))
    prompt = {"tokens": [5] * 10, "words": ["run", "ball", "happy"], "instruction": "x"}
    story = tok.encode("The happy dog ran to the ball.", bos=False) + [tok.eos_id]
    scores, parts = reward([prompt], [story])
    expected_length = -abs(20 - 10 - (len(story) - 1)) / 100
    assert parts == pytest.approx({"length": expected_length, "words": 2 / 3 + 0.5})
    assert scores.item() == pytest.approx(expected_length + 0.5 * (2 / 3 + 0.5))


def test_prompt_streams(story_data):
    tok = Tokenizer(tinystories.tokenizer_path(512, story_data))
    plain = ppo.PromptStream("plain", "train", 64, 512, start_len=5, seed=3, data_dir=story_data)
    first = next(plain)
    shard = tinystories.load_shard(512, 1, story_data).tolist() + tinystories.load_shard(512, 2, story_data).tolist()
    text = " ".join(map(str, shard))
    for p in first:
        assert p["tokens"][0] == tok.bos_id and 2 <= len(p["tokens"]) <= 6 and p["words"] is None
        assert " ".join(map(str, p["tokens"])) in text  # a story's opening in the training shards
    assert len({len(p["tokens"]) for p in first}) == 5  # every length from 1 to start_len story tokens
    second = next(plain)
    plain.load_state_dict({"next_batch": 1})
    assert next(plain) == second and plain.state_dict() == {"next_batch": 2}  # batch i depends on i alone
    instruct = ppo.PromptStream("instruct", "val", 8, 512, data_dir=story_data)
    examples = {tuple(e["prompt"]): e for e in tinystories.instruct_examples("val", 512, story_data)}
    for p in next(instruct):
        assert p["tokens"][-1] == tok.bos_id and p["words"] == examples[tuple(p["tokens"])]["words"]
        assert p["instruction"] == examples[tuple(p["tokens"])]["instruction"]


# ----------------------------------------------------------------------------- PPO through train.py

def ppo_args(story_data, pretrained, out_dir, *more):
    return ["--ppo=True", f"--init_from={pretrained}", f"--data_dir={story_data}", f"--out_dir={out_dir}",
            *SMALL_PPO, *more]


def test_ppo_checkpoint_and_resume_continues_exactly(story_data, pretrained, tmp_path):
    kl = ["--kl_horizon=50", "--kl_target=0.5", "--eval_interval=2"]  # a coefficient that visibly moves
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    train.main(ppo_args(story_data, pretrained, whole, "--max_iters=4", *kl))
    train.main(ppo_args(story_data, pretrained, halves, "--max_iters=2", *kl))
    half = read_checkpoint(os.path.join(halves, "ckpt.pt"))
    assert half["mode"] == "ppo" and half["iter_num"] == 2 and half["config"]["prompts"] == "plain"
    assert half["reference"]["path"] == os.path.abspath(pretrained) and half["value_head"]["weight"].abs().sum() > 0
    run = train.main(["--init_from=resume", f"--out_dir={halves}", "--max_iters=4"])
    assert run.iter_num == 4
    a, b = (rows(d, "ppo/loss/total") for d in (whole, halves))
    assert [r["iter"] for r in b] == [0, 1, 2, 3]
    for key in ("env/reward_mean", "ppo/loss/total", "ppo/kl_ref", "ppo/kl_coef", "tokens/response_len_mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # continued, not restarted
    a_ckpt, b_ckpt = (read_checkpoint(os.path.join(d, "ckpt.pt")) for d in (whole, halves))
    for name in ("value_head", "model"):
        assert all(torch.equal(a_ckpt[name][k], b_ckpt[name][k]) for k in a_ckpt[name])
    # the adaptive coefficient really moved, by the controller's rule, and was saved
    for now, after in zip(a, a[1:]):
        error = min(max(now["ppo/kl_ref"] / 0.5 - 1, -0.2), 0.2)
        assert after["ppo/kl_coef"] == pytest.approx(now["ppo/kl_coef"] * (1 + error * 8 / 50))
    assert a_ckpt["kl_coef"] != 0.2 and a_ckpt["kl_coef"] == b_ckpt["kl_coef"]
    # the stats are logged under the fork's names, and the evals score held-out prompts
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/entropy", "ppo/policy/approxkl",
                "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/returns/mean", "ppo/val/vpred", "ppo/kl_ref",
                "ppo/kl_coef", "ppo/reward_all", "env/reward_mean", "tokens/response_len_mean", "time/ppo/rollout",
                "time/ppo/scoring", "time/ppo/advantages", "time/ppo/update"):
        assert key in a[0], key
    evals = rows(whole, "val_loss")
    assert [r["iter"] for r in evals] == [0, 2, 4] and all(r["val_loss"] == -r["val_score"] for r in evals)


def test_ppo_under_torchrun_keeps_processes_in_sync(story_data, pretrained, tmp_path):
    """Each process rolls out its own prompts; gradients, early stops and the KL coefficient are shared."""
    out = str(tmp_path / "ddp")
    stdout = train_in_two_processes(ppo_args(story_data, pretrained, out, "--max_iters=2", "--eval_interval=2"),
                                    tmp_path)
    assert "2 x 8 rollouts" in stdout
    # the logged stats are means over both processes, whose prompts differ
    streams = [ppo.PromptStream("plain", "train", 8, 512, 8, seed=train.seed, rank=rank, data_dir=story_data)
               for rank in (0, 1)]
    query_len = [float(np.mean([len(p["tokens"]) for p in next(stream)])) for stream in streams]
    first = rows(out, "ppo/loss/total")[0]
    assert query_len[0] != query_len[1] and first["tokens/query_len_mean"] == pytest.approx(sum(query_len) / 2)
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 2


def test_resume_refuses_a_reference_that_changed(story_data, pretrained, tmp_path, capsys):
    ref = str(tmp_path / "ref.pt")
    ckpt = read_checkpoint(pretrained)
    save_checkpoint(ckpt, ref)
    out = str(tmp_path / "out")
    train.main(ppo_args(story_data, ref, out, "--max_iters=1"))
    ckpt["model"]["tok_embeddings.weight"] += 0.01  # the reference file trained further
    save_checkpoint(ckpt, ref)
    line = one_error_line(capsys, train.main, ["--init_from=resume", f"--out_dir={out}", "--max_iters=2"])
    assert "reference model" in line and "ref.pt" in line
    os.remove(ref)
    line = one_error_line(capsys, train.main, ["--init_from=resume", f"--out_dir={out}", "--max_iters=2"])
    assert "the reference model of this PPO run" in line and "is gone" in line
    line = one_error_line(capsys, train.main, ["--ppo=True", "--init_from=resume", f"--out_dir={tmp_path}/none"])
    assert "start with --init_from=a trained checkpoint" in line
    line = one_error_line(capsys, train.main, ["--init_from=resume", f"--out_dir={out}", "--init_kl_coef=0.05"])
    assert "goes on with its KL coefficient" in line


def test_ppo_moves_the_policy_toward_the_reward(story_data, pretrained, tmp_path):
    """Short stories pay: after a few iterations the mean length is well below the start's."""
    out = str(tmp_path / "short")
    train.main(["--ppo=True", f"--init_from={pretrained}", f"--data_dir={story_data}", f"--out_dir={out}",
                "--rollouts=32", "--batch_size=16", "--max_new_tokens=40", "--start_len=4", "--target_len=1",
                "--learning_rate=3e-3", "--max_iters=12", "--eval_interval=100", "--eval_iters=1",
                "--kl_control=fixed", "--init_kl_coef=0.01"])
    lengths = [r["tokens/response_len_mean"] for r in rows(out, "ppo/loss/total")]
    assert sum(lengths[-3:]) / 3 < 0.7 * sum(lengths[:3]) / 3, lengths


# ----------------------------------------------------------------------------- the reward model

NAMES = ("Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue")
PLACES = ("park", "garden", "beach", "forest", "farm", "house")


def synthetic_preferences(path, n, seed=0):
    """Pairs of one story with two endings: the happy one is preferred."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            name, place = rng.choice(NAMES), rng.choice(PLACES)
            story = f"{name} went to the {place}. {name} saw a {rng.choice(('dog', 'cat', 'bird'))}."
            f.write(json.dumps({"prompt": f"Write a story about {name}.", "chosen": story + " It was a happy day.",
                                "rejected": story + " It was a sad day.", "tie": i % 10 == 9}) + "\n")


def test_reward_model_learns_a_synthetic_preference(story_data, pretrained, tmp_path):
    prefs, out = str(tmp_path / "prefs.jsonl"), str(tmp_path / "rm")
    synthetic_preferences(prefs, 200)
    train.main(["--reward_model=True", f"--preferences={prefs}", f"--init_from={pretrained}", f"--out_dir={out}",
                "--max_iters=60", "--eval_interval=30", "--batch_size=16", "--learning_rate=3e-3",
                "--warmup_iters=5", "--log_interval=10"])
    evals = rows(out, "val_accuracy")
    assert evals[0]["val_loss"] == pytest.approx(math.log(2))  # a zero head: every pair a coin toss
    assert evals[0]["val_accuracy"] == 0.5
    assert evals[-1]["val_accuracy"] >= 0.9 and evals[-1]["val_loss"] < 0.4, evals
    ckpt = read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["mode"] == "reward_model" and set(ckpt["reward_head"]) == {"weight", "bias"}
    # its prompts are its pairs' (instructions, given as text), not those of the pretrained model it started from
    assert ckpt["config"]["prompts"] == "instruct"
    with pytest.raises(UserError, match="scores stories for instruct prompts"):
        ppo.make_reward(f"model:{out}/ckpt.pt", Tokenizer(ckpt["tokenizer"]["path"]), "plain")
    # its scores as a PPO reward: the happy ending scores higher
    tok = Tokenizer(ckpt["tokenizer"]["path"])
    reward = ppo.make_reward(f"model:{out}/ckpt.pt", tok, "instruct")
    instruction = "Write a story about Ben."
    prompt = {"tokens": instruct_prompt(tok, instruction), "words": None, "instruction": instruction}
    happy, sad = (tok.encode(f"Ben went to the farm. Ben saw a cat. It was a {w} day.", bos=False) + [tok.eos_id]
                  for w in ("happy", "sad"))
    scores, _ = reward([prompt, prompt], [happy, sad])
    assert scores[0] > scores[1]


def test_resumed_rlhf_runs_notice_changed_preferences_and_reward_models(story_data, pretrained, tmp_path, capsys):
    prefs, rm = str(tmp_path / "prefs.jsonl"), str(tmp_path / "rm")
    ppo.main(label_argv(pretrained, story_data, prefs, "--auto=length", "--target_len=10", "--num_pairs=24"))
    train.main(["--reward_model=True", f"--preferences={prefs}", f"--init_from={pretrained}", f"--out_dir={rm}",
                "--batch_size=4", "--eval_interval=2", "--max_iters=2"])
    lines = open(prefs).read().splitlines(keepends=True)
    with open(prefs, "a") as f:  # pairs labelled since: a resumed run trains on them too
        f.write(lines[0])
    capsys.readouterr()
    train.main(["--init_from=resume", f"--out_dir={rm}", "--max_iters=4"])
    assert "has grown since this run last saved" in capsys.readouterr().out
    open(prefs, "w").write("".join(reversed(lines)))  # reordered: held-out pairs would join the training
    assert "has changed since this reward model last saved" in one_error_line(
        capsys, train.main, ["--init_from=resume", f"--out_dir={rm}", "--max_iters=6"])
    # PPO against it, resumed after the reward model was retrained in place: said, and best.pt chosen afresh
    out, rm_ckpt = str(tmp_path / "ppo"), os.path.join(rm, "ckpt.pt")
    train.main(ppo_args(story_data, pretrained, out, f"--reward=model:{rm_ckpt}", "--max_iters=1"))
    ckpt = read_checkpoint(rm_ckpt)
    ckpt["reward_head"]["bias"] += 1.0
    save_checkpoint(ckpt, rm_ckpt)
    capsys.readouterr()
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=2"])
    assert f"model:{rm_ckpt} changed since this run last saved" in capsys.readouterr().out
    recorded = read_checkpoint(os.path.join(out, "ckpt.pt"))["reward_models"]
    assert recorded == ppo.make_reward(f"model:{rm_ckpt}", Tokenizer(ckpt["tokenizer"]["path"]), "plain").checksums
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=3"])  # unchanged since: nothing to say
    assert "changed since" not in capsys.readouterr().out


def test_paths_in_rlhf_settings_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that a run resumes, and compares its settings, from any directory
    settings = {"reward": "length+0.5*model:rm/ckpt.pt", "preferences": "prefs.jsonl"}
    train.absolute_paths(settings)
    assert settings == {"reward": f"length+0.5*model:{tmp_path}/rm/ckpt.pt", "preferences": f"{tmp_path}/prefs.jsonl"}


def test_a_preference_file_says_which_prompts_its_stories_answer(tmp_path):
    plain = {"prompt": "Once", "chosen": "a", "rejected": "b", "prompt_tokens": [1, 40], "chosen_tokens": [7, 2],
             "rejected_tokens": [9, 2]}
    instruct = {**plain, "prompt_tokens": [40, 41, 1]}
    text = {"prompt": "Write a story.", "chosen": "a", "rejected": "b"}
    files = {"plain": [plain, {"skipped": True}], "instruct": [instruct, text], "text": [text]}
    for name, lines in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert ppo.preference_prompts(str(tmp_path / "plain"), bos_id=1) == "plain"
    assert ppo.preference_prompts(str(tmp_path / "instruct"), bos_id=1) == "instruct"
    assert ppo.preference_prompts(str(tmp_path / "text"), bos_id=1, asked="instruct") == "instruct"
    with pytest.raises(UserError, match="--prompts=plain but the pairs of .* answer instruct prompts"):
        ppo.preference_prompts(str(tmp_path / "text"), bos_id=1, asked="plain")
    (tmp_path / "mixed").write_text(json.dumps(plain) + "\n" + json.dumps(text) + "\n")
    with pytest.raises(UserError, match="mixes stories for plain prompts"):
        ppo.preference_prompts(str(tmp_path / "mixed"), bos_id=1)


def test_preference_accuracy_counts_decided_pairs_only():
    model = tiny_policy()
    pair = {"chosen": [1, 5, 6], "rejected": [1, 7], "tie": False}
    decided = ppo.evaluate_preferences(model, [pair, {**pair, "tie": True}], batch_size=4)
    assert decided["val_accuracy"] in (0.0, 1.0)  # one decided pair; the tie is not counted
    ties = ppo.evaluate_preferences(model, [{**pair, "tie": True}] * 3, batch_size=2)
    assert "val_accuracy" not in ties and math.isfinite(ties["val_loss"])  # no accuracy, not NaN


def test_preference_files_with_tokens_and_split():
    tok_vocab = type("Tok", (), {"vocab_size": 100})()
    pairs = [{"chosen": [1, 2], "rejected": [1, 3], "tie": False} for _ in range(25)]
    train_pairs, val_pairs = ppo.split_pairs(pairs, 0.1)
    assert len(val_pairs) == 3 and len(train_pairs) == 22
    for share in (0.1, 0.35, 0.4, 0.45, 0.5):  # the asked share, not 1 / round(1 / share)
        assert len(ppo.split_pairs(list(range(1000)), share)[1]) == round(1000 * share)
    held = ppo.split_pairs(list(range(1000)), 0.1)[1]
    assert held[:3] == [0, 10, 20] and ppo.split_pairs(list(range(1200)), 0.1)[1][:100] == held  # appends stay put
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "prompt_tokens": [5, 1], "chosen_tokens": [7, 2],
           "rejected_tokens": [9, 9, 9]}
    assert ppo.pair_tokens(row, tok_vocab, "here", 10) == {"chosen": [5, 1, 7, 2], "rejected": [5, 1, 9, 9, 9],
                                                           "tie": False}
    with pytest.raises(UserError, match="exceed"):
        ppo.pair_tokens(row, tok_vocab, "here", 4)
    with pytest.raises(UserError, match="vocabulary"):
        ppo.pair_tokens({**row, "chosen_tokens": [700]}, tok_vocab, "here", 10)


# ----------------------------------------------------------------------------- labelling

def label_argv(pretrained, story_data, out, *more):
    return ["label", f"--checkpoint={pretrained}", f"--out={out}", f"--data_dir={story_data}",
            "--max_new_tokens=12", "--start_len=5", *more]


def test_label_through_stdin_appends_each_answer_and_resumes(story_data, pretrained, tmp_path, monkeypatch):
    out = str(tmp_path / "prefs.jsonl")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ppo.py"), *label_argv(pretrained, story_data, out)],
                            input="a\nbogus\nB\nmaybe\nTie\ns\nq\n", capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== pair") == 5 and "[a]" in result.stdout and " | " in result.stdout
    assert "'bogus' is not an answer: type a, b, t, s or q" in result.stdout  # not b, its first letter
    with open(out) as f:
        lines = [json.loads(line) for line in f]
    assert [r["index"] for r in lines] == [0, 1, 2, 3]
    assert not lines[0].get("tie") and lines[2]["tie"] and lines[3]["skipped"] and "chosen" not in lines[3]
    for r in lines[:3]:
        assert r["chosen_tokens"] != r["rejected_tokens"] and r["prompt_tokens"][0] == 1
        assert r["chosen"] and isinstance(r["prompt"], str)
    # a crash mid-write left half a line: it is dropped, the answers before it kept, and labelling goes on
    with open(out, "a") as f:
        f.write('{"index": 4, "prompt": "Once')
    monkeypatch.setattr(sys, "stdin", io.StringIO("b\n"))  # then the input ends: a quit
    ppo.main(label_argv(pretrained, story_data, out))
    with open(out) as f:
        again = [json.loads(line) for line in f]
    assert again[:4] == lines and [r["index"] for r in again] == [0, 1, 2, 3, 4]
    # pair k's prompt depends on (seed, k) alone, so a resumed session goes on where the file ends
    stream = ppo.PromptStream("plain", "train", 1, 512, start_len=5, data_dir=story_data)
    for r in again:
        stream.load_state_dict({"next_batch": r["index"]})
        assert r["prompt_tokens"] == next(stream)[0]["tokens"] if "prompt_tokens" in r else True
    # --auto answers by a reward, up to --num_pairs pairs in the file
    ppo.main(label_argv(pretrained, story_data, out, "--auto=length", "--target_len=10", "--num_pairs=9"))
    with open(out) as f:
        auto_rows = [json.loads(line) for line in f][5:]
    assert [r["index"] for r in auto_rows] == [5, 6, 7, 8]
    tok = Tokenizer(tinystories.tokenizer_path(512, story_data))
    for r in auto_rows:
        scores = [ppo.length_score(r["prompt_tokens"], r[k], (tok.bos_id, tok.eos_id), 10)
                  for k in ("chosen_tokens", "rejected_tokens")]
        assert scores[0] > scores[1] or (scores[0] == scores[1] and r.get("tie"))


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_and_exit_2(story_data, pretrained, tmp_path, capsys):
    base = ["--ppo=True", f"--init_from={pretrained}", f"--data_dir={story_data}", f"--out_dir={tmp_path / 'o'}"]
    assert "cannot read 'lenght'" in one_error_line(capsys, train.main, [*base, "--reward=lenght"])
    assert "is not a reward model" in one_error_line(capsys, train.main, [*base, f"--reward=model:{pretrained}"])
    assert "--reward=words needs instruct prompts" in one_error_line(capsys, train.main, [*base, "--reward=words"])
    assert "--auto=words needs instruct prompts" in one_error_line(
        capsys, ppo.main, label_argv(pretrained, story_data, tmp_path / "p", "--auto=words"))
    with pytest.raises(UserError, match="this data's are summaries"):  # instructions that never name the words
        ppo.make_reward("length+words", None, "instruct", prompt_style="summary")
    assert "--kl_estimator" in one_error_line(capsys, train.main, [*base, "--kl_estimator=k2"])
    assert "use --kl_horizon=41 or more" in one_error_line(capsys, train.main, [*base, "--rollouts=200",
                                                                               "--kl_horizon=40"])
    assert "--gamma and --lam must be between 0 and 1" in one_error_line(capsys, train.main, [*base, "--lam=5"])
    assert "--start_len=1000 leaves no room" in one_error_line(capsys, train.main, [*base, "--start_len=1000"])
    longest = max(len(e["prompt"]) for e in tinystories.instruct_examples("train", 512, story_data))
    assert f"the longest train instruction is {longest} tokens" in one_error_line(
        capsys, train.main, [*base, "--prompts=instruct", f"--max_seq_len={longest}"])
    scorer = str(tmp_path / "rm.pt")
    save_checkpoint({**read_checkpoint(pretrained), "mode": "reward_model"}, scorer)
    assert "is a reward model, which scores stories" in one_error_line(
        capsys, train.main, ["--ppo=True", f"--init_from={scorer}", f"--data_dir={story_data}"])
    assert "is a reward model, which scores stories" in one_error_line(
        capsys, ppo.main, ["eval", f"--checkpoint={scorer}", f"--data_dir={story_data}"])
    assert "choose one mode" in one_error_line(capsys, train.main, [*base, "--sft=True"])
    assert "--init_from" in one_error_line(capsys, train.main, ["--ppo=True", f"--data_dir={story_data}"])
    rm = ["--reward_model=True", f"--init_from={pretrained}", f"--out_dir={tmp_path / 'rm'}"]
    assert "--preferences" in one_error_line(capsys, train.main, rm)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no preference pairs" in one_error_line(capsys, train.main, [*rm, f"--preferences={empty}"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    assert "line 2 is not valid JSON" in one_error_line(capsys, train.main, [*rm, f"--preferences={broken}"])
    assert "preference file not found" in one_error_line(capsys, train.main, [*rm, "--preferences=nowhere.jsonl"])
    assert "is a folder, not a file" in one_error_line(capsys, train.main, [*rm, f"--preferences={tmp_path}"])
    assert "say what to do" in one_error_line(capsys, ppo.main, [])
    assert "unknown subcommand" in one_error_line(capsys, ppo.main, ["lable"])
    assert "--out=" in one_error_line(capsys, ppo.main, ["label", f"--checkpoint={pretrained}"])
    assert "checkpoint not found" in one_error_line(capsys, ppo.main, ["eval", "--checkpoint=nowhere.pt"])
    assert "cannot read" in one_error_line(capsys, train.main, [*base, "--reward=1e999*length"])
    assert "--auto='lenght'" in one_error_line(capsys, ppo.main, label_argv(pretrained, story_data, tmp_path / "p",
                                                                            "--auto=lenght"))
    synthetic_preferences(tmp_path / "fine.jsonl", 8)
    assert "--val_fraction must be above 0 and at most 0.5" in one_error_line(
        capsys, train.main, [*rm, f"--preferences={tmp_path / 'fine.jsonl'}", "--val_fraction=0.9"])
    tie = tmp_path / "tie.jsonl"
    tie.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "tie": "no"}\n' * 4)
    assert '"tie" must be true or false' in one_error_line(capsys, train.main, [*rm, f"--preferences={tie}"])
    odd_rows = {'"skipped" must be true or false': '{"prompt": "a", "chosen": "b", "rejected": "c", "skipped": "no"}',
                "an empty prompt or story": '{"prompt": " ", "chosen": "b", "rejected": "c"}',
                "not all ids": '{"prompt": "a", "chosen": "b", "rejected": "c", "prompt_tokens": [5, 1], '
                               '"chosen_tokens": [7, true], "rejected_tokens": [9]}'}
    for message, line in odd_rows.items():
        tie.write_text(line + "\n" + '{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 3)
        assert message in one_error_line(capsys, train.main, [*rm, f"--preferences={tie}"])


def test_label_refuses_an_out_file_that_is_not_its_answers(story_data, pretrained, tmp_path, capsys):
    not_answers = {"ckpt.pt": open(pretrained, "rb").read(), "list.json": b'[{"index": 0},\n {"index": 1}]',
                   "null_index.jsonl": b'{"index": null, "prompt": "a"}\n', "text.txt": b"a line\nno newline"}
    for name, content in not_answers.items():
        path = tmp_path / name
        path.write_bytes(content)
        line = one_error_line(capsys, ppo.main, label_argv(pretrained, story_data, path, "--auto=length"))
        assert "not an answer of ppo.py label" in line or "does not end in answers" in line, line
        assert path.read_bytes() == content
    assert "is a directory" in one_error_line(capsys, ppo.main, label_argv(pretrained, story_data, tmp_path,
                                                                           "--auto=length"))


def test_eval_reports_scores_on_held_out_prompts(story_data, pretrained, capsys, tmp_path):
    # with no --reward, story starts are scored by length (words needs instructions)
    ppo.main(["eval", f"--checkpoint={pretrained}", f"--data_dir={story_data}", "--target_len=20",
              "--num_prompts=6", "--batch_size=4", "--max_new_tokens=16", "--show=2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{pretrained}: 6 held-out plain prompts | reward length: -0.")
    assert sum(line.startswith("--- ") for line in out) == 2
    # instruct prompts also report the share of stories that use all their words
    model, ckpt = load_model(pretrained)
    tok = Tokenizer(ckpt["tokenizer"]["path"])
    prompts = [{"tokens": tok.encode("Write a story.", bos=False) + [tok.bos_id], "words": words,
                "instruction": "Write a story."} for words in (["the", "a", "to"], ["zebra", "a", "to"])]
    stops = (tok.bos_id, tok.eos_id)
    reward = ppo.make_reward("words", tok, "instruct", stop_tokens=stops)
    result, samples = ppo.evaluate_policy(model, tok, [prompts], reward, 40, stops)
    expected = [all(ppo.uses_word(story, w) for w in p["words"]) for p, (_, story) in zip(prompts, samples)]
    assert result["all_words"] == sum(expected) / 2 and not expected[1]
    assert samples[0][0] == "Write a story."
    # a model whose vocabulary is not the data's is refused, not fed foreign token ids
    ckpt["tokenizer"]["sha256"] = "0" * 64
    other = str(tmp_path / "other_vocab.pt")
    save_checkpoint(ckpt, other)
    assert "another vocabulary" in one_error_line(capsys, ppo.main, ["eval", f"--checkpoint={other}",
                                                                     f"--data_dir={story_data}", "--reward=length"])
    # a checkpoint whose tokenizer moved: --tokenizer names it
    moved = dict(read_checkpoint(pretrained), tokenizer={"path": str(tmp_path / "moved.model"), "vocab_size": 512})
    save_checkpoint(moved, other)
    argv = ["eval", f"--checkpoint={other}", f"--data_dir={story_data}", "--reward=length", "--num_prompts=2",
            "--max_new_tokens=4"]
    assert "--tokenizer=PATH.model" in one_error_line(capsys, ppo.main, argv)
    ppo.main([*argv, f"--tokenizer={tok.model_path}"])
    assert capsys.readouterr().out.startswith(f"{other}: 2 held-out plain prompts")


def test_pairs_are_shown_side_by_side_or_stacked_on_narrow_terminals():
    wide = ppo.side_by_side("[a] " + "one two " * 20, "[b] short", 80).splitlines()
    assert all(len(line) <= 80 and " | " in line for line in wide)
    narrow = ppo.side_by_side("[a] " + "one two " * 5, "[b] short", 30).splitlines()
    assert all(len(line) <= 30 and " | " not in line for line in narrow)
    assert narrow[0].startswith("[a] one") and narrow[-1] == "[b] short"
