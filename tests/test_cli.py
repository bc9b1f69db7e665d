"""The ``carv-pyro`` command: arguments checked before any work, and tiny dream and race runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import carv_pyro as carv
from carv_pyro import cli
from carv_pyro.pipelines import text_to_3d

from .test_text_to_3d import TINY, tiny_scene


def _error(capsys, argv: list[str]) -> str:
    """Run the command expecting a usage error; return its stderr."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as running a dream or a race."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the pipeline ran although the arguments were bad")

    monkeypatch.setattr(text_to_3d, "dream", forbidden)
    monkeypatch.setattr(text_to_3d, "race", forbidden)
    monkeypatch.setattr(text_to_3d, "make_scene", forbidden)


def test_the_cli_names_every_preset_of_the_one_table():
    assert cli.ESTIMATOR_NAMES == tuple(carv.PRESETS)


def test_help_lists_every_prompt_of_the_shapes_teacher(capsys):
    """README: ``carv-pyro dream --help`` lists the prompts (it once ended them with "...")."""
    from carv_pyro.pipelines.shapes import SHAPE_CLASSES

    assert cli.SHAPE_NAMES == SHAPE_CLASSES
    for command in ("dream", "race"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert ", ".join(SHAPE_CLASSES) in text, command


def test_help_imports_neither_torch_nor_pyro():
    code = (
        "import sys\nfrom carv_pyro import cli\ntry:\n    cli.main(['dream', '--help'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'pyro' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_unknown_prompt_names_the_prompt_and_the_classes(capsys, tmp_path, no_work):
    err = _error(capsys, ["dream", "dragon", "--out", str(tmp_path / "x")])
    assert "'dragon'" in err and "torus" in err and "sphere" in err
    err = _error(capsys, ["dream", "twelve", "--teacher", "digits", "--out", str(tmp_path / "y")])
    assert "'twelve'" in err and "digit" in err


@pytest.mark.parametrize("flag", ["--steps", "--R", "--K", "--resolution"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_non_positive_sizes_name_the_flag(capsys, tmp_path, no_work, flag, value):
    err = _error(capsys, ["dream", "torus", "--out", str(tmp_path / "r"), flag, value])
    assert flag in err


@pytest.mark.parametrize("flag", ["--lr", "--guidance-scale"])
def test_non_positive_rates_name_the_flag(capsys, tmp_path, no_work, flag):
    err = _error(capsys, ["dream", "torus", "--out", str(tmp_path / "r"), flag, "-1"])
    assert flag in err


def test_bad_estimator_teacher_device_and_dtype(capsys, tmp_path, no_work):
    out = str(tmp_path / "r")
    err = _error(capsys, ["dream", "torus", "--out", out, "--estimator", "fast"])
    assert "--estimator" in err and "auto" in err
    err = _error(capsys, ["dream", "torus", "--out", out, "--estimator", "baseline", "--K", "8"])
    assert "K = 1" in err and "reuse" in err
    err = _error(capsys, ["dream", "torus", "--out", out, "--teacher", str(tmp_path)])
    assert "--teacher" in err and "unet/" in err
    err = _error(capsys, ["dream", "torus", "--out", out, "--device", "cuda:0"])
    assert "--device" in err
    err = _error(capsys, ["dream", "torus", "--out", out, "--dtype", "float8"])
    assert "--dtype" in err
    err = _error(capsys, ["dream", "torus", "--out", out, "--resume", "--overwrite"])
    assert "not allowed with" in err


def test_a_teacher_folder_that_is_no_diffusers_model_is_refused_before_any_work(
    capsys, tmp_path, no_work
):
    """A folder with unet/ once passed the check and failed with a traceback once the run had
    started (no config, an unknown UNet class, no weights); a digits-style folder took a shape
    prompt the same way."""
    import json as _json

    from .test_text_to_3d import tiny_teacher

    out = ["--out", str(tmp_path / "r")]
    folder = tmp_path / "t"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    for command in ("dream", "race"):
        err = _error(capsys, [command, "3", *out, "--teacher", str(folder)])
        assert "--teacher" in err and "unet/config.json" in err
    (folder / "unet" / "config.json").write_text(_json.dumps({"_class_name": "Transformer"}))
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    err = _error(capsys, ["dream", "3", *out, "--teacher", str(folder)])
    assert "--teacher" in err and "'Transformer'" in err and "UNet2DModel" in err
    (folder / "unet" / "config.json").write_text(_json.dumps({"_class_name": "UNet2DModel"}))
    err = _error(capsys, ["dream", "3", *out, "--teacher", str(folder)])
    assert "--teacher" in err and "weights" in err
    err = _error(capsys, ["dream", "3", *out, "--teacher", str(tmp_path / "none")])
    assert "--teacher" in err and "not a folder" in err

    digits = tmp_path / "digits"
    tiny_teacher().save_pretrained(digits)  # no shapes_teacher.json: a digits-style teacher
    for command in ("dream", "race"):
        err = _error(capsys, [command, "cube", *out, "--teacher", str(digits)])
        assert "prompt" in err and "'cube'" in err and "digit" in err


def test_output_folders_are_checked_before_any_work(capsys, tmp_path, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _error(capsys, ["dream", "torus", "--out", str(blocker / "run")])
    assert "--out" in err
    err = _error(capsys, ["dream", "torus", "--out", str(tmp_path / "none"), "--resume"])
    assert "nothing to resume" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    err = _error(capsys, ["dream", "torus", "--out", str(tmp_path / "busy")])
    assert "not empty" in err and "--overwrite" in err


def test_missing_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_race_arguments(capsys, tmp_path, no_work):
    out = ["--out", str(tmp_path / "race")]
    err = _error(capsys, ["race", "torus", *out, "--estimators", "baseline,fast"])
    assert "'fast'" in err
    err = _error(capsys, ["race", "torus", *out, "--estimators", "baseline,baseline"])
    assert "distinct" in err
    err = _error(capsys, ["race", "torus", *out, "--estimators", "baseline", "--lrs", "auto=0.1"])
    assert "--lrs" in err and "'auto'" in err
    err = _error(capsys, ["race", "torus", *out, "--lrs", "baseline=-1"])
    assert "--lrs" in err
    err = _error(capsys, ["race", "torus", *out, "--budget-s", "0"])
    assert "--budget-s" in err
    err = _error(capsys, ["race", "torus", *out, "--estimators", "baseline,auto:K=zero"])
    assert "--estimators" in err and "'auto:K=zero'" in err and "integer" in err
    err = _error(capsys, ["race", "torus", *out, "--estimators", "auto,auto:K=4", "--lrs", "x=1"])
    assert "--lrs" in err and "['auto', 'auto:K=4']" in err
    err = _error(capsys, ["race", "torus", *out, "--estimators", "baseline,auto:K=4", "--K", "8"])
    assert "sets K itself" in err and "--K" in err


def test_bench_arguments_are_parsed_in_cli(capsys):
    args = cli.build_parser().parse_args(
        ["bench", "--pipeline", "distillation", "--quick", "--seed", "3", "--repeats", "7"]
    )
    assert (args.pipeline, args.quick, args.seed, args.repeats) == ("distillation", True, 3, 7)
    err = _error(capsys, ["bench", "--pipeline", "text-to-3d", "--pretrain-steps", "5"])
    assert "--pretrain-steps" in err and "distillation" in err


def test_dream_command_runs_resumes_and_refuses_a_finished_folder(capsys, tmp_path, monkeypatch):
    real_dream = text_to_3d.dream

    def tiny_dream(config, out_dir, **kwargs):
        config = text_to_3d.TextTo3DConfig.from_dict({**config.to_dict(), **TINY})
        return real_dream(config, out_dir, scene=tiny_scene(), **kwargs)

    monkeypatch.setattr(text_to_3d, "dream", tiny_dream)
    out = tmp_path / "run"
    argv = ["dream", "three", "--teacher", "digits", "--out", str(out), "--steps", "2"]
    assert (
        cli.main([*argv, "--estimator", "baseline", "--R", "2", "--quiet", "--eval-every", "1"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "dream 'three' [baseline, R=2, K=1" in printed and "2 steps" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"] == "baseline" and summary["steps"] == 2
    assert [h["step"] for h in summary["history"]] == [0, 1, 2]

    # a finished folder is not overwritten without --resume or --overwrite
    err = _error(capsys, argv)
    assert "finished" in err and "--resume" in err
    # --resume reuses the checkpoint's settings; only --steps changes
    resume = ["dream", "three", "--teacher", "digits", "--out", str(out), "--resume", "--quiet"]
    assert cli.main([*resume, "--steps", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 3
    err = _error(capsys, [*resume, "--steps", "4", "--lr", "0.5"])
    assert "lr" in err


def test_resume_checks_steps_and_keeps_a_finished_run(capsys, tmp_path, monkeypatch):
    """--resume --steps below the checkpoint's step once ended in a traceback after loading the
    teacher; --resume of a finished run rewrote its files (and said it was resumed)."""
    real_dream = text_to_3d.dream
    calls = []

    def tiny_dream(config, out_dir, **kwargs):
        calls.append(config.steps)
        config = text_to_3d.TextTo3DConfig.from_dict({**config.to_dict(), **TINY})
        return real_dream(config, out_dir, scene=tiny_scene(), **kwargs)

    monkeypatch.setattr(text_to_3d, "dream", tiny_dream)
    out = tmp_path / "run"
    argv = ["dream", "three", "--teacher", "digits", "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--steps", "3", "--estimator", "baseline", "--R", "2"]) == 0
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    err = _error(capsys, [*argv, "--resume", "--steps", "2"])
    assert "--steps" in err and "step 3" in err
    assert cli.main([*argv, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main([*argv, "--resume", "--steps", "3"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert calls == [3]
    assert cli.main([*argv, "--resume", "--steps", "4"]) == 0  # more steps: it continues
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 3
    err = _error(capsys, ["dream", "four", "--teacher", "digits", "--out", str(out), "--resume"])
    assert "prompt" in err


def test_race_quick_writes_json_and_plot(capsys, tmp_path, monkeypatch):
    race_module = sys.modules["carv_pyro.pipelines.text_to_3d.race"]
    monkeypatch.setattr(race_module, "make_scene", lambda *a, **k: tiny_scene())
    real_dream = race_module.dream
    monkeypatch.setattr(
        race_module, "dream", lambda *a, **k: real_dream(*a, **{**k, "scene": tiny_scene()})
    )
    js, png = tmp_path / "race.json", tmp_path / "race.png"
    argv = ["race", "3", "--teacher", "digits", "--quick", "--seeds", "2", "--budget-s", "1"]
    argv += ["--estimators", "baseline,auto,auto:K=2:outer=none", "--out", str(tmp_path / "r")]
    argv += ["--lrs", "auto:K=2:outer=none=0.2", "--quiet"]
    assert cli.main([*argv, "--json", str(js), "--plot", str(png)]) == 0
    results = json.loads(js.read_text())
    assert list(results["estimators"]) == ["baseline", "auto", "auto:K=2:outer=none"]
    variant = results["estimators"]["auto:K=2:outer=none"]
    assert variant["lr"] == 0.2 and variant["settings"]["outer"] is None
    assert variant["settings"]["K"] == 2 and variant["settings"]["adapt"]
    assert (tmp_path / "r" / "auto+K=2+outer=none_seed100").is_dir()
    assert results["target"]["metric"] == "p" and png.stat().st_size > 10_000
    assert "time to target" in capsys.readouterr().out


def test_race_json_is_strict_json_when_a_ratio_is_infinite(capsys, tmp_path, monkeypatch):
    """--json once wrote ``Infinity`` where an estimator's median seed missed the target."""
    from .test_text_to_3d import _censored_race, _strict_json

    results = _censored_race(tmp_path)
    monkeypatch.setattr(text_to_3d, "make_scene", lambda *a, **k: tiny_scene())
    monkeypatch.setattr(text_to_3d, "race", lambda *a, **k: results)
    js, png = tmp_path / "race.json", tmp_path / "race.png"
    argv = ["race", "3", "--teacher", "digits", "--estimators", "baseline,carv,reuse"]
    argv += ["--out", str(tmp_path / "r"), "--quiet", "--json", str(js), "--plot", str(png)]
    assert cli.main(argv) == 0
    on_disk = _strict_json(js.read_text())
    assert on_disk["estimators"]["carv"]["ratio_to_baseline"]["median"] is None
    assert png.stat().st_size > 10_000
    assert "inf" in capsys.readouterr().out


def test_race_with_an_lr_grid_sweeps_beside_the_race_folder(capsys, tmp_path, monkeypatch):
    """--lr-grid: each estimator's rate from a sweep on other seeds, then the race (the sweep's
    folder once sat inside the race's, which then refused to start)."""
    race_module = sys.modules["carv_pyro.pipelines.text_to_3d.race"]
    monkeypatch.setattr(race_module, "make_scene", lambda *a, **k: tiny_scene())
    real_dream = race_module.dream
    monkeypatch.setattr(
        race_module, "dream", lambda *a, **k: real_dream(*a, **{**k, "scene": tiny_scene()})
    )
    js = tmp_path / "race.json"
    argv = ["race", "3", "--teacher", "digits", "--quick", "--seeds", "1", "--budget-s", "0.5"]
    argv += ["--estimators", "baseline,auto", "--lr-grid", "0.1,0.3", "--tune-seeds", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "r"), "--quiet", "--json", str(js)]) == 0
    results = json.loads(js.read_text())
    assert results["lr_sweep"]["lrs"] == [0.1, 0.3]
    for name, entry in results["estimators"].items():
        assert entry["lr"] == results["lr_sweep"]["best"][name]
    assert (tmp_path / "r-lr-sweep" / "lr_sweep.json").exists()


def test_threads_option_sets_torch_threads_before_the_command(
    capsys, tmp_path, no_work, monkeypatch
):
    parser = cli.build_parser()
    for command in (["dream", "torus"], ["race", "torus"], ["bench"]):
        assert parser.parse_args(command).threads is None  # absent: torch's default
        assert parser.parse_args([*command, "--threads", "1"]).threads == 1
        for bad in ("0", "-2", "one"):
            assert "--threads" in _error(capsys, [*command, "--threads", bad])
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _error(capsys, ["dream", "dragon", "--threads", "1", "--out", str(tmp_path / "x")])
    assert calls == [1]  # set before the command's own checks and work


def test_compile_option_is_parsed_and_bad_modes_name_the_flag(capsys):
    assert cli.COMPILE_MODES == text_to_3d.COMPILE_MODES
    parser = cli.build_parser()
    for command in (["dream", "torus"], ["race", "torus"], ["bench"]):
        assert parser.parse_args(command).compile is None  # absent: eager
        assert parser.parse_args([*command, "--compile"]).compile == "default"
        args = parser.parse_args([*command, "--compile", "reduce-overhead"])
        assert args.compile == "reduce-overhead"
    err = _error(capsys, ["dream", "torus", "--compile", "fastest"])
    assert "--compile" in err and "reduce-overhead" in err
    err = _error(capsys, ["bench", "--pipeline", "distillation", "--compile"])
    assert "--compile" in err and "text-to-3d" in err


def test_dream_with_compile_reaches_the_teacher_and_may_change_on_resume(
    capsys, tmp_path, monkeypatch
):
    """``--compile`` goes through the config to the teacher's ``compile=``; the tiny run
    compiles with ``aot_eager`` (inductor works on a CPU but takes minutes per shape), and a
    resumed run may compile differently (speed only)."""
    real_dream = text_to_3d.dream
    from carv_pyro.pipelines.text_to_3d.scene import make_scene

    from .test_text_to_3d import tiny_classifier, tiny_teacher

    seen = []

    def tiny_dream(config, out_dir, **kwargs):
        seen.append((config.compile, config.teacher_compile))
        teacher = tiny_teacher()
        if config.compile is not None:  # the option as it reaches the teacher, cheap backend
            assert config.teacher_compile is True or "mode" in config.teacher_compile
            teacher = type(teacher)(
                teacher.unet, teacher.scheduler, compile={"backend": "aot_eager"}
            )
        scene = make_scene(teacher, config.prompt, classifier=tiny_classifier())
        scene.render_kwargs["n_samples"] = 8
        config = text_to_3d.TextTo3DConfig.from_dict({**config.to_dict(), **TINY})
        return real_dream(config, out_dir, scene=scene, **kwargs)

    monkeypatch.setattr(text_to_3d, "dream", tiny_dream)
    out = tmp_path / "run"
    argv = ["dream", "three", "--teacher", "digits", "--out", str(out), "--quiet"]
    argv += ["--estimator", "carv", "--K", "2", "--R", "2", "--eval-every", "1"]
    assert cli.main([*argv, "--steps", "2", "--compile"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["compile"] == "default" and summary["steps"] == 2
    resume = ["dream", "three", "--teacher", "digits", "--out", str(out), "--resume", "--quiet"]
    assert cli.main([*resume, "--steps", "3", "--compile", "reduce-overhead"]) == 0
    assert cli.main([*resume, "--steps", "4"]) == 0  # absent: the run's setting is kept
    assert seen == [
        ("default", True),
        ("reduce-overhead", {"mode": "reduce-overhead"}),
        ("reduce-overhead", {"mode": "reduce-overhead"}),
    ]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 3
