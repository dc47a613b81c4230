"""Checked file input and output paths: one line naming the file and the problem, nothing created.

``read_text_file`` / ``read_json_file`` turn a missing, binary, non-UTF-8 or malformed file into a
``ParScaleError`` naming it; ``ensure_writable_dir`` / ``ensure_writable_file`` check *before* any
work starts that an output can be written (an existing file where a directory is needed, a
directory where a file is needed, a read-only place), creating nothing. The library (trainer,
checkpoints, config files) and every CLI subcommand use them.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import ParScaleError

# --------------------------------------------------------------------------- input files


def read_text_file(path: str | os.PathLike, what: str, *, max_bytes: int | None = None) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable, binary or non-UTF-8 file (or not a
    regular file, or over ``max_bytes``) is a ParScaleError that starts with ``what`` (e.g.
    ``"--config run.toml"``)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ParScaleError(f"{what}: no such file") from None
    except OSError as e:
        raise ParScaleError(f"{what}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        # a device or pipe (/dev/zero, /dev/stdin) may never end: read only regular files
        raise ParScaleError(f"{what}: not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ParScaleError(f"{what}: {st.st_size:,} bytes, larger than the {max_bytes:,} this file may have")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParScaleError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ParScaleError(f"{what}: is a directory, expected a file") from None
    except OSError as e:
        raise ParScaleError(f"{what}: cannot read ({e.strerror or e})") from None
    if b"\x00" in data:
        raise ParScaleError(f"{what}: binary file (contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ParScaleError(f"{what}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, "
                            f"line {line})") from None
    return text.removeprefix("\ufeff")  # a BOM some editors write


def read_json_file(path: str | os.PathLike, what: str, *, expect: type = dict,
                   max_bytes: int | None = None) -> Any:
    """Parse a JSON file read with ``read_text_file``; the top level must be ``expect``."""
    text = read_text_file(path, what, max_bytes=max_bytes)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParScaleError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ParScaleError(f"{what}: not valid JSON (nested too deeply)") from None
    if expect is not None and not isinstance(data, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise ParScaleError(f"{what}: expected a JSON {kind} at the top level, got {type(data).__name__}")
    return data


def jsonl_objects(text: str, where: str):
    """``(line number, value)`` for each non-blank line of JSONL ``text``; a line that is not JSON
    raises one error naming ``where`` and the line."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ParScaleError(f"{where}:{lineno}: not valid JSON ({e.msg})") from None


def check_utf8_text(text: str, what: str) -> str:
    """``text`` unchanged if it is valid Unicode; command-line bytes that were not UTF-8 reach
    Python as lone surrogates (``surrogateescape``), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParScaleError(f"{what}: not valid UTF-8 text (undecodable byte at character {e.start})") from None
    return text


def check_checkpoint_path(path: str | os.PathLike, flag: str) -> Path:
    """``path`` names something a model loads from: a checkpoint directory with a readable
    ``config.json`` (or an adapter directory with ``adapter_config.json``), or a ``.gguf`` file.
    Checked before a tokenizer or data is read, so a wrong ``--model`` is named as such (not as a
    missing tokenizer.json); the weights themselves are checked by the loader."""
    if os.fspath(path) == "":
        raise ParScaleError(f"{flag}: empty path")
    path = Path(path)
    if not os.path.lexists(path):
        raise ParScaleError(f"{flag} {path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise ParScaleError(f"{flag} {path}: is a file; expected a checkpoint directory (config.json + "
                            "safetensors) or a .gguf file")
    if not path.is_dir():
        raise ParScaleError(f"{flag} {path}: not a directory")
    for name in ("config.json", "adapter_config.json"):
        if (path / name).exists():
            read_json_file(path / name, f"{flag} {path}: {name}")
            return path
    raise ParScaleError(f"{flag} {path}: no config.json there (not a checkpoint directory)")


# --------------------------------------------------------------------------- output paths


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_writable(directory: Path, flag: str, target: Path) -> None:
    """Can we create files in ``directory``? ``os.access`` says yes to root even on a read-only
    mount or in /proc, so create (and remove) a temporary file there."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ParScaleError(f"{flag} {target}: cannot write there ({directory} is not writable)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".parscale-probe-", dir=directory)
    except OSError as e:
        raise ParScaleError(f"{flag} {target}: cannot write there ({directory}: {e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _check_parents(path: Path, flag: str) -> None:
    """Every existing ancestor of ``path`` must be a directory, and the nearest one writable."""
    base = _nearest_existing(path.parent if path.parent != path else path)
    if not base.is_dir():
        raise ParScaleError(f"{flag} {path}: {base} is a file, not a directory")
    _probe_writable(base, flag, path)


def ensure_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check that ``path`` is, or can be created as, a writable directory (creates nothing)."""
    if os.fspath(path) == "":  # Path("") is "." (the working directory): refuse the empty flag
        raise ParScaleError(f"{flag}: empty path")
    path = Path(path)
    if os.path.lexists(path):
        if not path.is_dir():
            raise ParScaleError(f"{flag} {path}: exists and is not a directory (a directory is needed)")
        _probe_writable(path, flag, path)
        return path
    _check_parents(path, flag)
    return path


def ensure_writable_file(path: str | os.PathLike, flag: str, *, suffixes: tuple[str, ...] = ()) -> Path:
    """Check that ``path`` can be written as a file (creates nothing); ``suffixes`` (e.g.
    ``(".png",)``) are the allowed extensions."""
    raw, path = os.fspath(path), Path(path)
    if str(path) in ("", "."):
        raise ParScaleError(f"{flag}: empty path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ParScaleError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if raw.endswith(os.sep) or path.is_dir():  # "out/" names a directory even before it exists
        raise ParScaleError(f"{flag} {path}: is a directory (a file name is needed)")
    if os.path.lexists(path) and not path.is_file():
        raise ParScaleError(f"{flag} {path}: exists and is not a regular file")
    if path.is_file() and not os.access(path, os.W_OK):
        raise ParScaleError(f"{flag} {path}: the file is not writable")
    _check_parents(path, flag)
    return path


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two spellings name the same place (``micro`` vs ``/abs/micro``, symlinks)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)
