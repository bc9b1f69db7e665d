"""Text-to-3D by score distillation: carve a prompt into a voxel field with a frozen teacher.

A file a concept:

- [`scene`][carv_pyro.pipelines.text_to_3d.scene]: what the job needs of a teacher (`make_scene`);
- [`config`][carv_pyro.pipelines.text_to_3d.config]: `TextTo3DConfig`;
- [`model`][carv_pyro.pipelines.text_to_3d.model]: the SDS objective as a Pyro model;
- [`quality`][carv_pyro.pipelines.text_to_3d.quality]: 3D IoU and held-out views;
- [`pictures`][carv_pyro.pipelines.text_to_3d.pictures]: turntable and curves;
- [`dream`][carv_pyro.pipelines.text_to_3d.dream]: the main job (``carv-pyro dream``);
- [`race`][carv_pyro.pipelines.text_to_3d.race]: estimators against the clock (``carv-pyro race``);
- [`bench`][carv_pyro.pipelines.text_to_3d.bench]: the fixed-checkpoint bench adapter.
"""

from .bench import TextTo3DBench
from .config import COMPILE_MODES, DTYPES, TextTo3DConfig, compile_option
from .dream import (
    CHECKPOINT_FILE,
    DreamRun,
    build_run,
    checkpoint_progress,
    dream,
    load_checkpoint_config,
)
from .model import SeededUniform, make_model
from .quality import eval_cameras, quality
from .race import lr_sweep, race, save_race_json, save_race_plot, time_to_target
from .scene import TEACHERS, DigitsScene, Scene, ShapesScene, make_scene

__all__ = [
    "CHECKPOINT_FILE",
    "COMPILE_MODES",
    "DTYPES",
    "TEACHERS",
    "DigitsScene",
    "DreamRun",
    "Scene",
    "SeededUniform",
    "ShapesScene",
    "TextTo3DBench",
    "TextTo3DConfig",
    "build_run",
    "compile_option",
    "dream",
    "eval_cameras",
    "checkpoint_progress",
    "load_checkpoint_config",
    "lr_sweep",
    "make_model",
    "make_scene",
    "quality",
    "race",
    "save_race_json",
    "save_race_plot",
    "time_to_target",
]
