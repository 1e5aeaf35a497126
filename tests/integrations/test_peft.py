"""Sharpness-aware fine-tuning of real ``peft`` LoRA models: SAM over the adapters against
its formula, Flat-LoRA's seeded perturbation of the merged weight against its formula, the
frozen base weights, bf16 exactness, state round trips and the Hugging Face Trainer.

Everything in float64 on tiny models (an MLP and a GPT-2 of one layer, LoRA r = 2)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.integrations.peft import check_trainable_only, trainable_parameters
from effsam.optim.flatlora import FlatLoRA, noise_seed

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RHO, LR = 0.3, 0.1


# ---------------------------------------------------------------------- models and data
def mlp_lora(dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    return peft.get_peft_model(base.to(dtype), config).to(dtype)  # the adapters too


def gpt2_lora(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=20, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    base = transformers.GPT2LMHeadModel(cfg).to(dtype)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        init_lora_weights=False, lora_dropout=0.0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, config)


def mlp_batch(i, n=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(50 + i)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def gpt2_batch(i, n=4):
    g = torch.Generator().manual_seed(70 + i)
    ids = torch.randint(0, 20, (n, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


def mlp_loss(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def gpt2_loss(model, b):
    return model(**b).loss


def named_adapters(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def sgd(model, lr=LR):
    return torch.optim.SGD(trainable_parameters(model), lr=lr)


def run(api, model, opt, batch, loss_fn):
    """One step of ``opt`` through one of the three step APIs."""
    if api == "step":
        effsam.sharpness_aware_step(model, opt, batch, loss_fn)
    elif api == "closure":

        def closure():
            opt.zero_grad()
            loss = loss_fn(model, batch).mean()
            loss.backward()
            return loss

        opt.step(closure)
    else:  # the two phases by hand
        opt.zero_grad()
        with opt.first_pass():
            loss_fn(model, batch).mean().backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model, batch).mean().backward()
        opt.second_step(zero_grad=True)


def grads_at(model, batch, loss_fn, params):
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).mean().backward()
    return [p.grad.detach().clone() for p in params]


# ====================================================================== SAM over the adapters
@pytest.mark.parametrize("api", ["step", "closure", "two-phase"])
@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_sam_on_lora_is_the_formula_over_the_adapters(api, kind):
    make, data, loss_fn = (
        (mlp_lora, mlp_batch, mlp_loss) if kind == "mlp" else (gpt2_lora, gpt2_batch, gpt2_loss)
    )
    model, ref = make(), make()
    frozen = frozen_state(model)
    opt = effsam.SAM(sgd(model), rho=RHO)
    check_trainable_only(opt)
    params = list(named_adapters(ref).values())
    for i in range(3):
        b = data(i)
        run(api, model, opt, b, loss_fn)
        # ε = ρ g / ‖g‖ over the adapter parameters only; the gradient at θ + ε; SGD
        g = grads_at(ref, b, loss_fn, params)
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(RHO * gi / norm)
        g2 = grads_at(ref, b, loss_fn, params)
        with torch.no_grad():
            for p, t, gi in zip(params, theta, g2):
                p.copy_(t - LR * gi)
        for n, p in named_adapters(model).items():
            torch.testing.assert_close(p, named_adapters(ref)[n], rtol=1e-10, atol=1e-12)
    # the frozen base weights: bit-identical, never in the optimizer, never backed up
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    backups = sum(s["theta"].numel() for s in opt.state.values() if "theta" in s)
    assert backups == sum(p.numel() for p in params)  # 1x the adapters, nothing more


# SAM, ESAM's SWP, the schedules (fixed and adaptive), a gradient-reuse rule, a cheap ascent
# and Flat-LoRA: each through the HF Trainer on a PEFT model, against the plain loop.
TRAINER_METHODS = [
    ("sam", {}),
    ("esam-swp", {"beta": 0.5, "seed": 3}),
    ("rst", {"total_steps": 3, "seed": 3}),
    ("ae-sam", {"total_steps": 3}),
    ("looksam", {"k": 2}),
    ("sam-stale", {}),
    ("flat-lora", {}),
]


@pytest.mark.parametrize("api", ["closure", "two-phase"])
@pytest.mark.parametrize(
    "name,kwargs", TRAINER_METHODS[1:-1], ids=[m for m, _ in TRAINER_METHODS[1:-1]]
)
def test_every_step_api_gives_the_same_lora_steps(api, name, kwargs):
    """ESAM's SWP, the schedules, LookSAM and a cheap ascent on a PEFT model: the closure
    and the two phases by hand take the steps ``sharpness_aware_step`` takes, bit for bit,
    sharpness-aware and plain steps alike (SAM itself: the formula test above)."""
    models = [mlp_lora(), mlp_lora()]
    opts = [
        effsam.create_optimizer(trainable_parameters(m), name, lr=LR, rho=RHO, **kwargs)
        for m in models
    ]
    for i in range(4):
        run("step", models[0], opts[0], mlp_batch(i), mlp_loss)
        run(api, models[1], opts[1], mlp_batch(i), mlp_loss)
    assert opts[0].sharpness_aware_steps == opts[1].sharpness_aware_steps
    assert 0 < opts[0].sharpness_aware_steps or name == "looksam"
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), n


def test_the_optimizer_is_over_the_adapters_only():
    model = mlp_lora()
    check_trainable_only(sgd(model))
    with pytest.raises(ValueError, match="frozen parameters"):
        check_trainable_only(torch.optim.SGD(model.parameters(), lr=0.1))


# Every registered method that can work on a LoRA model, through sharpness_aware_step: the
# base weights never move, the adapters do, no optimizer state is the size of the base.
LORA_METHODS = [
    ("sam", {}),
    ("esam-swp", {"beta": 0.5}),
    ("esam", {"beta": 0.5, "gamma": 0.5}),
    ("sam-interval", {"every": 2}),
    ("sam-late", {"total_steps": 4}),
    ("rst", {"total_steps": 4}),
    ("ae-sam", {"total_steps": 4}),
    ("looksam", {"k": 2}),
    ("msam", {"rho": 0.5}),
    ("sam-slice", {}),
    ("sam-stale", {}),
    ("sam-layers", {}),
    ("ssam-d", {"total_steps": 4}),
    ("flat-lora", {"total_steps": 4}),
]


@pytest.mark.parametrize("name,kwargs", LORA_METHODS, ids=[n for n, _ in LORA_METHODS])
def test_every_method_trains_the_adapters_and_leaves_the_base(name, kwargs):
    model = mlp_lora()
    frozen, adapters = frozen_state(model), copy.deepcopy(named_adapters(model))
    spec = effsam.optim.get_spec(name)
    where = model if spec.needs_model else trainable_parameters(model)
    base = {"momentum": 0.9} if name.startswith("msam") else {}
    opt = effsam.create_optimizer(where, name, lr=LR, **base, **kwargs)
    for i in range(4):
        effsam.sharpness_aware_step(model, opt, mlp_batch(i), mlp_loss)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapters[n]), n
        else:
            assert torch.equal(p, frozen[n]), n
    base_ids = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in base_ids and s for p, s in opt.state.items())


def test_sam_on_refuses_a_lora_model_whose_norm_layers_are_frozen():
    model = gpt2_lora()
    with pytest.raises(ValueError, match="no normalisation layer with trainable"):
        opt = effsam.create_optimizer(model, "sam-on", lr=LR)
        effsam.sharpness_aware_step(model, opt, gpt2_batch(0), gpt2_loss)


# ====================================================================== Flat-LoRA
def flat(model, rho=RHO, **kw):
    kw.setdefault("sigma_schedule", "constant")
    return FlatLoRA(sgd(model), rho=rho, model=model, **kw)


def merged(target):
    """W' = W + s·B A (out × in) of a peft LoRA layer, written out."""
    lora = target.lora
    w = lora.get_base_layer().weight
    w = w.t() if target.transposed else w
    b, a, s = lora.lora_B["default"].weight, lora.lora_A["default"].weight, lora.scaling["default"]
    return w + s * (b @ a)


