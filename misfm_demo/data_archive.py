"""Safe, atomic file helpers used by :mod:`misfm_demo.fetch_data`.

* :func:`sha256_file` / :func:`verify_sha256` -- checksum a download before anything is extracted from it.
* :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_text` -- write to a temporary name in the
  target's folder and ``os.replace`` it into place, so an interrupted run never leaves a half-written file under
  the final name (the old content, if any, stays intact).
* :func:`safe_extract` -- stream a tar archive and extract only selected members; every member of the archive is
  checked, and an absolute path, a ``..`` component, a link leading outside the archive root, or a special file
  (device, fifo) raises :class:`UnsafeArchiveError` naming the member. Selected files are first written into a
  staging folder and only moved into place once the whole archive has been read and checked, so a refused or
  broken archive leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "ChecksumError",
    "UnsafeArchiveError",
    "MissingMemberError",
    "sha256_file",
    "verify_sha256",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "safe_extract",
    "check_member",
]

_CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A file's sha256 differs from the expected one."""


class UnsafeArchiveError(RuntimeError):
    """An archive holds a member that could write outside the extraction folder."""


class MissingMemberError(RuntimeError):
    """A member that the caller needs is not in the archive."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str = "", advice: str = "") -> str:
    """Raise :class:`ChecksumError` (expected / got / path / what to do) unless ``sha256(path) == expected``."""
    got = sha256_file(path)
    if got.lower() != expected.lower():
        msg = (
            f"sha256 mismatch for {what or 'file'} {os.fspath(path)!r}:\n"
            f"  expected {expected.lower()}\n"
            f"  got      {got}\n"
        )
        msg += advice or (
            "  The file is corrupt, truncated or a different version. Delete it and run the fetch again; "
            "nothing was extracted from it."
        )
        raise ChecksumError(msg)
    return got


def _tmp_name(target: Path) -> Path:
    # keep the suffixes (".nii.gz") so that writers choosing the format by extension (nibabel) still work
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=f"-{target.name}", dir=target.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is ``os.replace``-d onto ``target``.

    On an exception the temporary file is removed and ``target`` is left as it was (absent or old content).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def check_member(member: tarfile.TarInfo, archive_label: str = "archive") -> None:
    """Raise :class:`UnsafeArchiveError` if ``member`` could escape the extraction root."""
    name = member.name
    where = f"archive member {name!r} in {archive_label}"
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or os.path.isabs(name):
        raise UnsafeArchiveError(f"refusing {where}: absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing {where}: path contains '..'")
    if member.issym() or member.islnk():
        link = member.linkname
        if not link or link.startswith(("/", "\\")) or os.path.isabs(link):
            raise UnsafeArchiveError(f"refusing {where}: link to absolute path {link!r}")
        # symlink targets are relative to the member's folder, hard links to the archive root
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, link.replace("\\", "/")))
        if resolved == ".." or resolved.startswith("../") or posixpath.isabs(resolved):
            raise UnsafeArchiveError(f"refusing {where}: link {link!r} points outside the archive")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"refusing {where}: special file (device/fifo) not allowed")


def _check_dest(rel: str, where: str) -> str:
    rel = rel.replace("\\", "/")
    if rel.startswith("/") or ".." in rel.split("/") or os.path.isabs(rel) or not rel.strip("/"):
        raise UnsafeArchiveError(f"refusing to extract {where} to {rel!r}: destination outside the target folder")
    return rel


def safe_extract(
    archive: str | os.PathLike | IO[bytes],
    dest_root: str | os.PathLike,
    select: Callable[[str], str | None],
    required: int | None = None,
    label: str | None = None,
) -> list[Path]:
    """Stream ``archive`` (any compression tarfile knows) and extract the regular files ``select`` picks.

    Args:
        archive: path or binary file object (read as a stream, ``r|*``).
        dest_root: folder the selected members go under.
        select: member name -> destination path relative to ``dest_root`` (posix), or ``None`` to skip.
        required: if given, raise :class:`MissingMemberError` unless at least this many files were selected.
        label: name of the archive in error messages.

    Every member is checked with :func:`check_member`, selected or not. Selected links/directories are not
    created. Files go to a staging folder inside ``dest_root`` first and are moved into place (``os.replace``)
    only after the whole archive was read without error; otherwise the staging folder is removed.

    Returns the final paths, in archive order.
    """
    dest_root = Path(dest_root)
    label = label or (os.fspath(archive) if isinstance(archive, (str, os.PathLike)) else "archive stream")
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest_root))
    staged: list[tuple[Path, Path]] = []
    try:
        if isinstance(archive, (str, os.PathLike)):
            tf = tarfile.open(archive, mode="r|*")
        else:
            tf = tarfile.open(fileobj=archive, mode="r|*")
        with tf:
            for member in tf:
                check_member(member, label)
                if not member.isfile():
                    continue
                rel = select(member.name)
                if rel is None:
                    continue
                rel = _check_dest(rel, f"archive member {member.name!r} in {label}")
                tmp = staging / f"{len(staged):06d}"
                src = tf.extractfile(member)
                assert src is not None
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                staged.append((tmp, dest_root / rel))
        if required is not None and len(staged) < required:
            raise MissingMemberError(
                f"{label}: expected at least {required} selected members, found {len(staged)} "
                "(wrong archive or version?)"
            )
        finals = []
        for tmp, final in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            finals.append(final)
        return finals
    finally:
        shutil.rmtree(staging, ignore_errors=True)
