"""Edge cases of the core, each a bug once: dtypes, devices and dtype groups, the state
machine, bad input, the registry's arguments, SDS ranking, SSAM-F's Fisher mode, ASAM's
reference rule. Expected values are written out from the formulas, in float64."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim.fisher import empirical_fisher
from effsam.optim.registry import REGISTRY

RHO = 0.3


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def data(seed=1, n=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norm_does_not_overflow(dtype, foreach):
    # |g_i| = 300 over 100,000 elements: ‖g‖ = 94,868 > 65,504 (float16's largest value),
    # every element finite; the step must be taken with ε = ρ g / ‖g‖ (computed in float64)
    p = nn.Parameter(torch.zeros(100_000, dtype=dtype))
    opt = effsam.SAM(torch.optim.SGD([p], lr=0.1), rho=RHO, foreach=foreach)
    p.grad = torch.full_like(p, 300.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.first_step(zero_grad=True)
    expected = RHO * 300.0 / (300.0 * math.sqrt(100_000))
    torch.testing.assert_close(
        p.detach().double(),
        torch.full((100_000,), expected, dtype=torch.float64),
        rtol=1e-2,
        atol=0,
    )


def test_mixed_dtypes_are_grouped_and_match_the_formula():
    # a float32 and a float64 tensor in one optimizer, two groups with different ρ: one
    # global norm over both, ε per group, each tensor in its own dtype (the float32
    # tensor's share of the norm is taken in float32, hence the float32 tolerance)
    a = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float32))
    b = nn.Parameter(torch.tensor([0.5, 0.25], dtype=torch.float64))
    ga = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float32)
    gb = torch.tensor([-2.0, 0.7], dtype=torch.float64)
    results = []
    for foreach in (True, False):
        pa, pb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
        base = torch.optim.SGD([{"params": [pa], "rho": 0.1}, {"params": [pb], "rho": 0.2}], lr=1)
        opt = effsam.SAM(base, foreach=foreach)
        pa.grad, pb.grad = ga.clone(), gb.clone()
        assert opt.first_step(zero_grad=True)
        results.append((pa.detach().clone(), pb.detach().clone()))
        opt.restore()
        assert torch.equal(pa.detach(), a.detach()) and torch.equal(pb.detach(), b.detach())
    norm = math.sqrt(sum(float(v) ** 2 for v in [*ga.double(), *gb]))
    ea = a.detach().double() + 0.1 * ga.double() / (norm + 1e-12)
    eb = b.detach() + 0.2 * gb / (norm + 1e-12)
    for pa, pb in results:
        assert pa.dtype == torch.float32 and pb.dtype == torch.float64
        torch.testing.assert_close(pa.double(), ea, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pb, eb, rtol=1e-7, atol=1e-9)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_first_step_without_zero_grad_leaves_the_gradients():
    model = mlp()
    opt = effsam.ASAM(torch.optim.SGD(model.parameters(), lr=0.1))
    ce(model, data()).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=False)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# ---------------------------------------------------------------------- state machine
def test_second_step_without_first_step_raises_and_changes_nothing():
    model = mlp()
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    ce(model, data()).mean().backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    assert opt.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


def test_empty_batch_is_a_clear_error():
    model = mlp()
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    with pytest.raises(ValueError, match="empty batch"):
        effsam.sharpness_aware_step(model, opt, (x[:0], y[:0]), ce)


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_a_scalar_loss_is_the_whole_batch_loss_and_ambiguous_under_accumulation(name):
    # one pass over the whole batch: a scalar (e.g. a token-normalised LM loss) is the
    # batch's loss, the same step as its per-sample mean
    model, ref = mlp(), mlp()
    opt = effsam.create_optimizer(model, name, lr=0.1)
    ref_opt = effsam.create_optimizer(ref, name, lr=0.1)
    effsam.sharpness_aware_step(model, opt, data(), lambda m, b: ce(m, b).mean())
    effsam.sharpness_aware_step(ref, ref_opt, data(), ce)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    # over micro-batches a scalar does not say how they combine: a clear error, no change
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="scalar.*accumulation_steps > 1 needs per-sample"):
        effsam.sharpness_aware_step(
            model, opt, data(), lambda m, b: ce(m, b).mean(), accumulation_steps=2
        )
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


def test_pass1_on_a_model_without_parameters_accumulates_on_the_cpu():
    """The loss accumulator's device comes from the model's first parameter, else the CPU
    (a model holding no parameter of its own: the weights live outside it)."""
    from effsam.step import _Step

    w = nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1)
    x, y = data()
    batch = (x, y)
    step = _Step(
        model=nn.Identity(),
        optimizer=opt,
        batch=batch,
        loss_fn=lambda m, b: (m(b[0]) * w).sum(1) ** 2,
        scaler=None,
        amp_dtype=None,
        accumulation_steps=1,
        clip_grad_norm=None,
        sync_ascent=False,
        sam=False,
        b=len(x),
        micro=[batch],
        ddp=None,
        device_type="cpu",
        b_run=len(x),
    )
    step.pass1(False, None)
    expected = ((x * w).sum(1) ** 2).mean()
    assert step.total.device.type == "cpu"
    torch.testing.assert_close(step.total, expected.detach())
    assert w.grad is not None


# ---------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sam", {"ascent": effsam.AdaptiveAscent()}),
        ("esam", {"mask": effsam.PerturbationMask()}),
        ("asam", {"adaptive": False}),
        ("ssam-f", {"selection": effsam.TopSharpness(0.5)}),
        ("ssam-f", {"drop_rate": 0.5}),
        ("ssam-d", {"num_samples": 4, "total_steps": 9}),
        ("esam-swp", {"gamma": 0.5}),
        ("ssam-f", {"seed": 1}),  # SSAM-F draws nothing at random
        ("ssam-f-tensor", {"seed": 1}),
    ],
)
def test_the_registry_rejects_undeclared_arguments_up_front(name, kwargs, monkeypatch):
    built = []
    monkeypatch.setitem(effsam.optim.registry.BASES, "sgd", lambda *a, **k: built.append(1))
    bad = sorted(set(kwargs) - {"total_steps"})
    with pytest.raises(TypeError, match=re.escape(f"unknown arguments {bad}")):
        effsam.create_optimizer(mlp(), name, **kwargs)
    assert not built  # rejected before anything was constructed


def test_every_declared_argument_is_taken_by_its_factory():
    model = mlp()
    values = {
        "rho": 0.1,
        "adaptive": True,
        "eta": 0.01,
        "beta": 0.5,
        "gamma": 0.5,
        "seed": 3,
        "selection": "loss",
        "swp_scaling": "unit",
        "sparsity": 0.3,
        "update_interval": 2,
        "normalisation": "masked",
        "num_samples": 4,
        "fisher_chunk_size": 2,
        "fisher_mode": "eval",
        "granularity": "element",
        "total_steps": 9,
        "drop_rate": 0.2,
        "grow": "gradient",
        "foreach": False,
        "check_finite": True,
        "eps_denominator": 1e-9,
        "schedule": "every-step",
        "every": 2,
        "offset": 0,
        "start": 0.5,
        "probability": 0.5,
        "probability_schedule": "constant",
        "min_probability": 0.0,
        "delta": 0.8,
        "lambda1": -0.5,
        "lambda2": 0.5,
        "k": 3,
        "alpha": 0.5,
        "ascent_fraction": 0.5,
        "ascent_noise": 0.1,
        "ascent_seed": 3,
        "layers": "last:1",
        "refresh_every": 2,
        "sds_bn": "batch",
        "rho_mode": "relative",
        "bn_recompute": False,
        "bn_recompute_batches": 2,
        "alpha_mode": "adaptive",
        "ratio_ema": 0.5,
    }
    for name, spec in REGISTRY.items():
        for arg in effsam.optim.registry.accepted_kwargs(name):
            kwargs = {**spec.example, arg: values[arg]}
            if name == "ssam-f-tensor" and arg == "normalisation":
                kwargs[arg] = "masked"
            base = {"momentum": 0.9} if name.startswith("msam") else {}  # MSAM needs a momentum
            # SAM-ON perturbs the normalisation layers: a model that has one
            net = nn.Sequential(model, nn.BatchNorm1d(3)) if spec.needs_model else model
            effsam.create_optimizer(net, name, **base, **kwargs)  # must not raise


# ---------------------------------------------------------------------- SDS ranking
def test_sds_ranks_float64_scores_in_float64():
    # two scores 1e-12 apart are a tie in float32; the float64 top-3 is {0, 2, 5}
    before = torch.zeros(6, dtype=torch.float64)
    after = torch.tensor([0.9, 0.2, 0.5 + 1e-12, 0.5, 0.1, 0.8], dtype=torch.float64)
    assert effsam.TopSharpness(0.5).select(before, after).tolist() == [0, 2, 5]


def test_sds_ties_go_to_the_lower_index_like_the_masks():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 3.0, 2.0])
    # k = 4: both 3s, then the first two of the four 2s
    idx = effsam.TopSharpness(0.5).select(torch.zeros(8), scores)
    assert idx.tolist() == [1, 2, 3, 6]
    assert effsam.TopSharpness(0.5).select(torch.zeros(12), torch.zeros(12)).tolist() == list(
        range(6)
    )


# ---------------------------------------------------------------------- KeptFraction
def test_kept_fraction_counts_the_element_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = effsam.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5)
    r = effsam.sharpness_aware_step(model, opt, (x, y), ce)
    masks = opt.mask.masks
    n = sum(m.numel() for m in masks)
    assert r.kept_fraction.elements == sum(int(m.sum()) for m in masks) / n == opt.density
    assert r.kept_fraction.tensors == sum(bool(m.any()) for m in masks) / len(masks)


# ---------------------------------------------------------------------- SSAM-F's Fisher mode
def _conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def test_train_mode_fisher_is_the_authors_single_sample_train_mode_fisher():
    model = _conv_bn()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    buffers = copy.deepcopy(dict(model.named_buffers()))
    params = list(model.parameters())
    got = empirical_fisher(model, params, (x, y), ce, 5, chunk_size=2, mode="train")
    # the reference: each sample alone through a train-mode copy (BN with its own statistics)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(5):
        ref = copy.deepcopy(model).train()
        loss = ce(ref, (x[i : i + 1], y[i : i + 1])).sum()
        for e, gr in zip(expected, torch.autograd.grad(loss, list(ref.parameters()))):
            e += gr.square()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    eval_mode = empirical_fisher(model, params, (x, y), ce, 5, mode="eval")
    assert any(not torch.allclose(a, b) for a, b in zip(got, eval_mode))  # not the same thing
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert model.training


def test_ssam_takes_the_fisher_mode():
    model = _conv_bn()
    opt = effsam.SSAM(
        torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, fisher_mode="train"
    )
    assert opt.mask.fisher_mode == "train"
    with pytest.raises(ValueError, match="fisher_mode"):
        effsam.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), fisher_mode="test")
    with pytest.raises(ValueError, match="fisher_mode"):
        effsam.SSAM(
            torch.optim.SGD(model.parameters(), lr=0.1),
            mask="dynamic",
            total_steps=9,
            fisher_mode="train",
        )


# ---------------------------------------------------------------------- ASAM reference rule
def test_asam_reference_rule_weights_only_with_eta():
    model = mlp()
    eta = 0.01
    opt = effsam.ASAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        rho=RHO,
        eta=eta,
        adaptive_only=effsam.asam_reference_params(model),
    )
    ce(model, data()).mean().backward()
    named = list(model.named_parameters())
    theta = {n: p.detach().clone() for n, p in named}
    g = {n: p.grad.clone() for n, p in named}
    t = {n: (theta[n].abs() + eta if "weight" in n else torch.ones_like(theta[n])) for n in theta}
    norm = math.sqrt(sum(float(((t[n] * g[n]) ** 2).sum()) for n in theta))
    opt.first_step(zero_grad=True)
    for n, p in named:
        expected = theta[n] + RHO * t[n] ** 2 * g[n] / (norm + 1e-12)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="adaptive_only"):
        effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1), adaptive_only=[])


# ---------------------------------------------------------------------- policy interfaces
def test_a_policy_missing_part_of_its_interface_is_refused():
    class OldAscent:  # the former interface: terms() instead of scales_()
        name = "old"

        def terms(self, params, grads, foreach):
            return list(grads), list(grads)

    model = mlp()
    with pytest.raises(TypeError, match="AscentPolicy"):
        effsam.SharpnessAware(torch.optim.SGD(model.parameters(), lr=0.1), ascent=OldAscent())
    with pytest.raises(TypeError, match="MaskPolicy"):
        effsam.SharpnessAware(torch.optim.SGD(model.parameters(), lr=0.1), mask=object())


def test_dtensor_parameters_are_refused_by_the_mask_policys_flag(monkeypatch):
    """Under FSDP2 a mask policy is refused when its ``masks_follow_param_layout`` is
    False (SSAM-F), whatever its class; SSAM-D's masks follow the parameters."""
    from effsam.optim import _contract

    monkeypatch.setattr(_contract, "is_dtensor", lambda p: True)  # as if fully_shard'ed
    model = mlp()
    for opt in (
        effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1)),
        effsam.ESAM(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.5, gamma=1.0),
        effsam.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), mask="dynamic", total_steps=5),
    ):
        assert opt.mask.masks_follow_param_layout
        _contract.check_sharding(opt)
    opt.mask.masks_follow_param_layout = False  # the flag decides, not the class
    with pytest.raises(NotImplementedError, match="not supported"):
        _contract.check_sharding(opt)
    fisher = effsam.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), mask="fisher")
    assert not fisher.mask.masks_follow_param_layout
    with pytest.raises(NotImplementedError, match="SSAM-F under FSDP2 is not supported"):
        _contract.check_sharding(fisher)


