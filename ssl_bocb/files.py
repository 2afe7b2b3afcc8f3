"""Writing and reading the package's files: every file is written atomically (a unique temporary name beside it,
flushed to disk, renamed into place), so that a crash or kill mid-write leaves the old file or the new one, never
half of one, and two processes writing the same path never share a temporary file; JSON is written and read
strict (no NaN / Infinity tokens, which other JSON readers reject)."""
import contextlib
import json
import math
import os
import uuid
from typing import Any, Callable, Iterator, Optional

from .errors import UserError


def _temporary_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows on directories) refuse; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path for a writer that takes a path (torch.save, safetensors, np.save); on success it is flushed
    and renamed to ``path``, on failure removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """``open(path, mode)`` that becomes visible only once the block completes (see the module docstring)."""
    with atomic_path(path) as tmp:
        # exclusive creation: the name is unique, and the process's umask sets the permissions as for open()
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def strict(o: Any, nonfinite: str = "null") -> Any:
    """``o`` with every non-finite float replaced, so that it dumps as strict JSON: by None (``nonfinite="null"``)
    or by its name as a string ("nan", "inf"; ``nonfinite="string"``, where the value must stay readable). Tuples
    become lists, dataclasses dicts."""
    if isinstance(o, float):
        return o if math.isfinite(o) else (None if nonfinite == "null" else str(o))
    if isinstance(o, dict):
        return {k: strict(v, nonfinite) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict(v, nonfinite) for v in o]
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict
        return strict(asdict(o), nonfinite)
    return o


def write_json(path: str, data: Any, indent: Optional[int] = 2, default: Optional[Callable] = None) -> None:
    """``data`` as strict JSON, a non-finite float written as its name (:func:`strict`, ``nonfinite="string"``)."""
    write_text(path, json.dumps(strict(data, "string"), indent=indent, default=default, allow_nan=False))


def read_jsonl(path: str):
    """The rows of a JSON-lines log; [] when the file does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: str, what: str = "file", fix: str = "") -> Any:
    """A JSON file read strictly; a missing, unreadable or corrupt file is a one-line UserError naming ``what`` and
    ``path`` (and ``fix``, the way out, when given)."""
    how = f"; {fix}" if fix else ""
    try:
        with open(path) as f:
            return json.load(f, parse_constant=_reject_constant)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist{how}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{what} '{path}' is not readable JSON ({e}){how}") from None