def eps_formula(opt, index, sigma, step):
    """ε = σ ‖W'_i,:‖ / √n · z, z ~ N(0, 1) drawn in float32 from the layer's seed at this
    step."""
    t = opt.targets[index]
    wm = merged(t).detach()
    out_f, n = wm.shape
    g = torch.Generator().manual_seed(noise_seed(opt.seed, step, index))
    z = torch.randn(out_f, n, generator=g).to(wm.dtype)  # z drawn in float32
    return sigma * wm.norm(dim=1, keepdim=True) / math.sqrt(n) * z


def eps_seen(opt, index):
    """Inside a perturbed pass: W + ε as the layer's forward uses it and as its backward
    regenerates it (identity inputs: y = x (W + ε)ᵀ, ∂L/∂x = ∂L/∂y (W + ε))."""
    t = opt.targets[index]
    w = t.weight.detach()
    out_f, n = w.shape
    x1 = torch.eye(n, dtype=w.dtype)
    fwd = t.module(x1).detach().t()
    if t.module.bias is not None:
        fwd = fwd - t.module.bias.detach()[:, None]
    x2 = torch.zeros(out_f, n, dtype=w.dtype, requires_grad=True)
    t.module(x2).backward(torch.eye(out_f, dtype=w.dtype))
    return fwd, x2.grad


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_flat_lora_regenerates_the_epsilon_it_drew_and_it_is_the_formula(kind):
    model = mlp_lora(bias=False) if kind == "mlp" else gpt2_lora()
    opt = flat(model, rho=0.5)
    data, loss_fn = (mlp_batch, mlp_loss) if kind == "mlp" else (gpt2_batch, gpt2_loss)
    draws = []
    for step in range(2):
        with opt.first_pass():
            for i, t in enumerate(opt.targets):
                fwd, bwd = eps_seen(opt, i)
                w = t.weight.detach()
                assert torch.equal(fwd, bwd)  # the backward's ε is the forward's, bit for bit
                eps = opt.noise_for(i).materialise(t.weight)
                torch.testing.assert_close(eps, eps_formula(opt, i, 0.5, step), rtol=1e-12, atol=0)
                if kind == "mlp":  # no bias: W + ε exactly
                    assert torch.equal(fwd, w + eps)
                draws.append(eps / opt.noise_for(i).scale[:, None])  # z, the standard draw
            loss_fn(model, data(step)).mean().backward()
        opt.first_step()
        opt.second_step(zero_grad=True)
    n = len(opt.targets)
    # a new draw per step (z, not ε: the row norms move with the adapters anyway) ...
    assert not any(torch.allclose(draws[i], draws[n + i]) for i in range(n))
    # ... and per layer
    assert not torch.allclose(draws[0][:1, :4], draws[1][:1, :4])
    # the layers' noise is independent (different seeds)
    assert noise_seed(0, 0, 0) != noise_seed(0, 0, 1) != noise_seed(0, 1, 0)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
