"""Warp-RNN cell (warpopt/rnn.py) and the maze experiment's agents and script (examples/maze_agents.py, maze.py)."""
import numpy as np
import pytest
import torch

import warpopt
from maze_agents import a2c_loss, make_agent, run_episodes, warp_agent
from warpopt.envs.maze import MazeVectorEnv
from warpopt.rnn import MetaLSTMGates, WarpRNNCell


def _pair(seed=0):
    torch.manual_seed(seed)
    plain = make_agent("rnn", hidden_size=12, meta_hidden=8)
    torch.manual_seed(seed)
    warped = make_agent("warp-rnn", hidden_size=12, meta_hidden=8)
    return plain, warped


def _unroll_loss(agent, xs, actions, rewards):
    state = agent.initial_state(xs.shape[1])
    logits, values = [], []
    for x in xs:
        lg, v, state = agent(x, state)
        logits.append(lg)
        values.append(v)
    return a2c_loss(torch.stack(logits), torch.stack(values), actions, rewards), torch.stack(logits)


def test_warp_rnn_with_identity_gates_equals_plain_rnn():
    plain, warped = _pair()
    # Same seed: the task learner's init is shared (the meta-LSTM draws from a forked RNG).
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(warped.named_parameters())[name])
    # Give the meta-LSTM random (non-trivial) weights: U = 1 + tanh(P z) stays I as long as P = 0.
    with torch.no_grad():
        for p in warped.cell.meta.lstm.parameters():
            p.normal_()
    g = torch.Generator().manual_seed(1)
    T, B = 7, 5
    xs = torch.randn(T, B, 17, generator=g)
    actions = torch.randint(0, 4, (T, B), generator=g)
    rewards = torch.randn(T, B, generator=g)
    loss_p, logits_p = _unroll_loss(plain, xs, actions, rewards)
    loss_w, logits_w = _unroll_loss(warped, xs, actions, rewards)
    assert torch.allclose(logits_p, logits_w, atol=1e-6)
    assert torch.allclose(loss_p, loss_w, atol=1e-6)
    names = ["cell.core.W", "cell.core.V", "cell.core.b", "policy.weight", "value.weight"]
    gp = torch.autograd.grad(loss_p, [dict(plain.named_parameters())[n] for n in names])
    gw = torch.autograd.grad(loss_w, [dict(warped.named_parameters())[n] for n in names])
    for n, a, b in zip(names, gp, gw):
        assert a.abs().sum() > 0, n
        assert torch.allclose(a, b, atol=1e-6), n

    # A non-identity warp changes the function and the task gradient (gradient warping).
    with torch.no_grad():
        warped.cell.meta.proj.weight.normal_(std=0.5)
    loss_w2, _ = _unroll_loss(warped, xs, actions, rewards)
    gv = torch.autograd.grad(loss_w2, warped.cell.core.V)[0]
    assert not torch.allclose(gv, gp[1], atol=1e-4)


def test_gate_forms():
    meta = MetaLSTMGates(5, 6, 4, gate="shifted")
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    zc = (torch.randn(3, 4), torch.randn(3, 4))
    gates, _ = meta(x, h, zc)
    assert [g.shape[1] for g in gates] == [6, 6, 5, 6, 6]
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates)
    paper = MetaLSTMGates(5, 6, 4, gate="paper")
    gates, _ = paper(x, h, zc)
    assert all((g.abs() < 1).all() for g in gates) and not torch.allclose(gates[0], torch.ones_like(gates[0]))
    with pytest.raises(ValueError):
        MetaLSTMGates(5, 6, 4, gate="sigmoid")


def test_tnets_identity_init_equals_plain_rnn():
    torch.manual_seed(3)
    plain = make_agent("rnn", hidden_size=10)
    torch.manual_seed(3)
    tnets = make_agent("tnets-rnn", hidden_size=10)
    x = torch.randn(4, 17)
    lp, vp, hp = plain(x, plain.initial_state(4))
    lt, vt, ht = tnets(x, tnets.initial_state(4))
    assert torch.allclose(lp, lt, atol=1e-6) and torch.allclose(hp, ht, atol=1e-6)


@pytest.mark.parametrize("kind,warp_prefix", [("warp-rnn", "cell.meta."), ("tnets-rnn", "cell.tnet.")])
def test_parameter_partition(kind, warp_prefix):
    model = warp_agent(make_agent(kind, hidden_size=8, meta_hidden=6), kind)
    warp_names = {n for n, _ in model.named_warp_parameters()}
    adapt_names = {n for n, _ in model.named_adapt_parameters()}
    all_names = {n for n, _ in model.named_parameters()}
    assert warp_names and all(n.startswith(warp_prefix) for n in warp_names)
    assert warp_names | adapt_names == all_names and not warp_names & adapt_names
    assert {"cell.core.W", "cell.core.V", "cell.core.b", "policy.weight", "policy.bias",
            "value.weight", "value.bias"} == adapt_names
    if kind == "warp-rnn":
        assert {"cell.meta.lstm.weight_ih", "cell.meta.proj.weight"} <= warp_names


