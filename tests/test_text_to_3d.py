"""The text-to-3D pipeline: scene -> SDS Pyro model, SVI, quality, dream, checkpoints, race.

Most tests use a tiny random diffusers teacher and classifier at tiny sizes (a 6^3 field, 8
samples per ray), so they run in seconds; the quality tests use the embedded shapes teacher.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pyro
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

import carv_pyro as carv
from carv_pyro.classifier import DigitClassifier
from carv_pyro.pipelines.base import RunFolderError
from carv_pyro.pipelines.render import VoxelField
from carv_pyro.pipelines.text_to_3d import (
    TextTo3DConfig,
    dream,
    eval_cameras,
    make_model,
    make_scene,
    quality,
    race,
    save_race_plot,
    time_to_target,
)
from carv_pyro.teachers import DiffusersTeacher
from carv_pyro.teachers.shapes import SHAPES_TEACHER_DIR

from .seeds import seed

HAVE_SHAPES = (SHAPES_TEACHER_DIR / "unet").is_dir()
TINY = dict(resolution=6, eval_views=2, eval_elevations_deg=(10.0,))


def tiny_teacher() -> DiffusersTeacher:
    """A random class-conditional 1x16x16 UNet (labels 0-9, null class 10), 100 steps."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=16,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=11,
        )
    return DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=100))


def tiny_classifier() -> DigitClassifier:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DigitClassifier(width=2, num_features=8).eval()


def tiny_scene(prompt: str = "3"):
    scene = make_scene(tiny_teacher(), prompt, classifier=tiny_classifier())
    scene.render_kwargs["n_samples"] = 8
    return scene


def tiny_config(**overrides) -> TextTo3DConfig:
    kw = dict(
        prompt="3",
        teacher="digits",
        steps=4,
        R=2,
        eval_every=2,
        estimator=carv.Estimator.preset("carv", K=4),
        **TINY,
    )
    kw.update(overrides)
    return TextTo3DConfig(**kw)


def _field_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path / "checkpoint.pt", weights_only=False)
    return {k: v for k, v in state["param_store"]["params"].items() if k.startswith("field")}


# -- the model ------------------------------------------------------------------------------


def test_model_sites_shapes_and_params():
    scene = tiny_scene()
    field = VoxelField(6, 1, seed=seed(0))
    sds = carv.SDS(scene.teacher, guidance_scale=2.0)
    model = make_model(field, scene, sds, R=3, K=4, generator=torch.Generator().manual_seed(1))
    trace = poutine.trace(model).get_trace()
    assert trace.nodes["azimuth"]["value"].shape == (3, 1)
    assert trace.nodes["elevation"]["value"].shape == (3, 1)
    assert trace.nodes["sds.t"]["value"].shape == (3, 4)
    assert trace.nodes["sds.eps"]["value"].shape == (3, 4, 1, 16, 16)
    record = trace.nodes["sds"]["infer"]["carv_term"]
    assert record.layout.reserved and record.layout.inner_plate == "draws"
    params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
    assert any(n.startswith("field$$$") for n in params)


@pytest.mark.parametrize("name", sorted(carv.PRESETS))
def test_every_preset_moves_the_field(name):
    scene = tiny_scene()
    field = VoxelField(6, 1, seed=seed(0))
    sds = carv.SDS(scene.teacher, guidance_scale=2.0)
    model = make_model(field, scene, sds, R=2, K=2, generator=torch.Generator().manual_seed(2))
    estimator = carv.Estimator.preset(name)
    before = field.density_logits.detach().clone()
    svi = SVI(
        model, estimator.guide(model, seed=seed(3)), pyro.optim.Adam({"lr": 0.1}), estimator.loss()
    )
    for _ in range(2):
        assert torch.isfinite(torch.tensor(svi.step()))
    assert not torch.equal(before, field.density_logits.detach())


