"""Paths the commands read and write: special files refused before they are opened, output paths checked
before any work starts.

Opening a FIFO for reading blocks until a writer appears (forever, in a training folder); a device such as
``/dev/zero`` never ends. Both are told apart from regular files by ``stat``, which never blocks. An output
that cannot be written (a path below a regular file, an immutable or read-only folder, a full disk) is
refused with one line naming it, before minutes of sampling or training are spent.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from latentdiff.errors import UserError

class CannotWrite(UserError, OSError):
    """A file could not be written (full disk, read-only folder): a UserError for the CLI's one line, and still
    an OSError for callers that carry on without an optional file (a cache)."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_regular_file(path: Path | str) -> str | None:
    """Why ``path`` cannot be read as a file ("a FIFO (named pipe)", "file not found", ...); None for a regular
    file. Only ``stat`` is called (it follows symbolic links, so a link to ``/dev/zero`` is a device)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "file not found"
    except OSError as e:  # a symbolic-link loop, a path through a file, no permission
        return (e.strerror or str(e)).lower()
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: Path | str, what: str = "file") -> Path:
    """``path`` if it is a regular file (or a link to one); else a UserError naming it and what it is."""
    problem = not_a_regular_file(path)
    if problem == "file not found":
        raise UserError(f"{path}: file not found")
    if problem is not None:
        raise UserError(f"{path}: is {problem}, not a regular {what}" if problem.startswith("a ")
                        else f"{path}: cannot read {what} ({problem})")
    return Path(path)


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what creating ``path`` would write into)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def check_output_folder(path: Path | str, label: str) -> Path:
    """Refuse, before any work, an output folder that is not a folder or cannot be created and written.

    ``label`` names it as the user gave it ("--out", "DST"). Nothing is created: the probe is an unnamed
    temporary file in the nearest existing folder.
    """
    path = Path(path)
    where = f"{label} {path}"
    kind = not_a_regular_file(path)
    if os.path.lexists(path) and kind != "a folder":
        what = "a regular file" if kind is None else kind
        raise UserError(f"{where}: is {what}, not a folder; choose another path")
    base = _first_existing(path)
    base_kind = not_a_regular_file(base)
    if base_kind != "a folder":
        what = "a regular file" if base_kind is None else base_kind
        raise UserError(f"{where}: {base} is {what}, not a folder, so nothing can be created below it")
    _probe_write(base, where)
    return path


def check_output_file(path: Path | str, label: str) -> Path:
    """Refuse, before any work, an output file that is a folder or a special file, or whose folder cannot
    be created and written (an existing regular file is replaced)."""
    path = Path(path)
    kind = not_a_regular_file(path)
    if os.path.lexists(path) and kind is not None:
        raise UserError(f"{label} {path}: is {kind}, not a regular file; choose a file name")
    base = _first_existing(path.parent)
    base_kind = not_a_regular_file(base)
    if base_kind != "a folder":
        what = "a regular file" if base_kind is None else base_kind
        raise UserError(f"{label} {path}: {base} is {what}, not a folder, so nothing can be created below it")
    _probe_write(base, f"{label} {path}")
    return path


def _probe_write(folder: Path, where: str) -> None:
    """Create (and drop) an unnamed file in ``folder``: root ignores permission bits, not an immutable
    folder or a read-only file system, so only trying tells."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{where}: cannot write in {folder} ({e.strerror or e})") from None


def check_free_space(path: Path | str, need: int, label: str, what: str) -> None:
    """Refuse an output when the disk it goes to has less than ``need`` bytes free (``what``: for what)."""
    base = _first_existing(Path(path))
    try:
        st = os.statvfs(base)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will tell
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise UserError(f"{label} {path}: needs about {_size(need)} of disk space for {what}, only {_size(free)} "
                        f"free there; free some space or choose another {label}")


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
