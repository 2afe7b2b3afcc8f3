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
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.exists(dest):  # an earlier, incomplete unpack
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(dest, ".complete")):
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot unpack '{archive}' ({e}); check the file (sha256sum -c SHA256SUMS) or "
                        f"remove it and point data.root at an unpacked copy") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