@pytest.mark.parametrize("api", ["step", "closure", "two-phase"])
def test_flat_lora_step_is_the_gradient_at_the_perturbed_merged_weight(kind, api):
    """One pass at W + ε (ε from the formula, written into a reference copy), SGD on the
    adapters with that gradient; the model's base weights never change."""
    make, data, loss_fn = (
        (mlp_lora, mlp_batch, mlp_loss) if kind == "mlp" else (gpt2_lora, gpt2_batch, gpt2_loss)
    )
    model, ref = make(), make()
    frozen = frozen_state(model)
    sigma = 0.5
    opt = flat(model, rho=sigma)
    ref_opt = flat(ref, rho=sigma)  # only to name the layers in the same order
    for step in range(3):
        b = data(step)
        eps = [eps_formula(ref_opt, i, sigma, step) for i in range(len(ref_opt.targets))]
        run(api, model, opt, b, loss_fn)
        with torch.no_grad():
            for t, e in zip(ref_opt.targets, eps):
                t.module.weight.add_(e.t() if t.transposed else e)
        params = list(named_adapters(ref).values())
        g = grads_at(ref, b, loss_fn, params)
        with torch.no_grad():
            for t in ref_opt.targets:  # W back from a fresh copy (W + ε − ε is not W)
                t.module.weight.copy_(frozen_state(make())[_pname(ref, t.module)])
            for p, gi in zip(params, g):
                p.sub_(LR * gi)
        for n, p in named_adapters(model).items():
            torch.testing.assert_close(p, named_adapters(ref)[n], rtol=1e-10, atol=1e-12)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert opt.sharpness_aware_steps == 3
    assert not any(opt.state.values())  # no backup, no stored ε: the wrapper keeps nothing


