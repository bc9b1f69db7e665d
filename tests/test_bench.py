"""The bench protocol: every configuration measured, finite numbers, the formulas of RE/ECM, and
the report a person reads (legend, one set of variance components, K* against the best K, cost
warnings)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from carv_pyro import bench as bench_module
from carv_pyro.accounting import AccountingReport
from carv_pyro.bench import (
    LEGEND,
    BenchRow,
    _relative,
    components_from_rows,
    cost_model_summary,
    cost_warnings,
    format_table,
    k_star_note,
    main,
    modelled_costs,
    variance_components,
)


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


class FakeCostModel:
    """An accountant's cost model with known numbers: ``cost_of(K) = 10 + 2 K`` ms at R = 2."""

    last_R = 2
    step_costs = {1: 0.012}
    teacher_costs = {1: 0.003, 2: 0.005}

    def cost_of(self, K: int) -> float:
        return (10.0 + 2.0 * K) * 1e-3


def test_the_table_sets_the_modelled_cost_beside_the_measured_one():
    rows = [
        BenchRow("baseline", 2, 1, var=4.0, cost_s=0.012),  # the model is right: ratio 1
        BenchRow("reuse", 2, 16, var=1.0, cost_s=0.084),  # twice the modelled 42 ms
        BenchRow("IS", 2, 16, var=1.0, cost_s=0.042, proposal="weighted"),
        BenchRow("baseline", 4, 1, var=2.0, cost_s=0.020),  # another R: no prediction
    ]
    modelled_costs(rows, FakeCostModel())
    assert [r.cost_model_s for r in rows] == pytest.approx([0.012, 0.042, 0.042, None])
    table = format_table(rows).splitlines()
    assert "model (ms)" in table[0] and "cost/model" in table[0]
    assert table[2].split()[4:7] == ["12", "12", "1.00"]  # cost, modelled (ms), their ratio
    assert table[3].split()[4:7] == ["84", "42", "2.00"]
    assert table[5].split()[4:7] == ["20", "-", "-"]
    assert "model" in LEGEND and "cost/model" in LEGEND
    summary = cost_model_summary(rows, FakeCostModel(), steps=6)
    assert summary["R"] == 2 and summary["steps"] == 6
    assert summary["teacher_costs"] == FakeCostModel.teacher_costs
    # the plain rows at the model's R only (the IS row is not plain)
    assert summary["ratio_min"] == pytest.approx(1.0) and summary["ratio_max"] == pytest.approx(2)
    assert summary["worst"]["K"] == 16 and summary["worst"]["ratio"] == pytest.approx(2.0)
    assert "furthest at K = 16 (84 ms measured, 42 ms modelled)" in summary["text"]


def test_text_to_3d_bench_writes_every_configuration(tmp_path, capsys):
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
    # beside every row's measured cost, the learned cost model's (all rows are at the bench's R)
    model = result["cost_model"]
    assert model["R"] == result["rows"][0]["R"] and model["steps"] == 4
    assert set(model["teacher_costs"]) == {"1", "2"}  # K = 1 steps and their K = 2 probes
    for r in result["rows"]:
        assert math.isfinite(r["cost_model_s"]) and r["cost_model_s"] > 0, r
    assert "accounting" in result and math.isfinite(result["accounting"]["c_outer"])
    # one set of variance components, the accountant's, and the same numbers everywhere
    c = result["components"]
    assert c["source"] == "accountant"
    assert c["v_between"] == result["accounting"]["v_between"]
    assert c["v_within"] == result["accounting"]["v_within"]
    assert result["legend"] == LEGEND
    note = result["accounting"]["k_star_note"]
    assert note["best_k"] == result["accounting"]["best_k"]
    assert note["k_star"] == pytest.approx(result["accounting"]["k_star"])
    assert isinstance(result["warnings"], list)
    assert (tmp_path / "b.png").stat().st_size > 1000
    out = capsys.readouterr().out
    for key in ("RE", "ECM", "ECM pred", "model", "cost/model"):
        assert f"\n  {key:<10} " in out, key  # the legend, under the table
    assert out.count("V_b = ") == 1 and out.count("V_w = ") == 1  # printed once
    assert "this bench's variance components (measure()" in out
    assert "cost model (the adapting accountant's cost_of(K)" in out
    assert "K* = " in out and "best K = " in out


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


# -- the reading aids, on rows with known numbers ----------------------------------------------


