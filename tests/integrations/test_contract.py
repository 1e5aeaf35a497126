"""The torch.optim contract frameworks rely on: step() with and without a closure, hooks,
pickling, defaults for schedulers, params-first constructors, generator state on load."""

from __future__ import annotations

import ast
import copy
import inspect
import pickle
import textwrap

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import effsam
from effsam.optim.update import PassThrough
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

LR, MOM, RHO = 0.1, 0.9, 0.2


def _batches(n: int):
    return [tiny_data(seed=30 + i) for i in range(n)]


def _closure(model, opt, batch):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = per_sample_ce(model, batch).mean()
        loss.backward()
        return loss

    return closure


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)


def _assert_same(a: dict, b: dict):
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------- step()
def test_do_nothing_closure_after_manual_backward_raises_and_changes_nothing():
    model = tiny_bn_net()
    opt = effsam.SAM(_sgd(model), rho=RHO)
    before = clone_state(model)
    per_sample_ce(model, tiny_data()).mean().backward()
    with pytest.raises(RuntimeError, match="call 2 of the closure left no gradient"):
        opt.step(lambda: None)
    after = clone_state(model)
    for k in before:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(before[k], after[k]), k
    assert not opt.perturbed and opt.steps == 0


def test_closure_without_backward_raises_in_pass_1():
    model = tiny_bn_net()
    opt = effsam.SAM(_sgd(model), rho=RHO)
    with pytest.raises(RuntimeError, match="call 1 of the closure"):
        opt.step(lambda: per_sample_ce(model, tiny_data()).mean())


def test_closure_returning_none_without_gradients_skips_like_a_plain_optimizer():
    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0)
    before = clone_state(model)
    gen = opt.mask.generator.get_state()
    assert opt.step(lambda: None) is None
    _assert_same(before, clone_state(model))
    assert opt.steps == 0 and not opt.perturbed
    assert torch.equal(opt.mask.generator.get_state(), gen)  # the mask draw rolled back


def test_step_without_closure_finishes_a_started_step():
    """first_step, pass 2 by hand, then step() (what the HF Trainer and accelerate call)
    equals second_step()."""
    results = []
    for finish in ("second_step", "step"):
        model = tiny_bn_net()
        opt = effsam.SAM(_sgd(model), rho=RHO)
        for batch in _batches(3):
            opt.zero_grad()
            with opt.first_pass():
                per_sample_ce(model, batch).mean().backward()
            opt.first_step(zero_grad=True)
            per_sample_ce(model, batch).mean().backward()
            assert getattr(opt, finish)() in (None, True)
        assert opt.steps == 3 and not opt.perturbed
        results.append(clone_state(model))
    _assert_same(*results)


def test_step_without_closure_and_nothing_pending_is_a_clear_error():
    model = tiny_bn_net()
    opt = effsam.SAM(_sgd(model), rho=RHO)
    per_sample_ce(model, tiny_data()).mean().backward()
    with pytest.raises(RuntimeError, match="without a closure and no step is pending"):
        opt.step()


# ---------------------------------------------------------------------- hooks
def _count_step_hooks(opt):
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    return calls


@pytest.mark.parametrize("drive", ["closure", "two_phase", "sharpness_aware_step"])
def test_step_hooks_fire_once_per_step_on_every_path(drive):
    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=1.0, gamma=1.0)
    calls = _count_step_hooks(opt)
    seen_global = []
    handle = register_optimizer_step_pre_hook(
        lambda o, a, k: seen_global.append(o) if o is opt else None
    )
    try:
        for batch in _batches(2):
            if drive == "closure":
                opt.step(_closure(model, opt, batch))
            elif drive == "two_phase":
                with opt.first_pass():
                    per_sample_ce(model, batch).mean().backward()
                opt.first_step(zero_grad=True)
                per_sample_ce(model, batch).mean().backward()
                opt.second_step(zero_grad=True)
            else:
                effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    finally:
        handle.remove()
    assert calls == ["pre", "post"] * 2
    assert len(seen_global) == 2


def test_state_dict_hooks_fire_and_can_rewrite():
    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0)
    opt.step(_closure(model, opt, tiny_data()))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def post(o, sd):
        calls.append("sd_post")
        sd = dict(sd)
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        calls.append("load_pre")
        assert sd.pop("extra") == 1  # the rewritten dict reaches the pre-hook
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and "effsam" in sd
    opt.load_state_dict(sd)
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]


