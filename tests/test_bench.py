"""The bench protocol: every configuration measured, finite numbers, the formulas of RE/ECM."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from carv_pyro.bench import BenchRow, _relative, main


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
    assert set(result["extras"]["end_to_end"]) == {"baseline", "carv"}
    assert (tmp_path / "b.png").stat().st_size > 1000
