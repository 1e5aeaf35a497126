"""effsam.analysis against closed forms: Hessians of quadratics and linear regression, the
exact Hessian of a small network, landscapes along known directions, and `effsam analyze`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from effsam.analysis import (
    Landscape,
    filter_normalized_direction,
    hessian_top_eigenvalue,
    hessian_trace,
    hessian_trace_samples,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscape,
)
from effsam.train.cli import build_parser, main
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data
from train.tiny_runs import TINY_ARGS

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- fixtures
def regression(n: int = 20, d: int = 4, outputs: int = 1, seed: int = 0):
    """A float64 linear model and data for the squared error Σ_k (x·w_k + b_k − y_k)²."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] *= 3.0  # a clear gap between the top two eigenvalues: fast power iteration
    y = torch.randn(n, outputs, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    return nn.Linear(d, outputs).double(), (x, y)


def squared_error(model: nn.Module, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


class Quadratic(nn.Module):
    """Per-sample losses ½ wᵀ A_i w: the Hessian of their mean is the mean of the A_i."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.einsum("i,nij,j->n", self.w, a, self.w)


def quadratic_loss(model: nn.Module, batch):
    return model(batch), None  # the tuple form: losses first


def exact_hessian(model: nn.Module, batch, loss_fn) -> torch.Tensor:
    """The full Hessian of the mean loss over all parameters, via torch.func (eval mode)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = v[i : i + size].view(shape)
            i += size
        out = loss_fn(lambda x: torch.func.functional_call(model, params, (x,)), batch)
        return (out[0] if isinstance(out, tuple) else out).mean()

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.autograd.functional.hessian(loss, flat)
    finally:
        for m, training in flags:
            m.training = training


def hutchinson_tolerance(h: torch.Tensor, samples: int) -> float:
    """Five standard errors: one Rademacher estimate has variance 2 Σ_{i≠j} H_ij²."""
    off = h - torch.diag(torch.diag(h))
    return 5.0 * math.sqrt(2.0 * float((off**2).sum()) / samples)


def mixed_mode_bn_net() -> nn.Module:
    model = tiny_bn_net(seed=3)
    model.train()
    model[2].eval()  # a deliberately mixed model: each flag must come back as it was
    # running statistics away from their initial values, so eval mode is distinguishable
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def assert_untouched(model: nn.Module, state, grads, flags) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == flags


# ----------------------------------------------------------------------------- Hessian
def test_top_eigenvalue_and_trace_of_linear_regression():
    model, (x, y) = regression()
    n = x.shape[0]
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # weights, then bias
    h = 2.0 * xt.T @ xt / n
    top = hessian_top_eigenvalue(model, (x, y), squared_error, iters=500, tol=1e-13)
    assert top == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-6)
    samples = 400
    trace = hessian_trace(model, (x, y), squared_error, samples=samples, seed=1)
    assert abs(trace - float(torch.trace(h))) < hutchinson_tolerance(h, samples)


def test_top_eigenvalue_when_the_dominant_eigenvalue_is_negative():
    # At a saddle |λ_min| > λ_max: plain power iteration would return λ_min = -4.
    dim = 4
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    h = q @ torch.diag(torch.tensor([-4.0, 2.0, 0.5, 0.1], dtype=torch.float64)) @ q.T
    noise = torch.randn(3, dim, dim, dtype=torch.float64)
    noise = noise + noise.transpose(1, 2)
    a = h + noise - noise.mean(0)  # per-sample Hessians averaging to h
    model = Quadratic(dim)
    top = hessian_top_eigenvalue(model, a, quadratic_loss, iters=500, tol=1e-13)
    assert top == pytest.approx(2.0, rel=1e-6)
    # a diagonal Hessian has no off-diagonal noise: every Rademacher sample is exact
    diag = torch.diag(torch.tensor([3.0, -1.0, 0.25, 2.0], dtype=torch.float64))
    estimates = hessian_trace_samples(model, diag.expand(2, dim, dim), quadratic_loss, samples=3)
    assert torch.allclose(estimates, torch.full((3,), 4.25, dtype=torch.float64), rtol=1e-12)


def test_hessian_of_a_batchnorm_net_uses_running_statistics_and_leaves_it_as_it_was():
    model = mixed_mode_bn_net()
    batch = tiny_data(n=16)
    state, flags = clone_state(model), [m.training for m in model.modules()]
    grads = [p.grad.clone() for p in model.parameters()]
    h = exact_hessian(model, batch, per_sample_ce)  # eval mode, from torch.func
    eigenvalues = torch.linalg.eigvalsh(h)
    top = hessian_top_eigenvalue(model, batch, per_sample_ce, iters=2000, tol=1e-14)
    assert_untouched(model, state, grads, flags)
    assert top == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    samples = 300
    trace = hessian_trace(model, batch, per_sample_ce, samples=samples)
    assert_untouched(model, state, grads, flags)
    assert abs(trace - float(eigenvalues.sum())) < hutchinson_tolerance(h, samples)
    # deterministic for a seed, different across seeds
    again = hessian_trace(model, batch, per_sample_ce, samples=samples)
    assert again == trace
    assert hessian_trace(model, batch, per_sample_ce, samples=samples, seed=1) != trace


def test_frozen_parameters_are_left_out():
    model, (x, y) = regression()
    model.bias.requires_grad_(False)
    n = x.shape[0]
    h = 2.0 * x.T @ x / n  # weights only
    top = hessian_top_eigenvalue(model, (x, y), squared_error, iters=500, tol=1e-13)
    assert top == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, b: hessian_top_eigenvalue(m, b, squared_error, iters=0), "iters.*0"),
        (lambda m, b: hessian_top_eigenvalue(m, b, squared_error, tol=0.0), "tol.*0.0"),
        (lambda m, b: hessian_top_eigenvalue(m, b, squared_error, seed=1.5), "seed.*1.5"),
        (lambda m, b: hessian_trace(m, b, squared_error, samples=0), "samples.*0"),
        (lambda m, b: loss_landscape_1d(m, b, squared_error, steps=1), "steps.*1"),
        (lambda m, b: loss_landscape_2d(m, b, squared_error, span=0), "span.*0"),
        (lambda m, b: loss_landscape_1d(m, b, squared_error, span=-1.0), r"span.*-1\.0"),
        (lambda m, b: loss_landscape_1d(m, b, squared_error, span=float("nan")), "span.*nan"),
        (lambda m, b: hessian_trace(m, b, lambda m, b: m(b[0]).sum().detach()), "detached"),
        (lambda m, b: hessian_trace(m.requires_grad_(False), b, squared_error), "no trainable"),
    ],
)
def test_bad_input_names_the_value(call, message):
    model, batch = regression()
    with pytest.raises(ValueError, match=message):
        call(model, batch)


