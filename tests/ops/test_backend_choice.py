# SPDX-License-Identifier: Apache-2.0
"""ADREC_BACKEND: read at every op call (the choice is cached per value), so a change made while
the process runs takes effect at the next call, and a bad value is refused by name."""
import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference
from adrec_fast.ops import _backend


def test_env_change_takes_effect_at_next_call(monkeypatch):
    monkeypatch.delenv("ADREC_BACKEND", raising=False)
    assert _backend.backend_for("sigmoid_bce", torch.device("cpu")) == "cpp"
    monkeypatch.setenv("ADREC_BACKEND", "reference")
    assert _backend.backend_for("sigmoid_bce", "cpu") == "reference"
    monkeypatch.setenv("ADREC_BACKEND", "fm_interaction:reference")
    assert _backend.backend_for("sigmoid_bce", "cpu") == "cpp"
    assert _backend.backend_for("fm_interaction", "cpu") == "reference"
    monkeypatch.delenv("ADREC_BACKEND")
    assert _backend.backend_for("fm_interaction", "cpu") == "cpp"


def test_forced_reference_runs_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(37, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (37,), generator=g).double()
    monkeypatch.setenv("ADREC_BACKEND", "reference")
    calls = []
    real = reference.sigmoid_bce
    monkeypatch.setattr(reference, "sigmoid_bce", lambda *a: calls.append(1) or real(*a))
    loss = F.sigmoid_bce(z, y)
    assert calls == [1]
    monkeypatch.delenv("ADREC_BACKEND")
    torch.testing.assert_close(F.sigmoid_bce(z, y), loss)
    assert calls == [1]  # the C++ kernel again


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("ADREC_BACKEND", "sigmoid_bce:fortran")
    with pytest.raises(ValueError, match="ADREC_BACKEND: unknown backend 'fortran'"):
        _backend.backend_for("sigmoid_bce", "cpu")
