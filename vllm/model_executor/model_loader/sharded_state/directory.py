"""Atomic replacement of a checkpoint directory.

A save writes into a temporary directory beside the target (same filesystem), which
holds an "incomplete" marker from its first moment to the end. When every file is in
place it is swapped with the target in one step (``renameat2(RENAME_EXCHANGE)`` on
Linux; two renames elsewhere) and the marker is removed; the old contents, now in a
temporary directory, are deleted after that (by all ranks together, see
``split_for_deletion``). A directory holding the marker is refused by the loader, so a
save killed at any point leaves either the previous checkpoint untouched or a directory
that does not load; a killed deletion leaves a temporary directory that the next save
into the same target removes.

Files in the target that are not part of a sharded state (config, tokenizer, ...) are
carried over into the new directory as hard links (copies where links are impossible).

Where the target cannot be swapped (its parent is on another filesystem or not
writable), the temporary directory goes inside the target and the files are moved in
one by one while the target itself holds the marker. A mount point, the root directory,
and a target with a mount point inside are refused.

A swap gives the target a new inode: a process whose current directory was the target
(a caller that saved into ".") still sits in the old, deleted directory until it
changes into the path again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable

from vllm.logger import init_logger

logger = init_logger(__name__)

MARKER_NAME = ".sharded_state.incomplete"
_TMP_TAG = ".sharded-tmp-"
_OLD_TAG = ".sharded-old-"


def _can_swap(target: str) -> bool:
    """Whether a directory beside ``target`` can be renamed over it."""
    parent = os.path.dirname(target)
    try:
        same_fs = os.stat(parent).st_dev == os.stat(target).st_dev
        return same_fs and not os.path.ismount(target) and os.access(parent, os.W_OK)
    except OSError:
        return False


def _nested_mount(target: str) -> str | None:
    """A directory inside ``target`` that is another filesystem's mount point, if any."""
    device = os.stat(target).st_dev
    for dirpath, dirnames, _ in os.walk(target):
        for d in list(dirnames):
            path = os.path.join(dirpath, d)
            try:
                if os.path.ismount(path) or os.lstat(path).st_dev != device:
                    return path
            except OSError:
                dirnames.remove(d)
    return None


def check_target(target: str) -> None:
    """Refuse a save target that is not a directory, the root directory, a mount point,
    or a directory to be swapped that has a mount point inside (the swap would move that
    mount with the old contents, and deleting those would delete its files)."""
    target = os.path.realpath(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"Cannot save to {target}: it exists and is not a directory.")
    if not os.path.basename(target):
        raise ValueError(
            f"Cannot save a sharded state to {target}: it is the root directory. Save to a "
            "directory of its own, e.g. /checkpoints/model."
        )
    if os.path.ismount(target):
        raise ValueError(
            f"Cannot save a sharded state to {target}: it is a mount point (the root of a "
            "filesystem, e.g. a Docker volume), which a save cannot replace atomically. "
            f"Save to a directory inside it, e.g. {os.path.join(target, 'model')}."
        )
    swapped = os.path.isdir(target) and _can_swap(target)
    mount = _nested_mount(target) if swapped else None
    if mount is not None:
        raise ValueError(
            f"Cannot save to {target}: {mount} inside it is a mount point of another "
            "filesystem, and a save replaces the directory's contents. Save to a directory "
            "without mounts inside, or unmount it first."
        )


def make_temp_dir(target: str) -> str:
    """Create the temporary directory for a save into ``target`` (an absolute path)."""
    check_target(target)
    parent, name = os.path.split(target)
    inside = os.path.isdir(target) and not _can_swap(target)
    if not inside:
        os.makedirs(parent, exist_ok=True)
    remove_stale_temp_dirs(target)
    tmp = tempfile.mkdtemp(
        prefix=f".{name}{_TMP_TAG}{os.getpid()}-", dir=target if inside else parent
    )
    if os.path.isdir(target):
        mode = stat.S_IMODE(os.stat(target).st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o777 & ~umask
    os.chmod(tmp, mode)  # mkdtemp makes 0700; the result should look like a normal mkdir
    with open(os.path.join(tmp, MARKER_NAME), "w") as f:
        f.write("A save_sharded_state into this directory has not finished.\n")
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(target: str) -> None:
    """Delete temporary directories of earlier saves into ``target`` whose process is gone."""
    parent, name = os.path.split(target)
    for where in (parent, target):
        try:
            entries = os.listdir(where)
        except OSError:
            continue
        for tag in (_TMP_TAG, _OLD_TAG):
            prefix = f".{name}{tag}"
            for entry in entries:
                pid_text = entry[len(prefix) :].split("-", 1)[0]
                if not entry.startswith(prefix) or not pid_text.isdigit():
                    continue
                pid = int(pid_text)
                if pid == os.getpid() or _pid_alive(pid):
                    continue
                logger.info("Removing %s, left by an interrupted save (pid %d).", entry, pid)
                shutil.rmtree(os.path.join(where, entry), ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def carry_over(target: str, tmp: str, is_shard_state: Callable[[str], bool]) -> list[str]:
    """Link the target's entries that are not sharded state into ``tmp``; returns names."""
    carried: list[str] = []
    if not os.path.isdir(target):
        return carried
    for entry in os.scandir(target):
        if entry.name == MARKER_NAME or is_shard_state(entry.name):
            continue
        dst = os.path.join(tmp, entry.name)
        if os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)
        carried.append(entry.name)
    return carried


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"Cannot swap {a} into place: {os.strerror(err)}", b)