# ----------------------------------------------------------------------------- landscape
def conv_bn_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).double()


def test_filter_normalised_direction_matches_each_filter_norm():
    model = conv_bn_net()
    params = list(model.parameters())
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for p, di in zip(params, d):
        assert di.shape == p.shape and di.dtype == p.dtype
        if p.dim() <= 1:  # biases and BatchNorm's weight and bias stay put
            assert torch.count_nonzero(di) == 0
        else:  # conv: one filter per output channel; linear: one per row
            for k in range(p.shape[0]):
                assert float(di[k].norm()) == pytest.approx(float(p[k].detach().norm()), rel=1e-12)
            assert not torch.allclose(di / di.norm(), p.detach() / p.detach().norm())
    again = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(d, again))


def test_linear_model_landscape_matches_the_closed_form():
    model, (x, y) = regression(n=12, d=3, outputs=2)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    residual = x @ w.T + b - y  # [n, 2]
    g = torch.Generator().manual_seed(7)
    d1 = filter_normalized_direction([model.weight, model.bias], g)[0]
    d2 = filter_normalized_direction([model.weight, model.bias], g)[0]

    def closed_form(alpha: float, beta: float = 0.0) -> float:
        # (x·(w + αd₁ + βd₂) + b − y)² summed over outputs, mean over samples
        moved = residual + alpha * x @ d1.T + beta * x @ d2.T
        return float((moved**2).sum(1).mean())

    line = loss_landscape_1d(model, (x, y), squared_error, steps=9, span=2.0, seed=7)
    assert isinstance(line, Landscape) and line.dims == 1 and line.betas is None
    assert torch.allclose(line.alphas, torch.linspace(-2, 2, 9, dtype=torch.float64))
    expected = torch.tensor([closed_form(a) for a in line.alphas.tolist()], dtype=torch.float64)
    assert torch.allclose(line.losses, expected, rtol=1e-12, atol=0)
    assert line.alphas[4] == 0.0  # the grid passes through the trained weights exactly
    # the curve is a parabola: it must not be flat
    assert line.losses.max() > 2 * line.losses.min()

    plane = loss_landscape_2d(model, (x, y), squared_error, steps=5, span=1.0, seed=7)
    assert plane.losses.shape == (5, 5) and plane.dims == 2
    for i, a in enumerate(plane.alphas.tolist()):
        for j, c in enumerate(plane.betas.tolist()):
            assert float(plane.losses[i, j]) == pytest.approx(closed_form(a, c), rel=1e-12)
    assert json.loads(json.dumps(plane.to_dict()))["losses"][2][2] == plane.losses[2, 2]