def test_a_user_guide_can_propose_the_cameras():
    scene = tiny_scene()
    field = VoxelField(6, 1, seed=seed(0))
    sds = carv.SDS(scene.teacher)
    model = make_model(field, scene, sds, R=2, K=2, generator=torch.Generator().manual_seed(4))
    upstream = AutoNormal(poutine.block(model, hide=["sds.t", "sds.eps", "sds"]), init_scale=1.0)
    guide = carv.Estimator.preset("carv", K=2).guide(model, upstream=upstream, seed=seed(5))
    loss = carv.CARVLoss()
    loss.loss_and_grads(model, guide)
    assert torch.isfinite(field.density_logits.grad).all()
    assert loss.diagnostics["sds"].min_weight < loss.diagnostics["sds"].max_weight


# -- config, cameras, quality ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps"),
        (dict(R=-1), "R must"),
        (dict(lr=0.0), "lr"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(t_range=(0.5, 0.2)), "t_range"),
        (dict(azimuth_deg=(0, 400)), "azimuth_deg"),
        (dict(estimator="fast"), "unknown estimator"),
        (dict(weighting="dreamfusion2"), "weighting"),
        (dict(dtype="float8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(seed=-1), "seed"),
        (dict(eval_elevations_deg=(100.0,)), "eval_elevations_deg"),
    ],
)
def test_config_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_config_round_trips_through_json():
    config = tiny_config(azimuth_deg=(-90.0, 90.0))
    back = TextTo3DConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert TextTo3DConfig.from_dict(TextTo3DConfig().to_dict()).estimator.name == "auto"
    with pytest.raises(ValueError, match="unknown TextTo3DConfig fields"):
        TextTo3DConfig.from_dict({"prompt": "torus", "K": 4})


def test_eval_cameras_cover_the_full_circle_evenly():
    az, el = eval_cameras(4, (0.0, 30.0))
    assert az.shape == el.shape == (8,)
    deg = torch.rad2deg(az[:4])
    torch.testing.assert_close(deg, torch.tensor([-135.0, -45.0, 45.0, 135.0], dtype=torch.float64))
    assert torch.allclose(
        torch.rad2deg(el), torch.tensor([0.0] * 4 + [30.0] * 4, dtype=torch.float64)
    )


@pytest.mark.skipif(not HAVE_SHAPES, reason="the shapes teacher is not built")
def test_quality_of_the_true_shape_is_perfect_and_of_a_blob_is_not():
    from carv_pyro.pipelines.shapes import shape_field

    scene = make_scene("shapes", "torus")
    true = quality(shape_field("torus", 32), scene, n_views=4)
    assert true["iou_hard"] == 1.0 and true["p"] > 0.5
    blob = quality(VoxelField(32, 1, seed=0), scene, n_views=4)
    assert blob["iou"] < 0.5 * true["iou"] and blob["iou_hard"] < 0.2
    other = quality(shape_field("cube", 32), scene, n_views=4)
    assert other["iou"] < true["iou"] and other["p"] < true["p"]


# -- dream ----------------------------------------------------------------------------------


def test_dream_writes_pictures_summary_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    summary = dream(tiny_config(), out, progress=False, scene=tiny_scene())
    assert [h["step"] for h in summary["history"]] == [0, 2, 4]
    assert {"p", "accuracy"} <= set(summary["final_quality"])
    for name in ("turntable.png", "curves.png", "summary.json", "checkpoint.pt", "carv-run.json"):
        assert (out / name).is_file(), name
    image = matplotlib.image.imread(out / "turntable.png")
    assert image.shape[0] >= 160 and image.shape[1] >= 8 * 128
    assert json.loads((out / "carv-run.json").read_text())["state"] == "finished"
    # a finished folder is never overwritten without resume or overwrite, and nothing changes
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="finished 'dream' run.*--resume.*--overwrite"):
        dream(tiny_config(), out, progress=False, scene=tiny_scene())
    assert (out / "checkpoint.pt").read_bytes() == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        dream(tiny_config(), tmp_path / "foreign", progress=False, scene=tiny_scene())
    dream(tiny_config(steps=2), out, progress=False, scene=tiny_scene(), overwrite=True)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    with pytest.raises(ValueError, match="past steps=1"):
        dream(tiny_config(steps=1), out, progress=False, scene=tiny_scene(), resume=True)
    with pytest.raises(ValueError, match="(?s)cannot resume.*lr"):
        dream(tiny_config(steps=4, lr=0.5), out, progress=False, scene=tiny_scene(), resume=True)


