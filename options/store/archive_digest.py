"""The digest of every value of a table: what the archive compares, before a day leaves
PostgreSQL, between the rows PostgreSQL gave and the file read back from its storage.

**Definition** (version ``v2``; ``archived_days.checksum`` holds ``v2:<32 hex digits>``). For
each column of the dataset's schema, in its order, the rows in their order give byte streams:

- *validity*: one byte a row, 1 for a value, 0 for a null;
- a fixed-width column (integers, floating point, timestamps, dates, times, durations,
  booleans): each value's bytes at the column's width, little-endian, a null's as zeros. A
  double is its 8 IEEE 754 bytes, so -0.0, infinities and each NaN's payload count as
  stored; a timestamp is its int64 count of its unit (microseconds in the archive), a date32
  its int32 count of days, a boolean one byte;
- a string or binary column: *lengths*, each value's length in bytes as an int64 (0 for a
  null), and *data*, the values' bytes one after the other.

Each stream is hashed with SHA-256. A column's digest is the SHA-256 of its name, its declared
type, the row count and its streams' hashes; the table's is the SHA-256 of the row count and
the columns' digests, of which the text keeps 128 bits. The streams are hashed as the rows
come, so the digest depends neither on how the rows are cut into batches nor on how a file
encodes them (a dictionary, run lengths, plain), only on the values and their order. The
hashing runs in C over whole Arrow buffers (``hashlib`` on numpy views of them), never value by
value in Python: about 0.15 s for the 312,000 rows of the benchmark day (0.5 s with the file's
reading and decompression).

A row missing, added, duplicated or moved, a null for a value, one bit of one value: each
changes the digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from options.errors import ArchiveError

DIGEST_VERSION: Final = "v2"
"""Names the digest's definition in ``archived_days.checksum``: ``v2:<32 hex digits>``. Earlier
versions recorded a checksum of the keys alone, ``k1:<16 hex digits>``: such a record is read,
never written, and its day verified again with this digest."""
_DIGEST_HEX = 32  # 128 bits of the SHA-256


@dataclass(frozen=True)
class Digest:
    """A table's row count and the digest of its values, as ``archived_days`` keeps them."""

    rows: int
    checksum: str


def checksum_version(checksum: str) -> str:
    """The version prefix of a recorded checksum (``v2``, ``k1``; ``""`` when it has none)."""
    version, colon, _ = checksum.partition(":")
    return version if colon else ""


class _Stream:
    """One byte stream of a column, hashed as it comes."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def value(self) -> bytes:
        return self._hash.digest()


class _Column:
    """The streams of one column, fed from its arrays batch by batch."""

    def __init__(self, field: pa.Field) -> None:
        self.field = field
        kind = field.type
        self.variable = (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
        )
        if self.variable:
            self._width = 8
        elif pa.types.is_boolean(kind):
            self._width = 1
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind):
            self._width = kind.bit_width // 8
            if self._width not in (1, 2, 4, 8):
                raise TypeError(f"column {field.name}: {kind} cannot be digested")
        else:
            raise TypeError(f"column {field.name}: {kind} cannot be digested")
        self._streams = [_Stream() for _ in range(3 if self.variable else 2)]

    def add(self, array: pa.Array | pa.ChunkedArray) -> None:
        chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
        for chunk in chunks:
            self._add(chunk)

    def _add(self, array: pa.Array) -> None:
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if not _same_type(array.type, self.field.type):
            raise ArchiveError(f"column {self.field.name} is {array.type}, not {self.field.type}")
        validity, *values = self._streams
        if array.null_count:
            validity.add(array.is_valid().to_numpy(zero_copy_only=False).data)
        else:
            validity.add(b"\x01" * len(array))
        if self.variable:
            lengths, data = values
            # int64 offsets, and a null's bytes (Arrow allows a null some) left out
            array = array.cast(pa.large_binary())
            if array.null_count:
                array = pc.fill_null(array, pa.scalar(b"", pa.large_binary()))
            _, offsets_buffer, data_buffer = array.buffers()
            offsets = np.frombuffer(
                offsets_buffer, dtype="<i8", count=len(array) + 1, offset=array.offset * 8
            )
            lengths.add(np.diff(offsets).data)
            if data_buffer is not None and offsets[-1] > offsets[0]:
                data.add(memoryview(data_buffer)[offsets[0] : offsets[-1]])
            return
        (stream,) = values
        if pa.types.is_boolean(array.type):
            array = array.cast(pa.uint8())
        else:  # the bits as they are: a double's NaN payload and sign of zero kept
            array = array.view(_INTEGERS[self._width])
        if array.null_count:
            array = pc.fill_null(array, 0)
        stream.add(np.ascontiguousarray(array.to_numpy(), dtype=f"<i{self._width}").data)

    def value(self, rows: int) -> bytes:
        whole = hashlib.sha256()
        for part in (self.field.name.encode(), str(self.field.type).encode()):
            whole.update(len(part).to_bytes(8, "little"))
            whole.update(part)
        whole.update(rows.to_bytes(8, "little"))
        for stream in self._streams:
            whole.update(stream.value())
        return whole.digest()


class TableDigest:
    """The digest of rows of ``schema`` added batch by batch, in their order.

    Args:
        schema: the dataset's columns; a batch added must have them, in this order, with these
            types (a dictionary of the type, or a large string for a string, is taken as it).

    Raises:
        TypeError: a column's type has no defined digest (decimals, nested types).
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows = 0
        self._columns = [_Column(field) for field in schema]

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add the rows of ``batch`` after those added before.

        Raises:
            ArchiveError: the batch's columns are not the schema's.
        """
        if batch.schema.names != self.schema.names:
            raise ArchiveError(
                f"the columns are {', '.join(batch.schema.names)}, not "
                f"{', '.join(self.schema.names)}"
            )
        for column, array in zip(self._columns, batch.columns, strict=True):
            column.add(array)
        self.rows += batch.num_rows

    @property
    def digest(self) -> Digest:
        """The rows added so far, and their digest."""
        whole = hashlib.sha256(self.rows.to_bytes(8, "little"))
        for column in self._columns:
            whole.update(column.value(self.rows))
        return Digest(self.rows, f"{DIGEST_VERSION}:{whole.hexdigest()[:_DIGEST_HEX]}")


_INTEGERS: Final = {1: pa.int8(), 2: pa.int16(), 4: pa.int32(), 8: pa.int64()}


def _same_type(found: pa.DataType, declared: pa.DataType) -> bool:
    """An array of ``found`` holds values of the ``declared`` column (a string column read
    back as a large string, say)."""
    if found == declared:
        return True
    text = (pa.string(), pa.large_string())
    raw = (pa.binary(), pa.large_binary())
    return (found in text and declared in text) or (found in raw and declared in raw)
