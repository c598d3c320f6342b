"""Satori in this codebase: COAT traces and tokens, Restart-and-Explore, the reflection bonus, the ORM."""
import json
import math
import random
import re

import pytest
import torch

from conftest import make_checkpoint, make_tokenizer
import countdown as C
import traces as T
import model as M
import ppo
import satori
from plumbing import files

COAT = list(T.COAT_TOKENS.values())
CONT, REFL, EXPL = T.COAT_TOKENS["continue"], T.COAT_TOKENS["reflect"], T.COAT_TOKENS["explore"]

TRAJ = (f"\n{CONT} Numbers: 3, 5 and 7. {CONT} 3 + 5 = 8. That leaves 8 and 7. {CONT} 8 + 7 = 15. "
        f"{REFL} 15 is not 22.\n{EXPL} Let's try something else.\n{CONT} 3 * 5 = 15. {CONT} 15 + 7 = 22."
        f"\n</think>\n<answer> 3 * 5 + 7 </answer>")


# -- COAT traces ---------------------------------------------------------------------------------

def test_coat_trace_is_the_all_strategies_trace_with_a_meta_action_opening_every_step():
    plain = T.generate_traces("all_strategies", 150, seed=5)
    coat = T.generate_traces("coat", 150, seed=5)
    assert [r["id"] for r in plain] == [r["id"] for r in coat]
    for p, c in zip(plain, coat):
        # the same search, word for word, once the tokens are taken out
        assert re.sub(r"<\|(continue|reflect|explore)\|> ", "", c["completion"]) == p["completion"]
        assert c["behaviors"] == p["behaviors"] and c["condition"] == "coat"
        think = c["completion"].split("</think>")[0]
        # a verification opens with reflect and a backtrack with explore, one token per instance
        assert think.count(REFL) == c["behaviors"]["verification"]
        assert think.count(EXPL) == c["behaviors"]["backtracking"]
        # every step (a piece between tokens) holds exactly one statement of its kind: each stated
        # arithmetic step is opened by continue, directly or as the first sentence after it
        pieces = re.split(r"(<\|(?:continue|reflect|explore)\|>)", think)[1:]
        assert pieces and pieces[0] == CONT        # the opening goes on
        for tok, body in zip(pieces[::2], pieces[1::2]):
            if tok == EXPL:
                assert any(m in body.lower() for m in T.BEHAVIOR_PHRASES["backtracking"])
            if tok == REFL:
                assert any(m in body.lower() for m in T.BEHAVIOR_PHRASES["verification"])
            assert body.startswith(" ") and body.strip()
        assert C.score(c["completion"], c["nums"], c["target"]) == 1.0


# -- COAT tokens in a tokenizer and a model --------------------------------------------------------

def test_added_coat_tokens_round_trip_and_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ck = make_checkpoint(tmp_path / "ck")
    model, tok = M.load(ck)
    text = "\n<|continue|> 3 + 5 = 8. <|reflect|> 8 equals the target.\n<|explore|> Let's try something else."
    ids_before = {t: tok.encode(t) for t in COAT}
    assert all(len(v) > 1 for v in ids_before.values())      # the plain BPE splits them
    x = torch.tensor([tok.encode("17 - 8 = 9. 9 + 3 = 12.")])
    logits_before = model(x)
    new = M.add_tokens(model, tok, COAT)
    assert new == list(range(400, 403)) and model.config.vocab_size == 403 == tok.vocab_size
    assert M.add_tokens(model, tok, COAT) == new               # adding again changes nothing
    ids = tok.encode(text)
    assert [i for i in ids if i in new] == [new[0], new[1], new[2]]
    assert tok.decode(ids, skip_special_tokens=True) == text  # kept in the text the reward reads
    # old tokens' logits unchanged; the new rows are the mean embedding
    assert torch.equal(model(x)[..., :400], logits_before)
    assert torch.allclose(model.embed_tokens.weight[400], model.embed_tokens.weight[:400].mean(0))
    M.save(model, tok, tmp_path / "coat")
    model2, tok2 = M.load(tmp_path / "coat")
    assert tok2.encode(text) == ids and torch.equal(model2(torch.tensor([ids])), model(torch.tensor([ids])))
    # transformers (the oracle) reads the same ids and the same logits from the saved folder
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "coat")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "coat", torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=1e-5)


