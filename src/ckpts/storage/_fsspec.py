"""FsspecStorage: a run on any fsspec URL (``s3://``, ``memory://``, ``gs://``...).

No rename on object stores: files go straight into the checkpoint's prefix, then the
manifest, the commit marker, is created with ``If-None-Match: *`` (two writers never both
commit a step). Large files go up as parallel multipart uploads (S3), reads are parallel
ranged GETs of up to PART_SIZE (adjacent ranges merged); extra memory stays under
CONCURRENCY x PART_SIZE. The writer lock is a lease object (ckpts.storage._lease), proved
still held before every request that deletes or overwrites, so a writer that stalled past
its lease harms nothing its successor wrote. Manifest updates and history appends are
read-modify-writes conditional on the version read (ckpts.storage._versioned), so
concurrent updaters lose nothing. docs/storage.md has the whole story.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ckpts.errors import CheckpointError, CorruptCheckpointError, LockedError
from ckpts.storage._lease import Lease
from ckpts.storage._lock import LOCK_FILE
from ckpts.storage._parallel import run_parallel, threads_for
from ckpts.storage._port import (
    FOREIGN_SUFFIXES,
    HISTORY,
    MANIFEST,
    Listed,
    Range,
    Staged,
    Storage,
    as_os_errors,
    coalesce,
    parse_step,
    url_protocol,
)
from ckpts.storage._versioned import VersionedObjects

log = logging.getLogger("ckpts")

PART_SIZE = 8 * 2**20  # bytes per multipart part and per ranged GET
CONCURRENCY = 8  # requests in flight per call
_MAX_PARTS = 10_000  # S3's limit for one upload
_S3_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 2}}
_INSTALL = "pip install 'ckpts[s3]'"


class FsspecStorage(Storage):
    """A run on an fsspec URL: see the module docstring for the commit and the lease.

    Args:
        url: the run, e.g. ``"s3://bucket/runs/exp1"``.
        storage_options: for the fsspec filesystem (S3: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``); the usual AWS variables work too.
        lease_seconds: how long the writer's lease lasts without renewal.

    Raises:
        CheckpointError: the backend is missing, the protocol unknown, the bucket
            absent, the credentials refused or the store unreachable.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any], *,
                 lease_seconds: float = 60.0) -> None:
        self.location, self.lease_seconds = url.rstrip("/"), lease_seconds
        self._processes = 1  # of one job on this host: see share_host
        self._s3 = url_protocol(url) in ("s3", "s3a")
        try:
            import fsspec
        except ImportError as e:
            raise CheckpointError(f"{url}: URLs need fsspec: {_INSTALL}") from e
        # no cached listings: another process (the writer, an evaluator) changes the run
        options = {"use_listings_cache": False, **storage_options}
        if self._s3:  # botocore would retry a vanished server for minutes; give up in seconds
            options["config_kwargs"] = {**_S3_TIMEOUTS, **options.get("config_kwargs", {})}
        try:
            self.fs, root = fsspec.core.url_to_fs(self.location, **options)
        except ImportError as e:
            fix = _INSTALL if self._s3 else "install the package named above"
            raise CheckpointError(f"{url}: this URL's backend is missing ({e}); {fix}") from e
        except (ValueError, TypeError) as e:
            raise CheckpointError(
                f"{url}: fsspec cannot open this URL ({e}); check the protocol (known ones "
                f"include s3://, gs://, az://, memory://) and the storage_options") from e
        self.root: str = root.rstrip("/")
        self._objects = VersionedObjects(self.fs, conditional=self._s3)
        self._lease = Lease(self._objects, self._path(LOCK_FILE), location=self.location,
                            seconds=lease_seconds)
        if self._s3:  # other stores report a bad location as OSError at first use
            self._check_bucket()

    def _check_bucket(self) -> None:
        """One cheap request, so a bad bucket or key fails before anything is written."""
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError as e:
            raise CheckpointError(f"{self.location}: the bucket {bucket!r} does not exist; "
                                  f"create the bucket, or fix the URL") from e
        except PermissionError as e:
            raise CheckpointError(
                f"{self.location}: the store refused the credentials ({e}); set "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL off AWS), or pass "
                f"storage_options={{'key': ..., 'secret': ..., 'client_kwargs': "
                f"{{'endpoint_url': ...}}}}") from e
        except Exception as e:
            raise CheckpointError(f"{self.location}: cannot reach the store ({e!r}); check "
                                  f"the endpoint URL and the network") from e

    def __repr__(self) -> str:
        return f"FsspecStorage({self.location!r}, lease_seconds={self.lease_seconds})"

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _files_below(self, prefix: str) -> dict[str, int]:
        """Relative path -> size of every object below ``prefix``, from one listing."""
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(prefix) + 1:]: int(info["size"]) for path, info in found.items()
                if info.get("type") != "directory" and path.startswith(prefix + "/")}

    def _step_folders(self) -> dict[str, dict[str, int]]:
        """Step-folder name -> its direct files' sizes, from one recursive listing."""
        folders: dict[str, dict[str, int]] = {}
        for relative, size in self._files_below(self.root).items():
            name, _, file = relative.partition("/")
            if parse_step(name) is not None and file and "/" not in file:
                folders.setdefault(name, {})[file] = size
        return folders

    @as_os_errors
    def committed(self) -> list[Listed]:
        return [Listed(name, files) for name, files in self._step_folders().items()
                if MANIFEST in files]

    @as_os_errors
    def sizes(self, name: str) -> dict[str, int]:
        return {file: size for file, size in self._files_below(self._path(name)).items()
                if "/" not in file}

    @as_os_errors
    def read(self, name: str, file: str) -> bytes:
        return self._get(self._path(name, file))

    def _get(self, path: str) -> bytes:
        """A whole small object in one ranged GET (without a range s3fs HEADs it first)."""
        try:
            return bytes(self.fs.cat_file(path, start=0))
        except OSError as e:  # S3 refuses any range of an empty object (416)
            if isinstance(e, FileNotFoundError) or self.fs.size(path):
                raise
            return b""

    @as_os_errors
    def read_ranges(self, name: str, ranges: Sequence[Range]) -> None:
        run_parallel(lambda piece: self._read_into(name, *piece), coalesce(ranges, PART_SIZE),
                     threads=CONCURRENCY)

    def _read_into(self, name: str, file: str, offset: int, views: list[memoryview]) -> None:
        """One ranged GET of ``views``' bytes (adjacent in ``file`` from ``offset``)."""
        size = sum(view.nbytes for view in views)
        path, end = self._path(name, file), offset + size
        try:
            data = self.fs.cat_file(path, start=offset, end=end)
        except OSError as e:  # S3 answers a range past the end with 416, not short data
            if isinstance(e, FileNotFoundError) or self.fs.size(path) >= end:
                raise
            data = b""
        if len(data) != size:
            raise CorruptCheckpointError(f"{self.where(name)}/{file} ends before byte {end}: "
                                         f"it is truncated; restore another checkpoint")
        received, start = memoryview(data), 0
        for view in views:
            view[:] = received[start:start + view.nbytes]
            start += view.nbytes

    @as_os_errors
    def stage(self, name: str) -> Staged:
        """Start ``name`` in its final prefix, once what it holds (that step saved before,
        leftovers) is deleted, manifest first: no reader sees old and new files mixed; a
        crash during a re-save loses that step (a local disk keeps one of the two)."""
        self.delete(name)  # proves the lease first
        return Staged(name, self._path(name))

    @as_os_errors
    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        small: list[tuple[str, list[memoryview], int]] = []
        large: list[tuple[str, list[memoryview], int]] = []
        for file, parts in files:
            views = [memoryview(part).cast("B") for part in parts]
            size = sum(view.nbytes for view in views)
            is_large = self._s3 and size > PART_SIZE
            (large if is_large else small).append((f"{staged.where}/{file}", views, size))
        run_parallel(lambda file: self._put_new(file[0], b"".join(file[1])), small,
                     threads=CONCURRENCY)
        for path, views, size in large:  # one file at a time, its parts all in parallel
            self._upload(path, views, size)

    @as_os_errors
    def write_stream(self, staged: Staged, file: str, pieces: Iterable[memoryview]) -> None:
        """Through the filesystem's own buffered writer (s3fs: a multipart upload, part by
        part as the pieces come), which copies each piece before taking the next."""
        from fsspec.spec import AbstractBufferedFile

        self._lease.prove()
        stream = self.fs.open(f"{staged.where}/{file}", "wb")
        try:
            for piece in pieces:
                self._lease.prove()
                stream.write(piece)
        except BaseException:
            if isinstance(stream, AbstractBufferedFile):  # s3fs: abort the multipart upload
                stream.discard()
                stream.closed = True  # and finalize nothing
            else:
                stream.close()  # what it holds goes with the staged checkpoint, at abort
            raise
        self._lease.prove()
        stream.close()

    def _put_new(self, path: str, data: bytes) -> None:
        """One object of a staged checkpoint, written only where there is none (S3)."""
        self._lease.prove()
        self.fs.pipe_file(path, data, **({"mode": "create"} if self._s3 else {}))

    def _upload(self, path: str, views: Sequence[memoryview], size: int) -> None:
        """A parallel multipart upload; each part is copied from ``views`` only when sent."""
        bucket, key, _ = self.fs.split_path(path)
        upload = {"Bucket": bucket, "Key": key, "UploadId": self.fs.call_s3(
            "create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]}
        part_size = max(PART_SIZE, -(-size // _MAX_PARTS))
        try:
            etags = run_parallel(lambda part: self._upload_part(upload, views, *part, part_size),
                                 list(enumerate(range(0, size, part_size), 1)), threads=CONCURRENCY)
            parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
            self._lease.prove()
            self.fs.call_s3("complete_multipart_upload", **upload, IfNoneMatch="*",
                            MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.fs.call_s3("abort_multipart_upload", **upload)
            except Exception as e:  # the store may be gone; a lifecycle rule cleans up
                log.warning("could not abort the multipart upload of %s: %s", path, e)
            raise

    def _upload_part(self, upload: dict[str, str], views: Sequence[memoryview], number: int,
                     start: int, part_size: int) -> str:
        pieces, offset = [], 0  # copy this part's bytes only, when it is sent
        for view in views:
            lo, hi = max(start - offset, 0), min(start + part_size - offset, view.nbytes)
            pieces += [view[lo:hi]] if lo < hi else []
            offset += view.nbytes
        body = b"".join(pieces)
        self._lease.prove()
        return str(self.fs.call_s3("upload_part", **upload, PartNumber=number, Body=body)["ETag"])

    def reuse(self, staged: Staged, source: str, file: str, nbytes: int) -> bool:
        """A server-side copy (S3 CopyObject): the store keeps two full objects, but no
        byte crosses the network again."""
        path = self._path(source, file)
        self._lease.prove()
        try:
            if int(self.fs.info(path)["size"]) != nbytes:
                return False
            self.fs.cp_file(path, f"{staged.where}/{file}")
        except Exception as e:  # any failure: the caller writes the bytes instead
            log.info("could not copy %s on the server (%s); writing it instead", path, e)
            return False
        return True

    @as_os_errors
    def commit(self, staged: Staged, manifest: bytes) -> None:
        self._lease.prove()
        try:
            self.fs.pipe_file(f"{staged.where}/{MANIFEST}", manifest, mode="create")
        except FileExistsError as e:
            raise LockedError(
                f"{self.where(staged.name)}: another writer committed this step first: two "
                f"processes are saving to {self.location}; give each run its own URL") from e

    @as_os_errors
    def abort(self, staged: Staged) -> None:
        """Delete the staged prefix, unless the lease was lost: the prefix may then hold
        the new writer's files, and its clean-up removes what this writer left."""
        try:
            self._lease.prove()
        except LockedError as e:
            log.warning("left %s as it is: %s", self.where(staged.name), e)
            return
        self._delete(staged.name)

    @as_os_errors
    def delete(self, name: str) -> None:
        self._lease.prove()
        self._delete(name)

    def _delete(self, name: str) -> None:
        files = self._files_below(self._path(name))
        if MANIFEST in files:
            self.fs.rm_file(self._path(name, MANIFEST))
        if set(files) - {MANIFEST}:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(name), recursive=True)

    @as_os_errors
    def update(self, name: str, edit: Callable[[bytes], bytes]) -> bytes:
        """A read-modify-write conditional on the version read (S3: ``If-Match``),
        retried when another process updated the manifest in between."""
        def edited(manifest: bytes | None) -> bytes:
            if manifest is None:
                raise FileNotFoundError(f"{self.where(name)} has no {MANIFEST}")
            return edit(manifest)

        return self._objects.rewrite(self._path(name, MANIFEST), edited)

    @as_os_errors
    def clean(self, *, check_manifests: bool) -> list[str]:
        unfinished = sorted(name for name, files in self._step_folders().items()
                            if MANIFEST not in files) if check_manifests else []
        for name in unfinished:
            self.delete(name)  # proves the lease first
        return unfinished

    def free_space(self) -> int | None:
        return None

    @as_os_errors
    def lock(self) -> None:
        self._lease.acquire()

    @as_os_errors
    def unlock(self) -> None:
        self._lease.release()

    def lock_token(self) -> str | None:
        return self._lease.owner if self._lease.held else None

    @as_os_errors
    def take_over(self, token: str | None) -> None:
        self._lease.acquire(heir_of=token)

    @as_os_errors
    def append_history(self, line: bytes) -> None:
        """Append by rewriting the history object (stores cannot append), conditionally
        on the version read, so lines appended at once by two processes both stay."""
        self._objects.rewrite(self._path(HISTORY), lambda history: (history or b"") + line)

    @as_os_errors
    def read_history(self) -> bytes:
        try:
            return self._get(self._path(HISTORY))
        except FileNotFoundError:
            return b""

    @as_os_errors
    def foreign(self) -> list[str]:
        try:
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in paths]
        return sorted(name for name in names
                      if name.endswith(FOREIGN_SUFFIXES) or name.startswith("checkpoint-"))

    @as_os_errors
    def folders(self) -> list[str]:
        """The prefixes directly below the run's, from one listing."""
        self.fs.invalidate_cache(self.root)  # s3fs may cache listings despite the option
        try:
            found = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(info["name"].rstrip("/").rsplit("/", 1)[-1] for info in found
                      if info.get("type") == "directory")

    def share_host(self, processes: int) -> None:
        """The callers' streams shrink to the host's share (the requests in flight per
        call, :data:`CONCURRENCY`, wait on the network and stay as they are)."""
        self._processes = max(1, processes)

    def io_threads(self) -> int:
        return threads_for(self._processes)

    @as_os_errors
    def destroy(self) -> None:
        """The manifests first (each checkpoint as :meth:`delete`), then every other object
        below the run, the lease last; an object at the run's own key is deleted itself.
        Not atomic: a reader meanwhile sees fewer checkpoints, never a half-deleted one."""
        if self.fs.isfile(self.root):
            self.fs.rm_file(self.root)
            return
        for listed in self.committed():
            self._delete(listed.name)
        rest = [self._path(path) for path in self._files_below(self.root) if path != LOCK_FILE]
        if rest:
            self.fs.rm(rest)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(LOCK_FILE))
        if not self._s3 and "/" in self.root.strip("/"):  # empty folders, where there are
            with contextlib.suppress(FileNotFoundError):  # any; never a bucket itself
                self.fs.rm(self.root, recursive=True)
