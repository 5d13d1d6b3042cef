"""Vectorised replay (warpopt.vectorised) gives the per-sample loop's meta-gradient (float64)."""
import warnings

import pytest
import torch
from torch import nn

import warpopt
from warpopt.objectives import meta_gradient
from warpopt.vectorised import vectorised, vectorised_meta_gradient


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


def _convnet():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))


def _layernorm_mlp():  # a LayerNorm after a warp (the warp goes after the Tanh), as in transformer blocks
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


def _warped(kind, seed=0):
    torch.manual_seed(seed)
    model = warpopt.warp({"mlp": _mlp, "layernorm": _layernorm_mlp, "conv": _convnet}[kind]())
    with torch.no_grad():  # non-identity warps, so second-order terms are not trivial
        for p in model.warp_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _task_data(kind, seed):
    """A deterministic batch source k -> batch (so loop and vmap see the same batches)."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, 1, 5, 5) if kind == "conv" else (5, 3)
    xs = [torch.randn(*shape, generator=g) for _ in range(4)]
    if kind != "conv":
        ys = [torch.randn(5, 2, generator=g) for _ in range(4)]
        return (lambda k: (xs[k % 4], ys[k % 4])), nn.functional.mse_loss
    ys = [torch.randint(0, 2, (4,), generator=g) for _ in range(4)]
    return (lambda k: (xs[k % 4], ys[k % 4])), nn.functional.cross_entropy


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


def _filled(kind, optimizer, objective, tasks=2, steps=2, **kwargs):
    """An optimizer whose replay buffer holds the trajectories of ``tasks`` adapted tasks."""
    model = _warped(kind)
    cls, hyper = OPTIMIZERS[optimizer]
    opt = warpopt.WarpGradMetaOptimizer(model, task_optimizer=cls, objective=objective,
                                        initialisation=warpopt.none(), **hyper, **kwargs)
    for t in range(tasks):
        data, loss_fn = _task_data(kind, seed=10 + t)
        with opt.task(data, loss_fn):
            for k in range(steps):
                x, y = data(k)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    samples = [opt.replay.sample(i, opt.device) for i in range(len(opt.replay))]
    return opt, samples


def _both(opt, samples, **kwargs):
    context, params = opt.replay_context(), opt.meta_parameters()
    with opt.warp_trainable():
        loop, loop_loss = meta_gradient(opt.objective, context, samples, params)
        vec, vec_loss = vectorised_meta_gradient(opt.objective, context, samples, params, **kwargs)
    return loop, loop_loss, vec, vec_loss


@pytest.mark.parametrize("kind", ["mlp", "layernorm", "conv"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("objective", [warpopt.exact, warpopt.approx], ids=["exact", "approx"])
def test_same_meta_gradient_as_loop(kind, optimizer, objective):
    opt, samples = _filled(kind, optimizer, objective)
    assert len(samples) == 6
    if optimizer != "sgd":  # θ_0 (fresh state) and later points (with state) in one mini-batch
        assert not samples[0].states[0] and any(s.states[0] for s in samples)
    loop, loop_loss, vec, vec_loss = _both(opt, samples)
    assert sum(g.abs().sum() for g in loop) > 0
    torch.testing.assert_close(vec_loss, loop_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_batchnorm_buffers_are_replayed_and_left_untouched():
    opt, samples = _filled("conv", "sgd", warpopt.exact)
    assert samples[0].buffers, "the conv net's BatchNorm statistics should be adapt buffers"
    before = [[b.clone() for b in s.buffers] for s in samples]
    live = [b.clone() for b in opt.model.buffers()]
    loop, _, vec, _ = _both(opt, samples)
    for s, saved in zip(samples, before):
        for b, c in zip(s.buffers, saved):
            assert torch.equal(b, c)
    for b, c in zip(opt.model.buffers(), live):
        assert torch.equal(b, c)
    # eval mode: replay normalises with each sample's recorded running statistics
    opt.model.eval()
    loop, loop_loss, vec, vec_loss = _both(opt, samples)
    torch.testing.assert_close(vec_loss, loop_loss)
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_learned_lr_and_chunks():
    opt, samples = _filled("mlp", "momentum", warpopt.exact, learn_lr=True)
    loop, loop_loss, vec, vec_loss = _both(opt, samples, chunk_size=3)
    assert loop[-1].abs() > 0  # the learned lr gets a meta-gradient, through the replayed step
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_unequal_batches_grouped_or_rejected():
    opt, samples = _filled("mlp", "sgd", warpopt.exact, tasks=1)
    g = torch.Generator().manual_seed(3)
    x_small, y_small = torch.randn(2, 3, generator=g), torch.randn(2, 2, generator=g)
    other = warpopt.Task(lambda k: (x_small, y_small), nn.functional.mse_loss)
    samples[1].task = other  # a sample whose batches have another shape
    loop, _, vec, _ = _both(opt, samples)
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="equal batch shapes"):
        _both(opt, samples, strict=True)


def test_custom_objective_is_vectorised_or_says_why_not():
    """One definition per objective: a custom one is vmapped like exact/approx; one vmap cannot
    map falls back to the loop with a warning, or raises TypeError giving vmap's reason."""
    opt, samples = _filled("mlp", "sgd", warpopt.exact, tasks=1)

    def custom(context, sample):
        return warpopt.approx(context, sample) * 2 + warpopt.exact(context, sample)

    def not_vmappable(context, sample):
        loss = warpopt.approx(context, sample)
        return loss * 2 if loss.item() > 0 else loss  # data-dependent control flow

    context, params = opt.replay_context(), opt.meta_parameters()
    loop, loop_loss = meta_gradient(custom, context, samples, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: really vectorised
        vec, vec_loss = vectorised()(custom, context, samples, params)
    torch.testing.assert_close(vec_loss, loop_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    loop, _ = meta_gradient(not_vmappable, context, samples, params)
    with pytest.warns(RuntimeWarning, match="fell back to the per-sample loop"):
        vec, _ = vectorised()(not_vmappable, context, samples, params)
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="cannot vectorise the objective 'not_vmappable'"):
        vectorised(fallback=False)(not_vmappable, context, samples, params)


def test_offline_meta_step_matches_loop():
    results = []
    for gradient in (meta_gradient, vectorised(chunk_size=4)):
        torch.manual_seed(0)
        opt, _ = _filled("conv", "adam", warpopt.exact, algorithm=warpopt.offline(batch_size=4, gradient=gradient))
        stats = opt.meta_step()
        assert stats["warp_updates"] == 2  # 6 points in batches of 4
        results.append((stats["meta_loss"], [p.detach().clone() for p in opt.meta_parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_a_fallback_to_the_loop_replays_the_batches_already_drawn():
    # The vmap attempt draws each sample's batches first; the fallback drew them again, so with a
    # list (or any stateful source) it replayed other batches than the loop would, silently.
    def not_vmappable(context, sample):
        loss = warpopt.exact(context, sample)
        return loss * 2 if loss.item() > 0 else loss

    phi = []
    for gradient in (meta_gradient, vectorised(chunk_size=4)):
        model = _warped("mlp")
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, objective=not_vmappable, initialisation=warpopt.none(),
                                            algorithm=warpopt.offline(batch_size=4, gradient=gradient))
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)) for _ in range(3)]
        with opt.task(data, nn.functional.mse_loss) as task:
            for x, y in task:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's warning
            opt.meta_step()
        phi.append(torch.cat([p.detach().reshape(-1) for p in model.warp_parameters()]))
    torch.testing.assert_close(phi[1], phi[0], rtol=1e-12, atol=1e-14)


def test_tasks_adapted_in_different_train_eval_modes_are_not_mapped_together():
    # A vmap group runs its first sample's task: its modes must be every member's.
    phi = []
    for gradient in (meta_gradient, vectorised()):
        model = _warped("conv")
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none(),
                                            algorithm=warpopt.offline(batch_size=10, gradient=gradient))
        data, loss = _task_data("conv", 1)
        for train in (True, False):
            model.train(train)
            with opt.task(data, loss):
                for k in range(2):
                    opt.zero_grad()
                    loss(model(data(k)[0]), data(k)[1]).backward()
                    opt.step()
        opt.meta_step()
        phi.append(torch.cat([p.detach().reshape(-1) for p in model.warp_parameters()]))
    torch.testing.assert_close(phi[1], phi[0], rtol=1e-10, atol=1e-12)