def test_sft_add_tokens_flag_format_tunes_with_coat_tokens(tmp_path):
    import sft
    ck = make_checkpoint(tmp_path / "ck")
    data = tmp_path / "coat.jsonl"
    files.write_jsonl(data, [{"query": "Q:", "completion": TRAJ}] * 8)
    out = sft.train(sft.SFTConfig(data=str(data), out=str(tmp_path / "run"), model=str(ck), add_tokens="coat",
                                  epochs=1, batch_size=4, micro_batch_size=4, val_fraction=0, eval_n=0,
                                  device="cpu", max_length=1024))
    model, tok = M.load(out)
    assert [tok.tk.token_to_id(t) for t in COAT] == [400, 401, 402] and model.config.vocab_size == 403
    with pytest.raises(ValueError, match="add-tokens"):
        sft.train(sft.SFTConfig(data=str(data), out=str(tmp_path / "bad"), model=str(ck), add_tokens="a, b"))


# -- rewards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("origin, correct, bonus", [
    (None, True, 0.0), (None, False, 0.0),      # a problem's own prompt: no bonus
    ("-", True, 0.5), ("-", False, 0.0),        # repaired a wrong trajectory: +beta
    ("+", True, 0.0), ("+", False, -0.5),       # spoiled a right one: -beta
])
def test_reflection_bonus_sign_table(origin, correct, bonus):
    assert satori.reflection_bonus(origin, correct, 0.5) == bonus


def test_rule_rewards_paper_and_satori():
    p = {"nums": [3, 5, 7], "target": 22}
    right, wrong, none = " 3*5+7 </think>\n<answer> 3 * 5 + 7 </answer>", "<answer> 3 + 5 + 7 </answer>", "no answer"
    paper = ppo.resolve_config(ppo.PPOConfig(device="cpu"))
    satori = ppo.resolve_config(ppo.PPOConfig(device="cpu", rule_reward="satori"))
    assert [ppo._judge(t, p, paper)[0] for t in (right, wrong, none)] == [1.0, 0.1, 0.0]
    assert [ppo._judge(t, p, satori)[0] for t in (right, wrong, none)] == [0.0, -1.0, -1.0]


def test_countdown_reward_adds_the_bonus_to_restarts_only_and_measures_them_apart():
    tok = make_tokenizer()
    cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", samples=2, rae=True, reflection_bonus=0.5))
    p = {"nums": [3, 5, 7], "target": 22}
    right, wrong = tok.encode("<answer> 3 * 5 + 7 </answer>"), tok.encode("<answer> 3 + 5 + 7 </answer>")
    fn = satori.countdown_reward(tok, [p, p, p], cfg, origins=[None, "-", "+"])
    scores, extra = fn([right, wrong, right, wrong, right, wrong])
    assert scores == [1.0, 0.1, 1.5, 0.1, 1.0, 0.1 - 0.5]
    assert extra["accuracy"] == 0.5 and extra["restart_frac"] == pytest.approx(2 / 3)
    assert extra["restart_neg_accuracy"] == 0.5 and extra["restart_pos_accuracy"] == 0.5


# -- restart buffers and cut-back ------------------------------------------------------------------

def test_cut_back_on_a_hand_made_trajectory():
    assert satori.coat_steps(TRAJ) == 7
    assert satori.cut_back(TRAJ, 0) == TRAJ.split("\n</think>")[0] + f" {REFL}"
    assert satori.cut_back(TRAJ, 1) == f"\n{CONT} Numbers: 3, 5 and 7. {CONT} 3 + 5 = 8. That leaves 8 and 7. " \
                                    f"{CONT} 8 + 7 = 15. {REFL} 15 is not 22.\n{EXPL} Let's try something else." \
                                    f"\n{CONT} 3 * 5 = 15. {REFL}"
    assert satori.cut_back(TRAJ, 4) == f"\n{CONT} Numbers: 3, 5 and 7. {CONT} 3 + 5 = 8. That leaves 8 and 7. " \
                                    f"{CONT} 8 + 7 = 15. {REFL}"
    assert satori.cut_back(TRAJ, 6) == f"\n{CONT} Numbers: 3, 5 and 7. {REFL}"
    assert satori.cut_back(TRAJ, 7) is None                    # at least the first step stays
    assert satori.cut_back(TRAJ.replace("</think>", ""), 0) is None   # no complete reasoning
    assert satori.cut_back("plain text </think>", 0) is None   # no COAT steps


