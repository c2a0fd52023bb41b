"""Atomic outputs and provenance (docs/merging.md, "Outputs").

Everything is written into a temporary folder beside the target and renamed
into place at the end, so an error or an interrupt leaves nothing
half-written. An existing target is refused unless ``force``; a target that is
(or contains, or lies inside) an input is always refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work starts; return it as a Path."""
    out = Path(out)
    for inp in inputs:
        if inp is not None and _overlaps(out, Path(inp)):
            raise OutputError(out, f"output would overwrite the input {inp}; choose another --out")
    if out.exists() and not force:
        raise OutputError(out, "already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    return out


@contextmanager
def atomic_output_dir(
    out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success rename it to ``out``.

    On any exception (``KeyboardInterrupt`` included) the temporary folder is
    removed and ``out`` is left as it was.
    """
    out = check_output(out, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator:
    """Write one file through a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def provenance(method: str, parameters: dict, inputs: list[dict], **extra) -> dict:
    """The provenance record written into every output.

    ``inputs`` are dicts with at least ``path`` and ``sha256`` (an
    :meth:`Adapter.provenance` or a base model's record).
    """
    from .. import __version__

    rec = {
        "loramix_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "parameters": parameters,
        "inputs": inputs,
    }
    rec.update(extra)
    return rec


def write_provenance(folder: str | Path, record: dict, filename: str = "loramix.json") -> Path:
    path = Path(folder) / filename
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return path
