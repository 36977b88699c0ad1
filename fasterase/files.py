"""What every file fasterase writes shares: its folder checked writable before any work, and the
permissions the user's umask gives (the temporary files behind our atomic writes are made 0600)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(folder: Path, what: str) -> None:
    """UserError unless a file can be created in `folder` (or, where it does not exist yet, in the nearest
    folder above it, where it would be made): tried by creating and removing an empty temporary file,
    since permission bits do not show a read-only file system or a pseudo one (/proc)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fasterase-write-check.", dir=existing)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {existing} (creating a file there failed: {e.strerror}); choose a "
                        "folder you can write to") from None
    try:
        os.close(fd)
    finally:
        os.unlink(tmp)


# Below this much room left where a write failed, the disk is taken to have been filled by it: torch.save
# and safetensors name no disk (torch 2.13: "basic_ios::clear: iostream error", "unexpected pos"; safetensors'
# SafetensorError, which is no OSError), and the half-written file is still there when this looks.
FULL_BELOW = 16 * 2**20


@contextlib.contextmanager
def full_disk_named(folder: Path, what: str):
    """A write in `folder` that fails for want of room is a UserError saying so, with the room left there:
    an OSError ENOSPC / EDQUOT, or any error of the writer while under FULL_BELOW bytes are free there. Other
    errors pass unchanged. The caller removes what it half-wrote."""
    try:
        yield
    except Exception as e:
        if isinstance(e, UserError):
            raise
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            raise e from None
        no_room = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (no_room or free < FULL_BELOW):
            raise
        raise UserError(f"{what}: could not be written in {folder}, the disk has no room for it ({free / 1e9:.3f} GB "
                        f"free there; the writer said: {str(e).strip()[:200]}); nothing was left half-written: free "
                        "space or choose another place") from None


def check_outside(path: Path, model_folder: Path | None, what: str) -> None:
    """UserError when `path` is, or lies in, the model's folder (None: the model is no local folder): a
    user's model is never written to."""
    if model_folder is None:
        return
    path = Path(path).expanduser().resolve()
    if path == model_folder or model_folder in path.parents:
        raise UserError(f"{what}: {path} is or lies in the model's own folder {model_folder}, which fasterase never "
                        "writes to; choose a place outside it")


def set_default_mode(path: Path) -> None:
    """Give `path` and everything under it the modes a plain open() or mkdir() would have (0666 / 0777
    less the umask), as a file made by tempfile or safetensors (0600) is about to replace a user's file."""
    mask = umask()
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                Path(root, name).chmod(0o777 & ~mask)
            for name in files:
                Path(root, name).chmod(0o666 & ~mask)
