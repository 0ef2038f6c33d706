"""Where campaigns and stats live: a local path or any pyarrow filesystem URI.

`location("runs/a")`, `location("/shared/runs/a")`, `location("file:///shared/runs/a")`
and `location("s3://bucket/runs/a?endpoint_override=minio:9000&scheme=http")` all give a
`Location`: a folder or file on one `pyarrow.fs.FileSystem`, with the few operations the
pipeline needs (read, atomic write, list, delete). Every read and write of a campaign
directory or a stats cache goes through it, so the same code runs on a laptop disk, a
shared NFS mount or an object store; credentials come the usual way for that store (for
S3: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws`, an instance role).

Atomic writes: on a local disk a temp file beside the target is renamed over it; on an
object store a file is one object, which readers see whole or not at all. `str()` of a
location is a URI that `location()` reads back to the same place, query included, so a
location travels to Ray actors on other nodes as a plain string.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeAlias

import pyarrow.fs as pafs

from seqedit.errors import SeqeditError
from seqedit.files import write_atomic

_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


class StorageError(SeqeditError, OSError):
    """A location that cannot be opened or an operation on it that failed, naming it."""


class Location:
    """A file or folder on a pyarrow filesystem. Local ones use plain OS calls."""

    __slots__ = ("_display", "fs", "fs_path", "query", "scheme")

    def __init__(self, fs: pafs.FileSystem, fs_path: str, scheme: str = "", query: str = ""):
        self.fs = fs
        self.fs_path = fs_path.rstrip("/") or "/"
        self.scheme = scheme
        self.query = query

    # --- naming -------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """Whether this is on the local file system (a path the OS opens)."""
        return self.scheme in ("", "file")

    @property
    def local_path(self) -> Path:
        """The OS path of a local location; a remote one raises `StorageError`."""
        if not self.is_local:
            raise StorageError(f"{self}: not a local path")
        return Path(self.fs_path)

    @property
    def name(self) -> str:
        return self.fs_path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        head = posixpath.dirname(self.fs_path) or self.fs_path
        return Location(self.fs, head, self.scheme, self.query)

    def __truediv__(self, name: str | os.PathLike[str]) -> Location:
        child = os.fspath(name).strip("/")
        if not child:
            return self
        return Location(self.fs, f"{self.fs_path.rstrip('/')}/{child}", self.scheme, self.query)

    def __str__(self) -> str:
        if self.scheme == "":
            return self.fs_path
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.fs_path}{query}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self) -> tuple[Callable[[str], Location], tuple[str]]:
        return location, (str(self),)

    # --- reading ------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.fs_path)
        except OSError as exc:
            raise StorageError(f"{self}: {exc}") from exc

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        """The whole file; a missing one raises `FileNotFoundError` naming it."""
        if self.is_local:
            return self.local_path.read_bytes()
        try:
            with self.fs.open_input_stream(self.fs_path) as stream:
                return stream.read()
        except OSError as exc:
            raise self._read_error(exc) from exc

    def _read_error(self, exc: OSError) -> OSError:
        """A failed read as `FileNotFoundError` (no such file) or `StorageError`, named."""
        if isinstance(exc, FileNotFoundError) or not self.exists():
            return FileNotFoundError(f"{self}: no such file")
        return StorageError(f"{self}: cannot read: {exc}")

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local path holding this file for the block: the file itself when local, else a
        temporary download (for readers that need a path, e.g. safetensors' `safe_open`)."""
        if self.is_local:
            if not self.local_path.is_file():
                raise FileNotFoundError(f"{self}: no such file")
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="seqedit-") as folder:
            copy = Path(folder) / self.name
            try:  # streamed: a stats file of several GB never sits in memory whole
                with self.fs.open_input_stream(self.fs_path) as source, copy.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 22)
            except OSError as exc:
                raise self._read_error(exc) from exc
            yield copy

    def iterdir(self) -> list[Location]:
        """The entries of this folder (none if it does not exist), sorted by name."""
        selector = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=False)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise StorageError(f"{self}: cannot list: {exc}") from exc
        names = sorted(info.base_name for info in infos)
        return [self / name for name in names]

    def glob(self, pattern: str) -> list[Location]:
        """Entries of this folder whose name matches `pattern` (fnmatch, one level), sorted."""
        return [entry for entry in self.iterdir() if fnmatch.fnmatchcase(entry.name, pattern)]

    # --- writing ------------------------------------------------------------------------

    def mkdir(self) -> None:
        """Create this folder and its parents if missing (a no-op where folders are implicit)."""
        try:
            self.fs.create_dir(self.fs_path, recursive=True)
        except OSError as exc:
            raise StorageError(f"{self}: cannot create folder: {exc}") from exc

    def write_with(self, write: Callable[[Path], None]) -> Location:
        """Call `write(tmp)` to fill a local temp file, then put it here in one step: readers
        see the old file or the whole new one, never part of it."""
        if self.is_local:
            write_atomic(self.local_path, write)
            return self
        with tempfile.TemporaryDirectory(prefix="seqedit-") as folder:
            staged = Path(folder) / self.name
            write(staged)
            try:
                with staged.open("rb") as source, self.fs.open_output_stream(self.fs_path) as sink:
                    shutil.copyfileobj(source, sink, 1 << 22)
            except OSError as exc:
                raise StorageError(f"{self}: cannot write: {exc}") from exc
        return self

    def write_bytes(self, data: bytes) -> Location:
        return self.write_with(lambda tmp: tmp.write_bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> Location:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{self}: no such file") from None
        except OSError as exc:
            if missing_ok and not self.exists():
                return
            raise StorageError(f"{self}: cannot delete: {exc}") from exc

    def delete_tree(self) -> None:
        """Remove this folder and everything in it (nothing if it does not exist)."""
        if not self.exists():
            return
        try:
            self.fs.delete_dir(self.fs_path)
        except OSError as exc:
            raise StorageError(f"{self}: cannot delete folder: {exc}") from exc


Where: TypeAlias = str | os.PathLike[str] | Location
"""What functions taking a campaign dir or a stats dir accept."""


def is_uri(text: str) -> bool:
    """Whether `text` is a `scheme://...` URI rather than a local path."""
    return _URI.match(text) is not None


def location(where: Where) -> Location:
    """The location of a local path, a `file://` URI or any URI pyarrow has a filesystem for
    (s3://, gs://, hdfs://, abfs://; options such as `?endpoint_override=` in the query)."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    match = _URI.match(text)
    if match is None:
        return Location(_local_fs(), str(Path(text).absolute()), "", "")
    scheme = match["scheme"].lower()
    if scheme == "file":
        return Location(_local_fs(), str(Path(match["rest"]).absolute()), "file", "")
    rest, _, query = match["rest"].partition("?")
    fs = _remote_fs(scheme, rest.split("/", 1)[0], query)
    return Location(fs, rest, scheme, query)


@lru_cache(maxsize=1)
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@lru_cache(maxsize=32)
def _remote_fs(scheme: str, authority: str, query: str) -> pafs.FileSystem:
    """One filesystem object per store and options (S3 clients are costly to make)."""
    uri = f"{scheme}://{authority}" + (f"?{query}" if query else "")
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise StorageError(
            f"{uri}: not a storage location pyarrow can open ({exc}); use a local path or a "
            "URI such as file:///shared/runs or s3://bucket/runs"
        ) from exc
    return fs
