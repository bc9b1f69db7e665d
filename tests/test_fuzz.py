"""Hypothesis fuzz of the public constructors and entry points (issue 14).

Each test replaces one argument by an arbitrary value (wrong types, out-of-range numbers, NaN
and infinities, empty and huge sizes, strings, tensors, objects) and asserts one of two
outcomes: the call succeeds AND the value was a valid one (stated per argument by a predicate,
so a silent success with a wrong value fails), or it raises ``ValueError``/``TypeError`` whose
message names the argument. Any other exception fails. The ``carv-pyro`` parser is fuzzed
through `carv_pyro.cli.main` with invalid numbers: exit status 2, the flag named, no traceback.
Examples are derandomized (tests/conftest.py); ``CARV_TEST_SEED`` shifts them.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import carv_pyro as carv
from carv_pyro import cli
from carv_pyro.accounting import Accountant
from carv_pyro.infer.samplers import RandomSource
from carv_pyro.objectives import WEIGHTINGS
from carv_pyro.pipelines import text_to_3d
from carv_pyro.pipelines.text_to_3d import TextTo3DConfig
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.timesteps import UniformTimesteps

from .analytic import THETA0, D, sds

EXAMPLES = settings(max_examples=100)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, math.inf, -math.inf, math.nan, 1e308]),
    st.text(max_size=6),
    st.sampled_from(["", "1", "0.5", "nan", "iid", "prior", "weighted", "global", "sds"]),
    st.tuples(),
    st.lists(st.integers(-3, 100), max_size=3).map(tuple),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3).map(tuple),
    st.sampled_from([object(), [], {}, b"1", 1j]),
    st.builds(lambda: torch.empty(0)),
    st.builds(lambda: torch.tensor(3)),
    st.builds(lambda: torch.tensor([0.5, 0.2])),
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(v) -> bool:
    return _is_int(v) and v >= 1


def _pos_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _pair(v, ok) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and ok(v)


def _check(call, name: str, value, valid: bool, *, aliases: tuple[str, ...] = ()) -> None:
    """``call()`` succeeds only for a valid value, else raises ValueError/TypeError naming it."""
    try:
        call()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(n in message for n in (name, *aliases)), (
            f"{type(error).__name__} for {name}={value!r} does not name {name!r}: {message}"
        )
        assert not valid, f"{name}={value!r} is valid but was refused: {message}"
        return
    assert valid, f"{name}={value!r} was accepted silently"


def _kwarg(fn, name, value, **fixed):
    return lambda: fn(**{**fixed, name: value})


ESTIMATOR_VALID = {
    "K": lambda v: v is None or _pos_int(v),
    "stratify": lambda v: v in (None, "per_outer", "global"),
    "noise": lambda v: isinstance(v, str) and v in ("iid", "antithetic", "sobol"),
    "adapt": lambda v: v is False,  # adapt=True needs a starting K (refused naming adapt)
    "k_range": lambda v: _pair(v, lambda p: _pos_int(p[0]) and _pos_int(p[1]) and p[0] <= p[1]),
    "name": lambda v: isinstance(v, str),
    "proposal": lambda v: isinstance(v, str) and v in ("prior", "weighted"),
}


@EXAMPLES
@given(name=st.sampled_from(sorted(ESTIMATOR_VALID)), value=JUNK)
def test_estimator(name, value):
    valid = ESTIMATOR_VALID[name](value)
    if name == "proposal" and isinstance(value, str) and value not in ("prior", "weighted"):
        try:  # other registered names are valid too
            carv.Estimator(proposal=value)
            valid = True
        except (ValueError, TypeError):
            pass
    _check(_kwarg(carv.Estimator, name, value), name, value, valid)


GUIDE_VALID = {
    "K": lambda v: v is None or _pos_int(v),
    "stratify": ESTIMATOR_VALID["stratify"],
    "noise": ESTIMATOR_VALID["noise"],
    "seed": lambda v: v is None or (_is_int(v) and 0 <= v < 2**63),
    "generator": lambda v: v is None,
}


@EXAMPLES
@given(name=st.sampled_from(sorted(GUIDE_VALID)), value=JUNK)
def test_timestep_guide(name, value):
    call = _kwarg(carv.TimestepGuide, name, value, model=None)
    _check(call, name, value, GUIDE_VALID[name](value))


LOSS_VALID = {
    "num_particles": _pos_int,
    "nonfinite": lambda v: isinstance(v, str) and v in ("raise", "zero"),
    "accountant": lambda v: v is None,
    "vectorize_particles": lambda v: isinstance(v, bool),
}


@EXAMPLES
@given(name=st.sampled_from(sorted(LOSS_VALID)), value=JUNK)
def test_carv_loss(name, value):
    _check(_kwarg(carv.CARVLoss, name, value), name, value, LOSS_VALID[name](value))


ACCOUNTANT_VALID = {
    "every": _pos_int,
    "window": lambda v: _pos_int(v) and v <= 10**9,
    "min_measurements": _pos_int,
    "adapt": lambda v: isinstance(v, bool),
    "k_range": ESTIMATOR_VALID["k_range"],
    "costs": lambda v: v is None or _pair(v, lambda p: all(_pos_float(c) for c in p)),
    "plate": lambda v: v is None or isinstance(v, str),
    "term": lambda v: v is None or isinstance(v, str),
    "max_change": lambda v: _pos_float(v) and v > 1,
}


@EXAMPLES
@given(name=st.sampled_from(sorted(ACCOUNTANT_VALID)), value=JUNK)
def test_accountant(name, value):
    valid = ACCOUNTANT_VALID[name](value)
    if name == "max_change" and _pos_float(value) and value == 1:
        valid = None  # the boundary: either way is right
    if valid is None:
        return
    _check(_kwarg(Accountant, name, value), name, value, valid)


SDS_VALID = {
    "guidance_scale": _pos_float,
    "weighting": lambda v: isinstance(v, str) and v in WEIGHTINGS,
    "t_range": lambda v: (
        isinstance(v, (tuple, torch.Tensor))
        and len(v) == 2
        and not any(isinstance(x, bool) for x in v)
        and all(isinstance(float(x), float) and math.isfinite(float(x)) for x in v)
        and 0 <= float(v[0]) <= float(v[1]) < 1  # lo == hi: a one-step prior, documented
        and int(float(v[0]) * 60) <= int(float(v[1]) * 60)
    ),
}


@EXAMPLES
@given(name=st.sampled_from(sorted(SDS_VALID)), value=JUNK)
def test_sds(name, value):
    teacher = sds().teacher
    try:
        valid = SDS_VALID[name](value)
    except (TypeError, ValueError):
        valid = False
    _check(_kwarg(carv.SDS, name, value, teacher=teacher), name, value, valid)


@EXAMPLES
@given(name=st.sampled_from(["num_timesteps", "t_range"]), value=JUNK)
def test_uniform_timesteps(name, value):
    if name == "num_timesteps":
        valid = _pos_int(value) and 2 <= value <= 100_000
        assume(not (_pos_int(value) and 100_000 < value <= 1_000_000))  # valid but slow
        call = lambda: UniformTimesteps(value)  # noqa: E731
    else:
        try:
            valid = SDS_VALID["t_range"](value)
        except (TypeError, ValueError):
            valid = False
        call = lambda: UniformTimesteps(60, value)  # noqa: E731
    _check(call, name, value, valid)


@EXAMPLES
@given(
    value=st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=6),
        st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1.0)), min_size=0, max_size=6).map(
            lambda v: torch.tensor(sorted(v, reverse=True), dtype=torch.float64)
        ),
        st.sampled_from([torch.empty(0), torch.tensor(3), torch.ones(2, 2), 0.5, 1]),
    )
)
def test_discrete_schedule(value):
    try:
        schedule = DiscreteSchedule(value)
    except (ValueError, TypeError) as error:
        assert "alphas_cumprod" in str(error), str(error)
        return
    a = schedule.alphas_cumprod
    assert a.dim() == 1 and len(a) >= 1, a
    assert bool(((a > 0) & (a <= 1)).all()), f"accepted alphas_cumprod outside (0, 1]: {a}"
    assert bool((a[1:] <= a[:-1]).all()), f"accepted a non-decreasing alphas_cumprod: {a}"


@EXAMPLES
@given(name=st.sampled_from(["seed", "generator"]), value=JUNK)
def test_random_source(name, value):
    valid = GUIDE_VALID[name](value)
    _check(_kwarg(RandomSource, name, value), name, value, valid)


CONFIG_VALID = {
    "steps": _pos_int,
    "R": _pos_int,
    "lr": _pos_float,
    "resolution": lambda v: _pos_int(v) and v >= 8,
    "seed": lambda v: _is_int(v) and 0 <= v < 2**63,
    "budget_s": lambda v: v is None or _pos_float(v),
    "eval_every": _pos_int,
    "eval_views": _pos_int,
    "guidance_scale": lambda v: v is None or _pos_float(v),
    "dtype": lambda v: v in ("float32", "float64", "bfloat16", "float16"),
    "device": lambda v: v == "cpu",
}


@EXAMPLES
@given(name=st.sampled_from(sorted(CONFIG_VALID)), value=JUNK)
def test_text_to_3d_config(name, value):
    try:
        valid = CONFIG_VALID[name](value)
    except TypeError:
        valid = False
    if name == "resolution" and _pos_int(value) and (value < 8 or value > 4096):
        valid = None  # a bound of the config's own choosing
    if name in ("dtype", "device") and isinstance(value, str) and value != "cpu":
        valid = None
    if name in ("steps", "R", "eval_every", "eval_views") and _pos_int(value) and value > 10**6:
        valid = None
    if valid is None:
        return
    _check(_kwarg(TextTo3DConfig, name, value), name, value, valid)


# -- the command line ------------------------------------------------------------------------

FLAGS = {
    ("dream", "--R"): "pos_int",
    ("dream", "--K"): "pos_int",
    ("dream", "--lr"): "pos_float",
    ("dream", "--resolution"): "pos_int",
    ("dream", "--steps"): "pos_int",
    ("dream", "--seed"): "non_neg_int",
    ("race", "--seeds"): "pos_int",
    ("race", "--first-seed"): "non_neg_int",
    ("race", "--tune-seeds"): "pos_int",
    ("bench", "--seed"): "non_neg_int",
    ("bench", "--repeats"): "pos_int",
}


def _parses_as(kind: str, text: str) -> bool:
    try:
        if kind == "pos_float":
            return math.isfinite(float(text)) and float(text) > 0
        n = int(text)
    except ValueError:
        return False
    return n >= 1 if kind == "pos_int" else n >= 0


@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the command ran although an argument was bad")

    for name in ("dream", "race", "make_scene"):
        monkeypatch.setattr(text_to_3d, name, forbidden)


@settings(max_examples=150)
@given(
    flag=st.sampled_from(sorted(FLAGS)),
    text=st.one_of(
        st.text(max_size=8),
        st.sampled_from(["0", "-1", "-0", "nan", "inf", "-inf", "1e400", "2.5", "", " ", "1_0"]),
        st.integers(-(10**30), 0).map(str),
    ),
)
def test_cli_numbers(flag, text, capsys, no_work):
    command, option = flag
    assume(not _parses_as(FLAGS[flag], text))
    argv = [command] + (["torus"] if command in ("dream", "race") else []) + [f"{option}={text}"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert option in err and "Traceback" not in err, err


# -- teacher_term ----------------------------------------------------------------------------


@EXAMPLES
@given(
    which=st.sampled_from(["x", "cond"]),
    value=st.one_of(
        JUNK,
        st.sampled_from(
            [
                torch.zeros(2, 1, D, dtype=torch.long),
                torch.zeros(2, 1, D + 1, dtype=torch.float64),
                torch.zeros(0, 1, D, dtype=torch.float64),
                torch.zeros(2, 1, D, dtype=torch.bool),
                torch.zeros(2, 1, D, dtype=torch.complex64),
                torch.zeros(5, 1, D, dtype=torch.float64),
            ]
        ),
    ),
)
def test_teacher_term_x_and_cond(which, value):
    objective = sds()
    good_x = THETA0.expand(2, 1, D)
    x, cond = (value, None) if which == "x" else (good_x, value)

    def model():
        with pyro.plate("views", 2, dim=-2), pyro.plate("noise", 3, dim=-1):
            carv.teacher_term("sds", objective, x, cond=cond)

    valid = (which == "cond" and value is None) or (
        which == "x"
        and isinstance(value, torch.Tensor)
        and value.dtype.is_floating_point
        and value.shape[-1:] == (D,)
        and len(value.shape) <= 3
        and all(n in (1, 2) for n in value.shape[:-2])
        and (value.dim() < 2 or value.shape[-2] == 1)
    )
    try:
        model()
    except (ValueError, TypeError) as error:
        assert which in str(error), f"{which}={value!r:.60}: {error}"
        assert not valid
        return
    assert valid, f"teacher_term accepted {which}={value!r:.60}"


# -- found by this fuzz and fixed: each now names its argument
FOUND = [
    ("sites", lambda: carv.TimestepGuide(None, sites=False)),
    ("sites", lambda: carv.TimestepGuide(None, sites=torch.tensor(3))),
    ("num_timesteps", lambda: UniformTimesteps(2**63)),
    ("num_timesteps", lambda: UniformTimesteps(2**43)),
    ("alphas_cumprod", lambda: DiscreteSchedule(None)),
    ("alphas_cumprod", lambda: DiscreteSchedule("ab")),
    ("costs", lambda: Accountant(costs=torch.tensor(3))),
    ("window", lambda: Accountant(window=2**63)),
    # an increasing schedule at tiny values (the monotonicity check is relative)
    (
        "alphas_cumprod",
        lambda: DiscreteSchedule(torch.tensor([2.6e-230, 8.7e-165], dtype=torch.float64)),
    ),
]


@pytest.mark.parametrize("name,call", FOUND)
def test_found_inputs_name_their_argument(name, call):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