def test_landscape_restores_weights_and_starts_from_the_eval_mode_loss(tmp_path):
    model = conv_bn_net()
    model.train()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64), torch.arange(6) % 4)
    state, flags = clone_state(model), [m.training for m in model.modules()]
    grads = [p.grad.clone() for p in model.parameters()]
    model.eval()
    with torch.no_grad():
        at_weights = float(per_sample_ce(model, batch).mean())
        in_train_mode = float(per_sample_ce(model.train(), batch).mean())
    model.load_state_dict(state)  # the train-mode forward moved the running statistics
    assert at_weights != in_train_mode

    line = loss_landscape_1d(model, batch, per_sample_ce, steps=7, span=0.5)
    assert_untouched(model, state, grads, flags)
    assert float(line.losses[3]) == at_weights
    plane = loss_landscape_2d(model, batch, per_sample_ce, steps=3, span=0.5, seed=4)
    assert_untouched(model, state, grads, flags)
    assert float(plane.losses[1, 1]) == at_weights
    assert not torch.equal(plane.losses[0], plane.losses[2])

    plot_landscape(line, tmp_path / "line.png")
    plot_landscape(plane, tmp_path / "plane.png", title="2D")
    for name in ("line.png", "plane.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- effsam analyze
def test_analyze_command_on_a_tiny_run(tmp_path, capsys):
    assert "analyze" in build_parser().format_help()
    argv = ["train", *TINY_ARGS, "--epochs", "1", "--optimizer", "sam"]
    assert main([*argv, "--out", str(tmp_path), "--name", "run", "--quiet"]) == 0
    run = tmp_path / "run"
    checkpoint = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()

    assert main(["analyze", str(run), "--batches", "2", "--landscape", "2d"]) == 0
    out = capsys.readouterr().out
    assert "Hessian top eigenvalue" in out and "32 training images" in out
    result = json.loads((run / "analysis.json").read_text())
    assert (run / "landscape.png").read_bytes()[:8] == PNG
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert result["optimizer"] == "sam" and result["epoch"] == 1 and result["batches"] == 2
    assert result["samples_analysed"] == 32

    # the loss, recomputed here from the checkpoint on the first two shuffled batches
    from effsam.data import BatchLoader
    from effsam.train.build import build_model, load_data
    from effsam.train.checkpoint import load_checkpoint
    from effsam.train.config import load_config

    cfg = load_config(run / "config.yaml")
    data = load_data(cfg)
    loader = BatchLoader(
        data.train_x, data.train_y, 16, shuffle=True, seed=cfg.seed, mean=data.mean, std=data.std
    )
    model = build_model(cfg, data.num_classes, 3)
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    model.eval()
    x, y = (torch.cat(t) for t in zip(*[b for b, _ in zip(loader, range(2))]))
    with torch.no_grad():
        logits = model(x)
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    surface = result["landscape"]
    assert surface["dims"] == 2 and len(surface["losses"]) == 11
    assert surface["losses"][5][5] == pytest.approx(result["loss"], rel=1e-6)
    # λ_max is at least the mean eigenvalue tr(H)/d (up to the trace's sampling error)
    floor = (result["hessian_trace"] - 5 * result["hessian_trace_stderr"]) / result["params"]
    assert result["hessian_top_eigenvalue"] >= floor
    assert result["hessian_top_eigenvalue"] > 0 and math.isfinite(result["hessian_trace"])

    # --out elsewhere, no landscape
    other = tmp_path / "elsewhere"
    assert main(["analyze", str(run), "--landscape", "none", "--out", str(other)]) == 0
    alone = json.loads((other / "analysis.json").read_text())
    assert alone["landscape"] is None and alone["samples_analysed"] == 16
    assert not (other / "landscape.png").exists()

    # errors: not a run, no checkpoint, too many batches, a bad count
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["analyze", str(bare)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(["analyze", str(run), "--batches", "7"]) == 2
    assert "--batches 7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(run), "--batches", "0"])


def test_analyze_refuses_a_run_with_non_finite_weights(tmp_path, capsys):
    from effsam.train.checkpoint import load_checkpoint, save_checkpoint

    argv = ["train", *TINY_ARGS, "--epochs", "1", "--optimizer", "sgd"]
    assert main([*argv, "--out", str(tmp_path), "--name", "run", "--quiet"]) == 0
    run = tmp_path / "run"
    state = load_checkpoint(run / "checkpoint.pt")
    weight = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][weight].view(-1)[:3] = float("nan")  # as a diverged run leaves them
    save_checkpoint(run / "checkpoint.pt", state, keep_previous=False)
    capsys.readouterr()
    assert main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err
    assert "effsam analyze: error: nothing to analyse: 3 of the" in err
    assert "are not finite, so the run diverged" in err and "Traceback" not in err
    assert not (run / "analysis.json").exists() and not (run / "landscape.png").exists()
