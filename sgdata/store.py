"""The build's OUT, a local folder or a prefix on object storage, behind one small interface.

The build, the writer, the merge and verify address OUT's files by names relative to it
("train/train-000000.tar", "train/parts/train-000000.json") and never touch paths themselves, so
`--out /data/shards` and `--out s3://bucket/shards` run the same code and write the same bytes.

How a file appears whole (what resume and readers rely on):
- local: `sgdata.format.files.atomic_write`: a hidden temporary beside the file, fsynced, renamed.
- object storage (s3, gs, az, ...): the file is written to a local temporary first, then uploaded
  under its final key in one request (a multipart upload for large files). An object store
  publishes an object only when its upload completes, so a reader sees the whole object or none;
  a killed upload leaves no object behind (S3 keeps the parts of an unfinished multipart upload
  out of sight until a lifecycle rule aborts them).
- any other fsspec filesystem (sftp, webdav, ...): uploaded under the temporary name
  `.<name>.tmp-<host>-<pid>` and then moved, the same scheme and clean-up as local temporaries.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from sgdata.format.files import atomic_write, fsync_dir, json_bytes, temporary_name
from sgdata.format.storage import filesystem, is_url, local_path, reaching, scheme

# Filesystems whose single upload is atomic (an object appears only when complete).
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "memory"}


class Store:
    """OUT at `root` (a path, a file:// URL or an fsspec URL); names are relative to it, '/'-separated."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.remote = is_url(self.root)
        if self.remote:
            self.root = self.root.rstrip("/")
            self.fs, self.base = filesystem(self.root)
            self.base = self.base.rstrip("/")
            self.atomic_upload = scheme(self.root) in OBJECT_STORES
        else:
            self.base = local_path(self.root)
            self.root = self.base

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def _path(self, name: str = "") -> str:
        if self.remote:
            return f"{self.base}/{name}" if name else self.base
        return str(Path(self.base) / name) if name else self.base

    def url(self, name: str = "") -> str:
        """The full path or URL of `name` (for messages and for readers)."""
        if self.remote:
            return f"{self.root}/{name}" if name else self.root
        return self._path(name)

    def reaching(self):
        """Storage failures inside the block become one sentence naming OUT (no-op locally)."""
        return reaching(self.root) if self.remote else contextlib.nullcontext()

    # ---- reading ---------------------------------------------------------------------------------

    def is_folder(self) -> bool | None:
        """True: OUT is a folder (or a prefix); False: it is a file; None: nothing is there."""
        if self.remote:
            if self.fs.isfile(self.base):
                return False
            return True if self.fs.isdir(self.base) else None
        path = Path(self.base)
        return path.is_dir() if path.exists() else None

    def size(self, name: str) -> int | None:
        """The size of file `name`, or None when it is missing."""
        if self.remote:
            try:
                info = self.fs.info(self._path(name))
            except FileNotFoundError:
                return None
            return int(info["size"]) if info.get("type") == "file" else None
        path = Path(self._path(name))
        return path.stat().st_size if path.is_file() else None

    def is_file(self, name: str) -> bool:
        return self.size(name) is not None

    def read_bytes(self, name: str) -> bytes:
        if self.remote:
            return self.fs.cat_file(self._path(name))
        return Path(self._path(name)).read_bytes()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open(self, name: str) -> IO[bytes]:
        """A binary read stream."""
        return self.fs.open(self._path(name), "rb") if self.remote else open(self._path(name), "rb")

    def entries(self, folder: str = "") -> tuple[list[str], list[str]]:
        """(file names, folder names) directly in `folder`, sorted; empty when it does not exist."""
        files, folders = [], []
        if self.remote:
            try:
                listing = self.fs.ls(self._path(folder), detail=True)
            except FileNotFoundError:
                return [], []
            for entry in listing:
                name = entry["name"].rstrip("/").rpartition("/")[2]
                (folders if entry.get("type") == "directory" else files).append(name)
        else:
            path = Path(self._path(folder))
            if not path.is_dir() or path.is_symlink():
                return [], []
            for entry in path.iterdir():
                if entry.is_file():
                    files.append(entry.name)
                elif entry.is_dir() and not entry.is_symlink():
                    folders.append(entry.name)
        return sorted(files), sorted(folders)

    # ---- writing ---------------------------------------------------------------------------------

    def make_folder(self, folder: str = "") -> None:
        """Create `folder` (object stores have no folders: nothing to do)."""
        if not self.remote:
            Path(self._path(folder)).mkdir(parents=True, exist_ok=True)

    def delete(self, name: str) -> None:
        """Remove file `name` if it exists."""
        if self.remote:
            try:
                self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass
        else:
            Path(self._path(name)).unlink(missing_ok=True)

    def remove_empty_folder(self, folder: str) -> None:
        if not self.remote:
            path = Path(self._path(folder))
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()

    def sync(self, folder: str) -> None:
        """Make the renames in `folder` durable (local folders; an upload is durable once it returns)."""
        if not self.remote:
            fsync_dir(self._path(folder))

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file to write `name` into; it appears under its name, whole, when the block ends.

        An exception in the block leaves `name` as it was. See the module docstring for how.
        """
        if not self.remote:
            with atomic_write(self._path(name), "wb") as f:
                yield f
            return
        fd, scratch = tempfile.mkstemp(prefix=".sgdata-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            final = self._path(name)
            if self.atomic_upload:
                self.fs.put_file(scratch, final)
            else:
                staged = f"{final.rpartition('/')[0]}/{temporary_name(final.rpartition('/')[2]).name}"
                self.fs.put_file(scratch, staged)
                self.fs.mv(staged, final)
        finally:
            os.unlink(scratch)

    def write_json(self, name: str, obj: Any) -> None:
        """`obj` as sgdata's JSON (indented, sorted keys, UTF-8) through `writing`."""
        with self.writing(name) as f:
            f.write(json_bytes(obj))
