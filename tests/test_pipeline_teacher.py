"""PipelineTeacher: a Stable-Diffusion-like pipeline from a local folder as a latent teacher.

The pipeline is assembled offline from config dicts: a tiny UNet2DConditionModel, a tiny
AutoencoderKL, a tiny CLIPTextModel and a CLIPTokenizer built from vocabulary files written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pytest
import torch

import carv_pyro as carv
from carv_pyro.teachers.pipeline import PipelineTeacher, teacher_from_pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

T = 50
MAX_TOKENS = 8
WORDS = ("a", "photo", "of", "cat", "dog", "hamburger")
R, K = 2, 3


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A byte-pair vocabulary: the letters (word-final or not), a few words and their merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        if len(word) < 2:
            continue
        # merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>"
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if f"{parts[0]} {parts[1]}" not in merges:
                merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_pipeline(folder: Path, seed: int = 0):
    """A StableDiffusionPipeline of tiny random components (16x16 images, 8x8x4 latents)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(folder / "tokenizer_src")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_and_loaded_pipeline(folder: Path):
    """Build, ``save_pretrained`` and load back with ``from_pretrained(local_files_only=True)``."""
    from diffusers import StableDiffusionPipeline

    build_tiny_pipeline(folder).save_pretrained(str(folder / "pipe"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder / "pipe"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return saved_and_loaded_pipeline(tmp_path_factory.mktemp("sd"))


def test_tokenizer_files_build_a_working_clip_tokenizer(pipe):
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=MAX_TOKENS).input_ids
    vocab = pipe.tokenizer.get_vocab()
    assert ids[:4] == [0, vocab["a</w>"], vocab["cat</w>"], 1]  # merges applied
    assert len(ids) == MAX_TOKENS


def test_teacher_shapes_and_null_conditioning_is_the_empty_prompt(pipe):
    teacher = teacher_from_pipeline(pipe)
    assert isinstance(teacher, PipelineTeacher)
    assert tuple(teacher.event_shape) == (4, 8, 8)
    assert tuple(teacher.cond_event_shape) == (MAX_TOKENS, 16)
    want, _ = pipe.encode_prompt("", torch.device("cpu"), 1, False)
    torch.testing.assert_close(teacher.null_encoder_hidden_states, want[0])
    torch.testing.assert_close(teacher.null_cond(3)[2], want[0])
    other = teacher_from_pipeline(pipe, guidance_prompt="a photo")
    want_photo, _ = pipe.encode_prompt("a photo", torch.device("cpu"), 1, False)
    torch.testing.assert_close(other.null_encoder_hidden_states, want_photo[0])


def test_prompts_match_the_pipeline_and_are_cached(pipe):
    teacher = teacher_from_pipeline(pipe)
    calls = teacher.text_encoder_calls
    emb = teacher.encode_prompt("a photo of a cat")
    want, _ = pipe.encode_prompt("a photo of a cat", torch.device("cpu"), 1, False)
    torch.testing.assert_close(emb, want[0])
    assert teacher.encode_prompt("a photo of a cat") is emb
    assert teacher.encode_cond("a photo of a cat") is emb
    assert teacher.text_encoder_calls == calls + 1
    both = teacher.encode_cond(["a photo of a cat", "a dog"])
    assert both.shape == (2, MAX_TOKENS, 16)
    assert teacher.text_encoder_calls == calls + 2
    tensor = torch.randn(MAX_TOKENS, 16)
    assert teacher.encode_cond(tensor) is tensor


def test_guided_prediction_uses_the_empty_prompt(pipe):
    teacher = teacher_from_pipeline(pipe)
    torch.manual_seed(1)
    x_t = torch.randn(3, 4, 8, 8)
    t = torch.tensor([3, 20, 45])
    s = 7.5
    got = teacher.predict_eps(x_t, t, "a hamburger", guidance_scale=s)
    cond, uncond = (
        pipe.encode_prompt(p, torch.device("cpu"), 1, False)[0].expand(3, -1, -1)
        for p in ("a hamburger", "")
    )
    with torch.no_grad():
        e_c = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        e_u = pipe.unet(x_t, t, encoder_hidden_states=uncond).sample
    torch.testing.assert_close(got, e_u + s * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_encode_images_is_the_vae_mean_times_scaling_and_differentiable(pipe):
    teacher = teacher_from_pipeline(pipe)
    images = (torch.rand(2, 1, 3, 16, 16) * 2 - 1).requires_grad_()
    latents = teacher.encode_images(images)
    assert latents.shape == (2, 1, 4, 8, 8)
    with torch.no_grad():
        want = pipe.vae.encode(images.reshape(2, 3, 16, 16)).latent_dist.mean
    torch.testing.assert_close(latents.reshape(2, 4, 8, 8), want * pipe.vae.config.scaling_factor)
    latents.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())  # frozen
    assert teacher.decode_latents(latents.detach()).shape == (2, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        teacher.encode_images(torch.zeros(2, 4, 16, 16))


def test_missing_components_raise():
    class NotAPipeline:
        unet = scheduler = vae = None

    with pytest.raises(TypeError, match="tokenizer"):
        teacher_from_pipeline(NotAPipeline())


def test_from_pretrained_folder_round_trip(tmp_path, pipe):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        PipelineTeacher.from_pretrained(tmp_path)
    teacher_from_pipeline(pipe).save_pretrained(tmp_path / "again")
    teacher = PipelineTeacher.from_pretrained(tmp_path / "again")
    assert tuple(teacher.event_shape) == (4, 8, 8)


def _sds_model(teacher, objective, prompt):
    """SDS on a learnable RGB image: views shift its brightness; the VAE encoder is upstream."""
    shifts = torch.linspace(-0.2, 0.2, R).reshape(R, 1, 1, 1, 1)

    def model():
        logits = pyro.param("image", lambda: 0.3 * torch.randn(3, 16, 16))
        with pyro.plate("views", R, dim=-2):
            images = torch.tanh(logits + shifts)  # (R, 1, 3, 16, 16)
            latents = teacher.encode_images(images)  # (R, 1, 4, 8, 8)
            with pyro.plate("noise", K, dim=-1):
                carv.teacher_term("sds", objective, latents, cond=prompt)

    return model, shifts


def test_sds_step_through_carv_loss_with_the_vae_in_the_upstream(pipe):
    teacher = teacher_from_pipeline(pipe)
    objective = carv.SDS(teacher, guidance_scale=7.5)
    model, shifts = _sds_model(teacher, objective, "a hamburger")
    guide = carv.TimestepGuide(model, proposal="prior")
    loss = carv.CARVLoss()
    calls = teacher.text_encoder_calls
    loss.loss_and_grads(model, guide)
    logits = pyro.param("image").unconstrained()
    got = logits.grad.detach().clone()

    # the same estimate by hand: J^T h averaged over the R x K draws, h the recorded residual
    record = loss.last_records[0]
    assert tuple(record.batch_shape) == (R, K)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        latents = teacher.encode_images(torch.tanh(leaf + shifts))  # (R, 1, 4, 8, 8)
        surrogate = (latents * record.residual).sum() / (R * K)
        (want,) = torch.autograd.grad(surrogate, leaf)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert got.abs().sum() > 0

    assert torch.isfinite(record.residual).all()

    # prompts were encoded once, then cached across steps
    loss.loss_and_grads(model, guide)
    assert teacher.text_encoder_calls == calls + 1


def test_svi_steps_update_the_image(pipe):
    teacher = teacher_from_pipeline(pipe)
    objective = carv.SDS(teacher, guidance_scale=1.0, weighting="uniform")
    model, _ = _sds_model(teacher, objective, "a cat")
    guide = carv.TimestepGuide(model, proposal="weighted", stratify="per_outer")
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=carv.CARVLoss())
    start = pyro.param("image", 0.3 * torch.randn(3, 16, 16)).detach().clone()
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(pyro.param("image").detach(), start)
