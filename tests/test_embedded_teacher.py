"""The embedded default teacher, its classifier, digit prompts and DDIM sampling.

The full quality evaluation (200 guided DDIM samples judged by the classifier) is too slow for
the test suite; it runs in ``scripts/train_default_teacher.py`` and its numbers are recorded in
``manifest.json``. These tests check that the shipped files are the ones measured there and
that they behave like a trained teacher.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import UNet2DModel

from carv_pyro.classifier import DigitClassifier, classifier_accuracy, load_classifier
from carv_pyro.data import DIGIT_NAMES, load_digits_images, parse_prompt
from carv_pyro.sampling import ddim_sample, ddim_timesteps
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers.diffusers_teacher import DiffusersTeacher
from carv_pyro.teachers.embedded import (
    DEFAULT_ETA,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_TEACHER_DIR,
    NULL_CLASS,
    default_prompt_cond,
    load_default,
    load_manifest,
    verify_default_weights,
)
from carv_pyro.teachers.gaussian import GaussianTeacher


@pytest.fixture(scope="module")
def teacher():
    return load_default()


@pytest.fixture(scope="module")
def test_split():
    return load_digits_images(16, "test", seed=0)


# --------------------------------------------------------------------------- loading


def test_teacher_loads_offline_and_matches_manifest(teacher, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    verify_default_weights()
    manifest = load_manifest()
    assert {"unet/config.json", "scheduler/scheduler_config.json"} <= set(manifest["files"])
    assert any(f.startswith("unet/") and f.endswith(".safetensors") for f in manifest["files"])
    assert "classifier.safetensors" in manifest["files"]
    assert isinstance(teacher, DiffusersTeacher)
    assert isinstance(teacher.unet, UNet2DModel)
    assert teacher.event_shape == torch.Size([1, 16, 16])
    assert teacher.cond_event_shape == torch.Size([])
    assert teacher.null_class == NULL_CLASS == teacher.unet.config.num_class_embeds - 1
    assert teacher.prediction_type == "epsilon"
    assert teacher.schedule.num_timesteps == 1000
    n_params = sum(p.numel() for p in teacher.unet.parameters())
    assert n_params == manifest["unet"]["num_parameters"]
    assert not any(p.requires_grad for p in teacher.unet.parameters())


def test_verify_detects_a_modified_file(tmp_path):
    folder = tmp_path / "default"
    shutil.copytree(DEFAULT_TEACHER_DIR, folder)
    verify_default_weights(folder)
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace("\n", "\n ", 1))
    with pytest.raises(RuntimeError, match=r"unet/config\.json: sha256"):
        verify_default_weights(folder)
    (folder / "classifier.safetensors").unlink()
    with pytest.raises(RuntimeError, match=r"classifier\.safetensors: missing"):
        verify_default_weights(folder)


def test_manifest_records_measured_quality():
    manifest = load_manifest()
    samples = manifest["quality"]["samples"]
    assert samples["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    assert samples["eta"] == DEFAULT_ETA
    assert samples["num_samples"] >= 200
    assert samples["classifier_accuracy"] >= 0.80
    assert all(manifest["checks"].values()), manifest["checks"]
    for key in ("command", "seed", "steps", "wall_time_s", "final_losses"):
        assert key in manifest
    json.dumps(manifest)  # plain JSON throughout


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predict_eps_shape_and_dtype(teacher, dtype):
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 1, 16, 16, generator=gen, dtype=dtype)
    t = torch.tensor([0, 10, 300, 700, 999])
    for cond, scale in [
        (torch.arange(5), 1.0),
        (default_prompt_cond("seven"), DEFAULT_GUIDANCE_SCALE),
        (None, 1.0),
    ]:
        eps = teacher.predict_eps(x_t, t, cond, guidance_scale=scale)
        assert eps.shape == x_t.shape and eps.dtype == dtype
        assert torch.isfinite(eps).all()


def test_denoising_loss_far_below_untrained_twin(teacher, test_split):
    """Trained eps-MSE on 20 test images at t in {50, 250, 500, 750} vs an untrained twin.

    An untrained network's output does not depend on the drawn noise eps, so its MSE is
    ``E||f||^2 / D + mean(eps^2)``, at least the mean of the 20 * 4 * 256 = 20480 squares of
    standard normals: 1 +- 0.01 (one standard error), so >= 0.95 here with room to spare.
    The trained teacher's test loss is about 0.05 over the whole range of t (``manifest.json``,
    ``quality.denoising_loss_test``); ``< 0.25`` (and a ratio > 4) is a wide, fixed margin.
    """
    images, labels = test_split
    idx = torch.arange(0, images.shape[0], images.shape[0] // 20)[:20]
    x0, y = images[idx], labels[idx]
    ts = torch.tensor([50, 250, 500, 750]).repeat_interleave(len(idx))
    x0, y = x0.repeat(4, 1, 1, 1), y.repeat(4)
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=gen)
    a = teacher.schedule.alpha(ts, like=x0).view(-1, 1, 1, 1)
    s = teacher.schedule.sigma(ts, like=x0).view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    trained = (teacher.predict_eps(x_t, ts, y) - eps).pow(2).mean().item()

    torch.manual_seed(0)
    twin = UNet2DModel.from_config(teacher.unet.config)
    untrained_teacher = DiffusersTeacher(twin, teacher.scheduler)
    untrained = (untrained_teacher.predict_eps(x_t, ts, y) - eps).pow(2).mean().item()
    assert untrained > 0.95
    assert trained < 0.25
    assert untrained / trained > 4.0


# --------------------------------------------------------------------------- classifier


def test_classifier_accuracy_on_test_split(test_split):
    clf = load_classifier()
    assert isinstance(clf, DigitClassifier) and not clf.training
    assert not any(p.requires_grad for p in clf.parameters())
    images, labels = test_split
    assert classifier_accuracy(clf, images, labels) >= 0.95
    feats = clf.features(images[:7])
    assert feats.shape == (7, clf.config["num_features"])
    assert clf(images[:7]).shape == (7, 10)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        clf(torch.zeros(2, 16, 16))


# --------------------------------------------------------------------------- data and prompts


def test_load_digits_images_split():
    train_x, train_y = load_digits_images(16, "train")
    test_x, test_y = load_digits_images(16, "test")
    all_x, _ = load_digits_images(16, "all")
    assert train_x.shape == (1437, 1, 16, 16) and test_x.shape == (360, 1, 16, 16)
    assert all_x.shape[0] == 1797 == train_x.shape[0] + test_x.shape[0]
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.long
    assert train_x.min() >= -1.0 and train_x.max() <= 1.0
    assert set(test_y.tolist()) == set(range(10))  # stratified: every digit held out
    again, _ = load_digits_images(16, "test")
    assert torch.equal(again, test_x)
    with pytest.raises(ValueError, match="split"):
        load_digits_images(16, "val")


@pytest.mark.parametrize(
    ("prompt", "label"),
    [("3", 3), ("three", 3), (" Three ", 3), (3, 3), ("ZERO", 0), (0, 0), ("9", 9), ("nine", 9)],
)
def test_parse_prompt_accepts(prompt, label):
    assert parse_prompt(prompt) == label
    assert default_prompt_cond(prompt).dtype == torch.long
    assert default_prompt_cond(prompt).shape == ()
    assert int(default_prompt_cond(prompt)) == label


@pytest.mark.parametrize("prompt", ["ten", "12", 12, -1, "", "3.0", 3.0, None, True, "th ree"])
def test_parse_prompt_rejects(prompt):
    with pytest.raises(ValueError, match="expected a digit 0-9 or its English name"):
        parse_prompt(prompt)


def test_digit_names():
    assert len(DIGIT_NAMES) == 10 and DIGIT_NAMES[3] == "three"
    assert [parse_prompt(name) for name in DIGIT_NAMES] == list(range(10))


# --------------------------------------------------------------------------- sampling


def test_ddim_timesteps():
    ts = ddim_timesteps(1000, 5)
    assert ts.tolist() == [999, 749, 500, 250, 0]
    assert ddim_timesteps(1000, 1).tolist() == [999]
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_tiny_ddim_sample(teacher):
    labels = torch.tensor([0, 3, 7])
    gen = torch.Generator().manual_seed(0)
    images = ddim_sample(
        teacher, labels, steps=4, guidance_scale=DEFAULT_GUIDANCE_SCALE, generator=gen
    )
    assert images.shape == (3, 1, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    again = ddim_sample(
        teacher,
        labels,
        steps=4,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(images, again)  # eta = 0: deterministic given the initial noise
    noisy = ddim_sample(
        teacher,
        None,
        num_samples=2,
        steps=3,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        progress=True,
    )
    assert noisy.shape == (2, 1, 16, 16) and torch.isfinite(noisy).all()
    with pytest.raises(ValueError, match="num_samples"):
        ddim_sample(teacher, None, steps=2)


def test_ddim_sample_point_mass_is_exact():
    """For data concentrated at ``m`` the exact denoiser gives ``x0_hat = m`` at every step."""
    schedule = DiscreteSchedule.linear(1000)
    mean = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    teacher = GaussianTeacher(mean, 1e-6, schedule)
    gen = torch.Generator().manual_seed(0)
    for eta in (0.0, 1.0):
        x = ddim_sample(
            teacher, None, num_samples=64, steps=5, eta=eta, generator=gen, dtype=torch.float64
        )
        torch.testing.assert_close(x, mean.expand(64, 3), atol=1e-4, rtol=0)


def test_ddim_sample_gaussian_moments():
    """With the exact denoiser of ``N(2, 0.5^2)`` data, 200 DDIM steps recover the moments.

    20000 draws of 4 coordinates: standard errors 0.5 / sqrt(80000) = 0.0018 for the mean and
    about 0.0013 for the std. The sampler's own bias is larger: x_T ~ N(0, I) ignores the
    residual ``alpha_999 * 2 = 0.013`` of the data mean, and 200 deterministic steps shrink the
    std by about 0.01 (both measured; they vanish as steps grow). Tolerances of 0.02 / 0.03
    leave several standard errors on top of those biases.
    """
    teacher = GaussianTeacher(torch.full((4,), 2.0), 0.5, DiscreteSchedule.linear(1000))
    x = ddim_sample(
        teacher, None, num_samples=20000, steps=200, generator=torch.Generator().manual_seed(0)
    )
    assert abs(x.mean().item() - 2.0) < 0.02
    assert abs(x.std().item() - 0.5) < 0.03
