"""The bench protocol: every configuration measured, finite numbers, the formulas of RE/ECM."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from carv_pyro.bench import BenchRow, _relative, components_from_rows, main


def test_relative_efficiency_and_ecm_formulas():
    rows = [
        BenchRow("baseline", 2, 1, var=4.0, cost_s=1.0),
        BenchRow("reuse", 2, 8, var=1.0, cost_s=2.0),
        BenchRow("IS+strat", 2, 8, var=0.5, cost_s=2.0, proposal="weighted", stratify="per_outer"),
    ]
    _relative(rows)
    assert rows[0].re == 1.0 and rows[0].ecm == 1.0
    assert rows[1].re == 1.0 and rows[1].ecm == pytest.approx(4.0 * 1.0 / (1.0 * 2.0))
    assert rows[2].re == pytest.approx(2.0)  # against plain reuse at the same (R, K)
    assert rows[2].ecm == pytest.approx(4.0 / (0.5 * 2.0))


def test_components_solve_the_two_plain_rows_exactly():
    # V_b = 3, V_w = 48 at R = 4: Var(4, 1) = 51 / 4, Var(4, 16) = (3 + 3) / 4
    rows = [
        BenchRow("baseline", 4, 1, var=51 / 4, cost_s=1.0),
        BenchRow("reuse", 4, 4, var=(3 + 12) / 4, cost_s=1.0),
        BenchRow("reuse", 4, 16, var=6 / 4, cost_s=1.0),
        BenchRow("strat", 4, 16, var=0.1, cost_s=1.0, stratify="per_outer"),  # not plain
    ]
    c = components_from_rows(rows)
    assert c["R"] == 4 and c["K"] == 16  # the largest plain K
    assert c["v_between"] == pytest.approx(3.0) and c["v_within"] == pytest.approx(48.0)
    assert c["ceiling"] == pytest.approx(51 / 3)
    assert components_from_rows(rows[:1]) is None  # no plain K > 1 row
    assert components_from_rows(rows[3:]) is None
    # V_w explains everything: no between part, no ceiling
    flat = [BenchRow("baseline", 2, 1, 8.0, 1.0), BenchRow("reuse", 2, 8, 1.0, 1.0)]
    assert components_from_rows(flat)["ceiling"] == math.inf


def test_text_to_3d_bench_writes_every_configuration(tmp_path):
    args = SimpleNamespace(
        pipeline="text-to-3d",
        quick=True,
        smoke=True,
        json=str(tmp_path / "b.json"),
        plot=str(tmp_path / "b.png"),
        device="cpu",
        seed=0,
        repeats=None,
        quiet=True,
    )
    assert main(args) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["pipeline"] == "text-to-3d" and result["device"]
    methods = {r["method"] for r in result["rows"]}
    for m in (
        "baseline",
        "reuse",
        "IS",
        "strat",
        "IS+strat",
        "IS+strat+antithetic",
        "IS+strat+QMC",
        "adaptive K*",
        "strat global",
    ):
        assert m in methods, m
    assert {r["K"] for r in result["rows"] if r["method"] == "reuse"} == {2, 4, 8, 16}
    for r in result["rows"]:
        for key in ("var", "cost_s", "re", "ecm"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (r, key)
    assert "accounting" in result and math.isfinite(result["accounting"]["c_outer"])
    assert set(result["components"]) == {"R", "K", "v_between", "v_within", "ceiling"}
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_pretrain_steps_is_refused_for_other_pipelines_before_any_work():
    args = SimpleNamespace(
        pipeline="text-to-3d",
        quick=True,
        json=None,
        plot=None,
        device="cpu",
        seed=0,
        repeats=None,
        pretrain_steps=5,
    )
    with pytest.raises(ValueError, match="pretrain_steps.*distillation"):
        main(args)
