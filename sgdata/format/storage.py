"""Where shards live: a local path, or a URL of any filesystem fsspec knows (s3://, gs://, ...).

Readers (`sgdata inspect/verify`, `sgmodel train/evaluate`) and the build address object storage the
same way they address a folder; this module is the one place that tells the two apart:

- `is_url(spec)`: a `scheme://` spec. `file://` URLs are local paths (`local_path` strips them), so
  a local build is the same code and the same bytes whichever way it is named.
- `filesystem(url)`: fsspec's filesystem and path for a URL. Listing caches are off, because other
  processes (Ray workers, other ranks) write the bucket while this one reads it.
- `open_shard(url)`: a binary stream over a shard, local or remote, read front to back.

Credentials and endpoints come from where the filesystem's own library reads them, never from
sgdata options: for s3:// that is botocore (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws/config and ~/.aws/credentials, AWS_ENDPOINT_URL for S3-compatible servers such as MinIO);
for gs:// it is gcsfs (GOOGLE_APPLICATION_CREDENTIALS, gcloud's login).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import IO, Any, Iterator

from sgdata.format.errors import UserError

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# the package fsspec needs per scheme, named in the error when it is missing
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub"}


def is_url(spec: str | Path) -> bool:
    """True for `scheme://...` other than file:// (which names a local path)."""
    m = _SCHEME.match(str(spec))
    return bool(m) and m["scheme"].lower() != "file"


def local_path(spec: str | Path) -> str:
    """A local spec without its `file://` prefix (anything else unchanged)."""
    text = str(spec)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m["scheme"].lower() if m else "file"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; a one-sentence UserError when fsspec cannot serve it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError:
        package = BACKENDS.get(scheme(url), "the fsspec backend for it")
        raise UserError(f"{scheme(url)}:// URLs need the {package} package: pip install {package}") from None
    except ValueError as err:
        raise UserError(f"{url} is not a storage URL fsspec can open ({err})") from None


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Turn a storage failure (no credentials, endpoint down, access denied) into one sentence naming `url`.

    Wraps whole operations on remote storage at the entry points, so what reaches the user is
    "cannot reach s3://bucket/prefix: <the library's own reason>", not a botocore traceback.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # botocore, aiohttp, gcsfs errors share no base class
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot reach {url}: {type(err).__name__}: {reason[:300]} (credentials and endpoint "
                        f"come from the environment, e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID)") from None


def join(root: str, *names: str) -> str:
    """`root/name/...` for a local path or a URL (URLs always use '/')."""
    parts = [str(root).rstrip("/")] + [n.strip("/") for n in names if n]
    return "/".join(parts) if is_url(root) else str(Path(*parts))


def open_shard(url: str | Path) -> IO[bytes]:
    """A binary stream over the shard at `url` (a local path or an fsspec URL)."""
    if not is_url(url):
        return open(local_path(url), "rb")
    fs, path = filesystem(str(url))
    return fs.open(path, "rb")


def read_text(url: str) -> str | None:
    """The text of a small file (a sizes.json, a dataset card), or None when it does not exist."""
    try:
        if not is_url(url):
            return Path(local_path(url)).read_text()
        fs, path = filesystem(url)
        return fs.cat_file(path).decode()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def stat(url: str) -> tuple[int, str]:
    """(size in bytes, a version tag that changes when the file is replaced) of a shard."""
    if not is_url(url):
        st = Path(local_path(url)).stat()
        return st.st_size, str(st.st_mtime_ns)
    fs, path = filesystem(url)
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or info.get("mtime")
    return int(info["size"]), str(version)