def test_restart_buffers_sort_by_outcome_cap_size_and_round_trip():
    b = satori.RestartBuffers(size=2)
    p = {"nums": [3, 5, 7], "target": 22, "id": 0}
    for k in range(3):
        b.add(dict(p, id=k), TRAJ, correct=True)
    b.add(p, TRAJ, correct=False)
    b.add(p, "no steps </think>", correct=False)           # nothing to restart from
    b.add(p, TRAJ.replace("</think>", ""), correct=False)  # truncated
    assert [q["id"] for q, _ in b.pos] == [1, 2] and len(b.neg) == 1
    c = satori.RestartBuffers(size=2)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert c.pos == b.pos and c.neg == b.neg


def test_sample_restarts_is_seeded_and_draws_t_and_buffers_uniformly():
    tok = make_tokenizer()
    M.add_tokens(M.Transformer(M.ModelConfig(vocab_size=400, hidden_size=8, intermediate_size=8,
                                             num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)),
                 tok, COAT)
    cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", rae=True, rae_max_back=3, max_prompt=1024))
    b = satori.RestartBuffers(size=8)
    p = {"nums": [3, 5, 7], "target": 22, "id": 0}
    b.add(p, TRAJ, correct=True)
    b.add(p, TRAJ.replace("3 * 5 + 7 </answer>", "3 + 5 + 7 </answer>"), correct=False)
    draw = lambda seed: satori.sample_restarts(b, 400, random.Random(seed), tok, cfg)  # noqa: E731
    rs = draw(1)
    assert len(rs) == 400 and [(r.origin, r.back, r.prompt_ids) for r in rs] == \
        [(r.origin, r.back, r.prompt_ids) for r in draw(1)]
    assert [(r.origin, r.back) for r in rs] != [(r.origin, r.back) for r in draw(2)]
    # T uniform on 0..3, each buffer half the time (binomial bounds at ~5 sigma)
    for t in range(4):
        assert abs(sum(r.back == t for r in rs) - 100) < 45
    assert abs(sum(r.origin == "-" for r in rs) - 200) < 50
    r = rs[0]
    prompt = ppo.encode_prompts(tok, [p], cfg)[0]
    assert r.prompt_ids == prompt + tok.encode(satori.cut_back(TRAJ, r.back))
    assert tok.decode(r.prompt_ids).endswith(REFL)
    # too long for --max-prompt: skipped, not cut
    short = ppo.resolve_config(ppo.PPOConfig(device="cpu", rae=True, max_prompt=len(prompt) + 5))
    assert satori.sample_restarts(b, 10, random.Random(0), tok, short) == []
    assert satori.sample_restarts(satori.RestartBuffers(4), 10, random.Random(0), tok, cfg) == []


def test_rae_flags_are_checked():
    with pytest.raises(ValueError, match="rae-ratio"):
        ppo.resolve_config(ppo.PPOConfig(device="cpu", rae=True, rae_ratio=1.0))
    with pytest.raises(ValueError, match="only --rae"):
        ppo.resolve_config(ppo.PPOConfig(device="cpu", reflection_bonus=0.5))


# -- the outcome reward model and its preference bonus ----------------------------------------------

def test_bradley_terry_loss_and_pairs_by_hand():
    # -log sigmoid(2 - 0.5) = log(1 + e^-1.5) = 0.201413; -log sigmoid(-1) = log(1 + e) = 1.313262
    got = satori.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0]))
    assert got.item() == pytest.approx((0.201413 + 1.313262) / 2, abs=1e-5)
    assert satori.preference_pairs([True, False, False, True, False, False], 3) == [(0, 1), (0, 2), (3, 4), (3, 5)]
    assert satori.preference_pairs([True, False, True, False], 2) == [(0, 1), (2, 3)]
    assert satori.preference_pairs([True, True, False, False], 4) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert satori.preference_pairs([False, False, True, True], 2) == []   # no pair crosses prompts


def _toy_orm(seed=0, vocab=16):
    torch.manual_seed(seed)
    from conftest import make_config
    mc = make_config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    orm = ppo.Critic(M.Transformer(mc), seed=seed).eval()
    opt = ppo.MasterAdamW(orm.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          master_device="cpu")
    return orm, opt


def test_orm_scores_read_the_last_token_of_each_unpadded_sequence():
    orm, _ = _toy_orm()
    seqs = [[1, 2, 3], [4, 5], [6]]
    got = satori.orm_scores(orm, seqs, pad_id=0)
    for q, r in zip(seqs, got):
        assert r.item() == pytest.approx(orm(torch.tensor([q]))[0, -1].item(), abs=1e-5)


