"""Integrity of a shipped teacher folder: every file checked against ``manifest.json``.

An embedded teacher's folder (``teachers/default/``, ``teachers/shapes_teacher/``) holds a
``manifest.json`` written by the script that trained it. Its ``"files"`` entry maps every
weight and config file (relative POSIX paths) to the sha256 of its bytes; its ``"created_by"``
entry names the script. `verify_teacher_files` checks them all before a loader reads the
weights, so a truncated download, a half-copied folder or weights from another run fail with
the file named, instead of loading silently or failing deep inside diffusers.

The check hashes every listed file once per process: the result is cached by folder and by
the size and modification time of the manifest and of every listed file, so reloading a
teacher costs a few ``stat`` calls.

Examples:
    >>> from carv_pyro.teachers.embedded import DEFAULT_TEACHER_DIR
    >>> manifest = verify_teacher_files(DEFAULT_TEACHER_DIR)
    >>> "unet/config.json" in manifest["files"]
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_FILE",
    "TeacherFilesError",
    "clear_verification_cache",
    "file_sha256",
    "load_manifest",
    "verify_teacher_files",
]

MANIFEST_FILE = "manifest.json"
"""Name of the manifest inside a teacher folder."""

_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


class TeacherFilesError(RuntimeError):
    """A teacher folder's files do not match its manifest (missing, modified or invalid)."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes.

    Args:
        path: the file.

    Returns:
        64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remedy(script: str | None) -> str:
    return f"reinstall carv-pyro or rerun {script}" if script else "reinstall carv-pyro"


def load_manifest(folder: str | os.PathLike[str], *, script: str | None = None) -> dict[str, Any]:
    """Read a teacher folder's ``manifest.json``.

    Args:
        folder: the teacher folder.
        script: the script that writes the folder, named in error messages.

    Returns:
        The manifest as a dict.

    Raises:
        FileNotFoundError: if there is no manifest.
        TeacherFilesError: if it is not valid JSON (e.g. truncated) or not a JSON object.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {path.parent}; {_remedy(script)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherFilesError(
            f"{MANIFEST_FILE} in {path.parent} is not valid JSON (truncated or edited?): {err}; "
            f"{_remedy(script)}"
        ) from None
    if not isinstance(manifest, dict):
        raise TeacherFilesError(
            f"{MANIFEST_FILE} in {path.parent} is not a JSON object; {_remedy(script)}"
        )
    return manifest


def _stat_key(root: Path, rels: list[str]) -> tuple[Any, ...] | None:
    """``(folder, (name, size, mtime_ns)...)`` for the manifest and listed files; None if any is missing."""
    entries = []
    for rel in [MANIFEST_FILE, *rels]:
        try:
            st = (root / rel).stat()
        except OSError:
            return None
        entries.append((rel, st.st_size, st.st_mtime_ns))
    return (str(root.resolve()), tuple(entries))


def verify_teacher_files(
    folder: str | os.PathLike[str], *, script: str | None = None, what: str = "teacher"
) -> dict[str, Any]:
    """Check every file listed in a teacher folder's manifest against its sha256.

    JSON files (configs) whose hash differs are also parsed, so that a truncated or hand-edited
    config is reported as such.

    Args:
        folder: the teacher folder, holding ``manifest.json``.
        script: the script that writes the folder (default: the manifest's ``"created_by"``),
            named in the error's remedy.
        what: what the folder holds, for the error message (``"default teacher"``).

    Returns:
        The manifest (a dict; the same object on cached calls: do not modify it).

    Raises:
        FileNotFoundError: if the manifest is missing.
        TeacherFilesError: naming each file that is missing, differs from its recorded sha256
            (with "not valid JSON" for a broken ``.json``), or if the manifest itself is invalid
            or lists no files. The message ends with the remedy: reinstall carv-pyro or rerun
            the script.
    """
    root = Path(folder)
    manifest = load_manifest(root, script=script)
    script = script or manifest.get("created_by")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise TeacherFilesError(
            f"{root / MANIFEST_FILE} lists no files to verify; {_remedy(script)}"
        )
    key = _stat_key(root, sorted(files))
    if key is not None and key in _CACHE:
        return _CACHE[key]
    problems = []
    for rel, expected in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"  {rel}: missing")
            continue
        actual = file_sha256(path)
        if actual != expected:
            note = ""
            if path.suffix == ".json":
                try:
                    json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    note = f" (not valid JSON, truncated or edited?: {err})"
            problems.append(f"  {rel}: sha256 {actual} != manifest {expected}{note}")
    if problems:
        raise TeacherFilesError(
            f"{what} files in {root} do not match {MANIFEST_FILE}:\n"
            + "\n".join(problems)
            + f"\n{_remedy(script)}"
        )
    if key is not None:
        _CACHE[key] = manifest
    return manifest


def clear_verification_cache() -> None:
    """Forget which folders `verify_teacher_files` has checked (the next call re-hashes)."""
    _CACHE.clear()
