"""What every pipeline shares: a config base, one training loop, run folders and checkpoints,
and a fixed-checkpoint bench base (a file a concept)."""

from .bench import FixedCheckpointBench, config_estimator
from .checkpoint import Checkpointer, RunFolder, RunFolderError, write_json
from .config import PipelineConfig
from .loop import Clock, LoopState, RunStopped, StopSignals, TrainLoop

__all__ = [
    "Checkpointer",
    "Clock",
    "FixedCheckpointBench",
    "LoopState",
    "PipelineConfig",
    "RunFolder",
    "RunFolderError",
    "RunStopped",
    "StopSignals",
    "TrainLoop",
    "config_estimator",
    "write_json",
]
