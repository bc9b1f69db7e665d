"""Latent-space teachers from Stable-Diffusion-like diffusers pipelines in a local folder.

A threestudio user already has a checkpoint folder (``model_index.json``, ``unet/``,
``scheduler/``, ``vae/``, ``tokenizer/``, ``text_encoder/``). `teacher_from_pipeline` turns
the pipeline loaded from it into a `PipelineTeacher`:

- the teacher works in the pipeline's LATENT space: ``event_shape == (4, h, w)``;
- text prompts are encoded with the pipeline's own tokenizer and text encoder, once per prompt
  (cached), and the empty prompt's embedding is the null conditioning of classifier-free
  guidance;
- `PipelineTeacher.encode_images` is the pipeline's VAE encoder, differentiable, so that it
  is part of the upstream ``x = g(theta, xi)`` (render RGB, then encode to latents).

Examples:
    >>> pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)  # doctest: +SKIP
    >>> teacher = teacher_from_pipeline(pipe, dtype=torch.bfloat16).to("cuda")  # doctest: +SKIP
    >>> sds = carv.SDS(teacher, guidance_scale=100.0)  # doctest: +SKIP
    >>> def model():  # doctest: +SKIP
    ...     with pyro.plate("views", 4, dim=-2):
    ...         images = render(field, *random_cameras((4, 1)), image_size=512)  # (4, 1, 3, H, W)
    ...         latents = teacher.encode_images(images)                          # (4, 1, 4, h, w)
    ...         with pyro.plate("noise", 8, dim=-1):
    ...             carv.teacher_term("sds", sds, latents, cond="a hamburger")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from einops import pack, unpack
from torch import Tensor

from .diffusers_teacher import DiffusersTeacher

__all__ = ["PipelineTeacher", "teacher_from_pipeline", "PIPELINE_COMPONENTS"]

#: The pipeline attributes a `PipelineTeacher` needs.
PIPELINE_COMPONENTS = ("unet", "scheduler", "vae", "tokenizer", "text_encoder")


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.get_default_dtype()


class PipelineTeacher(DiffusersTeacher):
    """A `DiffusersTeacher` in a latent-diffusion pipeline's latent space, with text prompts.

    Conditioning (``cond`` of `predict_eps` and of [`teacher_term`][carv_pyro.teacher_term]) may be
    a prompt string, a sequence of ``N`` prompt strings, or ``encoder_hidden_states`` tensors of
    shape ``(L, D)`` / ``(N, L, D)``. Prompts are encoded by `encode_prompt` and cached per
    ``(prompt, device)``, so a training loop encodes each prompt once.

    Classifier-free guidance uses the embedding of ``guidance_prompt`` (default ``""``, the empty
    prompt, as in Stable Diffusion and threestudio) as ``null_encoder_hidden_states``.

    The VAE, tokenizer and text encoder are frozen and held as plain attributes (never Pyro
    parameters). `to` moves the UNet, the VAE, the text encoder, the null conditioning and
    the prompt cache together; on a GPU, ``teacher.to("cuda", torch.bfloat16)`` with
    ``dtype=torch.bfloat16`` computes without keeping a cast copy of the UNet.

    Args:
        unet: the pipeline's ``UNet2DConditionModel``.
        scheduler: the pipeline's scheduler (its ``alphas_cumprod`` and ``prediction_type``).
        vae: the pipeline's ``AutoencoderKL`` (its ``config.scaling_factor`` and, where set,
            ``config.shift_factor`` map the encoder's mean to latents).
        tokenizer: the pipeline's tokenizer (a ``transformers`` tokenizer).
        text_encoder: the pipeline's text encoder; its first output (last hidden state) is the
            conditioning, as in ``StableDiffusionPipeline.encode_prompt`` without ``clip_skip``.
        dtype: the UNet's compute dtype (see `DiffusersTeacher`).
        max_batch: evaluate at most this many UNet rows per call.
        compile: compile the UNet's forward (see `DiffusersTeacher`).
        guidance_prompt: the prompt whose embedding is the unconditional branch of guidance.
        pipeline: the pipeline the components came from (kept for `save_pretrained`).

    Raises:
        ValueError: if the text encoder's width is not the UNet's ``cross_attention_dim``.
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        *,
        vae: Any,
        tokenizer: Any,
        text_encoder: Any,
        dtype: torch.dtype | None = None,
        max_batch: int | None = None,
        guidance_prompt: str = "",
        compile: bool | dict[str, Any] = False,
        pipeline: Any = None,
    ):
        if not isinstance(guidance_prompt, str):
            raise TypeError(f"guidance_prompt must be a str, got {type(guidance_prompt).__name__}")
        self.vae = _freeze(vae)
        self.text_encoder = _freeze(text_encoder)
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.guidance_prompt = guidance_prompt
        self._prompt_cache: dict[tuple[str, torch.device], Tensor] = {}
        self.text_encoder_calls = 0
        null = self.encode_prompt(guidance_prompt)
        super().__init__(
            unet,
            scheduler,
            dtype=dtype,
            max_batch=max_batch,
            null_encoder_hidden_states=null,
            compile=compile,
        )
        config = vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        dtype: torch.dtype | None = None,
        max_batch: int | None = None,
        guidance_prompt: str = "",
        compile: bool | dict[str, Any] = False,
    ) -> PipelineTeacher:
        """The teacher of a loaded pipeline (see `teacher_from_pipeline`)."""
        missing = [name for name in PIPELINE_COMPONENTS if getattr(pipe, name, None) is None]
        if missing:
            raise TypeError(
                f"{type(pipe).__name__} lacks the components {missing}; a PipelineTeacher needs "
                f"a Stable-Diffusion-like pipeline with {list(PIPELINE_COMPONENTS)}"
            )
        return cls(
            pipe.unet,
            pipe.scheduler,
            vae=pipe.vae,
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            dtype=dtype,
            max_batch=max_batch,
            guidance_prompt=guidance_prompt,
            pipeline=pipe,
            compile=compile,
        )

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | os.PathLike, **kwargs: Any
    ) -> PipelineTeacher:
        """Load a pipeline folder (``model_index.json`` and components) locally; nothing is
        downloaded.

        Args:
            path: the folder, as written by a pipeline's ``save_pretrained``.
            **kwargs: ``dtype``, ``max_batch``, ``guidance_prompt``, ``compile``.

        Raises:
            FileNotFoundError: if ``path`` holds no ``model_index.json``.
        """
        from diffusers import DiffusionPipeline

        root = Path(path)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(
                f"no pipeline at {str(root)!r}: expected a local folder with model_index.json "
                f"(as written by a diffusers pipeline's save_pretrained; nothing is downloaded)"
            )
        pipe = DiffusionPipeline.from_pretrained(str(root), local_files_only=True)
        return cls.from_pipeline(pipe, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the pipeline folder (loads back with `from_pretrained`).

        Raises:
            RuntimeError: if the teacher was not built from a pipeline.
        """
        if self.pipeline is None:
            raise RuntimeError(
                "this PipelineTeacher was built from components, not a pipeline; save the "
                "components with their own save_pretrained"
            )
        self.pipeline.save_pretrained(str(path))

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompt: str, device: torch.device | str | None = None) -> Tensor:
        """The text encoder's ``encoder_hidden_states`` for one prompt, cached.

        The prompt is padded/truncated to ``tokenizer.model_max_length`` tokens, as the
        pipeline does.

        Args:
            prompt: the text.
            device: where to return (and cache) the embedding; default the UNet's device (the
                text encoder's before the UNet is attached).

        Returns:
            ``(L, D)`` float tensor (detached), ``L = tokenizer.model_max_length``.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if device is None:
            unet = getattr(self, "unet", None)
            device = _device_of(unet if unet is not None else self.text_encoder)
        device = torch.device(device)
        key = (prompt, device)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            return cached
        source = next((v for (p, _), v in self._prompt_cache.items() if p == prompt), None)
        if source is None:
            source = self._run_text_encoder(prompt)
        out = source.to(device)
        self._prompt_cache[key] = out
        return out

    def _run_text_encoder(self, prompt: str) -> Tensor:
        tok = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = _device_of(self.text_encoder)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        with torch.no_grad():
            out = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        self.text_encoder_calls += 1
        return out[0].detach()

    def encode_cond(self, cond: Any) -> Tensor | None:
        """Prompts to ``encoder_hidden_states``.

        Args:
            cond: a prompt (``-> (L, D)``), a sequence of ``N`` prompts (``-> (N, L, D)``), a
                tensor (returned as is) or ``None``.
        """
        if cond is None or isinstance(cond, Tensor):
            return cond
        if isinstance(cond, str):
            return self.encode_prompt(cond)
        if isinstance(cond, Sequence) and cond and all(isinstance(c, str) for c in cond):
            return torch.stack([self.encode_prompt(c) for c in cond])
        return super().encode_cond(cond)

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (the null conditioning is kept)."""
        self._prompt_cache.clear()

    # ------------------------------------------------------------------ images

    @property
    def latent_channels(self) -> int:
        """Channels of a latent (the UNet's ``in_channels``)."""
        return int(self.event_shape[0])

    def encode_images(self, images: Tensor) -> Tensor:
        """VAE-encode images to latents, differentiably (part of the upstream).

        ``latents = (mean(q(z | images)) - shift_factor) * scaling_factor``: the encoder's
        posterior mean, as a deterministic function of the images. The VAE computes in its own
        parameters' dtype; the result has ``images``' dtype.

        Args:
            images: ``(*B, 3, H, W)`` images in ``[-1, 1]`` (e.g. ``(R, 1, 3, H, W)`` inside a
                plate at ``dim=-2``); gradients flow back to them.

        Returns:
            ``(*B, C, H / f, W / f)`` latents, ``C`` the VAE's latent channels and ``f`` its
            downsampling factor (8 for Stable Diffusion).

        Raises:
            ValueError: if ``images`` is not ``(*B, 3, H, W)``.
        """
        if not isinstance(images, Tensor) or images.dim() < 3:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (*B, C, H, W) tensor, got {got}")
        want = int(self.vae.config.in_channels)
        if images.shape[-3] != want:
            raise ValueError(
                f"images must have {want} channels at dim -3 for this VAE, got shape "
                f"{tuple(images.shape)}"
            )
        flat, packed = pack([images], "* c h w")
        vae_dtype = _dtype_of(self.vae)
        posterior = self.vae.encode(flat.to(vae_dtype)).latent_dist
        latents = (posterior.mean - self.shift_factor) * self.scaling_factor
        return unpack(latents.to(images.dtype), packed, "* c h w")[0]

    def decode_latents(self, latents: Tensor) -> Tensor:
        """VAE-decode latents to images in ``[-1, 1]`` (no gradients; for previews).

        Args:
            latents: ``(*B, C, h, w)``.

        Returns:
            ``(*B, 3, H, W)`` images, clamped to ``[-1, 1]``, in ``latents``' dtype.
        """
        flat, packed = pack([latents], "* c h w")
        z = flat / self.scaling_factor + self.shift_factor
        with torch.no_grad():
            images = self.vae.decode(z.to(_dtype_of(self.vae))).sample
        return unpack(images.clamp(-1, 1).to(latents.dtype), packed, "* c h w")[0]

    # ------------------------------------------------------------------ state

    def to(self, *args: Any, **kwargs: Any) -> PipelineTeacher:
        """Move (and cast) the UNet, VAE and text encoder in place; returns ``self``.

        Takes ``torch.nn.Module.to`` arguments. The null conditioning and cached prompt
        embeddings move to the new device (keeping their dtype), so no host-to-device copy of
        them happens inside a training step.
        """
        super().to(*args, **kwargs)
        self.vae.to(*args, **kwargs)
        self.text_encoder.to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            if self.null_encoder_hidden_states is not None:
                self.null_encoder_hidden_states = self.null_encoder_hidden_states.to(device)
            self._prompt_cache = {
                (p, device): v.to(device) for (p, d), v in self._prompt_cache.items()
            }
        return self

    def __repr__(self) -> str:
        return (
            f"PipelineTeacher({type(self.unet).__name__}, latents={tuple(self.event_shape)}, "
            f"cond={tuple(self.cond_event_shape)}, prediction_type={self.prediction_type!r}, "
            f"guidance_prompt={self.guidance_prompt!r})"
        )


def teacher_from_pipeline(
    pipe: Any,
    *,
    dtype: torch.dtype | None = None,
    max_batch: int | None = None,
    guidance_prompt: str = "",
    compile: bool | dict[str, Any] = False,
) -> PipelineTeacher:
    """A latent-space teacher from a Stable-Diffusion-like diffusers pipeline.

    Args:
        pipe: a pipeline with ``unet``, ``scheduler``, ``vae``, ``tokenizer`` and
            ``text_encoder`` (``StableDiffusionPipeline`` and its kin), e.g. loaded with
            ``from_pretrained(local_dir, local_files_only=True)``.
        dtype: the UNet's compute dtype (e.g. ``torch.bfloat16`` on a GPU).
        max_batch: evaluate at most this many UNet rows per call (guidance doubles the rows).
        guidance_prompt: the prompt of the unconditional branch of guidance (default ``""``).
        compile: compile the UNet's forward with `torch.compile` (``True`` or a dict of its
            keyword arguments; see `DiffusersTeacher`).

    Returns:
        a `PipelineTeacher` whose ``event_shape`` is the latent shape ``(C, h, w)`` and
        whose ``cond_event_shape`` is ``(L, D)``.

    Raises:
        TypeError: if the pipeline lacks one of the components.
    """
    return PipelineTeacher.from_pipeline(
        pipe, dtype=dtype, max_batch=max_batch, guidance_prompt=guidance_prompt, compile=compile
    )