def _report(**kw) -> AccountingReport:
    base = dict(v_between=1.0, v_within=30.0, c_outer=0.010, c_inner=0.002, R=2, K=8)
    base.update(kw)
    return AccountingReport(**base)


def test_variance_components_prefer_the_accountant_and_fall_back_to_the_rows():
    rows = [
        BenchRow("baseline", 4, 1, var=51 / 4, cost_s=1.0),
        BenchRow("reuse", 4, 16, 6 / 4, 1.0),
    ]
    c = variance_components(rows, _report(stderr=(0.5, 0.1)))
    assert c["source"] == "accountant" and (c["R"], c["K"]) == (2, 8)
    assert (c["v_between"], c["v_within"]) == (1.0, 30.0)
    assert (c["se_within"], c["se_between"]) == (0.5, 0.1)
    assert c["ceiling"] == pytest.approx(31.0)
    c = variance_components(rows, None)
    assert c["source"] == "plain rows" and "reference" in c["how"]
    assert c["v_between"] == pytest.approx(3.0) and c["v_within"] == pytest.approx(48.0)
    # an accountant that measured nothing does not hide the rows' estimate
    assert variance_components(rows, _report(v_between=math.nan))["source"] == "plain rows"
    assert variance_components(rows[:1], None) is None


def test_k_star_note_names_the_linear_cost_model_when_measured_costs_decide():
    # K* = sqrt(5 * 30) = 12.2 -> K = 16 nearest; a teacher whose batch of 16 costs what one
    # draw costs makes K = 16 best too; a steep measured cost makes K = 1 best instead
    flat = _report(teacher_seconds={1: 0.004, 2: 0.004, 4: 0.004, 8: 0.004, 16: 0.004})
    note = k_star_note(flat, [], (1, 2, 4, 8, 16))
    assert note["k_star"] == pytest.approx(math.sqrt(150))
    assert note["k_near_star"] == 16 and note["best_k"] == 16 and "agree" in note["text"]
    steep = _report(teacher_seconds={1: 0.001, 2: 0.03, 4: 0.1, 8: 0.4, 16: 2.0})
    note = k_star_note(steep, [], (1, 2, 4, 8, 16))
    assert note["best_k"] == 1 and note["k_near_star"] == 16
    assert note["teacher_cost_growth"] == pytest.approx(2000.0)
    assert "linear cost" in note["text"] and "grows 2e+03x from K = 1 to K = 16" in note["text"]
    assert note["ecm_at_best_k"] == pytest.approx(1.0)
    assert note["ecm_at_best_k"] > note["ecm_at_k_near_star"]


def test_k_star_note_says_flat_when_the_ecm_barely_differs():
    # K* = sqrt(4 * 9) = 6, nearest candidate 8; a teacher batch of 16 a quarter cheaper than the
    # line makes K = 16 best, by 2%
    report = _report(
        v_between=1.0,
        v_within=9.0,
        c_outer=0.004,
        c_inner=0.001,
        teacher_seconds={1: 0.002, 2: 0.004, 4: 0.008, 8: 0.016, 16: 0.024},
    )
    note = k_star_note(report, [BenchRow("baseline", 2, 1, 1.0, 1.0, ecm=1.0)], (1, 2, 4, 8, 16))
    assert note["k_near_star"] == 8 and note["best_k"] == 16
    assert note["ecm_at_best_k"] / note["ecm_at_k_near_star"] == pytest.approx(0.0255 / 0.025)
    assert "flat" in note["text"] and "in the rows the best plain K is 1" in note["text"]


def test_with_linear_costs_the_best_k_is_the_candidate_nearest_k_star():
    for v_w in (0.3, 3.0, 9.0, 40.0, 300.0):  # no K* at a geometric midpoint (a tie)
        report = _report(v_between=1.0, v_within=v_w, c_outer=0.004, c_inner=0.001)
        note = k_star_note(report, [], (1, 2, 4, 8, 16))
        assert note["best_k"] == note["k_near_star"] and "agree" in note["text"], v_w
        assert note["ecm_linear_at_k_star"] >= note["ecm_at_best_k"]  # K* is the optimum