# ---------------------------------------------------------------------- pickle, deepcopy
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_base_policies_and_continue_identically(how):
    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0, seed=3)
    batches = _batches(4)
    for batch in batches[:2]:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert isinstance(opt2.base, torch.optim.SGD) and opt2.param_groups is opt2.base.param_groups
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    assert opt2.steps == 2 and opt2.mask.beta == 0.5
    for batch in batches[2:]:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        effsam.sharpness_aware_step(model2, opt2, batch, per_sample_ce)
    _assert_same(clone_state(model), clone_state(model2))
    # the copy's hooks work and are its own
    calls = _count_step_hooks(opt2)
    effsam.sharpness_aware_step(model2, opt2, batches[0], per_sample_ce)
    assert calls == ["pre", "post"]


# ---------------------------------------------------------------------- defaults, schedulers
def test_defaults_show_the_base_hyperparameters_with_rho_on_top():
    model = tiny_bn_net()
    opt = effsam.SAM(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.07)
    assert opt.defaults["rho"] == 0.07 and opt.defaults["betas"] == (0.9, 0.999)
    assert "rho" not in opt.base.defaults


@pytest.mark.parametrize("sched", ["onecycle", "cyclic"])
def test_momentum_cycling_schedulers_drive_the_base_like_a_plain_optimizer(sched):
    def make(opt):
        if sched == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)
        return torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.5, step_size_up=2)

    model = tiny_bn_net()
    opt = effsam.SAM(_sgd(model), rho=RHO)
    plain = _sgd(tiny_bn_net())
    s1, s2 = make(opt), make(plain)
    seen = []
    for batch in _batches(5):
        opt.step(_closure(model, opt, batch))
        plain.step()
        s1.step()
        s2.step()
        g, p = opt.base.param_groups[0], plain.param_groups[0]
        seen.append(g["lr"])
        assert (g["lr"], g["momentum"]) == (p["lr"], p["momentum"])
    assert len(set(seen)) > 2  # the schedule moved


def test_base_with_its_own_rho_is_refused():
    model = tiny_bn_net()
    with pytest.raises(ValueError, match="Adadelta has its own 'rho'"):
        effsam.SAM(torch.optim.Adadelta(model.parameters()), rho=RHO)


# ---------------------------------------------------------------------- params-first
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (effsam.SAM, {}),
        (effsam.ASAM, {"eta": 0.01}),
        (effsam.ESAM, {"beta": 0.5, "gamma": 1.0, "seed": 2}),
        (effsam.SSAM, {"sparsity": 0.5, "mask": "dynamic", "total_steps": 4, "update_interval": 2}),
    ],
)
def test_params_first_constructor_equals_the_instance_form(cls, kwargs):
    results = []
    for form in ("instance", "params"):
        model = tiny_bn_net()
        if form == "instance":
            opt = cls(_sgd(model), rho=RHO, foreach=False, **kwargs)
        else:
            opt = cls(
                model.parameters(), base=torch.optim.SGD, lr=LR, momentum=MOM, rho=RHO,
                foreach=False, **kwargs,
            )  # fmt: skip
        assert isinstance(opt.base, torch.optim.SGD) and opt.foreach is False
        assert opt.base.param_groups[0]["momentum"] == MOM
        for batch in _batches(3):
            effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        results.append(clone_state(model))
    _assert_same(*results)


def test_params_first_base_kwargs_and_bad_forms():
    model = tiny_bn_net()
    opt = effsam.SAM(
        model.parameters(), base=torch.optim.SGD, lr=LR, base_kwargs={"foreach": False}
    )
    assert opt.base.param_groups[0]["foreach"] is False and opt.foreach is True
    with pytest.raises(TypeError, match="base must be a torch.optim.Optimizer subclass"):
        effsam.SAM(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="either the instance"):
        effsam.SAM(_sgd(model), base=torch.optim.SGD)
    with pytest.raises(TypeError, match="already holds its parameters"):
        effsam.SAM(list(model.parameters()), base=_sgd(model))
    with pytest.raises(TypeError, match="momentumm"):
        effsam.SAM(model.parameters(), base=torch.optim.SGD, lr=LR, momentumm=0.9)
    with pytest.raises(TypeError, match="needs an optimizer"):
        effsam.SAM()
    assert isinstance(effsam.SAM(base=_sgd(model)).base, torch.optim.SGD)


