"""Errors that name the fix: a step() with nothing pending called by a wrapper around
effsam's optimizer, and timm's register() without timm."""

from __future__ import annotations

import sys

import pytest
import torch

import effsam
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data


class Outer(torch.optim.Optimizer):
    """A Lookahead-like wrapper that steps the optimizer inside it after one backward."""

    def __init__(self, inner):
        self.inner = inner
        super().__init__(inner.param_groups, {})

    def step(self, closure=None):
        return self.inner.step()


def test_a_wrapper_around_effsam_is_told_to_nest_the_other_way():
    model = tiny_bn_net()
    opt = Outer(effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1))
    per_sample_ce(model, tiny_data()).mean().backward()
    before = clone_state(model)
    with pytest.raises(RuntimeError, match="Outer wraps the effsam optimizer.*OUTER wrapper"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in clone_state(model).items())


def test_a_plain_step_without_a_framework_keeps_the_generic_message():
    model = tiny_bn_net()
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    per_sample_ce(model, tiny_data()).mean().backward()
    with pytest.raises(RuntimeError, match=r"does the whole step\.$"):
        opt.step()


def test_timm_register_without_timm_says_what_to_install(monkeypatch):
    from effsam.integrations import timm as etimm

    for name in list(sys.modules):
        if name == "timm" or name.startswith("timm."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm → ImportError
    with pytest.raises(ImportError, match=r"pip install 'effsam\[timm\]'"):
        etimm.register()
