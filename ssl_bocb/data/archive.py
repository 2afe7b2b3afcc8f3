"""Unpack a dataset archive once into a cache folder, atomically (a half-unpacked tree is never used)."""
import os
import shutil
import tarfile
import tempfile

from ..errors import UserError


def default_cache_dir(cache_dir: str = "") -> str:
    return cache_dir or os.environ.get("SSL_BOCB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ssl_bocb")


def unpack_once(archive: str, cache_dir: str = "") -> str:
    """Unpack ``archive`` (a .tar.gz) into ``<cache>/<archive name without .tar.gz>/`` and return that folder.

    A finished unpack leaves a ``.complete`` marker; later calls return at once. The unpack goes to a temporary
    folder first and is renamed into place, so an interrupted unpack never leaves a partial tree behind.
    """
    name = os.path.basename(archive)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    cache = default_cache_dir(cache_dir)
    dest = os.path.join(cache, name)
    if _complete(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    # unique names (mkdtemp): processes on several nodes sharing the cache folder never collide
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.isdir(dest) and not _complete(dest):  # an incomplete tree left by an older version: move aside
            _discard(dest, cache, name)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: its tree is complete, ours is discarded
            if not _complete(dest):
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot unpack '{archive}' ({e}); check the file (sha256sum -c SHA256SUMS) or "
                        f"remove it and point data.root at an unpacked copy") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _complete(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, ".complete"))


def _discard(folder: str, cache: str, name: str) -> None:
    """Remove ``folder`` without ever deleting a tree another process is reading: rename it to a unique name first
    (atomic; if someone else moved it already, there is nothing to do), then delete that."""
    trash = tempfile.mkdtemp(prefix=f".{name}-stale-", dir=cache)
    try:
        os.rename(folder, os.path.join(trash, "tree"))
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)