def _pname(model, module):
    return next(n for n, p in model.named_parameters() if p is module.weight)


def test_flat_lora_at_sigma_zero_is_exactly_the_base_step():
    for kw in ({"rho": 0.0}, {"rho": 0.5, "sigma_schedule": "cosine", "total_steps": 5}):
        model, ref = mlp_lora(), mlp_lora()
        opt = flat(model, **kw)
        base = sgd(ref)
        steps = 3 if kw["rho"] == 0 else 1  # the cosine's σ_0 = 0: the first step is plain
        for i in range(steps):
            effsam.sharpness_aware_step(model, opt, mlp_batch(i), mlp_loss)
            effsam.sharpness_aware_step(ref, base, mlp_batch(i), mlp_loss)
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.equal(p, q), n


def test_flat_lora_sigma_follows_the_cosine_and_the_row_norms():
    model = mlp_lora()
    opt = flat(model, rho=0.5, sigma_schedule="cosine", total_steps=4)
    assert [round(opt.sigma_at(t), 12) for t in range(5)] == [
        round(0.5 * 0.5 * (1 - math.cos(math.pi * t / 4)), 12) for t in range(5)
    ]
    t = opt.targets[0]
    rows = opt.row_scales(t, 0.5)
    torch.testing.assert_close(
        rows, 0.5 * merged(t).detach().norm(dim=1) / math.sqrt(6), rtol=1e-12, atol=0
    )


def test_flat_lora_in_small_chunks_regenerates_the_same_epsilon():
    """A chunk budget of 4 elements (several chunks per layer): the forward and the backward
    still see the same W + ε bit for bit, with the same row scales as one chunk; the update
    is the gradient at W + ε for the ε the chunks drew."""
    a, b = mlp_lora(bias=False), mlp_lora(bias=False)
    oa, ob = flat(a, rho=0.5), flat(b, rho=0.5, chunk_elements=4)
    with ob.first_pass():
        for i, t in enumerate(ob.targets):
            assert ob.noise_for(i).rows_per_chunk(t.weight.shape[1]) == 1  # one row a chunk
            fwd, bwd = eps_seen(ob, i)
            assert torch.equal(fwd, bwd)
            eps = ob.noise_for(i).materialise(t.weight)
            assert torch.equal(fwd, t.weight.detach() + eps)
            assert torch.equal(ob.noise_for(i).scale, oa.row_scales(t, 0.5))
    ob.abort_step()