def test_orm_learns_to_rank_right_above_wrong_from_the_policys_pairs():
    """Prompt tokens 1..4; a response is right iff it ends in token 9 (else 10): the ORM must learn
    that from pairs alone, and its bonus must then favour right responses."""
    orm, opt = _toy_orm()
    cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", samples=4, grad_clip=10.0, critic_lr=1e-2))
    rng = random.Random(0)

    def batch():
        seqs, correct = [], []
        for _ in range(8):
            p = rng.randint(1, 4)
            for _ in range(4):
                ok = rng.random() < 0.5
                seqs.append([p, rng.randint(1, 8), 9 if ok else 10])
                correct.append(ok)
        return seqs, correct
    first = None
    for _ in range(30):
        seqs, correct = batch()
        stats = satori.update_orm(orm, opt, seqs, correct, cfg, pad_id=0)
        first = first or stats
    seqs, correct = batch()
    bonus = satori.preference_bonus(orm, seqs, 0, batch=7)
    right = [b for b, ok in zip(bonus, correct) if ok]
    wrong = [b for b, ok in zip(bonus, correct) if not ok]
    assert first["orm_loss"] == pytest.approx(math.log(2), abs=0.1)   # an untrained head ranks at chance
    assert stats["orm_pair_accuracy"] == 1.0 and stats["orm_loss"] < 0.1
    assert min(right) > 0.5 > max(wrong)
    assert satori.update_orm(orm, opt, [[1, 9]] * 4, [False] * 4, cfg, 0) == {}   # no pairs: no step


def test_countdown_reward_adds_the_orms_sigmoid_score_of_prompt_and_response():
    orm, _ = _toy_orm(vocab=400)
    tok = make_tokenizer()
    cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", samples=2, rule_reward="satori"))
    p = {"nums": [3, 5, 7], "target": 22}
    prompts = [[5, 6, 7], [8]]
    right, wrong = tok.encode("<answer> 3 * 5 + 7 </answer>"), tok.encode("<answer> 3 + 5 + 7 </answer>")
    responses = [right, wrong, wrong, right]
    scores, extra = satori.countdown_reward(tok, [p, p], cfg, orm=orm, prompts=prompts)(responses)
    seqs = [[5, 6, 7] + right, [5, 6, 7] + wrong, [8] + wrong, [8] + right]
    with torch.no_grad():
        bonus = [torch.sigmoid(orm(torch.tensor([q]))[0, -1]).item() for q in seqs]
    assert scores == pytest.approx([0 + bonus[0], -1 + bonus[1], -1 + bonus[2], 0 + bonus[3]], abs=1e-6)
    assert extra["preference_bonus_mean"] == pytest.approx(sum(bonus) / 4, abs=1e-6)


# -- the whole loop ------------------------------------------------------------------------------

def _coat_checkpoint(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    model, tok = M.load(ck)
    M.add_tokens(model, tok, COAT)
    return M.save(model, tok, tmp_path / "coat")


class _FilledBuffers(satori.RestartBuffers):
    """Buffers that start with one right and one wrong hand-made trajectory. A random tiny policy
    never writes a COAT trajectory of its own, so each of its responses enters wrapped in two steps:
    the restarts of later steps then depend on every earlier rollout (and on a correct resume)."""

    def __init__(self, size):
        super().__init__(size)
        p = {"nums": [3, 5, 7], "target": 22, "id": -1}
        satori.RestartBuffers.add(self, p, TRAJ, correct=True)
        satori.RestartBuffers.add(self, p, TRAJ.replace("3 * 5 + 7 </answer>", "3 + 5 + 7 </answer>"), correct=False)

    def add(self, problem, text, correct):
        super().add(problem, f"\n{CONT} {text!r} {CONT} {len(text)}.\n</think>", correct)


def _rae_cfg(ck, out, steps):
    return ppo.PPOConfig(model=str(ck), out=str(out), device="cpu", batch_prompts=4, samples=2, mini_batch_prompts=2,
                         micro_batch=4, max_response=6, max_prompt=1024, steps=steps, val_every=2, n_val=2, n_train=16,
                         n_test=3, save_every=2, progress=False, actor_lr=1e-3, critic_lr=1e-3, seed=3, rae=True,
                         rae_ratio=0.5, reflection_bonus=0.5, rule_reward="satori", preference_bonus=True)


def test_rae_run_restarts_half_its_batch_checkpoints_the_buffers_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(satori, "RestartBuffers", _FilledBuffers)
    ck = _coat_checkpoint(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    ppo.train(_rae_cfg(ck, straight, 4))
    ppo.train(_rae_cfg(ck, split, 2))
    ppo.train(_rae_cfg(ck, split, 4))
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["restart_frac"] == 0.5 for r in rows[1:])         # 2 of the 4 prompts restart
    assert all(0 < r["preference_bonus_mean"] < 1 for r in rows[1:])
    # satori rule reward: the own prompts' accuracy a, the reflection bonus only on restarts
    assert all(r["reward_mean"] <= 0.5 * 0.5 + 0 for r in rows[1:])
    s1 = torch.load(straight / "checkpoints" / "step_4" / "state.pt", weights_only=True)
    s2 = torch.load(split / "checkpoints" / "step_4" / "state.pt", weights_only=True)
    assert len(s1["rae"]["pos"]) == 1 and len(s1["rae"]["neg"]) == 1 + 4 * 2 * 2 and s1["rae"] == s2["rae"]
    assert all(torch.equal(s1["orm"][k], s2["orm"][k]) for k in s1["orm"])
    w1 = M.load(straight / "checkpoints" / "step_4" / "policy")[0].state_dict()
    w2 = M.load(split / "checkpoints" / "step_4" / "policy")[0].state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    rows2 = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in rows2]