def test_public_accessors():
    model = mlp()
    opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.5, gamma=1.0, seed=1)
    assert [id(p) for p in opt.params] == [id(p) for p in model.parameters()]
    assert opt.pass1_keep is None
    with opt.first_pass():
        ce(model, data()).mean().backward()
    keep = opt.pass1_keep
    assert keep is not None and len(keep) == len(opt.params)
    assert [p.grad is not None for p in model.parameters()] == keep


# ---------------------------------------------------------------------- module structure
def _imports(path, package):
    """The effsam modules ``path`` imports, at the top or inside functions."""
    import ast

    module = package + "." + path.stem
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")[: -node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("effsam.")}


def test_no_module_of_the_optimizers_imports_one_that_imports_it_back():
    import pathlib

    root = pathlib.Path(effsam.optim.__file__).parent
    graph = {
        f"effsam.optim.{p.stem}": _imports(p, "effsam.optim")
        for p in root.glob("*.py")
        if p.stem != "__init__"
    }
    mutual = sorted(
        (a, b) for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, ())
    )
    assert not mutual


# ---------------------------------------------------------------------- low-memory top-k
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("largest", [True, False])
def test_select_mask_is_the_stable_sorted_top_k(dtype, largest):
    from effsam.optim._ranking import select_mask

    g = torch.Generator().manual_seed(0)
    # many ties (rounded values, zeros) so the lower-index rule is exercised
    scores = (torch.rand(500, generator=g, dtype=torch.float64) * 8).floor().to(dtype)
    where = torch.rand(500, generator=g) < 0.6
    for k in (0, 1, 7, 100, int(where.sum())):
        got = select_mask(scores, k, where, largest=largest)
        idx = where.nonzero().flatten()
        order = torch.sort(scores[idx], descending=largest, stable=True).indices[:k]
        expected = torch.zeros(500, dtype=torch.bool)
        expected[idx[order]] = True
        assert torch.equal(got, expected), k
    with pytest.raises(ValueError, match="exceeds"):
        select_mask(scores, int(where.sum()) + 1, where, largest=largest)