def test_cost_warnings_flag_a_fall_with_its_cause_and_only_within_a_series():
    rows = [
        BenchRow("baseline", 2, 1, 1.0, cost_s=0.100, cost_mad_s=0.002),
        BenchRow("reuse", 2, 2, 1.0, cost_s=0.090, cost_mad_s=0.002),  # falls: 100 -> 90 ms
        BenchRow("reuse", 2, 4, 1.0, cost_s=0.130, cost_mad_s=0.002),
        # cheaper than the baseline, but another estimator: not a fall in K
        BenchRow("IS+strat", 2, 2, 1.0, cost_s=0.050, proposal="weighted", stratify="per_outer"),
    ]
    (w,) = cost_warnings(rows, n_timing=15)
    assert (w["kind"], w["where"], w["K_low"], w["K_high"]) == ("non_monotone_cost", "rows", 1, 2)
    assert w["method"] == "baseline -> reuse" and w["within_noise"] is False
    assert "load" in w["likely_cause"] and "idle machine" in w["advice"]
    # within the spread and few rounds: timing noise and too few rounds, more --repeats
    rows[1].cost_mad_s = rows[0].cost_mad_s = 0.006
    (w,) = cost_warnings(rows, n_timing=3)
    assert w["within_noise"] is True
    assert "timing noise" in w["likely_cause"] and "too few timing rounds (3)" in w["likely_cause"]
    assert "--repeats 15" in w["advice"]
    # the accountant's teacher timings are checked too; a GPU adds the launch-bound cause
    (w,) = cost_warnings(rows[:1], {1: 0.02, 2: 0.01, 4: 0.03}, n_timing=15, device="cuda")
    assert w["where"] == "accountant teacher calls" and (w["K_low"], w["K_high"]) == (1, 2)
    assert "launch-bound" in w["likely_cause"] and "larger R" in w["advice"]
    monotone = [BenchRow("baseline", 2, 1, 1.0, 0.1), BenchRow("reuse", 2, 2, 1.0, 0.2)]
    assert cost_warnings(monotone, {1: 0.01, 2: 0.02}, n_timing=15) == []


class _FakeBench:
    """A pipeline whose costs are injected through a fake clock: ``K = 2`` cheaper than ``1``."""

    name = "fake"
    R = 2
    COSTS = {1: 0.100, 2: 0.080, 4: 0.150}

    def __init__(self, quick, seed=0, device="cpu", smoke=False):
        self.clock = 0.0
        self.gen = torch.Generator().manual_seed(seed)
        self.k_adaptive = None

    def configs(self):
        return [dict(method="baseline", R=2, K=1)] + [
            dict(method="reuse", R=2, K=k) for k in (2, 4)
        ]

    def estimate(self, config):
        self.clock += self.COSTS[config["K"]]
        var = (1.0 + 9.0 / config["K"]) / config["R"]
        return var**0.5 * torch.randn(3, generator=self.gen, dtype=torch.float64)

    def reference(self, n):
        return torch.zeros(3, dtype=torch.float64)

    def extras(self):
        return {}

    def accounting(self, R, n_repeats):
        return _report(v_between=1.0, v_within=9.0, teacher_seconds={1: 0.02, 2: 0.03, 4: 0.05})


def test_main_warns_on_injected_non_monotone_costs(tmp_path, capsys, monkeypatch):
    fake = {}

    def build(**kw):
        fake["bench"] = _FakeBench(**kw)
        return fake["bench"]

    monkeypatch.setitem(bench_module.PIPELINES, "fake", build)
    monkeypatch.setattr(bench_module, "_clock", lambda: fake["bench"].clock)
    args = SimpleNamespace(
        pipeline="fake",
        quick=True,
        json=str(tmp_path / "fake.json"),
        plot=None,
        device="cpu",
        seed=0,
        repeats=4,
        quiet=True,
    )
    assert main(args) == 0
    result = json.loads((tmp_path / "fake.json").read_text())
    costs = {r["K"]: r["cost_s"] for r in result["rows"]}
    assert costs == pytest.approx(_FakeBench.COSTS)  # the clock saw exactly the injected costs
    (w,) = result["warnings"]
    assert (w["where"], w["K_low"], w["K_high"]) == ("rows", 1, 2)
    assert w["within_noise"] is False  # the fake clock has no spread
    assert "too few timing rounds (4)" in w["likely_cause"] and result["timing_rounds"] == 4
    assert result["components"]["source"] == "accountant"
    out = capsys.readouterr().out
    assert (
        "warning: measured cost falls as K grows (rows, baseline -> reuse, R = 2, K = 1 -> 2" in out
    )
    assert out.count("V_b = ") == 1
