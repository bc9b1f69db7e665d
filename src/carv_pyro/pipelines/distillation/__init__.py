"""Single-step distillation (DMD-style): a one-step generator learns from a frozen teacher.

Distribution matching distillation (DMD, DMD2) trains a generator ``x = G(z, y)`` so that its
samples' distribution matches the teacher's. The gradient w.r.t. the generator's parameters is
a teacher expectation with the generator forward as the expensive upstream step:

    grad(theta) = E_{z, y} E_{t ~ p(t)} E_{eps} [ J_G(z, y)^T  h(x, t, eps, y) ],
    h = (eps_real(x_t, t, y) - eps_fake(x_t, t, y)) / mean|eps_real(x_t, t, y) - eps|,

where ``eps_real`` is the frozen teacher (with classifier-free guidance) and ``eps_fake`` a
"fake" score network of the generator's own samples, trained online with the standard denoising
loss between generator steps. ``h`` is DMD2's normalized score difference
``(x0_fake - x0_real) / mean|x - x0_real|``, written in eps-space (the ``sigma_t / alpha_t``
factors cancel). Written as a Pyro model, the latents ``(z, y)`` are the outer plate and the
teacher's ``(t, eps)`` draws the reserved inner plate ([`carv_pyro.draws`][carv_pyro.draws]):

```python
config = DistillationConfig(R=8)               # estimator: "stratified" with K = 16
distiller = Distiller(config, teacher=load_default())
guide = config.estimator.guide(distiller.model, seed=0)
svi = SVI(distiller.model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=config.estimator.loss())
for _ in range(100):
    distiller.fake_step()  # a few denoising updates of the fake score on fresh samples
    svi.step()             # one generator step
```

[`train_distillation`][carv_pyro.pipelines.distillation.train_distillation] wraps that loop in
the shared ``carv_pyro.pipelines.base.TrainLoop``: a compute budget or a number of
steps, evaluation by the Fréchet distance in the digit classifier's feature space (`fid_digits`),
and, with an ``out_dir``, checkpoints from which a stopped run resumes bit for bit.
[`DistillationBench`][carv_pyro.pipelines.distillation.DistillationBench] is the adapter used by
``carv-pyro bench``: gradient estimates of every estimator at one fixed checkpoint.

One concept per module: `generator` (the student), `fake_score` (the online fake score, reusable
by VSD), `objective` (the DMD residual), `model` (the Pyro model), `metrics` (Fréchet distance,
sample grids), `config`, `distiller` (the run's state), `train`, `bench`, `teacher` (the real
teacher or a random stand-in).
"""

from .bench import DistillationBench
from .config import DEFAULT_ESTIMATOR, DistillationConfig
from .distiller import Distiller
from .fake_score import FakeScore
from .generator import Generator
from .metrics import fid_digits, frechet_distance, save_sample_grid
from .model import StratifiedLabels, make_model
from .objective import dmd_objective
from .teacher import tiny_digits_teacher
from .train import DistillationHistory, train_distillation

__all__ = [
    "DEFAULT_ESTIMATOR",
    "DistillationBench",
    "DistillationConfig",
    "DistillationHistory",
    "Distiller",
    "FakeScore",
    "Generator",
    "StratifiedLabels",
    "dmd_objective",
    "fid_digits",
    "frechet_distance",
    "make_model",
    "save_sample_grid",
    "tiny_digits_teacher",
    "train_distillation",
]
