"""The catalog's errors: a subtree of :class:`node.errors.VmlendError`.

They say whose fault a failure is: the data on our disk (:class:`ChunkCorruptError`), the caller
(:class:`UnknownBlobError`, :class:`QuotaExceededError`), or the peers we fetch from
(:class:`NoProviderError`). Wire-level violations by a peer stay
:class:`node.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from node.errors import DeadlineError, VmlendError


class CatalogError(VmlendError):
    """Root of every error raised by ``catalog``."""


class ChunkCorruptError(CatalogError):
    """A chunk's bytes do not hash to its ID (a flipped bit on disk, or a truncated file)."""

    def __init__(self, chunk_id_hex: str, where: str) -> None:
        super().__init__(f"chunk {chunk_id_hex} is corrupt: bytes do not match its ID ({where})")
        self.chunk_id_hex = chunk_id_hex
        self.where = where


class MissingChunkError(CatalogError):
    """A chunk that was expected on disk is not there (a blob still being fetched, or damaged)."""

    def __init__(self, chunk_id_hex: str) -> None:
        super().__init__(f"chunk {chunk_id_hex} is not in the store")
        self.chunk_id_hex = chunk_id_hex


class SpoolWriteError(CatalogError):
    """The file could not take the bytes (disk full, I/O error). ``salvaged``: the bytes already
    taken off the socket; ``remaining``: how many of the answer are still to be received."""

    def __init__(self, error: OSError, salvaged: bytes, remaining: int) -> None:
        super().__init__(f"cannot write a received chunk to the spool: {error}")
        self.salvaged = salvaged
        self.remaining = remaining


class UnknownBlobError(CatalogError):
    """No blob with this ID is in the store."""

    def __init__(self, blob_id_hex: str) -> None:
        super().__init__(f"no blob {blob_id_hex} in the store")
        self.blob_id_hex = blob_id_hex


class BlobTooLargeError(CatalogError):
    """A blob is larger than the caller allows reading into memory (refused unread)."""

    def __init__(self, blob_id_hex: str, size: int, limit: int) -> None:
        super().__init__(f"blob {blob_id_hex} is {size} bytes; at most {limit} are allowed here")
        self.blob_id_hex = blob_id_hex
        self.size = size
        self.limit = limit


class IncompleteBlobError(CatalogError):
    """The blob is known but some of its chunks are still missing (a transfer is not finished)."""

    def __init__(self, blob_id_hex: str, missing: int) -> None:
        super().__init__(f"blob {blob_id_hex} is incomplete: {missing} chunk(s) missing")
        self.blob_id_hex = blob_id_hex
        self.missing = missing


class InvalidIdError(CatalogError):
    """Text given as a blob or chunk ID is not 64 hex digits."""


class ManifestError(CatalogError):
    """Bytes that claim to be a blob manifest are malformed, non-canonical or over a limit."""


class StoreLockedError(CatalogError):
    """Another process has this chunk store open (one process owns a store at a time)."""


class FileAccessError(CatalogError):
    """A file the caller named cannot be read (``blob add``) or written (``blob get -o``)."""


class StoreIOError(CatalogError):
    """The disk under the chunk store failed (full, read-only, I/O error); the store is intact."""


class QuotaExceededError(CatalogError):
    """Storing more would exceed the chunk store's disk quota; the failed call stored nothing."""

    def __init__(self, *, used: int, needed: int, quota: int) -> None:
        super().__init__(
            f"chunk store quota exceeded: {used} bytes used + {needed} bytes needed > "
            f"quota of {quota} bytes (free {max(quota - used, 0)} bytes; "
            "run `vmlend blob gc`, remove blobs, or raise the quota)"
        )
        self.used = used
        self.needed = needed
        self.quota = quota


class TransferError(CatalogError):
    """A blob transfer cannot complete."""


class NoProviderError(TransferError):
    """No live, well-behaved provider holds some chunk the transfer still needs."""

    def __init__(self, blob_id_hex: str, missing: list[str], excluded: dict[str, str]) -> None:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        peers = ", ".join(f"{peer} ({why})" for peer, why in sorted(excluded.items())) or "none"
        super().__init__(
            f"blob {blob_id_hex}: no live provider has {len(missing)} needed chunk(s) "
            f"[{shown}]; providers excluded: {peers}"
        )
        self.blob_id_hex = blob_id_hex
        self.missing = missing
        self.excluded = excluded


class FetchTimeoutError(TransferError, DeadlineError):
    """A blob was not complete within the caller's budget (its providers were too slow or
    silent). A network error as well: no fault of ours. What arrived stays for a resume."""

    def __init__(self, blob_id_hex: str, timeout: float) -> None:
        super().__init__(f"blob {blob_id_hex} was not complete within {timeout:g} s")
        self.blob_id_hex = blob_id_hex
        self.timeout = timeout


class TransferCancelledError(TransferError):
    """The transfer was cancelled by its caller; what was fetched stays on disk for a resume."""


class InvalidEntryError(CatalogError):
    """Bytes or fields that claim to be a catalog entry are malformed, non-canonical or over a
    limit, or break the rules of the entry's kind."""


class EntrySignatureError(InvalidEntryError):
    """An entry's signature does not verify under its publisher's key (forged or tampered)."""


class UntrustedPublisherError(CatalogError):
    """A well-formed, correctly signed entry whose publisher this scheduler does not trust."""

    def __init__(self, publisher_hex: str) -> None:
        super().__init__(f"publisher {publisher_hex} is not trusted by this scheduler")
        self.publisher_hex = publisher_hex


class UnknownEntryError(CatalogError):
    """No entry in the catalog matches the ID or name asked for."""


class AmbiguousEntryError(CatalogError):
    """A name or ID prefix matches entries of several kinds or several IDs; say which."""


class TaskFileError(CatalogError):
    """A task file is unreadable or invalid; says which file, line and key are at fault."""

    def __init__(
        self, message: str, *, source: str, line: int | None = None, key: str | None = None
    ) -> None:
        where = source + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.source = source
        self.line = line
        self.key = key
        self.reason = message


class BuildError(CatalogError):
    """Building an OS, a package layer or an image failed (a tool failed, or bad input)."""


class UnknownOsError(BuildError):
    """The OS named is not one the catalog can build or holds."""


class PackageError(BuildError):
    """A package cannot be layered on the OS: not in its archive, or it does not fit it."""


class TaskInputError(BuildError):
    """A file or directory the task names is missing or unreadable."""


class ImageManifestError(CatalogError):
    """Bytes that claim to be an image manifest are malformed, non-canonical or over a limit."""


class EntryRuleError(InvalidEntryError):
    """A well-formed entry breaks a rule of its kind (one of the registered kind validators).

    Schedulers may run different rule sets (another version), so a peer sending such an entry
    is not misbehaving: the entry is refused, like one from an untrusted publisher."""