@pytest.mark.parametrize("estimator", ["carv", "baseline", "carv+cv"])
def test_resume_equals_an_uninterrupted_run(tmp_path, estimator):
    if estimator == "carv+cv":  # the fit of SDS's eps control variate is resumed too
        est = carv.Estimator.preset("carv", K=4).replace(control_variates=True)
    else:
        est = carv.Estimator.preset(estimator, **({} if estimator == "baseline" else {"K": 4}))
    whole = dream(
        tiny_config(estimator=est, steps=6), tmp_path / "a", progress=False, scene=tiny_scene()
    )
    dream(tiny_config(estimator=est, steps=3), tmp_path / "b", progress=False, scene=tiny_scene())
    resumed = dream(
        tiny_config(estimator=est, steps=6),
        tmp_path / "b",
        progress=False,
        scene=tiny_scene(),
        resume=True,
    )
    assert resumed["resumed_from"] == 3
    a, b = _field_state(tmp_path / "a"), _field_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the first run also evaluated where it ended (step 3); every regular evaluation is shared
    assert {h["step"] for h in whole["history"]} <= {h["step"] for h in resumed["history"]}


_CHILD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_text_to_3d import tiny_config, tiny_scene
from carv_pyro.pipelines.base import RunStopped
from carv_pyro.pipelines.text_to_3d import dream
try:
    dream(tiny_config(steps={steps}), {out!r}, progress=False, scene=tiny_scene())
except RunStopped as err:
    print(err, file=sys.stderr)
    sys.exit(err.exit_code)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_checkpoints_and_resume_is_bit_identical(tmp_path, sig):
    """A real subprocess is signalled while it trains; whatever step the signal lands in, the
    step finishes, is checkpointed, and the resumed run equals an uninterrupted one."""
    steps = 400
    out = tmp_path / "stopped"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(root=root, steps=steps, out=str(out))],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = out / "carv-run.json"
    deadline = time.monotonic() + 60
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # some steps in
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name} after step" in err and "--resume" in err
    assert "Traceback" not in err
    done = torch.load(out / "checkpoint.pt", weights_only=False)["loop"]["step"]
    assert 0 < done < steps
    target = done + 2
    dream(tiny_config(steps=target), out, progress=False, scene=tiny_scene(), resume=True)
    dream(tiny_config(steps=target), tmp_path / "whole", progress=False, scene=tiny_scene())
    a, b = _field_state(out), _field_state(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not HAVE_SHAPES, reason="the shapes teacher is not built")
@pytest.mark.parametrize(
    "spec,start,teacher_sizes", [("auto", 4, {"4"}), ("auto:K=1", 1, {"1", "2"})]
)
def test_dream_summary_says_what_auto_measured_and_chose(tmp_path, spec, start, teacher_sizes):
    est = carv.Estimator.from_spec(spec)
    summary = dream(tiny_config(estimator=est), tmp_path / "a", progress=False, scene=tiny_scene())
    acc = summary["accounting"]
    # the first step runs plain (the plate's size is not known before it), the second measures:
    # V_w from its own inner halves at K = 4, by probing K = 2 at K = 1
    first = acc["measurements"][0]
    assert first["step"] == 1 and math.isfinite(first["v_within"]), first
    assert {"v_between", "v_within", "c_outer", "c_inner", "K"} <= set(first)
    assert set(acc["teacher_costs_s"]) == teacher_sizes and str(start) in acc["step_costs_s"]
    assert summary["K"]["first"] == start
    if start == 1:
        assert summary["K"]["steps_at"]["2"] >= 1


def test_dream_carves_a_shape_that_beats_its_start_with_the_shapes_teacher(tmp_path):
    config = TextTo3DConfig(prompt="cube", steps=40, eval_every=20, estimator="carv", seed=seed(0))
    summary = dream(config, tmp_path / "cube", progress=False)
    first, last = summary["initial_quality"], summary["final_quality"]
    assert last["iou"] > first["iou"] + 0.05, (first, last)


# -- the race -------------------------------------------------------------------------------


