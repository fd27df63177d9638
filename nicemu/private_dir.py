"""Private directories for sockets: the one check every socket directory of nicemu passes.

A socket is only as safe as the directory it lives in: whoever can write to the directory can
rename our socket away, bind their own in its place and read what a driver or a peer sends
(a squatter did exactly that with a 1777 `serve --socket` directory). So a topology's runtime
directory, a `nicemu serve --socket` directory and a unix cable end's directory must all be
*private* (`check_private_dir`):

- a directory, not a symlink to one;
- owned by us (the effective uid);
- no access for group or other (mode & 0o077 == 0);
- its parent owned by us or root and, if group or other may write to it, sticky (as /tmp is):
  otherwise another user could rename the whole directory away and put theirs there.

nicemu changes the mode only of directories it created itself. An existing directory that is
not private is refused, never chmodded: with `runtime_dir: /tmp` that would have made /tmp
0700 for everybody.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["MissingParentError", "PrivateDirError", "check_private_dir", "ensure_private_dir",
           "private_dir_problem"]


class PrivateDirError(OSError):
    """A directory that cannot hold our sockets safely; str() is one line for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class MissingParentError(FileNotFoundError):
    """A directory nicemu was asked to create whose parent does not exist.

    nicemu creates one level only (the socket's or the runtime directory itself): creating a
    whole missing tree would turn a typo into directories nobody removes."""

    def __init__(self, directory: Path, parent: Path) -> None:
        super().__init__(f"the directory {parent} does not exist; nicemu creates only {directory} "
                         f"itself (create {parent} first, or choose another path)")
        self.directory, self.parent = Path(directory), Path(parent)


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """Raise PrivateDirError unless `path` is a private directory (see the module docstring);
    FileNotFoundError if it does not exist."""
    path = Path(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise PrivateDirError(errno.ELOOP, f"{path} is a symlink; refusing to put sockets behind it")
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateDirError(errno.ENOTDIR, f"{path} is not a directory")
    me = os.geteuid()
    if st.st_uid != me:
        raise PrivateDirError(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not to us (uid {me}); "
                                           "another user could replace the sockets in it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PrivateDirError(errno.EPERM, f"directory {path} is accessible to group/other (mode "
                                           f"{mode:o}); use a 0700 directory so no other user can "
                                           "reach or replace the sockets in it")
    _check_parent(path)


def _check_parent(path: Path) -> None:
    """The parent may not let another user rename `path` away."""
    parent = path.parent
    st = os.stat(parent)
    if st.st_uid not in (os.geteuid(), 0):
        raise PrivateDirError(errno.EPERM, f"{parent} belongs to uid {st.st_uid}; refusing to put "
                                           "sockets under it")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise PrivateDirError(errno.EPERM, f"{parent} is writable by group/other without the sticky "
                                           f"bit (mode {stat.S_IMODE(st.st_mode):o}); another user "
                                           f"could rename {path.name} away")


def ensure_private_dir(path: str | os.PathLike[str], *, parents: bool = False,
                       created: list[Path] | None = None) -> Path:
    """Create `path` 0700, or check that an existing one is private (never change its mode).

    parents=False refuses a missing parent (MissingParentError); parents=True creates missing
    parents too (0700). Every directory created is appended to `created`, outermost first, so
    its owner can remove exactly those. Raises PrivateDirError for a directory that is not
    private (see check_private_dir)."""
    path = Path(path)
    for _attempt in range(10):  # another run may remove an empty parent between our mkdirs
        missing = [path, *path.parents][: _missing_depth(path)]
        if len(missing) > 1 and not parents:
            raise MissingParentError(path, missing[-1])
        try:
            for p in reversed(missing):
                try:
                    os.mkdir(p, 0o700)
                except FileExistsError:
                    continue  # made meanwhile (or a dangling symlink): checked below
                os.chmod(p, 0o700)  # ours: mkdir's mode was filtered by the umask
                if created is not None:
                    created.append(p)
            break
        except FileNotFoundError:
            continue
    check_private_dir(path)
    return path


def private_dir_problem(path: str | os.PathLike[str], *, parents: bool = False) -> str | None:
    """Why ensure_private_dir(path, parents=...) would fail, or None; creates nothing.

    For `nicemu up --check` and the checks before a start: an existing directory must be
    private; for a missing one, its parent must exist (unless `parents`), be a directory we may
    create in, and (as check_private_dir will ask once it is made) not let others rename it."""
    path = Path(path)
    try:
        check_private_dir(path)
        return None
    except FileNotFoundError:
        pass
    except OSError as e:
        return str(e) if isinstance(e, PrivateDirError) else f"{path}: {e.strerror or e}"
    missing = [path, *path.parents][: _missing_depth(path)]
    if len(missing) > 1 and not parents:
        return str(MissingParentError(path, missing[-1]))
    top = missing[-1].parent  # the existing directory the first mkdir would create in
    try:
        if not stat.S_ISDIR(os.stat(top).st_mode):
            return f"{top} is not a directory"
        if top == path.parent:
            _check_parent(path)
    except PrivateDirError as e:
        return str(e)
    except OSError as e:
        return f"{top}: {e.strerror or e}"
    if not os.access(top, os.W_OK | os.X_OK):
        return f"cannot create {missing[-1]}: {top} is not writable for us"
    return None


def _missing_depth(path: Path) -> int:
    """How many of path, path.parent, ... do not exist (up to the first that does)."""
    n = 0
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            break
        n += 1
    return n
