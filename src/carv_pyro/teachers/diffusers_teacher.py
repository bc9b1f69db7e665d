"""A teacher backed by a diffusers UNet and scheduler, loaded from a local folder."""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel, UNet2DModel
from torch import Tensor

from .. import _checks
from ..schedules import DiscreteSchedule
from .base import AbstractTeacher

__all__ = ["DiffusersTeacher"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
#: The weight files of a diffusers UNet folder (whole or sharded), the names diffusers' loader
#: looks for without a ``variant``.
_UNET_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
_TEACHER_CONFIG = "carv_teacher.json"
_NULL_EHS_FILE = "null_encoder_hidden_states.safetensors"
#: ``torch.compile`` modes that capture CUDA graphs (their outputs live in graph-owned memory)
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile(compile: Any) -> dict[str, Any] | None:
    """``compile=`` as ``torch.compile`` keyword arguments (``None``: eager), else an error.

    ``False`` is eager, ``True`` is ``torch.compile``'s defaults, a dict is passed on as keyword
    arguments (``{"mode": "max-autotune-no-cudagraphs"}``, ``{"backend": "aot_eager"}``).

    Raises:
        ValueError: on anything else, or a dict key that ``torch.compile`` does not take,
            naming ``compile``.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, dict):
        raise ValueError(
            f"compile must be True, False or a dict of torch.compile keyword arguments (e.g. "
            f"{{'mode': 'max-autotune-no-cudagraphs'}}), got {compile!r:.80}"
        )
    allowed = [k for k in inspect.signature(torch.compile).parameters if k != "model"]
    unknown = sorted(str(k) for k in compile if k not in allowed)
    if unknown:
        raise ValueError(
            f"compile has keys torch.compile does not take: {unknown}; it takes {allowed}"
        )
    return dict(compile)


def _is_integer(x: Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


class DiffusersTeacher(AbstractTeacher):
    """A frozen diffusers UNet as a teacher, with the scheduler's noise schedule.

    Supported networks:

    - `diffusers.UNet2DModel`: unconditional, or class-conditional when
      ``unet.config.num_class_embeds`` is set (``cond``: ``(N,)`` long labels,
      ``cond_event_shape == ()``; the null class for guidance defaults to the last label,
      ``num_class_embeds - 1``).
    - `diffusers.UNet2DConditionModel`: cross-attention conditioning (``cond``:
      ``encoder_hidden_states`` of shape ``(N, L, D)``, ``cond_event_shape == (L, D)``).
      Guidance needs ``null_encoder_hidden_states`` (e.g. the text encoder's output for the
      empty prompt). ``L`` is taken from ``null_encoder_hidden_states`` or ``cond_length``;
      without either it is ``-1`` (any length).
    - `diffusers.UNet2DConditionModel` without cross-attention blocks and with
      ``class_embed_type="projection"`` (or ``"simple_projection"``): a conditioning VECTOR
      added to the timestep embedding, as MVDream adds its camera (``cond``: ``(N, D)``
      floating, passed as ``class_labels``, ``cond_event_shape == (D,)`` with
      ``D = projection_class_embeddings_input_dim``). It has no fixed null conditioning
      (``null_cond`` returns ``None``); a subclass that knows the vector's layout provides one
      (e.g. ``carv_pyro.teachers.shapes.ShapesTeacher``).

    ``cond=None`` on a conditional teacher means the unconditional prediction (the null class,
    or ``null_encoder_hidden_states``), and raises if there is none.

    The prediction type is read from ``scheduler.config.prediction_type`` and converted to
    ``eps``: ``"epsilon"`` as is, ``"v_prediction"``: ``eps = alpha_t v + sigma_t x_t``,
    ``"sample"``: ``eps = (x_t - alpha_t x0_hat) / sigma_t``. The conversion runs in
    ``x_t``'s dtype.

    The network is frozen (``requires_grad_(False)``, ``eval()``) and held as a plain
    attribute, never registered as a Pyro parameter. When the input's device or compute dtype
    differs from the network's, a cast copy is made lazily and cached (one at a time; it is
    rebuilt if the network's weights change in place). ``teacher.unet`` itself is never cast;
    use `to` to move it.

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel``.
        scheduler: a diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, PNDM, ...).
        dtype: compute dtype, e.g. ``torch.bfloat16`` on a GPU; the result is returned in
            ``x_t``'s dtype. ``None`` (default): compute in ``x_t``'s dtype.
        max_batch: evaluate at most this many rows per network call (``None``: one call).
        null_class: the unconditional class label for guidance (class-conditional
            ``UNet2DModel`` only); default ``num_class_embeds - 1``.
        null_encoder_hidden_states: ``(L, D)`` unconditional ``encoder_hidden_states`` for
            guidance (``UNet2DConditionModel`` only).
        cond_length: the sequence length ``L`` of ``encoder_hidden_states`` when
            ``null_encoder_hidden_states`` is not given (``UNet2DConditionModel`` only).
        compile: compile the UNet's forward with `torch.compile`, once, on first use:
            ``False`` (default: eager), ``True`` (torch's defaults: inductor) or a dict of
            ``torch.compile`` keyword arguments, e.g. ``{"mode": "max-autotune-no-cudagraphs"}``
            or ``{"backend": "aot_eager"}``. The network that runs (``teacher.unet``, or its
            cast copy) is wrapped, never ``teacher.unet`` itself; the first call of each input
            shape pays the compilation (tens of seconds for an SD-2.1-size UNet on a GPU), so
            keep the rows per call fixed: a fixed ``(R, K)`` and ``max_batch`` (guidance
            doubles the rows; an adapting ``K`` or a short last chunk is another shape, and
            past ``torch._dynamo.config.cache_size_limit`` shapes torch falls back to eager).
            ``{"mode": "reduce-overhead"}`` (and ``"max-autotune"``) also captures CUDA
            graphs, which need those fixed shapes and static inputs: each call then marks a
            new graph step and copies the prediction out of the graph's memory (one copy of
            the output), so that a later call cannot overwrite a residual the step still
            holds. The estimator's math is unchanged: the compiled network computes the same
            function, to the compiler's rounding (checked against eager in the tests, and the
            unbiasedness tests run through it).

    Raises:
        TypeError: if ``unet`` is not one of the supported classes, or the scheduler has no
            ``alphas_cumprod``.
        ValueError: on an unsupported prediction type or configuration, or inconsistent
            arguments.

    Examples:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> teacher = DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=100))
        >>> teacher.predict_eps(torch.randn(2, 1, 8, 8), torch.tensor([3, 70])).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: Any,
        *,
        dtype: torch.dtype | None = None,
        max_batch: int | None = None,
        null_class: int | None = None,
        null_encoder_hidden_states: Tensor | None = None,
        cond_length: int | None = None,
        compile: bool | dict[str, Any] = False,
    ):
        compile_kwargs = check_compile(compile)
        if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
            raise TypeError(
                f"unet must be a diffusers UNet2DModel or UNet2DConditionModel, got "
                f"{type(unet).__name__}"
            )
        config = unet.config
        prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"scheduler.config.prediction_type must be one of {_PREDICTION_TYPES}, got "
                f"{prediction_type!r}"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if max_batch is not None and (
            isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        ):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")

        size = config.sample_size
        if size is None:
            raise ValueError(
                "unet.config.sample_size must be set: the teacher's event_shape is "
                "(in_channels, *sample_size)"
            )
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"unet.config.sample_size must be an int or (H, W), got {size!r}")

        self.schedule = DiscreteSchedule.from_diffusers(scheduler)
        self.scheduler = scheduler
        self.prediction_type: str = prediction_type
        self.event_shape = torch.Size([int(config.in_channels), *hw])
        self.dtype = dtype
        self.max_batch = max_batch
        self.null_class: int | None = None
        self.null_encoder_hidden_states: Tensor | None = None

        if isinstance(unet, UNet2DConditionModel) and _is_vector_conditional(config):
            self._cond_kind: str | None = "class_vector"
            self._init_class_vector(config, null_class, null_encoder_hidden_states, cond_length)
        elif isinstance(unet, UNet2DConditionModel):
            self._cond_kind = "encoder_hidden_states"
            self._init_cross_attention(config, null_class, null_encoder_hidden_states, cond_length)
        else:
            if config.class_embed_type is not None:
                raise ValueError(
                    f"UNet2DModel with class_embed_type={config.class_embed_type!r} is not "
                    f"supported (only num_class_embeds with class_embed_type=None)"
                )
            if null_encoder_hidden_states is not None or cond_length is not None:
                raise ValueError(
                    "null_encoder_hidden_states and cond_length apply to UNet2DConditionModel only"
                )
            self._init_class_labels(config, null_class)

        unet.requires_grad_(False)
        unet.eval()
        self.unet = unet
        self._requires_grad = False
        self._cast: torch.nn.Module | None = None
        self._cast_key: tuple[Any, ...] | None = None
        self.compile_kwargs: dict[str, Any] | None = compile_kwargs
        self._compiled: tuple[torch.nn.Module, Any] | None = None

    def _init_class_labels(self, config: Any, null_class: int | None) -> None:
        n_classes = config.num_class_embeds
        if n_classes is None:
            if null_class is not None:
                raise ValueError("null_class given, but the UNet2DModel is unconditional")
            self._cond_kind = None
            self.num_class_embeds: int | None = None
            self.cond_event_shape = None
            return
        self._cond_kind = "class_labels"
        self.num_class_embeds = int(n_classes)
        self.cond_event_shape = torch.Size([])
        null = n_classes - 1 if null_class is None else null_class
        if isinstance(null, bool) or not isinstance(null, int) or not 0 <= null < n_classes:
            raise ValueError(f"null_class must be an int in [0, {n_classes - 1}], got {null!r}")
        self.null_class = int(null)

    def _init_class_vector(
        self,
        config: Any,
        null_class: int | None,
        null_ehs: Tensor | None,
        cond_length: int | None,
    ) -> None:
        self.num_class_embeds = None
        for name, value in (
            ("null_class", null_class),
            ("null_encoder_hidden_states", null_ehs),
            ("cond_length", cond_length),
        ):
            if value is not None:
                raise ValueError(
                    f"{name} does not apply to a UNet2DConditionModel conditioned on a vector "
                    f"(class_embed_type={config.class_embed_type!r})"
                )
        dim = config.projection_class_embeddings_input_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(
                f"class_embed_type={config.class_embed_type!r} needs a positive "
                f"projection_class_embeddings_input_dim, got {dim!r}"
            )
        self.cond_event_shape = torch.Size([dim])

    def _init_cross_attention(
        self,
        config: Any,
        null_class: int | None,
        null_ehs: Tensor | None,
        cond_length: int | None,
    ) -> None:
        self.num_class_embeds = None
        if null_class is not None:
            raise ValueError("null_class applies to a class-conditional UNet2DModel only")
        for key in ("class_embed_type", "num_class_embeds", "addition_embed_type"):
            if getattr(config, key, None) is not None:
                raise ValueError(
                    f"UNet2DConditionModel with {key}={getattr(config, key)!r} is not supported "
                    f"(only encoder_hidden_states conditioning)"
                )
        if getattr(config, "encoder_hid_dim_type", None) not in (None, "text_proj"):
            raise ValueError(
                f"UNet2DConditionModel with encoder_hid_dim_type="
                f"{config.encoder_hid_dim_type!r} is not supported"
            )
        dim = getattr(config, "encoder_hid_dim", None) or config.cross_attention_dim
        if not isinstance(dim, int):
            dims = set(dim)
            if len(dims) != 1:
                raise ValueError(
                    f"per-block cross_attention_dim {tuple(dim)} is not supported; the "
                    f"encoder_hidden_states width must be one number"
                )
            dim = dims.pop()
        if cond_length is not None and (
            isinstance(cond_length, bool) or not isinstance(cond_length, int) or cond_length < 1
        ):
            raise ValueError(f"cond_length must be a positive int or None, got {cond_length!r}")
        length = -1 if cond_length is None else cond_length
        if null_ehs is not None:
            null_ehs = torch.as_tensor(null_ehs)
            if (
                not null_ehs.dtype.is_floating_point
                or null_ehs.dim() != 2
                or null_ehs.shape[1] != dim
                or (cond_length is not None and null_ehs.shape[0] != cond_length)
            ):
                want = f"({'L' if cond_length is None else cond_length}, {dim})"
                raise ValueError(
                    f"null_encoder_hidden_states must be a floating tensor of shape {want}, got "
                    f"{tuple(null_ehs.shape)} ({null_ehs.dtype})"
                )
            length = null_ehs.shape[0]
            self.null_encoder_hidden_states = null_ehs.detach().clone()
        self.cond_event_shape = torch.Size([length, int(dim)])

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder_unet: str | None = "unet",
        subfolder_scheduler: str | None = "scheduler",
        **kwargs: Any,
    ) -> DiffusersTeacher:
        """Load a teacher from a LOCAL folder (nothing is downloaded).

        The folder holds ``unet/`` (``config.json`` and weights) and ``scheduler/``
        (``scheduler_config.json``), as written by `save_pretrained` or by a diffusers
        pipeline's ``save_pretrained``. The UNet and scheduler classes are read from the
        configs' ``_class_name`` (an unknown scheduler class falls back to ``DDPMScheduler``).
        Guidance settings saved by `save_pretrained` (``null_class``,
        ``null_encoder_hidden_states``) are restored unless overridden in ``kwargs``.

        Args:
            path: the folder.
            subfolder_unet: the UNet's subfolder (``None``: ``path`` itself).
            subfolder_scheduler: the scheduler's subfolder (``None``: ``path`` itself).
            **kwargs: passed to the constructor (``dtype``, ``max_batch``, ``null_class``, ...).

        Raises:
            FileNotFoundError: if the folder or a config file is missing.
            ValueError: if the UNet class is not supported.
        """
        root = Path(path)
        unet_cls = cls.check_folder(
            root, subfolder_unet=subfolder_unet, subfolder_scheduler=subfolder_scheduler
        )
        unet_dir = root / subfolder_unet if subfolder_unet else root
        sched_dir = root / subfolder_scheduler if subfolder_scheduler else root
        sched_cfg = sched_dir / "scheduler_config.json"
        # low_cpu_mem_usage=False: the plain loader, with no nag about the optional `accelerate`
        unet = unet_cls.from_pretrained(
            str(unet_dir), local_files_only=True, low_cpu_mem_usage=False
        )
        scheduler = _load_scheduler(sched_dir, sched_cfg)

        extra = root / _TEACHER_CONFIG
        if extra.is_file():
            saved = json.loads(extra.read_text())
            if saved.get("null_class") is not None:
                kwargs.setdefault("null_class", saved["null_class"])
            if saved.get("null_encoder_hidden_states"):
                from safetensors.torch import load_file

                tensors = load_file(str(root / _NULL_EHS_FILE))
                kwargs.setdefault(
                    "null_encoder_hidden_states", tensors["null_encoder_hidden_states"]
                )
        return cls(unet, scheduler, **kwargs)

    @staticmethod
    def check_folder(
        path: str | os.PathLike,
        *,
        subfolder_unet: str | None = "unet",
        subfolder_scheduler: str | None = "scheduler",
    ) -> type:
        """Check, from its files alone (no weights read), that ``path`` loads with
        `from_pretrained`: the folder, both configs as JSON objects, a supported UNet class,
        and UNet weights diffusers' loader finds (whole or sharded, no ``variant``).

        A command calls it before any work, so that a folder that is no diffusers model ends
        it at once with this message rather than once the run has started.

        Args:
            path: the folder.
            subfolder_unet: the UNet's subfolder (``None``: ``path`` itself).
            subfolder_scheduler: the scheduler's subfolder (``None``: ``path`` itself).

        Returns:
            The UNet class the config names.

        Raises:
            FileNotFoundError: if the folder, a config file or the weights are missing.
            ValueError: if a config is not a JSON object or the UNet class is not supported.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(
                f"no teacher folder at {str(root)!r} (expected a local folder with unet/ and "
                f"scheduler/ subfolders; nothing is downloaded)"
            )
        unet_dir = root / subfolder_unet if subfolder_unet else root
        sched_dir = root / subfolder_scheduler if subfolder_scheduler else root
        unet_cfg = unet_dir / "config.json"
        sched_cfg = sched_dir / "scheduler_config.json"
        configs = []
        for f, what in ((unet_cfg, "UNet config"), (sched_cfg, "scheduler config")):
            if not f.is_file():
                raise FileNotFoundError(f"{what} not found: {str(f.relative_to(root))!r}")
            try:
                config = json.loads(f.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"{what} {str(f)!r} is not readable JSON ({err})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{what} {str(f)!r} is not a JSON object")
            configs.append(config)
        unet_name = configs[0].get("_class_name")
        unet_cls = _UNET_CLASSES.get(unet_name)
        if unet_cls is None:
            raise ValueError(
                f"unsupported UNet class {unet_name!r} in {str(unet_cfg)!r}; expected one of "
                f"{sorted(_UNET_CLASSES)}"
            )
        if not any((unet_dir / name).is_file() for name in _UNET_WEIGHTS):
            raise FileNotFoundError(
                f"no UNet weights in {str(unet_dir)!r} (expected {_UNET_WEIGHTS[0]} or "
                f"{_UNET_WEIGHTS[1]}, or their sharded index)"
            )
        return unet_cls

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``unet/``, ``scheduler/`` and the guidance settings under ``path``.

        The result loads back with `from_pretrained`.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(root / "unet"))
        self.scheduler.save_pretrained(str(root / "scheduler"))
        has_null_ehs = self.null_encoder_hidden_states is not None
        if has_null_ehs:
            from safetensors.torch import save_file

            save_file(
                {"null_encoder_hidden_states": self.null_encoder_hidden_states.contiguous()},
                str(root / _NULL_EHS_FILE),
            )
        settings = {"null_class": self.null_class, "null_encoder_hidden_states": has_null_ehs}
        (root / _TEACHER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    # ------------------------------------------------------------------ state

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        """Keep the autograd graph in `predict_eps`; setting it also (un)freezes the UNet.

        With ``requires_grad = True`` the computation runs on ``teacher.unet`` itself, so it
        must already be on the input's device and in the compute dtype (see `to`).
        """
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self._requires_grad = bool(value)
        self.unet.requires_grad_(self._requires_grad)
        self.clear_cache()

    def to(self, *args: Any, **kwargs: Any) -> DiffusersTeacher:
        """Move ``teacher.unet`` in place (``torch.nn.Module.to`` arguments); returns ``self``.

        ``null_encoder_hidden_states`` moves to the new device too (keeping its dtype), so that
        guidance copies nothing from the host inside a step.
        """
        self.unet.to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and self.null_encoder_hidden_states is not None:
            self.null_encoder_hidden_states = self.null_encoder_hidden_states.to(device)
        self.clear_cache()
        return self

    def clear_cache(self) -> None:
        """Drop the cached cast copy of the UNet (and its compiled wrapper)."""
        self._cast = None
        self._cast_key = None
        self._compiled = None

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether ``compile`` asks for CUDA graphs (``mode`` ``"reduce-overhead"`` or
        ``"max-autotune"``, or inductor's ``triton.cudagraphs`` option)."""
        kw = self.compile_kwargs
        if kw is None:
            return False
        options = kw.get("options") or {}
        return kw.get("mode") in _CUDAGRAPH_MODES or bool(options.get("triton.cudagraphs"))

    def _compiled_for(self, module: torch.nn.Module) -> Any:
        """``module`` wrapped by `torch.compile` with ``compile_kwargs``, built once per module."""
        hit = self._compiled
        if hit is None or hit[0] is not module:
            hit = self._compiled = (module, torch.compile(module, **self.compile_kwargs))
        return hit[1]

    def null_cond(self, n: int) -> Tensor | None:
        """``(n,)`` null class labels, or ``(n, L, D)`` null ``encoder_hidden_states``, or None."""
        if self.null_class is not None:
            return torch.full((n,), self.null_class, dtype=torch.long)
        if self.null_encoder_hidden_states is not None:
            return self.null_encoder_hidden_states.expand(n, *self.null_encoder_hidden_states.shape)
        return None

    # ------------------------------------------------------------------ compute

    def _module_for(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        master = self.unet
        param = next(master.parameters())
        if (param.device, param.dtype) == (device, dtype):
            return master
        if self._requires_grad:
            raise ValueError(
                f"requires_grad=True computes with teacher.unet itself, which is on "
                f"{param.device} in {param.dtype}, but the input needs {device} in {dtype}; "
                f"move it first with teacher.to({str(device)!r}, {dtype})"
            )
        version = sum(p._version for p in master.parameters())
        key = (device, dtype, version)
        if self._cast_key != key:
            self.clear_cache()
            self._cast = _cast_module(copy.deepcopy(master), device, dtype)
            self._cast_key = key
        return self._cast

    def _predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        n = x_t.shape[0]
        if cond is None and self._cond_kind is not None:
            cond = self.null_cond(n)
            if cond is None:
                raise ValueError(
                    "cond is required: this teacher is conditional on encoder_hidden_states and "
                    "has no null_encoder_hidden_states for an unconditional prediction"
                    if self._cond_kind == "encoder_hidden_states"
                    else "cond is required: this teacher is conditional on a vector and has no "
                    "null conditioning for an unconditional prediction"
                )
            cond = cond.to(x_t.device)
        compute = self.dtype or x_t.dtype
        unet = self._module_for(x_t.device, compute)
        kwargs: dict[str, Tensor] = {}
        if self._cond_kind == "class_labels":
            if not _is_integer(cond):
                raise TypeError(f"cond must hold integer class labels, got dtype {cond.dtype}")
            if _checks.host_checks(cond.device):
                lo, hi = (int(v) for v in torch.aminmax(cond))  # one reduction, not two
                if lo < 0 or hi >= self.num_class_embeds:
                    raise ValueError(
                        f"cond must hold class labels in [0, {self.num_class_embeds - 1}], got "
                        f"range [{lo}, {hi}]"
                    )
            else:  # no host round trip: a device-side assert (CARVLoss(checks=True) reads)
                torch._assert_async(
                    ((cond >= 0) & (cond < self.num_class_embeds)).all(),
                    f"cond must hold class labels in [0, {self.num_class_embeds - 1}]",
                )
            kwargs["class_labels"] = cond.long()
        elif self._cond_kind == "encoder_hidden_states":
            if not cond.dtype.is_floating_point:
                raise TypeError(
                    f"cond must be floating-point encoder_hidden_states, got dtype {cond.dtype}"
                )
            kwargs["encoder_hidden_states"] = cond.to(compute)
        elif self._cond_kind == "class_vector":
            if not cond.dtype.is_floating_point:
                raise TypeError(f"cond must be a floating-point vector, got dtype {cond.dtype}")
            kwargs["encoder_hidden_states"] = None
            kwargs["class_labels"] = cond.to(compute)
        if self.compile_kwargs is not None:
            unet = self._compiled_for(unet)
            if self.uses_cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
        out = unet(x_t.to(compute), t, return_dict=False, **kwargs)[0]
        if self.uses_cuda_graphs:
            out = out.clone()  # out of the graph's memory: the next replay overwrites it
        out = out.to(x_t.dtype)
        if out.shape != x_t.shape:
            raise RuntimeError(
                f"the UNet returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; its "
                f"out_channels must equal in_channels"
            )
        if self.prediction_type == "epsilon":
            return out
        shape = (n,) + (1,) * (x_t.dim() - 1)
        alpha = self.schedule.alpha(t, like=x_t).reshape(shape)
        sigma = self.schedule.sigma(t, like=x_t).reshape(shape)
        if self.prediction_type == "v_prediction":
            return alpha * out + sigma * x_t
        return (x_t - alpha * out) / sigma  # "sample"

    def __repr__(self) -> str:
        cond = None if self.cond_event_shape is None else tuple(self.cond_event_shape)
        return (
            f"DiffusersTeacher({type(self.unet).__name__}, "
            f"prediction_type={self.prediction_type!r}, event_shape={tuple(self.event_shape)}, "
            f"cond_event_shape={cond}, schedule={self.schedule!r})"
        )


def _is_vector_conditional(config: Any) -> bool:
    """A UNet2DConditionModel conditioned on a projected vector only (no cross-attention)."""
    if getattr(config, "class_embed_type", None) not in ("projection", "simple_projection"):
        return False
    blocks = tuple(config.down_block_types) + tuple(config.up_block_types)
    mid = getattr(config, "mid_block_type", None)
    cross = any("CrossAttn" in b for b in blocks) or (mid is not None and "CrossAttn" in mid)
    return not cross and getattr(config, "addition_embed_type", None) is None


def _cast_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
    """Cast a (copied) diffusers model, keeping its ``_keep_in_fp32_modules`` in float32.

    ``torch.nn.Module.to`` is used directly: diffusers' ``ModelMixin.to`` logs a warning on
    every dtype cast, even for models without float32-only modules.
    """
    torch.nn.Module.to(module, device=device, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                torch.nn.Module.to(sub, dtype=torch.float32)
    return module


def _load_scheduler(folder: Path, config_file: Path) -> Any:
    """The scheduler class named in ``scheduler_config.json``, loaded locally."""
    import diffusers

    name = json.loads(config_file.read_text()).get("_class_name")
    sched_cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(sched_cls, type) and issubclass(sched_cls, SchedulerMixin)):
        if name is not None:
            warnings.warn(
                f"unknown scheduler class {name!r} in {str(config_file)!r}; loading it as "
                f"DDPMScheduler",
                stacklevel=3,
            )
        sched_cls = diffusers.DDPMScheduler
    return sched_cls.from_pretrained(str(folder), local_files_only=True)