def commit(tmp: str, target: str) -> str | None:
    """Put the finished ``tmp`` at ``target`` and drop the marker; return the directory
    that now holds the old contents, for the caller to delete (None: nothing replaced)."""
    _fsync_dir(tmp)
    old = None
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        old = tmp  # the old contents now live at the temporary path
    else:
        head, tail = os.path.split(tmp)
        old = os.path.join(head, tail.replace(_TMP_TAG, _OLD_TAG, 1))
        os.rename(target, old)
        os.rename(tmp, target)
    _fsync_dir(os.path.dirname(target))
    os.remove(os.path.join(target, MARKER_NAME))
    _fsync_dir(target)
    return old


def _install_in_place(
    tmp: str, target: str, is_shard_state: Callable[[str], bool], last: str
) -> None:
    """Move the files of ``tmp`` (inside ``target``) into ``target``; ``last`` goes last.
    The target holds the marker from before the first old shard is deleted to the end."""
    marker = os.path.join(target, MARKER_NAME)
    with open(marker, "w") as f:
        f.write("A save_sharded_state into this directory has not finished.\n")
    _fsync_dir(target)
    for name in os.listdir(target):
        path = os.path.join(target, name)
        if is_shard_state(name) and not os.path.isdir(path):
            os.remove(path)
    names = [n for n in os.listdir(tmp) if n not in (MARKER_NAME, last)]
    for name in [*names, last]:
        os.replace(os.path.join(tmp, name), os.path.join(target, name))
    shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(target)
    os.remove(marker)
    _fsync_dir(target)


def install(tmp: str, target: str, is_shard_state: Callable[[str], bool], last: str) -> str | None:
    """Make the finished ``tmp`` the contents of ``target``: the target's files for which
    ``is_shard_state`` is false are kept, the others replaced; ``last`` (the manifest) is
    in place no earlier than the rest. Returns a directory of old contents that the
    caller deletes, or None."""
    if os.path.dirname(tmp) == target:
        _install_in_place(tmp, target, is_shard_state, last)
        return None
    carried = carry_over(target, tmp, is_shard_state)
    old = commit(tmp, target)
    if old is not None:
        keep_late_entries(old, target, set(carried), is_shard_state)
    return old


def keep_late_entries(
    old: str, target: str, carried: set[str], is_shard_state: Callable[[str], bool]
) -> list[str]:
    """Move back into ``target`` what appeared in it between ``carry_over`` and the swap
    (so it is in ``old`` but was not carried): a save deletes only what it replaces.
    Returns the names moved back."""
    kept = []
    for name in os.listdir(old):
        if name == MARKER_NAME or name in carried or is_shard_state(name):
            continue
        dst = os.path.join(target, name)
        if os.path.lexists(dst):  # the same name was created again since the swap
            dst = os.path.join(target, f"{name}.kept-{os.getpid()}")
        os.rename(os.path.join(old, name), dst)
        kept.append(name)
        logger.warning("Kept %s, created in %s while the save was finishing.", dst, target)
    return kept


def split_for_deletion(path: str, parts: int) -> list[list[str]]:
    """The files directly in ``path``, dealt into ``parts`` lists of about equal bytes.

    Unlinking a large file costs time in proportion to its size (the kernel frees its
    pages and extents), so when a save replaces a checkpoint every rank deletes one
    share of the old files at the same time.
    """
    files = []
    for entry in os.scandir(path):
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                files.append((entry.stat(follow_symlinks=False).st_size, entry.path))
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for size, file in sorted(files, reverse=True):
        i = loads.index(min(loads))
        shares[i].append(file)
        loads[i] += size
    return shares


def delete_files(paths: list[str]) -> None:
    """Remove ``paths``; failures are logged, not raised (the save itself has succeeded)."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("Could not delete %s, left from the replaced checkpoint: %s", path, e)


def is_incomplete(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER_NAME))