def test_time_to_target_interpolates_the_first_crossing():
    curve = [[0.0, 0, 0.1, None], [10.0, 5, 0.3, None], [20.0, 9, 0.7, None], [30.0, 12, 0.5, None]]
    assert time_to_target(curve, 0.5) == pytest.approx(15.0)
    assert time_to_target(curve, 0.05) == 0.0
    assert time_to_target(curve, 0.9) is None


def test_race_writes_curves_target_and_ratios(tmp_path, monkeypatch):
    base = tiny_config(estimator="baseline")
    race_module = sys.modules["carv_pyro.pipelines.text_to_3d.race"]

    monkeypatch.setattr(race_module, "make_scene", lambda *a, **k: tiny_scene())
    real_dream = race_module.dream
    monkeypatch.setattr(
        race_module, "dream", lambda *a, **k: real_dream(*a, **{**k, "scene": tiny_scene()})
    )
    results = race(
        "3",
        tmp_path / "race",
        estimators=["baseline", "carv"],
        seeds=2,
        budget_s=1.0,
        base=base,
        progress=False,
    )
    assert results["target"]["metric"] == "p"
    for name in ("baseline", "carv"):
        entry = results["estimators"][name]
        assert [run["seed"] for run in entry["seeds"]] == [100, 101]
        for run in entry["seeds"]:
            assert run["curve"][0][:2] == [0.0, 0] and all(len(row) == 4 for row in run["curve"])
            assert run["curve"][-1][0] >= 1.0  # the budget was spent
            want_k = 1 if name == "baseline" else 8
            assert run["K"]["first"] == run["K"]["last"] == want_k
            assert run["K"]["steps_at"] == {str(want_k): run["steps"]} and run["steps"] > 0
            assert run["accounting"] is None  # neither preset adapts: no accountant
        assert len(entry["time_to_target_s"]) == 2
        assert set(entry["ratio_to_baseline"]) == {"median", "ci95"}
    on_disk = json.loads((tmp_path / "race" / "race.json").read_text())
    assert on_disk["target"] == results["target"]
    path = save_race_plot(results, tmp_path / "race.png")
    assert matplotlib.image.imread(path).shape[1] >= 1000
    with pytest.raises(RunFolderError):
        race("3", tmp_path / "race", estimators=["baseline"], seeds=1, budget_s=1.0, base=base)


def _strict_json(text: str):
    """``json.loads`` that rejects Python's ``Infinity`` and ``NaN``, as strict readers do."""

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def _censored_race(tmp_path) -> dict:
    """Race results, scored, where ``carv`` never reaches the target (an infinite ratio) and
    ``reuse`` reaches it only on seeds where the baseline does not (an undefined bound)."""
    from carv_pyro.pipelines.text_to_3d.race import _score

    def run(seed, finals):
        return {"seed": seed, "curve": [[0.0, 0, 0.1, None], [1.0, 5, finals, None]]}

    results = {
        "prompt": "torus",
        "device": "cpu",
        "budget_s": 1.0,
        "seeds": [0, 1],
        "estimators": {
            "baseline": {"lr": 0.3, "seeds": [run(0, 0.5), run(1, 0.7)]},
            "carv": {"lr": 0.3, "seeds": [run(0, 0.2), run(1, 0.3)]},
            "reuse": {"lr": 0.3, "seeds": [run(0, 0.9), run(1, 0.2)]},
        },
    }
    _score(results, "baseline", "iou")
    return results


def test_race_json_is_strict_json_with_null_for_infinite_ratios(tmp_path):
    """A censored race once wrote ``Infinity`` into race.json (``default=`` is never called for
    floats), which ``jq`` and browsers reject."""
    from carv_pyro.pipelines.text_to_3d import save_race_json

    results = _censored_race(tmp_path)
    assert math.isinf(results["estimators"]["carv"]["ratio_to_baseline"]["median"])
    save_race_json(results, tmp_path / "race.json")  # what race() writes as race.json
    on_disk = _strict_json((tmp_path / "race.json").read_text())
    carv_ratio = on_disk["estimators"]["carv"]["ratio_to_baseline"]
    assert carv_ratio == {"median": None, "ci95": [None, None]}
    assert on_disk["estimators"]["carv"]["time_to_target_s"] == [None, None]
    assert on_disk["estimators"]["baseline"]["ratio_to_baseline"]["median"] == 1.0
    assert on_disk["target"] == results["target"]
    # the in-memory results keep the infinities for the plot and the printed lines
    assert math.isinf(results["estimators"]["carv"]["ratio_to_baseline"]["median"])
    save_race_plot(results, tmp_path / "race.png")
    save_race_plot(on_disk, tmp_path / "race_from_json.png")