# ---------------------------------------------------------------------- generator state
class _OnAccelerator(torch.Tensor):
    """A CPU tensor that says it lives on a GPU, as the generator state does after
    accelerate's ``prepare`` moved the optimizer state to the device; ``.to`` copies it
    back to a plain CPU tensor, as a real device tensor would."""

    @property
    def device(self):  # type: ignore[override]
        return torch.device("cuda", 0)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            return args[0].as_subclass(torch.Tensor).clone()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class _RecordingGenerator:
    """Records the states loaded into it; reads come from the real generator (an atomic
    load snapshots the current state first)."""

    def __init__(self, real):
        self.real = real
        self.seen = []

    def get_state(self):
        return self.real.get_state()

    def set_state(self, state):
        self.seen.append(state)


@pytest.mark.parametrize("kind", ["esam", "ssam_dynamic"])
def test_generator_state_from_a_device_is_loaded_on_the_cpu(kind):
    def make(model):
        if kind == "esam":
            return effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0, seed=5)
        return effsam.SSAM(
            _sgd(model), rho=RHO, mask="dynamic", total_steps=6, update_interval=1, seed=5
        )

    model = tiny_bn_net()
    opt = make(model)
    batches = _batches(4)
    for batch in batches[:2]:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    sd = copy.deepcopy(opt.state_dict())  # its own momentum buffers, not opt's
    gen = sd["effsam"]["mask"]["generator"]
    sd["effsam"]["mask"]["generator"] = gen.as_subclass(_OnAccelerator)
    model2 = copy.deepcopy(model)
    opt2 = make(model2)
    real = opt2.mask.generator
    recorder = _RecordingGenerator(real)
    opt2.mask.generator = recorder
    opt2.load_state_dict(sd)
    (state,) = recorder.seen
    assert type(state) is torch.Tensor and state.device.type == "cpu"
    assert torch.equal(state, gen)
    real.set_state(state)
    opt2.mask.generator = real
    for batch in batches[2:]:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        effsam.sharpness_aware_step(model2, opt2, batch, per_sample_ce)
    _assert_same(clone_state(model), clone_state(model2))


def test_generator_state_of_the_wrong_type_is_named():
    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0)
    sd = opt.state_dict()
    sd["effsam"]["mask"]["generator"] = sd["effsam"]["mask"]["generator"].float()
    with pytest.raises(TypeError, match="SWP generator state: expected a uint8 tensor"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------------- distributed checkpoint
def test_distributed_checkpoint_state_dict_keeps_effsams_state_and_resumes_exactly():
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0, seed=3)
    # before any step: DCP initialises the state with step() at lr 0 and zero gradients
    first = get_optimizer_state_dict(model, opt)
    assert first["param_groups"][0]["effsam"]["steps"] == 0
    assert all(p.grad is None for p in model.parameters())
    assert opt.base.param_groups[0]["lr"] == LR and opt.steps == 0
    batches = _batches(4)
    for batch in batches[:2]:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert set(osd) == {"state", "param_groups"}  # DCP's schema: effsam's entry is in a group
    model2 = copy.deepcopy(model)
    opt2 = effsam.ESAM(_sgd(model2), rho=RHO, beta=0.5, gamma=1.0, seed=11)
    set_optimizer_state_dict(model2, opt2, osd)
    assert opt2.steps == 2 and "effsam" not in opt2.base.param_groups[0]
    for batch in batches[2:]:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        effsam.sharpness_aware_step(model2, opt2, batch, per_sample_ce)
    _assert_same(clone_state(model), clone_state(model2))


def test_state_dict_stores_effsams_entry_once():
    import io

    model = tiny_bn_net()
    opt = effsam.ESAM(_sgd(model), rho=RHO, beta=0.5, gamma=1.0)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["effsam"] is sd["effsam"]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["param_groups"][0]["effsam"] is loaded["effsam"]


# ---------------------------------------------------------------------- at the definitions
_NOT_WRAPPING = {"final", "property", "staticmethod", "classmethod"}


def _written(cls: type) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """From the source of ``cls``: the names its body binds, and per function the line it
    starts on (its first decorator) and how many of its decorators wrap it."""
    lines, start = inspect.getsourcelines(cls)
    body = ast.parse(textwrap.dedent("".join(lines))).body[0].body
    names: set[str] = set()
    funcs: dict[str, tuple[int, int]] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
            decos = [ast.unparse(d) for d in node.decorator_list]
            if any(d in ("property",) or d.endswith((".setter", ".getter")) for d in decos):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            wrapping = sum(d not in _NOT_WRAPPING for d in decos)
            funcs[node.name] = (start + first - 1, wrapping)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names, funcs


