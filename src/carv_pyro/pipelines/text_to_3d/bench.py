"""`TextTo3DBench`: the text-to-3D pipeline at a fixed checkpoint, for ``carv-pyro bench``.

The checkpoint is a voxel field trained for a few baseline SDS steps from its seeded
initialisation, so that ``theta`` is a realistic mid-training state; every estimator's gradient
is then measured at that ``theta`` (see [`carv_pyro.bench`][carv_pyro.bench]).
"""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro.infer import SVI

from ...infer.control_variates import SteinControlVariate, clean_gain
from ...infer.estimator import Estimator
from ...measure import measure
from ...objectives import SDS
from ..base import FixedCheckpointBench
from ..render import VoxelField
from .config import TextTo3DConfig
from .model import make_model
from .scene import make_scene

__all__ = ["TextTo3DBench"]


class TextTo3DBench(FixedCheckpointBench):
    """The text-to-3D SDS pipeline on the embedded shapes teacher, at a fixed checkpoint.

    Args:
        quick: small sizes (minutes on a laptop CPU).
        seed: seeds everything.
        device: ``"cpu"`` or ``"cuda"``.
        prompt: the shape to carve.
        smoke: tiny sizes for the test suite (seconds; the numbers mean nothing).
        teacher: ``"shapes"``, ``"digits"`` or a folder (see `TextTo3DConfig`).
        compile: the teacher's ``torch.compile`` mode (``None``: eager; see
            `TextTo3DConfig`).
    """

    name = "text-to-3d"

    def __init__(
        self,
        quick: bool,
        seed: int = 0,
        device: str = "cpu",
        prompt: str = "torus",
        smoke: bool = False,
        teacher: str = "shapes",
        compile: str | None = None,
    ):
        super().__init__(seed=seed, device=device)
        self.quick = quick or smoke
        self.smoke = smoke
        self.R = 2 if self.quick else 4
        self.config = TextTo3DConfig(
            prompt=prompt,
            teacher=teacher,
            device=str(self.device),
            seed=seed,
            estimator="baseline",
            compile=compile,
        )
        self.scene = make_scene(
            teacher, prompt, device=self.device, compile=self.config.teacher_compile
        )
        self.objective = SDS(
            self.scene.teacher,
            weighting=self.config.weighting,
            t_range=self.config.t_range,
            guidance_scale=self.scene.guidance_scale,
        )
        # the same SDS with a Stein control variate declared beside its eps term: x * eps, a
        # noise gain that follows the render (for the "+CV(eps+Stein)" rows)
        self.objective_stein = SDS(
            self.scene.teacher,
            weighting=self.config.weighting,
            t_range=self.config.t_range,
            guidance_scale=self.scene.guidance_scale,
        )
        self.objective_stein.control_variates += (
            SteinControlVariate(clean_gain(1), diagonal=True),
        )
        self.field = VoxelField(self.config.resolution, self.scene.channels, seed=seed).to(
            self.device
        )
        with self.scope():
            self._pretrain(steps=2 if smoke else 20 if quick else 100)
        self.k_adaptive: int | None = None

    def _model(self, R: int, K: int, seed: int, cv: str | None = None):
        gen = torch.Generator().manual_seed(seed)
        objective = self.objective_stein if cv == "eps+stein" else self.objective
        return make_model(self.field, self.scene, objective, R, K, gen)

    def _pretrain(self, steps: int) -> None:
        model = self._model(self.R, 1, self.seed + 11)
        estimator = Estimator.preset("baseline")
        svi = SVI(
            model,
            estimator.guide(model, seed=self.seed + 12),
            pyro.optim.Adam({"lr": self.config.lr}),
            loss=estimator.loss(),
        )
        for _ in range(steps):
            svi.step()

    def params(self) -> list[torch.Tensor]:
        return list(self.field.parameters())

    def model_for(self, config: dict[str, Any], seed: int):
        return self._model(int(config["R"]), int(config["K"]), seed, config.get("cv")), (), {}

    def setup(self, config: dict[str, Any]):
        hit = super().setup(config)
        if config.get("proposal") == "adaptive" and not getattr(hit[1], "_warmed", False):
            # let the adaptive proposal learn q(t) at the fixed checkpoint (no parameter steps)
            model, guide, loss, args, kwargs = hit
            for _ in range(30):
                with self.scope():
                    from ...measure import gradient_estimate

                    gradient_estimate(loss, model, guide, params=self.params())
            guide._warmed = True
        return hit

    def reference_config(self) -> dict[str, Any]:
        R, K = (2, 4) if self.smoke else (8, 16)
        return dict(method="reference", R=R, K=K, proposal="weighted", stratify="per_outer")

    def accounting(self, R: int, n_repeats: int):
        """V_b, V_w and measured costs at the checkpoint (plain reuse draws)."""
        model, guide, loss, _, _ = self.setup(dict(method="accounting", R=R, K=8))
        with self.scope():
            return measure(
                model, guide, loss=loss, n_repeats=n_repeats, candidate_ks=(1, 2, 4, 8, 16)
            )

    def configs(self) -> list[dict[str, Any]]:
        R = self.R
        rows = [dict(method="baseline", R=R, K=1)]
        rows += [dict(method="reuse", R=R, K=k) for k in (2, 4, 8, 16)]
        rows += [
            dict(method="IS", R=R, K=8, proposal="weighted"),
            dict(method="strat", R=R, K=8, stratify="per_outer"),
            dict(method="strat global", R=R, K=1, stratify="global"),
            dict(method="IS+strat global", R=R, K=1, proposal="weighted", stratify="global"),
        ]
        rows += [
            dict(method="IS+strat", R=R, K=k, proposal="weighted", stratify="per_outer")
            for k in (2, 4, 8)
        ]
        rows += [
            dict(
                method="IS+strat+antithetic",
                R=R,
                K=8,
                proposal="weighted",
                stratify="per_outer",
                noise="antithetic",
            ),
            dict(
                method="IS+strat+QMC",
                R=R,
                K=8,
                proposal="weighted",
                stratify="per_outer",
                noise="sobol",
            ),
        ]
        carv = dict(proposal="weighted", stratify="per_outer")
        rows += [
            # the outer designs: plain inner rows at K = 1 and 16 split V_b (design_splits)
            dict(method="outer strat", R=R, K=1, outer="stratified"),
            dict(method="outer strat", R=R, K=16, outer="stratified"),
            dict(method="outer lattice", R=R, K=1, outer="lattice"),
            dict(method="outer lattice", R=R, K=16, outer="lattice"),
            # a Latin hypercube over (camera, t) at K = 1
            dict(
                method="IS+strat global+outer",
                R=R,
                K=1,
                proposal="weighted",
                stratify="global",
                outer="stratified",
            ),
            dict(method="IS+strat+outer strat", R=R, K=8, outer="stratified", **carv),
            dict(method="IS+strat+outer lattice", R=R, K=8, outer="lattice", **carv),
            dict(method="IS+strat+outer anti", R=R, K=8, outer="antithetic", **carv),
            dict(method="IS+strat+outer sobol", R=R, K=8, outer="sobol", **carv),
            # control variates on the residual, at equal K
            dict(method="IS+strat+CV(eps)", R=R, K=8, cv="eps", **carv),
            dict(method="IS+strat+CV(eps+Stein)", R=R, K=8, cv="eps+stein", **carv),
            dict(method="IS+strat+outer+CV", R=R, K=8, outer="stratified", cv="eps", **carv),
        ]
        if self.k_adaptive is not None:
            rows.append(
                dict(
                    method="adaptive K*",
                    R=R,
                    K=self.k_adaptive,
                    proposal="adaptive",
                    stratify="per_outer",
                )
            )
        return rows
