"""Run folders and atomic checkpoints: a long run loses no work and never overwrites another.

- `RunFolder` decides, before any work, what a command may do with its output folder: start in a
  new or empty folder, resume the run whose checkpoint it holds (``resume=True``), or replace it
  (``overwrite=True``). A finished run, an unfinished one, or a folder of someone else's files is
  never overwritten otherwise: the error says which and what to pass.
- `Checkpointer` writes a checkpoint atomically and durably (a temporary file, ``fsync``, an
  atomic rename, ``fsync`` of the folder), so a crash at any instant leaves the previous
  checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpointer", "RunFolder", "RunFolderError", "write_json"]

MARKER = "carv-run.json"


class RunFolderError(ValueError):
    """The output folder holds something the command may not replace (the message says what)."""


class Checkpointer:
    """Atomic, durable ``torch.save`` of a state dict to ``path``.

    Args:
        path: the checkpoint file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether a checkpoint is there."""
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (anything ``torch.save`` takes) atomically and durably."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def load(self) -> dict[str, Any]:
        """Read the checkpoint (pickled Pyro state: only load checkpoints you wrote).

        Raises:
            FileNotFoundError: if there is none.
            ValueError: if the file is not a checkpoint.
        """
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # a torn or foreign file
            raise ValueError(f"{self.path} is not a readable checkpoint: {err}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{self.path} is not a carv-pyro checkpoint")
        return state


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a temporary file, then a rename), so a
    reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunFolder:
    """The output folder of one run of a pipeline command.

    The folder is marked by ``carv-run.json`` (the kind of run, its state ``"running"`` or
    ``"finished"``). `prepare` is called before any work:

    - a missing or empty folder: a fresh run;
    - a folder with this kind's marker and ``resume=True``: resume from its checkpoint;
    - ``overwrite=True``: the folder's files from a previous run are removed, a fresh run starts;
    - anything else raises `RunFolderError` naming what is there and what to pass.

    Args:
        path: the folder.
        kind: the kind of run, e.g. ``"dream"`` (a folder of another kind is foreign).
        checkpoint_file: the checkpoint's file name inside the folder.
    """

    def __init__(self, path: str | os.PathLike[str], kind: str, checkpoint_file: str):
        self.path = Path(path)
        self.kind = kind
        self.checkpoint = Checkpointer(self.path / checkpoint_file)

    def _marker(self) -> dict[str, Any] | None:
        file = self.path / MARKER
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            return {"kind": "unreadable", "state": "unknown"}
        return data if isinstance(data, dict) else {"kind": "unreadable", "state": "unknown"}

    def prepare(self, *, resume: bool, overwrite: bool) -> bool:
        """Check the folder (`check`) and make it ready; return whether the run resumes.

        Raises:
            RunFolderError: the folder may not be used as asked (nothing was changed).
            ValueError: ``resume`` and ``overwrite`` together.
        """
        resuming = self.check(resume=resume, overwrite=overwrite)
        if resuming:
            return True
        marker = self._marker()
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if overwrite and marker is not None:
            for name in entries:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.mark("running")
        return False

    def check(self, *, resume: bool, overwrite: bool) -> bool:
        """Whether the run would resume; raise if the folder may not be used as asked.

        Writes nothing, so a command can check its folder before any work and prepare it after
        its other inputs are known to be good.

        Raises:
            RunFolderError: the folder may not be used as asked.
            ValueError: ``resume`` and ``overwrite`` together.
        """
        if resume and overwrite:
            raise ValueError("give at most one of resume and overwrite")
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} exists and is not a folder")
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        marker = self._marker()
        if resume:
            if marker is None or marker.get("kind") != self.kind or not self.checkpoint.exists():
                raise RunFolderError(
                    f"nothing to resume in {self.path}: it holds no {self.kind!r} checkpoint "
                    f"({self.checkpoint.path.name}); run without --resume to start a new run"
                )
            return True
        if entries and not overwrite:
            if marker is not None and marker.get("kind") == self.kind:
                state = marker.get("state", "unknown")
                raise RunFolderError(
                    f"{self.path} holds a {state} {self.kind!r} run; pass --resume to continue "
                    f"it, --overwrite to replace it, or choose another folder"
                )
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunFolderError(
                f"{self.path} is not empty ({shown}) and is not a {self.kind!r} run folder; "
                f"choose an empty or new folder, or pass --overwrite to write into it anyway"
            )
        return False

    def mark(self, state: str) -> None:
        """Record the run's state (``"running"`` or ``"finished"``) in the marker, atomically."""
        file = self.path / MARKER
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps({"kind": self.kind, "state": state}) + "\n")
        os.replace(tmp, file)