def _layers(fn):
    n = 0
    while hasattr(fn, "__wrapped__"):
        fn, n = fn.__wrapped__, n + 1
    return fn, n


def _sharpness_aware_classes():
    seen, todo = [], [effsam.SharpnessAware]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("effsam."):
            seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


@pytest.mark.parametrize("cls", _sharpness_aware_classes(), ids=lambda c: c.__name__)
def test_no_method_is_rewritten_after_the_class_body(cls):
    """Every attribute of the class is what its body wrote, with only the decorators
    written there (torch patches ``step`` with its profiling hook at the first instance)."""
    names, funcs = _written(cls)
    for name, value in vars(cls).items():
        if name == "step" and getattr(value, "hooked", False):  # torch's own patch
            assert "step" in names or cls is not effsam.SharpnessAware
            value = value.__wrapped__
            if "step" not in names:
                continue
        if name.startswith("__") and name not in names:
            continue  # __module__, __doc__, __dict__, ...
        if isinstance(value, (classmethod, staticmethod)):  # (__init_subclass__ is implicitly one)
            value = value.__func__
        assert name in names, f"{cls.__name__}.{name} was not written in the class body"
        if name in funcs:
            line, wrapping = funcs[name]
            inner, layers = _layers(value)
            assert inner.__code__.co_firstlineno == line, name
            assert layers == wrapping, f"{cls.__name__}.{name}: {layers} wrappers"
    assert "__init_subclass__" not in vars(cls) or cls is effsam.SharpnessAware


class _ProbeUpdate(PassThrough):
    """An update policy that records whether it ran inside a compiled region."""

    name = "probe"

    def __init__(self, log):
        self.log = log

    def on_update(self, state, params, step):
        self.log.append(("update", torch.compiler.is_compiling()))

    def state_dict(self, state, params):
        return {"probe": len(self.log)}


class _Probe(effsam.SAM):
    """Overrides hooks of the final methods (and brings an update policy); records
    whether they ran inside a compiled region."""

    def __init__(self, *args, **kwargs):
        self.log = []
        super().__init__(*args, update=_ProbeUpdate(self.log), **kwargs)

    def _on_begin_step(self, decision):
        self.log.append(("begin", torch.compiler.is_compiling()))

    def _on_restore(self):
        self.log.append(("restore", torch.compiler.is_compiling()))


def test_a_subclass_is_left_as_written_and_its_hooks_run_under_the_contract():
    assert vars(_Probe)["_on_restore"].__code__ is _Probe._on_restore.__code__
    assert not any(hasattr(v, "__wrapped__") for v in vars(_Probe).values())
    model = tiny_bn_net()
    opt = _Probe(_sgd(model), rho=RHO)
    calls = _count_step_hooks(opt)
    with opt.first_pass():
        per_sample_ce(model, tiny_data()).mean().backward()
    opt.first_step(zero_grad=True)
    per_sample_ce(model, tiny_data()).mean().backward()
    opt.second_step(zero_grad=True)
    assert calls == ["pre", "post"]  # fired around the two-phase path's update
    assert [k for k, _ in opt.log] == ["begin", "restore", "update"]
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sd["effsam"]["probe"]))
    sd = opt.state_dict()
    assert seen == [3] and sd["param_groups"][0]["effsam"]["probe"] == 3


def test_a_subclass_hooks_run_eagerly_in_a_compiled_step():
    torch._dynamo.reset()
    model = tiny_bn_net()
    opt = _Probe(_sgd(model), rho=RHO)

    def train_step(x, y):
        return opt.step(_closure(model, opt, (x, y)))

    compiled = torch.compile(train_step, backend="eager")
    for i in range(2):
        compiled(*tiny_data(seed=60 + i))
    assert opt.steps == 2 and not opt.perturbed
    assert {k for k, _ in opt.log} == {"begin", "restore", "update"}
    assert not any(compiling for _, compiling in opt.log)


@pytest.mark.parametrize("name", ["step", "second_step", "begin_step", "state_dict"])
def test_a_subclass_overriding_a_final_method_is_refused(name):
    with pytest.raises(TypeError, match=f"overrides {name} of SharpnessAware"):
        type("Override", (effsam.SAM,), {name: lambda self, *a, **k: None})
