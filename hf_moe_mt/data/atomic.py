"""Write a whole output directory or nothing: stage it in a sibling temp dir, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory (or a file) unless asked to; checked before any work."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)) and not overwrite:
        raise ValueError(
            f"output directory {output_dir} already exists and is not empty; pass --overwrite to replace it"
        )


@contextlib.contextmanager
def atomic_directory(output_dir: str, overwrite: bool = False):
    """Yield a staging directory; on success it replaces `output_dir`, on any error it is deleted and
    `output_dir` is left untouched (same file system, so the final step is a rename)."""
    check_output_dir(output_dir, overwrite)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        yield staging
        if os.path.isfile(output_dir):
            os.remove(output_dir)
        if os.path.exists(output_dir):
            retired = staging + "-old"
            os.rename(output_dir, retired)
            os.rename(staging, output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