def test_race_legend_says_when_the_median_seed_never_arrived(tmp_path):
    """The legend once read "infx the baseline's time [inf, inf]" (and "n/ax" from JSON)."""
    from carv_pyro.pipelines.text_to_3d import save_race_json
    from carv_pyro.pipelines.text_to_3d.race import _legend_label

    results = _censored_race(tmp_path)
    on_disk = _strict_json(Path(save_race_json(results, tmp_path / "race.json")).read_text())
    for source in (results, on_disk):
        label = _legend_label("carv", source["estimators"]["carv"])
        assert label == "carv: its median seed did not reach the target"
        label = _legend_label("baseline", source["estimators"]["baseline"])
        assert label == "baseline: 1.00x the baseline's time [1.00, 1.00]"


def test_race_median_time_is_the_time_by_which_half_the_seeds_arrived():
    """Even seed counts: the lower middle (the baseline's own median seed is often censored)."""
    from carv_pyro.pipelines.text_to_3d.race import _median_time, _ratio

    assert _median_time([3.0, None]) == 3.0
    assert _median_time([1.0, 2.0, None]) == 2.0
    assert _median_time([None, None]) == math.inf
    assert _ratio([2.0, 4.0], [4.0, None]) == 0.5
    assert math.isnan(_ratio([None, None], [None, None]))


def test_compile_goes_from_the_config_to_the_loaded_teacher(monkeypatch):
    """``TextTo3DConfig(compile=...)`` is validated, round-trips, may differ on resume, and
    `make_scene` hands it to the teacher it loads as ``compile=``."""
    from carv_pyro import teachers

    config = tiny_config(compile="reduce-overhead")
    assert config.teacher_compile == {"mode": "reduce-overhead"}
    assert tiny_config(compile="default").teacher_compile is True
    assert tiny_config().teacher_compile is False
    assert TextTo3DConfig.from_dict(config.to_dict()) == config
    tiny_config().resumable_from(config)  # speed only: allowed
    old = config.to_dict()
    del old["compile"]  # a checkpoint written before the option
    assert TextTo3DConfig.from_dict(old).compile is None
    with pytest.raises(ValueError, match="compile"):
        tiny_config(compile="fast")
    with pytest.raises(ValueError, match="compile"):
        make_scene(tiny_teacher(), "3", compile=True)  # an object is used as it is
    calls = []

    def fake_load_default(**kwargs):
        calls.append(kwargs)
        return tiny_teacher()

    monkeypatch.setattr(teachers, "load_default", fake_load_default)
    make_scene("digits", "3", compile=config.teacher_compile, classifier=tiny_classifier())
    assert calls and calls[0]["compile"] == {"mode": "reduce-overhead"}


def test_a_compiled_teacher_gives_the_eager_gradient_on_the_cpu():
    """The compiled path through the teacher (``backend="aot_eager"``: the graph capture
    without inductor's code generation) inside a CARV step gives eager's gradient."""
    import pyro

    grads = []
    for compile in (False, {"backend": "aot_eager"}):
        base = tiny_teacher()
        teacher = DiffusersTeacher(base.unet, base.scheduler, compile=compile)
        objective = carv.SDS(teacher, guidance_scale=2.0)

        def model(objective=objective):
            x = pyro.param("x", torch.zeros(2, 1, 1, 16, 16))
            with pyro.plate("views", 2, dim=-2), carv.draws(3, dim=-1):
                carv.teacher_term("sds", objective, x, cond=3)

        pyro.clear_param_store()
        guide = carv.Estimator.preset("carv", K=3).guide(model, seed=1)
        carv.CARVLoss().loss_and_grads(model, guide)
        grads.append(pyro.param("x").unconstrained().grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
