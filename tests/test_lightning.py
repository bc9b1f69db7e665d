"""The text-to-3D job as a LightningModule under DDP: 2 CPU processes (gloo), a tiny run.

One Lightning run (``strategy="ddp_fork"``: the two ranks fork from this process, so nothing is
imported again) of 3 steps records on every rank, at every step, the cameras and timesteps it
drew, the base uniforms of its timestep strata, its own gradient before the all-reduce and the
gradient after it, and the accountant's pooled statistics. The checks:

- the ranks drew different cameras and timesteps, from different seeds derived from one;
- the gradient every rank steps with is the mean of the ranks' own gradients (2 views each),
  the same on both ranks, and the fields stay identical;
- the union of the ranks' timestep uniforms is one stratified design of all ``R K`` draws,
  exactly the one a single process draws from the shared seed;
- the accountant's statistics are pooled: both ranks hold the same components, built from
  both ranks' measurements, and choose the same ``K``;
- the metrics reach Lightning's logger.

A run resumed from a Lightning checkpoint in a fresh ``Trainer`` ends with the field, bit for
bit, of the uninterrupted run: in one process (with a learned proposal, global strata and an
outer design, whose streams all come back), and under DDP (the checkpoint written at step 2 of
the 2-process run, resumed for its last step).

The example script runs with 2 processes too (``strategy="ddp"``, as a user runs it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

pl = pytest.importorskip("pytorch_lightning")

from carv_pyro import Estimator  # noqa: E402
from carv_pyro.infer.distributed import SharedStrataSource  # noqa: E402
from carv_pyro.infer.samplers import RandomSource  # noqa: E402
from carv_pyro.integrations.lightning import (  # noqa: E402
    CHECKPOINT_KEY,
    STREAMS,
    TextTo3DModule,
    derive_seed,
)
from carv_pyro.pipelines.text_to_3d import TextTo3DConfig  # noqa: E402

from .seeds import seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD, R, K, STEPS = 2, 4, 2, 3
N = R * K  # timestep draws per step over both ranks

# global strata across the ranks; adapting K so that the pooled accountant decides something
ESTIMATOR = Estimator(
    K=K, proposal="weighted", stratify="global", adapt=True, k_range=(K, K), name="test"
)


def tiny_config(**changes) -> TextTo3DConfig:
    base = dict(
        prompt="torus",
        estimator=ESTIMATOR,
        R=R,
        steps=STEPS,
        resolution=6,
        seed=seed(11),
        eval_every=2,
        eval_views=2,
        eval_elevations_deg=(20.0,),
    )
    return TextTo3DConfig(**(base | changes))


class Recorder(pl.Callback):
    """Records every rank's draws and gradients, step by step, into ``rank{r}.pt``."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_start(self, trainer, module) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx:
            return
        # the module's on_train_start (after the callbacks') has built the per-rank parts
        loss, source = module.loss.inner, module.guide.source
        global_strata, own_step = source.global_strata, loss.loss_and_grads

        def strata(n, device="cpu"):
            u = global_strata(n, device)
            self._u = u.clone()
            return u

        def draws(_loss, records, model_trace, guide_trace):  # after the guide drew the strata
            self.steps.append(
                {
                    "azimuth": model_trace.nodes["azimuth"]["value"].detach().clone(),
                    "t": records[0].t.detach().clone(),
                    "K": records[0].n_inner,
                    "u": self._u,
                }
            )

        def step(*args, **kwargs):  # this rank's own gradient, before the all-reduce
            value = own_step(*args, **kwargs)
            self.steps[-1]["own_grad"] = self._grad(module)
            return value

        source.global_strata = strata
        loss.hooks.append(draws)
        loss.loss_and_grads = step

    @staticmethod
    def _grad(module) -> torch.Tensor:
        return torch.cat([p.grad.detach().reshape(-1).clone() for p in module.field.parameters()])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["grad"] = self._grad(module)
        self.steps[-1]["params"] = torch.cat(
            [p.detach().reshape(-1).clone() for p in module.field.parameters()]
        )

    def on_train_end(self, trainer, module) -> None:
        acc = module.loss.accountant
        torch.save(
            {
                "steps": self.steps,
                "seeds": module.seeds,
                "shard": len(self.steps[0]["azimuth"]),
                "components": acc.components.state(),
                "history": acc.history,
                "k_star": acc.k_star,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class FinalParams(pl.Callback):
    """Saves every rank's field after the run into ``final{r}.pt``."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, module) -> None:
        params = torch.cat([p.detach().reshape(-1).clone() for p in module.field.parameters()])
        torch.save(params, self.out / f"final{trainer.global_rank}.pt")


def checkpoint_at(out: Path, step: int) -> ModelCheckpoint:
    """Lightning's checkpoint callback, writing the state after ``step`` into ``out``."""
    return ModelCheckpoint(
        dirpath=out, filename="step{step}", every_n_train_steps=step, save_top_k=-1
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    module = TextTo3DModule(tiny_config(), measure_every=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp_fork",
        max_epochs=1,
        logger=pl.loggers.CSVLogger(out, name="", version=""),
        # a checkpoint after step 2 (collective: every rank adds its own state) for the resume
        callbacks=[Recorder(out), checkpoint_at(out / "checkpoints", 2)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return ranks, rows, out


def test_the_ranks_draw_different_cameras_and_timesteps_from_one_seed(ddp_run):
    ranks, _, _ = ddp_run
    a, b = ranks
    config = tiny_config()
    for r, rank in enumerate(ranks):
        for stream in ("cameras", "draws"):
            assert rank["seeds"][stream] == derive_seed(config.seed, stream, r)
    assert a["seeds"]["cameras"] != b["seeds"]["cameras"]
    assert a["seeds"]["draws"] != b["seeds"]["draws"]
    assert a["seeds"]["strata"] == b["seeds"]["strata"]  # the one shared stream
    assert a["shard"] == b["shard"] == R // WORLD
    for sa, sb in zip(a["steps"], b["steps"]):
        assert not torch.equal(sa["azimuth"], sb["azimuth"])
        assert not torch.equal(sa["t"], sb["t"])


def test_every_rank_steps_with_the_mean_of_the_ranks_gradients(ddp_run):
    ranks, _, _ = ddp_run
    for step in range(STEPS):
        own = [rank["steps"][step]["own_grad"] for rank in ranks]
        mean = torch.stack(own).mean(0)  # equal shards (2 views each): the plain mean
        assert not torch.allclose(own[0], own[1])  # different draws, different gradients
        for rank in ranks:
            torch.testing.assert_close(rank["steps"][step]["grad"], mean, rtol=1e-5, atol=1e-7)
        assert torch.equal(ranks[0]["steps"][step]["grad"], ranks[1]["steps"][step]["grad"])
        assert torch.equal(ranks[0]["steps"][step]["params"], ranks[1]["steps"][step]["params"])


def test_the_ranks_strata_are_one_global_design(ddp_run):
    ranks, _, _ = ddp_run
    shared = RandomSource(seed=ranks[0]["seeds"]["strata"])
    for step in range(STEPS):
        parts = [rank["steps"][step]["u"].reshape(-1) for rank in ranks]
        assert [p.numel() for p in parts] == [N // WORLD] * WORLD
        union = torch.cat(parts)  # rank order: the plate's order
        strata = torch.floor(union * N).long()
        assert sorted(strata.tolist()) == list(range(N))  # one draw in each of the R K strata
        # neither rank's half is a stratified design of its own: each holds some of the strata
        assert all(len(set(torch.floor(p * N).long().tolist())) == N // WORLD for p in parts)
        torch.testing.assert_close(union, shared.global_strata(N), rtol=0, atol=0)


def test_the_accountant_pools_both_ranks(ddp_run):
    ranks, _, _ = ddp_run
    a, b = ranks
    assert a["components"] == b["components"]
    assert a["k_star"] == b["k_star"] and math.isfinite(a["k_star"])
    # an adapting accountant measures from its second step on (the first tells it the plate's
    # size, so that it can probe K = 2)
    assert len(a["history"]) == STEPS - 1
    assert a["components"][0] == WORLD * (STEPS - 1)  # every rank's measurement of each step
    assert [s["K"] for s in a["steps"]] == [s["K"] for s in b["steps"]]


def test_metrics_reach_the_logger(ddp_run):
    _, rows, _ = ddp_run
    logged = {k for row in rows for k, v in row.items() if v != ""}
    for key in (
        "train/loss",
        "sds/ess",
        "sds/max_weight",
        "sds/K",
        "carv/k_star",
        "carv/v_between",
        "carv/v_within",
        "quality/iou",
        "quality/p",
    ):
        assert key in logged, f"{key} not logged: {sorted(logged)}"
    evaluated = [int(row["step"]) for row in rows if row.get("quality/iou")]
    assert evaluated == [2, 3]  # every eval_every steps and the last, each once


def test_a_ddp_run_resumed_from_its_checkpoint_continues_exactly(ddp_run):
    ranks, _, out = ddp_run
    (path,) = (out / "checkpoints").glob("step*2*.ckpt")
    saved = torch.load(path, weights_only=True)[CHECKPOINT_KEY]  # plain data: Lightning's load
    assert saved["step"] == 2 and len(saved["ranks"]) == WORLD
    resumed_out = out / "resumed"
    resumed_out.mkdir()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp_fork",
        max_epochs=1,
        logger=False,
        callbacks=[FinalParams(resumed_out)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TextTo3DModule(tiny_config(), measure_every=1), ckpt_path=path)
    for r, rank in enumerate(ranks):
        assert torch.equal(torch.load(resumed_out / f"final{r}.pt"), rank["steps"][-1]["params"])


# -- resuming, in one process --------------------------------------------------------------------

# every stream a step draws from: cameras, the guide's (t, eps), the global strata, the outer
# design of the cameras; a proposal that learns in the param store; an accountant that adapts
# (within k_range=(2, 2), so that what it decides does not hang on the times it measures)
RESUMED = Estimator(
    K=2,
    proposal="adaptive",
    stratify="global",
    outer="stratified",
    adapt=True,
    k_range=(2, 2),
    name="resumed",
)


def one_process(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def fields(module: TextTo3DModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.field.parameters()]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 4-step run checkpointed after step 2 (stopped there by ``max_steps``), and what its
    loss held then."""
    out = tmp_path_factory.mktemp("resume")
    module = TextTo3DModule(tiny_config(estimator=RESUMED, steps=4), measure_every=1)
    one_process(callbacks=[checkpoint_at(out, 2)], max_steps=2).fit(module)
    (path,) = out.glob("step*2*.ckpt")
    acc = module.loss.accountant
    held = {
        "history": list(acc.history),
        "components": acc.components.state(),
        "k": acc.k,
        "store": {k: v.clone() for k, v in module._store["params"].items()},
    }
    return path, held


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(interrupted):
    path, held = interrupted
    whole = TextTo3DModule(tiny_config(estimator=RESUMED, steps=4), measure_every=1)
    one_process(enable_checkpointing=False).fit(whole)
    resumed = TextTo3DModule(tiny_config(estimator=RESUMED, steps=4), measure_every=1)
    seen = {}

    class AtResume(pl.Callback):  # after the module's on_train_start restored its state
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not seen:
                acc = module.loss.accountant
                seen.update(batch=batch, history=list(acc.history), k=acc.k)
                seen.update(
                    components=acc.components.state(),
                    store={k: v.clone() for k, v in module._store["params"].items()},
                )

    trainer = one_process(enable_checkpointing=False, callbacks=[AtResume()])
    trainer.fit(resumed, ckpt_path=path)
    assert trainer.global_step == 4 and seen["batch"] == 2  # the epoch went on from step 2
    # the accountant and the learned proposal are the ones the interrupted run held
    assert seen["history"] == held["history"] and seen["k"] == held["k"]
    assert seen["components"] == held["components"]
    learned = {k for k in held["store"] if k.startswith("carv.adaptive")}
    assert learned and all(torch.equal(seen["store"][k], held["store"][k]) for k in learned)
    assert resumed.seeds == whole.seeds  # the streams go on; none is derived afresh
    assert all(torch.equal(a, b) for a, b in zip(fields(whole), fields(resumed)))
    # the measured variance components of the resumed steps are the uninterrupted run's too
    # (its costs are times, measured anew)
    pick = ("step", "v_between", "v_within", "K")
    assert [{k: h[k] for k in pick} for h in whole.loss.accountant.history] == [
        {k: h[k] for k in pick} for h in resumed.loss.accountant.history
    ]


def test_a_checkpoint_that_cannot_continue_restores_the_field_with_a_warning(interrupted, tmp_path):
    path, _ = interrupted
    state = torch.load(path, weights_only=True)
    reference = None
    for name, change in (
        ("no carv-pyro state", lambda s: s.pop(CHECKPOINT_KEY)),
        ("from 2 processes", lambda s: s[CHECKPOINT_KEY]["ranks"].append(None)),
    ):
        edited = {**state, CHECKPOINT_KEY: dict(state[CHECKPOINT_KEY])}
        edited[CHECKPOINT_KEY]["ranks"] = list(edited[CHECKPOINT_KEY]["ranks"])
        change(edited)
        file = tmp_path / "edited.ckpt"
        torch.save(edited, file)
        module = TextTo3DModule(tiny_config(estimator=RESUMED, steps=3), measure_every=1)
        with pytest.warns(UserWarning, match="derived afresh from step 2"):
            one_process(enable_checkpointing=False).fit(module, ckpt_path=file)
        assert module.seeds["cameras"] == derive_seed(tiny_config().seed, "cameras", 0, 2)
        # started afresh: its one step told it the plate's size and measured nothing yet (a
        # restored accountant would hold the measurement made before the checkpoint)
        assert len(module.loss.accountant.history) == 0
        reference = reference or fields(module)
        assert all(torch.equal(a, b) for a, b in zip(reference, fields(module))), name
    # and those fresh streams are not the ones the uninterrupted run goes on with
    whole = TextTo3DModule(tiny_config(estimator=RESUMED, steps=3), measure_every=1)
    one_process(enable_checkpointing=False).fit(whole)
    assert not all(torch.equal(a, b) for a, b in zip(reference, fields(whole)))


# -- the parts, in one process ------------------------------------------------------------------


def test_derive_seed_gives_every_rank_stream_and_step_its_own_seed():
    seeds = {
        (stream, rank, step): derive_seed(seed(3), stream, rank, step)
        for stream in STREAMS
        for rank in (None, 0, 1, 7)
        for step in (0, 100)
    }
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert derive_seed(seed(3), "cameras", 1) == seeds[("cameras", 1, 0)]  # deterministic


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"seed": -1}, "seed"),
        ({"seed": None}, "seed"),
        ({"stream": "camera"}, "stream"),
        ({"rank": -1}, "rank"),
        ({"step": 1.5}, "step"),
    ],
)
def test_derive_seed_refuses_bad_input(kwargs, name):
    args = {"seed": 0, "stream": "cameras", "rank": 0, "step": 0} | kwargs
    with pytest.raises(ValueError, match=name):
        derive_seed(**args)


def test_shared_strata_source_in_one_process_is_the_global_design():
    source = SharedStrataSource(seed(1), seed(2))
    torch.testing.assert_close(
        source.global_strata(12), RandomSource(seed=seed(2)).global_strata(12), rtol=0, atol=0
    )
    state = source.get_state()
    first = source.global_strata(5)
    source.set_state(state)
    assert torch.equal(source.global_strata(5), first)
    with pytest.raises(ValueError, match="shared_seed"):
        SharedStrataSource(seed(1), seed(1))
    with pytest.raises(ValueError, match="shared_seed"):
        SharedStrataSource(seed(1), None)


def test_the_module_refuses_bad_input_before_any_work():
    with pytest.raises(TypeError, match="config"):
        TextTo3DModule({"prompt": "torus"})
    with pytest.raises(ValueError, match="measure_every"):
        TextTo3DModule(tiny_config(), measure_every=0)
    with pytest.raises(ValueError, match="measure_every"):
        TextTo3DModule(tiny_config(), measure_every=None)  # the estimator adapts K
    with pytest.raises(TypeError, match="scene"):
        TextTo3DModule(tiny_config(), scene="torus")


def test_importing_carv_pyro_does_not_import_lightning():
    code = (
        "import sys, carv_pyro, carv_pyro.integrations; "
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow  # two fresh interpreters import torch, pyro and Lightning
def test_the_example_runs_with_two_processes(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "lightning_sds.py"),
        "--devices",
        "2",
        "--steps",
        "2",
        "--resolution",
        "6",
        "--eval-every",
        "2",
        "--measure-every",
        "1",
        "--no-pictures",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert "iou" in summary["final_quality"]
    seeds = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
    assert len(seeds) == 2 and seeds[0].split(":", 1)[1] != seeds[1].split(":", 1)[1]
