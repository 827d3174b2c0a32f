"""Output directories of the ``seft`` command: checked before the work, written to a temporary sibling and renamed
into place at the end, so a failed run leaves the output directory as it was."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("peft_seft.cli")


def expand(path: str | None) -> str | None:
    """``~`` expanded; other names (Hub ids included) unchanged."""
    return os.path.expanduser(path) if path and path.startswith("~") else path


def _local(name: str | os.PathLike | None) -> Path | None:
    if name is None:
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Iterable[str | None]) -> Path:
    """The resolved output directory, after refusing what would lose data or fail late: an output that is or holds
    an input (model, base, adapter, dataset), a non-empty directory without ``overwrite``, a location that cannot be
    written."""
    output = Path(output_dir).expanduser().resolve()
    for name in inputs:
        source = _local(name)
        if source is not None and (source == output or output in source.parents):
            raise ValueError(
                f"--output-dir {output_dir} would overwrite the input {name}; choose another output directory."
            )
    if output.is_file():
        raise ValueError(f"--output-dir {output_dir} is a file.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"--output-dir {output_dir} exists and is not empty; pass --overwrite to replace it, or choose another one."
        )
    existing = next(parent for parent in (output, *output.parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"Cannot create --output-dir {output_dir}: {existing} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write to --output-dir {output_dir}: {existing} is not writable.")
    return output


@contextmanager
def staged(output: Path, keep_on_failure: str | None = None) -> Iterator[Path]:
    """A temporary sibling of ``output`` to write into; on success it replaces ``output``, on failure it is removed
    (or, when it holds ``keep_on_failure``, e.g. training checkpoints, kept and named in the log)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield work
    except BaseException:
        if keep_on_failure and (work / keep_on_failure).exists() and any((work / keep_on_failure).iterdir()):
            logger.error("The run failed; its %s are kept in %s (resume from there).", keep_on_failure, work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
        output.rename(old / output.name)
        work.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(output)