def test_rae_needs_a_format_tuned_tokenizer(tmp_path):
    ck = make_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="sft.py --add-tokens coat"):
        ppo.train(_rae_cfg(ck, tmp_path / "run", 1))


def test_restarts_teach_a_toy_policy_to_repair_after_reflect():
    """The toy task of test_ppo (prompt p in 1..4, right answer token p + 8), with Restart-and-Explore
    in token form: a restart is [p, y, R], a past answer y from D+ or D- and the reflect token R; half
    of each batch restarts once the buffers hold answers, with the reflection bonus. The policy
    learns the restart task: sampled accuracy on restarts rises from chance (1/16) and greedy
    answers to [p, w, R] repair every wrong w far more often than at the start (never).
    Measured (seeds 0-3): restart accuracy of the first 3 steps 0.03-0.16, of the last 5 0.73-0.98;
    greedy repair 0 -> 0.69-0.94."""
    from test_ppo import _toy_cfg, _toy_models   # test_ppo's toy task and models
    R, samples = 15, 4
    cfg = _toy_cfg(samples=samples, micro_batch=64, actor_lr=5e-3, rae=True, reflection_bonus=0.5)
    models = _toy_models(cfg)
    policy = models.policy

    def repair_rate():
        """Greedy answers to [p, w, R] for every p and every wrong w."""
        cases = [(p, w) for p in range(1, 5) for w in range(1, 15) if w != p + 8]
        gen = M.generate(policy, [[p, w, R] for p, w in cases], max_new_tokens=1, temperature=0, eos_id=0, pad_id=0)
        return sum(int(t) == p + 8 for t, (p, _) in zip(gen.tokens[:, 0], cases)) / len(cases)

    before = repair_rate()
    rng, pos, neg, restart_acc = random.Random(0), [], [], []
    for step in range(1, 41):
        ps = [rng.randint(1, 4) for _ in range(cfg.batch_prompts)]
        prompts, origins = [[p] for p in ps], [None] * len(ps)
        if pos or neg:
            for k in range(len(ps) // 2, len(ps)):
                origin = rng.choice([o for o, b in (("+", pos), ("-", neg)) if b])
                ps[k], y = rng.choice(pos if origin == "+" else neg)
                prompts[k], origins[k] = [ps[k], y, R], origin

        def reward_fn(responses):
            ok = [r[0] == ps[i // samples] + 8 for i, r in enumerate(responses)]
            got = [o for i, o in enumerate(ok) if origins[i // samples] is not None]
            if got:
                restart_acc.append(sum(got) / len(got))
            return [float(o) + satori.reflection_bonus(origins[i // samples], o, cfg.reflection_bonus)
                    for i, o in enumerate(ok)], {}
        _, exp, _ = ppo.ppo_iteration(models, prompts, reward_fn, cfg, step, eos_id=0, pad_id=0)
        for i in range(len(ps) * samples):      # the plain prompts' answers fill D+ and D-
            if origins[i // samples] is None:
                y = int(exp.input_ids[i, exp.prompt_len])
                (pos if y == ps[i // samples] + 8 else neg).append((ps[i // samples], y))
    assert len(restart_acc) == 39 and max(restart_acc[:3]) < 0.25
    assert sum(restart_acc[-5:]) / 5 > 0.6, restart_acc
    assert before < 0.1 and repair_rate() > 0.6


def test_save_correct_writes_sft_rows_and_a_resume_drops_the_steps_it_redoes(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "_judge", lambda text, p, cfg: (1.0, True, True))   # every answer right
    ck = make_checkpoint(tmp_path / "ck")
    cfg = ppo.PPOConfig(model=str(ck), out=str(tmp_path / "run"), device="cpu", batch_prompts=2, samples=2,
                        mini_batch_prompts=1, micro_batch=2, max_response=4, max_prompt=1024, steps=2, val_every=0,
                        n_train=8, n_test=2, save_every=2, progress=False, seed=3, save_correct=True)
    ppo.train(cfg)
    path = tmp_path / "run" / "correct.jsonl"
    rows = files.read_jsonl(path)
    train = files.read_jsonl(tmp_path / "run" / "data" / "train.jsonl")
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4
    for r in rows:
        assert r["query"] == C.make_prompt(r["nums"], r["target"]) and isinstance(r["completion"], str)
        assert any(t["nums"] == r["nums"] and t["target"] == r["target"] for t in train)
    files.append_jsonl(path, dict(rows[0], step=3))   # a step that ran after the last checkpoint
    ppo.train(cfg)                                 # resumes at step 2: nothing to do, step 3 forgotten
    assert files.read_jsonl(path) == rows


def test_a_run_started_before_a_setting_existed_resumes_with_its_default(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    cfg = ppo.PPOConfig(model=str(ck), out=str(tmp_path / "run"), device="cpu", batch_prompts=2, samples=2,
                        mini_batch_prompts=1, micro_batch=2, max_response=4, max_prompt=1024, steps=1,
                        val_every=0, n_train=4, n_test=2, progress=False)
    ppo.train(cfg)
    cfg_path = tmp_path / "run" / "config.json"
    saved = json.loads(cfg_path.read_text())
    for k in ("rule_reward", "rae", "reflection_bonus", "preference_bonus", "save_correct"):
        del saved[k]                              # as config.json was written before Satori's flags
    cfg_path.write_text(json.dumps(saved))
    ppo.train(ppo.PPOConfig(**{**cfg.__dict__, "steps": 2}))
    assert [r["step"] for r in files.read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    cfg_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="rule_reward: 'paper' -> 'satori'"):
        ppo.train(ppo.PPOConfig(**{**cfg.__dict__, "steps": 3, "rule_reward": "satori"}))


# -- COAT from LLM-written traces (curate.py controls --kind coat) ---------------------------------

def test_curate_coat_marks_the_steps_of_a_free_text_trace():
    import curate
    query = C.make_prompt([3, 5, 7], 22)
    think = ("\nLet me try 3 + 5 = 8. Then 8 + 7 = 15. 15 is not 22.\nLet's try something else. "
             "3 * 5 = 15. 15 + 7 = 22. That matches the target.\n")
    row = {"query": query, "completion": think + "</think>\n<answer> 3 * 5 + 7 </answer>", "nums": [3, 5, 7],
           "target": 22}
    (got,), dropped = curate.coat([row, {"query": "q", "completion": "no thoughts"}])
    assert dropped == 1
    assert got["completion"] == (f"\n{CONT} Let me try 3 + 5 = 8. Then 8 + 7 = 15. {REFL} 15 is not 22.\n"
                                 f"{EXPL} Let's try something else. {CONT} 3 * 5 = 15. 15 + 7 = 22. "
                                 f"{REFL} That matches the target.\n</think>\n<answer> 3 * 5 + 7 </answer>")


def test_curate_coat_on_synthetic_traces_puts_one_token_per_behavior_instance():
    """The rules judge is exact on countdown's wording, so there the conversion must place exactly
    one reflect per verification and one explore per backtrack, and keep every word."""
    import curate
    rows = T.generate_traces("all_strategies", 150, seed=4)
    got, dropped = curate.coat(rows)
    assert dropped == 0
    for r, g in zip(rows, got):
        assert g["completion"].count(REFL) == r["behaviors"]["verification"]
        assert g["completion"].count(EXPL) == r["behaviors"]["backtracking"]
        assert re.sub(r"<\|(continue|reflect|explore)\|> ", "", g["completion"]) == r["completion"]
        assert C.score(g["completion"], r["nums"], r["target"]) == 1.0
