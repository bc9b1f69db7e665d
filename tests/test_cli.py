"""The ``carv-pyro`` command: argument checking before any work, and a tiny ``dream`` run."""

from __future__ import annotations

import json

import pytest

from carv_pyro import cli
from carv_pyro.pipelines import text_to_3d

from .test_text_to_3d import TINY, tiny_classifier, tiny_teacher


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
    """Fail the test if the command gets as far as running a dream."""

    def forbidden(*args, **kwargs):
        raise AssertionError("dream() ran although the arguments were bad")

    monkeypatch.setattr(text_to_3d, "dream", forbidden)


def test_unknown_prompt_names_the_prompt_and_what_is_allowed(capsys, tmp_path, no_work):
    err = _error(capsys, ["dream", "ten", "--out", str(tmp_path / "out")])
    assert "unknown prompt 'ten'" in err and "0-9" in err and "nine" in err
    assert not (tmp_path / "out").exists()  # rejected before touching the output folder


@pytest.mark.parametrize("flag", ["--steps", "--R", "--K"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_non_positive_sizes_name_the_flag(capsys, tmp_path, no_work, flag, value):
    err = _error(capsys, ["dream", "3", "--out", str(tmp_path), flag, value])
    assert f"argument {flag}: must be a positive integer, got '{value}'" in err


@pytest.mark.parametrize("flag", ["--lr", "--guidance-scale"])
def test_non_positive_rates_name_the_flag(capsys, tmp_path, no_work, flag):
    err = _error(capsys, ["dream", "3", "--out", str(tmp_path), flag, "0"])
    assert f"argument {flag}" in err


def test_unwritable_output_folder_is_named(capsys, tmp_path, no_work):
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a folder")
    out = regular_file / "dream"
    err = _error(capsys, ["dream", "3", "--out", str(out)])
    assert "--out" in err and str(out) in err and "cannot write" in err


def test_resume_without_checkpoint_is_an_error(capsys, tmp_path, no_work):
    err = _error(capsys, ["dream", "3", "--out", str(tmp_path), "--resume"])
    assert "--resume" in err and "checkpoint.pt" in err


def test_missing_subcommand_and_unknown_estimator(capsys, tmp_path):
    _error(capsys, [])
    err = _error(capsys, ["dream", "3", "--out", str(tmp_path), "--estimator", "magic"])
    assert "--estimator" in err and "magic" in err


def test_bench_arguments_are_parsed_in_cli():
    assert cli.build_parser().parse_args(["bench"]).pipeline == "text-to-3d"
    args = cli.build_parser().parse_args(
        ["bench", "--pipeline", "distillation", "--quick", "--json", "r.json", "--repeats", "5"]
    )
    assert args.command == "bench" and args.pipeline == "distillation" and args.quick
    assert (args.json, args.plot, args.device, args.seed, args.repeats) == (
        "r.json",
        None,
        "cpu",
        0,
        5,
    )


def test_bench_pretrain_steps_is_parsed_and_only_for_distillation(capsys):
    args = cli.build_parser().parse_args(
        ["bench", "--pipeline", "distillation", "--pretrain-steps", "0"]
    )
    assert args.pretrain_steps == 0
    assert cli.build_parser().parse_args(["bench"]).pretrain_steps is None
    err = _error(capsys, ["bench", "--pretrain-steps", "5"])
    assert "--pretrain-steps" in err and "distillation" in err and "text-to-3d" in err
    err = _error(capsys, ["bench", "--pipeline", "distillation", "--pretrain-steps", "-1"])
    assert "--pretrain-steps" in err


def test_dream_command_runs_and_resumes(capsys, tmp_path, monkeypatch):
    # The real pipeline at tiny sizes, with a tiny random teacher and classifier.
    real_dream = text_to_3d.dream
    shrink = dict(resolution=TINY["resolution"], n_samples=TINY["n_samples"], eval_views=2)

    def tiny_dream(config, out_dir, **kwargs):
        config = text_to_3d.TextTo3DConfig.from_dict({**config.to_dict(), **shrink})
        kwargs.update(teacher=tiny_teacher(), classifier=tiny_classifier())
        return real_dream(config, out_dir, **kwargs)

    monkeypatch.setattr(text_to_3d, "dream", tiny_dream)
    out = tmp_path / "run"
    argv = ["dream", "three", "--out", str(out), "--steps", "2", "--estimator", "baseline"]
    assert cli.main([*argv, "--R", "2", "--quiet", "--eval-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "dream 'three' [baseline, R=2, K=1]: 2 steps" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label"] == 3 and summary["estimator"] == "baseline"
    assert [h["step"] for h in summary["history"]] == [0, 1, 2]

    # --resume reuses the checkpoint's settings; only --steps changes.
    assert cli.main(["dream", "3", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 3
    assert summary["config"]["R"] == 2 and summary["config"]["K"] == 1
    err = _error(capsys, ["dream", "3", "--out", str(out), "--resume", "--lr", "0.5"])
    assert "cannot resume" in err and "lr" in err
    err = _error(capsys, ["dream", "4", "--out", str(out), "--resume"])
    assert "prompt" in err