def test_flat_lora_state_dict_round_trip_continues_bit_identically():
    def train(model, opt, steps):
        for i in steps:
            effsam.sharpness_aware_step(model, opt, gpt2_batch(i), gpt2_loss)

    model = gpt2_lora()
    opt = FlatLoRA(sgd(model), rho=0.5, model=model, total_steps=6, seed=3)
    train(model, opt, range(6))
    half = gpt2_lora()
    hopt = FlatLoRA(sgd(half), rho=0.5, model=half, total_steps=6, seed=3)
    train(half, hopt, range(3))
    saved = copy.deepcopy((half.state_dict(), hopt.state_dict()))
    fresh = gpt2_lora(seed=1)  # other weights: everything must come from the state
    fresh.load_state_dict(saved[0])
    fopt = FlatLoRA(sgd(fresh), rho=0.5, model=fresh, total_steps=6, seed=3)
    fopt.load_state_dict(saved[1])
    train(fresh, fopt, range(3, 6))
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    other = FlatLoRA(sgd(fresh), rho=0.5, model=fresh, total_steps=6, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(saved[1])


def test_sam_on_lora_state_dict_round_trip_continues_bit_identically():
    model = mlp_lora()
    opt = effsam.SAM(torch.optim.AdamW(trainable_parameters(model), lr=0.01), rho=RHO)
    for i in range(4):
        effsam.sharpness_aware_step(model, opt, mlp_batch(i), mlp_loss)
    half = mlp_lora()
    hopt = effsam.SAM(torch.optim.AdamW(trainable_parameters(half), lr=0.01), rho=RHO)
    for i in range(2):
        effsam.sharpness_aware_step(half, hopt, mlp_batch(i), mlp_loss)
    saved = copy.deepcopy((half.state_dict(), hopt.state_dict()))
    fresh = mlp_lora(seed=1)
    fresh.load_state_dict(saved[0])
    fopt = effsam.SAM(torch.optim.AdamW(trainable_parameters(fresh), lr=0.01), rho=RHO)
    fopt.load_state_dict(saved[1])
    for i in range(2, 4):
        effsam.sharpness_aware_step(fresh, fopt, mlp_batch(i), mlp_loss)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


# ====================================================================== bf16
def bf16_cycles(opt, model, cycles=25):
    """Perturb and restore ``cycles`` times without a descent (each step aborted after its
    passes), then one full step at lr 0: every weight must be bit-identical."""
    for i in range(cycles):
        opt.zero_grad()
        b = mlp_batch(i, dtype=torch.bfloat16)
        with opt.first_pass():
            mlp_loss(model, b).float().mean().backward()
        if opt.first_step(zero_grad=True):
            mlp_loss(model, b).float().mean().backward()
        opt.abort_step()
    effsam.sharpness_aware_step(model, opt, mlp_batch(99, dtype=torch.bfloat16), mlp_loss)


@pytest.mark.parametrize("method", ["sam", "flat-lora"])
def test_bf16_perturb_and_restore_is_exact(method):
    model = mlp_lora(dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if method == "sam":
        opt = effsam.SAM(sgd(model, lr=0.0), rho=0.5)
    else:
        opt = FlatLoRA(sgd(model, lr=0.0), rho=0.5, model=model, sigma_schedule="constant")
    bf16_cycles(opt, model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, before[n]), n
    if method == "sam":
        # what an exact restore protects against: θ + ε − ε is not θ in bf16
        p = next(iter(named_adapters(model).values())).detach()
        eps = 0.37 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(p.dtype)
        assert not torch.equal((p + eps) - eps, p)
    else:
        # ... and for Flat-LoRA, adding ε to the bf16 base weight and subtracting it again
        t = opt.targets[0]
        with opt.first_pass():
            eps = opt.noise_for(0).materialise(t.weight).to(torch.bfloat16)
        opt.abort_step()
        w = t.weight.detach()
        assert not torch.equal((w + eps) - eps, w)


def test_flat_lora_bf16_autocast_step_runs_and_matches_float32_closely():
    """Under bf16 autocast the perturbed layers compute in bf16 (as nn.Linear does); the
    update is close to the float32 one."""
    a, b = mlp_lora(dtype=torch.float32), mlp_lora(dtype=torch.float32)
    oa, ob = flat(a, rho=0.5), flat(b, rho=0.5)
    batch = mlp_batch(0, dtype=torch.float32)
    effsam.sharpness_aware_step(a, oa, batch, mlp_loss, autocast="bf16")
    effsam.sharpness_aware_step(b, ob, batch, mlp_loss)
    for (n, p), q in zip(named_adapters(a).items(), named_adapters(b).values()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-2, msg=n)


# ====================================================================== refusals
def test_flat_lora_refuses_what_it_cannot_perturb():
    model = mlp_lora()
    with pytest.raises(ValueError, match="total_steps"):
        FlatLoRA(sgd(model), model=model)
    with pytest.raises(ValueError, match="sigma_schedule"):
        FlatLoRA(sgd(model), model=model, sigma_schedule="linear")
    with pytest.raises(ValueError, match="ascent_fraction"):
        FlatLoRA(sgd(model), model=model, total_steps=3, ascent_fraction=0.5)
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    emb = peft.get_peft_model(emb, peft.LoraConfig(r=2, target_modules=["0", "1"]))
    with pytest.raises(NotImplementedError, match="Embedding"):
        FlatLoRA(sgd(emb), model=emb, total_steps=3)
    torch.manual_seed(0)
    dora = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    dora = peft.get_peft_model(dora, peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(NotImplementedError, match="variant"):
        FlatLoRA(sgd(dora), model=dora, total_steps=3)
    other = mlp_lora()
    with pytest.raises(ValueError, match="not in the optimizer"):
        FlatLoRA(sgd(other), model=model, total_steps=3)


def test_flat_lora_on_a_plain_model_perturbs_its_linear_weights():
    """Without LoRA layers W' = W: the gradient of W is taken at W + ε."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ref = copy.deepcopy(model)
    opt = FlatLoRA(torch.optim.SGD(model.parameters(), lr=LR), rho=0.5, model=model,
                   sigma_schedule="constant")  # fmt: skip
    b = mlp_batch(0)
    eps = []
    for i, m in enumerate([ref[0], ref[2]]):
        w = m.weight.detach()
        g = torch.Generator().manual_seed(noise_seed(0, 0, i))
        z = torch.randn(w.shape, generator=g).to(w.dtype)
        eps.append(0.5 * w.norm(dim=1, keepdim=True) / math.sqrt(w.shape[1]) * z)
    effsam.sharpness_aware_step(model, opt, b, mlp_loss)
    with torch.no_grad():
        ref[0].weight.add_(eps[0])
        ref[2].weight.add_(eps[1])
    g = grads_at(ref, b, mlp_loss, list(ref.parameters()))
    with torch.no_grad():
        ref[0].weight.sub_(eps[0])
        ref[2].weight.sub_(eps[1])
        for p, gi in zip(ref.parameters(), g):
            p.sub_(LR * gi)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_flat_lora_batchnorm_statistics_are_those_of_its_one_perturbed_pass():
    """One pass per step: BN's running statistics move once, by the batch seen through
    W + ε (never a clean pass as well, never twice)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model = model.double()
    opt = FlatLoRA(torch.optim.SGD(model.parameters(), lr=LR), rho=0.5, model=model,
                   sigma_schedule="constant")  # fmt: skip
    for step in range(3):
        b = mlp_batch(step)
        probe = copy.deepcopy(model)
        w = probe[0].weight.detach()
        g = torch.Generator().manual_seed(noise_seed(0, step, 0))
        z = torch.randn(w.shape, generator=g).to(w.dtype)
        with torch.no_grad():
            probe[0].weight.add_(0.5 * w.norm(dim=1, keepdim=True) / math.sqrt(w.shape[1]) * z)
            probe(b[0])
        effsam.sharpness_aware_step(model, opt, b, mlp_loss)
        torch.testing.assert_close(model[1].running_mean, probe[1].running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(model[1].running_var, probe[1].running_var, rtol=1e-12, atol=0)
        assert model[1].num_batches_tracked == step + 1


# ====================================================================== the HF Trainer
class _Data(torch.utils.data.Dataset):
    def __init__(self, n=12):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 20, (n, 7), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        # the first label ignored: the Trainer's token count (labels, shifted or not) is
        # then the causal loss's, so its sum / count is the loop's mean
        labels = self.ids[i].clone()
        labels[0] = -100
        return {"input_ids": self.ids[i], "labels": labels}


@pytest.mark.parametrize("method,kwargs", TRAINER_METHODS, ids=[m for m, _ in TRAINER_METHODS])
def test_the_trainer_with_a_peft_model_equals_the_plain_loop(tmp_path, method, kwargs):
    hf = pytest.importorskip("effsam.integrations.transformers")

    def make_opt(model):
        if method == "sam":
            return effsam.SAM(sgd(model), rho=RHO)
        if method == "flat-lora":
            return FlatLoRA(sgd(model), rho=0.5, model=model, total_steps=3, seed=2)
        return effsam.create_optimizer(
            trainable_parameters(model), method, lr=LR, rho=RHO, **kwargs
        )

    model = gpt2_lora()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
        train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = hf.SharpnessAwareTrainer(
        model=model, args=args, train_dataset=_Data(), optimizers=(make_opt(model), None)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ref = gpt2_lora()
    opt = make_opt(ref)
    data = _Data()
    for s in range(3):
        rows = [data[i] for i in range(4 * s, 4 * s + 4)]
        b = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        effsam.sharpness_aware_step(ref, opt, b, gpt2_loss)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


# ====================================================================== docs/lora.md
def test_the_lora_doc_loop_runs_as_written():
    """The first Python block under "## A plain loop" in docs/lora.md, verbatim."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "lora.md").read_text()
    section = text[text.index("## A plain loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    ns: dict = {"__name__": "lora_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/lora.md", "exec"), ns)
    opt = ns["opt"]
    assert isinstance(opt, FlatLoRA) and opt.steps == ns["total_steps"]
    assert opt.sharpness_aware_steps == ns["total_steps"] - 1  # σ_0 = 0: the first is plain
    assert torch.isfinite(ns["result"].loss)
    check_trainable_only(opt)
