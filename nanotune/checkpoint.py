"""Files that are either complete or absent.

Every folder nanotune writes (adapter, model, checkpoint) is built under a temporary name next to
its destination, its files fsynced, then renamed into place: a crash mid-save leaves at worst a
stray temporary folder, never a destination that looks finished and is not.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager


def fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder; when the block succeeds it replaces `path` in one rename."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(path):  # rename the old one away first: a directory cannot be renamed over
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