def test_baselines_are_not_warped():
    for kind in ("rnn", "hyper-rnn"):
        model = warp_agent(make_agent(kind, hidden_size=8, meta_hidden=6), kind)
        assert not warpopt.is_warped(model)
    hyper = make_agent("hyper-rnn", hidden_size=8, meta_hidden=6)
    assert isinstance(hyper.cell, WarpRNNCell)


def test_a2c_loss_matches_hand_computation():
    T, B = 3, 2
    logits = torch.randn(T, B, 4, requires_grad=True)
    values = torch.randn(T, B)
    actions = torch.tensor([[0, 1], [2, 3], [1, 1]])
    rewards = torch.tensor([[0.0, 10.0], [10.0, 0.0], [0.0, 0.0]])
    loss = a2c_loss(logits, values, actions, rewards, gamma=0.9, value_weight=0.1, entropy_weight=0.03)
    expected = 0.0
    for b in range(B):
        R = 0.0
        for t in reversed(range(T)):
            R = rewards[t, b] + 0.9 * R
            adv = R - values[t, b]
            p = torch.softmax(logits[t, b], -1)
            expected = expected - torch.log(p[actions[t, b]]) * adv + 0.1 * adv ** 2 + 0.03 * (p ** 2).sum()
    assert torch.allclose(loss, expected / (B * T), atol=1e-5)


def test_end_to_end_continual_warp_updates_every_30():
    torch.manual_seed(0)
    agent = make_agent("warp-rnn", hidden_size=16, meta_hidden=8)
    model = warp_agent(agent, "warp-rnn")
    opt = warpopt.WarpGradMetaOptimizer(model, lr=1e-3, task_optimizer=torch.optim.Adam, meta_lr=1e-3,
                                        algorithm=warpopt.continual(every=30), initialisation=warpopt.none())
    env = MazeVectorEnv(2, size=7, episode_length=3)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    warp0 = [p.detach().clone() for p in model.warp_parameters()]
    adapt0 = [p.detach().clone() for p in model.adapt_parameters()]
    changed_at = []
    for it in range(61):
        loss, rewards = run_episodes(agent, env, rng)
        assert rewards.shape == (2,)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.adapt_parameters()), 4.0)
        before = [p.detach().clone() for p in model.warp_parameters()]
        opt.step()
        if any(not torch.equal(b, p) for b, p in zip(before, model.warp_parameters())):
            changed_at.append(it + 1)
    assert changed_at == [30, 60]
    assert opt.counters["warp_updates"] == 2 and opt.counters["task_steps"] == 61
    assert any(not torch.equal(a, p) for a, p in zip(adapt0, model.adapt_parameters()))
    # P moved away from zero, so the gates are no longer the identity.
    assert model.cell.meta.proj.weight.abs().sum() > 0
    assert any(not torch.equal(a, p) for a, p in zip(warp0, model.warp_parameters()))


def _example():
    import maze

    return maze


def test_quick_mode_settings_apply_but_explicit_flags_win():
    mod = _example()
    quick, full = mod.parse_args(["--quick"]), mod.parse_args([])
    assert (quick.warp_every, quick.episodes, quick.size, quick.workers) == (5, 400, 9, 2)
    assert len(quick.seeds) == 10 and quick.model == ["warp-rnn", "rnn"]
    assert (full.warp_every, full.episodes, full.size) == (30, 200_000, 11)
    assert mod.parse_args(["--quick", "--warp-every", "30"]).warp_every == 30


def test_example_runs_and_reports(tmp_path):
    import json

    mod = _example()
    out = tmp_path / "maze"
    mod.main(["--model", "warp-rnn", "tnets-rnn", "rnn", "hyper-rnn", "--episodes", "3", "--seeds", "0", "1",
              "--size", "7", "--episode-length", "6", "--batch", "3", "--hidden", "8", "--meta-hidden", "6",
              "--warp-every", "2", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 4 and (out / "maze_rewards.png").exists() and (out / "config.json").exists()
    paired = results["warp-rnn/size7/episodes3"]["vs_rnn_same_seed"]
    assert paired["seeds"] == 2 and 0 <= paired["wins"] <= 2 and "vs_rnn_same_seed" not in results["rnn/size7/episodes3"]
    run = json.loads((out / "runs" / "warp-rnn_size7_seed0.json").read_text())
    assert len(run["reward"]) == 3 and run["counters"]["warp_updates"] == 1


def test_equal_time_reads_the_iteration_off_the_cumulative_cpu_time():
    mod = _example()
    slow = {"cpu_seconds": 40.0, "cpu_seconds_at": {"10": 10.0, "20": 20.0, "30": 30.0, "40": 40.0},
            "reward": list(range(40))}
    fast = {"cpu_seconds": 25.0, "reward": [5.0] * 40}
    t = mod.equal_time(slow, fast, window=1)
    assert t["iteration"] == 25 and t["reward"] == 24.0 and t["reference_reward"] == 5.0
    assert mod.equal_time(fast | {"cpu_seconds_at": {"40": 25.0}}, slow, window=1) is None  # cheaper run: no equal time
