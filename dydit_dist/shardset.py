"""A shard set: a folder of tar shards, each written once and whole, and a manifest of what is done.

    {uri}/shard-{i:06d}.tar     samples as tar members `{key}.{ext}`, grouped into samples by key
    {uri}/manifest.json         settings, planned shard count, one record per finished shard (sha256)
    {uri}/done/shard-{i:06d}.json   a worker's record of a shard it finished (done-marker)

The data folders of the prepare job (latents, `data/`) and the samples folders of the sampling job
(images, `sample/`) are shard sets; each adds its per-sample members and its own manifest fields
by subclassing `ShardManifest`.

Shards are built in memory with fixed member metadata, so the same samples always give the same
bytes (and sha256), and written whole: a reader never sees half a shard. Each is created once: the
first copy written stays, a later copy of the same shard (a lost worker that still writes) finds it
and returns its record (`write_shard`); a driver removes the objects of the shards it makes again
first (`remove_shards`). A record holds at least {"index", "name", "count", "sha256", "bytes"}.

Only the driver writes the manifest. A worker that finishes a shard writes the shard, then may write
its done-marker; the driver merges markers into the manifest (`ShardManifest.resume`). Two workers
finishing at once never touch the same object, so no update is lost, and a driver that died before
writing the manifest loses nothing: the next run merges the markers it finds. A rerun with the same
settings skips every finished shard whose object is there at its recorded size (`drop_missing`); one
with other settings is an error, as the shards would mix, unless nothing was recorded yet. Readers
given a shard's record check its sha256 (`read_shard`, `stream`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import posixpath
import tarfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

from dydit_dist import storage

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MARKERS = "done"

Sample = dict[str, bytes]  # {"__key__": key, ext: payload} for members `{key}.{ext}`, as webdataset has it


class ShardError(ValueError):
    """A shard that is missing, truncated or does not match its manifest record (named in the message)."""


WRITE_SHARE = 0.05  # of a running job's time, at most this much goes into rewriting its manifest (`PeriodicWriter`)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_url(uri: str, index: int) -> str:
    return storage.join(uri, shard_name(index))


def manifest_url(uri: str) -> str:
    return storage.join(uri, MANIFEST)


def marker_url(uri: str, index: int) -> str:
    return storage.join(uri, MARKERS, f"shard-{index:06d}.json")


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- shards


def pack(samples: Iterable[Sample], mode: int = 0o444) -> bytes:
    """Tar bytes of the samples' members, in order; same input, same bytes. `mode` is the members'
    permission bits (0o444 in latent shards, 0o644 in sample shards)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for files in samples:
            key = files["__key__"].decode()
            for ext, data in files.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, mode
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(uri: str, index: int, data: bytes, count: int, *, replace: bool = False) -> dict:
    """Write shard `index` (`count` samples packed in `data`) whole; returns the record of the object stored.

    The object is only created (`storage.create`): when another copy of the same shard is there first
    (a lost worker's late write, a retried task whose first try still ran), that copy stays and the record
    describes its bytes, so a record never names bytes that storage does not hold (copies differ where
    the work is not bit-reproducible, as on GPUs). Drivers remove the objects of the shards they make
    again before handing them out (`remove_shards`). `replace=True` overwrites (a data set written by
    one process)."""
    name = shard_name(index)
    url = storage.join(uri, name)
    if replace:
        storage.write_bytes(url, data)
    elif not storage.create(url, data):
        stored = storage.read_bytes(url)
        if stored != data:
            log.warning("%s: another copy of this shard was written first; it is kept (this copy's bytes "
                        "differ: sha256 %s, not %s)", url, hashlib.sha256(stored).hexdigest()[:12],
                        hashlib.sha256(data).hexdigest()[:12])
        data = stored
    return {"index": index, "name": name, "count": count, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data)}


def remove_shards(uri: str, indices: Iterable[int]) -> list[str]:
    """Remove the objects of shards `indices` that are to be made again (written but never recorded, or
    not matching their record), so that the create-only writes of `write_shard` land; their URLs."""
    names = {shard_name(i) for i in indices}
    stale = [url for url in storage.listdir(uri) if url.rsplit("/", 1)[-1] in names]
    for url in stale:
        storage.remove(url)
    if stale:
        log.info("%s: removed %d shard objects without a matching record before making them again", uri, len(stale))
    return stale


def read_shard(uri: str, record: dict) -> bytes:
    """The bytes of the shard of a manifest record, checked against its sha256 (ShardError if not)."""
    url = storage.join(uri, record["name"])
    if "sha256" not in record:
        raise ShardError(f"{url}: its manifest record has no sha256 to check it against; make the shard again")
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ShardError(f"missing shard {url} (listed in the manifest)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise _mismatch(url, len(data), digest, record)
    return data


def _mismatch(url: str, size: int, digest: str, record: dict) -> ShardError:
    """A shard whose bytes are not those its record holds. Its job's rerun only checks the sizes of the
    shards it finds (`drop_missing`), so it remakes the shard only once the object is gone."""
    return ShardError(f"corrupt shard {url}: {size} bytes with sha256 {digest[:12]}..., the manifest has "
                      f"{record['bytes']} bytes with sha256 {record['sha256'][:12]}...; remove that object and rerun "
                      "the job that wrote it (prepare, or sample) with the same config, which makes it again")


class _NotUstar(Exception):
    """A member the fast path does not handle (long names, pax headers, links): use tarfile."""


def _ustar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of a plain ustar archive's regular files; the fast path for shards we wrote."""
    offset = 0
    while offset + 512 <= len(data):
        header = data[offset : offset + 512]
        if header.count(0) == 512:
            return
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0", b"5"):
            raise _NotUstar
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.HeaderError(f"bad header checksum at byte {offset}")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        start = offset + 512
        if start + size > len(data):
            raise EOFError(f"member {name.decode(errors='replace')} runs past the end of the archive")
        if header[156:157] != b"5":
            yield (prefix + b"/" + name if prefix else name).decode(), data[start : start + size]
        offset = start + (size + 511) // 512 * 512
    raise EOFError("archive ends without its end-of-archive blocks")


def _tarfile_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of any tar's regular files. tarfile ends its iteration quietly at a header that is
    cut short or missing, as at an end-of-archive block: the block is required here, as in the ustar path."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()
        if data[tar.offset : tar.offset + 512] != bytes(512):  # tar.offset: the header where iteration stopped
            raise EOFError("archive ends without its end-of-archive blocks")


def _group(members: Iterable[tuple[str, bytes]]) -> Iterator[Sample]:
    """(name, payload) members in tar order -> one dict per sample, grouped by key as webdataset does:
    `dir/key.a.b` is member "a.b" of sample "dir/key"; names without an extension are skipped."""
    sample: Sample | None = None
    for name, payload in members:
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = (f"{folder}/{stem}" if folder else stem).encode()
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key}
        sample[ext] = payload
    if sample is not None:
        yield sample


def _unreadable(url: str, err: Exception) -> ShardError:
    return ShardError(f"corrupt shard {url}: not a readable tar ({type(err).__name__}: {err})")


def unpack(data: bytes, url: str) -> list[Sample]:
    """Samples of a shard's bytes, in order (ShardError naming `url` if it is not a readable tar)."""
    try:
        try:
            members = list(_ustar_members(data))
        except _NotUstar:
            members = list(_tarfile_members(data))
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise _unreadable(url, err) from err
    return list(_group(members))


class _Hashing:
    """A binary file object's reads, counted and hashed on the way through."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def stream(url: str, record: dict) -> Iterator[Sample]:
    """The samples of a shard object (any storage URL), one at a time, without holding it in memory.
    The bytes are checked against its manifest `record`'s sha256 as they stream: a ShardError after the
    last sample when they differ (a reader must not trust what it yielded until the end). The record is
    required: the streaming tar reader alone accepts an archive cut at a member boundary."""
    with storage.open_file(url, "rb") as f:
        reader = _Hashing(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                yield from _group((m.name, tar.extractfile(m).read()) for m in tar if m.isfile())
        except (tarfile.TarError, EOFError) as err:
            raise _unreadable(url, err) from err
        while reader.read(1 << 20):  # the end-of-archive padding the tar reader leaves unread
            pass
    if "sha256" not in record:
        raise ShardError(f"{url}: its manifest record has no sha256 to check it against; make the shard again")
    digest = reader.sha256.hexdigest()
    if digest != record["sha256"] or reader.bytes != record["bytes"]:
        raise _mismatch(url, reader.bytes, digest, record)


def corruption(url: str, record: dict) -> ShardError | None:
    """The corrupt-shard error of `url` when its bytes are not its record's (read whole, streamed), else None:
    what a reader checks first when a shard's content makes no sense, so that the message says it is corrupt."""
    if "sha256" not in record:
        return None
    with storage.open_file(url, "rb") as f:
        reader = _Hashing(f)
        while reader.read(1 << 20):
            pass
    digest = reader.sha256.hexdigest()
    if digest != record["sha256"] or reader.bytes != record.get("bytes", reader.bytes):
        return _mismatch(url, reader.bytes, digest, record)
    return None


# ---------------------------------------------------------------------------- the manifest


def write_marker(uri: str, record: dict) -> None:
    """A worker's done-marker of the shard it finished (merged into the manifest by `resume`)."""
    storage.write_json(marker_url(uri, record["index"]), record)


_RECORD_FIELDS = {"index": int, "name": str, "count": int}  # what every reader of a record takes as given


def record_problem(record) -> str | None:
    """Why `record` (a manifest's or a done-marker's) is not a shard record, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a shard record"
    for key, kind in _RECORD_FIELDS.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            return f"its {key!r} is {value!r}, expected a{'n' if kind is int else ''} {kind.__name__}" + \
                (" >= 0" if kind is int else "")
    return None


_ABSENT = object()


def _differences(a: dict, b: dict) -> list[str]:
    def shown(v) -> str:
        return "absent" if v is _ABSENT else repr(v)

    keys = sorted(set(a) | set(b))
    return [f"{k}: {shown(a.get(k, _ABSENT))} there vs {shown(b.get(k, _ABSENT))} now" for k in keys
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


@dataclass
class ShardManifest:
    """`{uri}/manifest.json`: the settings that decide the bytes of every shard, the planned number
    of shards and the record of each finished one.

    A kind of shard set subclasses it with its `FORMAT`, its `error` (the exception a job reports
    for a folder that does not hold what was asked for), `complete` and any fields of its own
    (`_extra_json` / `_extra_fields`).
    """

    FORMAT: ClassVar[str]
    error: ClassVar[type[ValueError]]
    ELSEWHERE: ClassVar[str]  # how to start over, in the settings mismatch error
    # Settings keys added after folders of this kind were first written: {key: what a folder written before
    # meant by it} where the key is not None now (None now: the key means nothing for these settings).
    LEGACY: ClassVar[dict] = {}

    settings: dict
    num_shards: int
    shards: dict[int, dict] = field(default_factory=dict)  # index -> record

    @property
    def num_samples(self) -> int:
        return sum(r["count"] for r in self.shards.values())

    def done(self) -> set[int]:
        return set(self.shards)

    def add(self, record: dict) -> None:
        self.shards[int(record["index"])] = record

    def records(self) -> list[dict]:
        """The shard records in index order."""
        return [self.shards[i] for i in sorted(self.shards)]

    def content_digest(self) -> str:
        """sha256 of the shards' names and sha256s in index order: the same for the same bytes, another
        for a folder made again (other weights at the same URL), whatever its settings say."""
        return settings_digest([[r["name"], r.get("sha256")] for r in self.records()])

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "complete": self.complete, "settings": self.settings,
                "num_shards": self.num_shards, "num_samples": self.num_samples, "shards": self.records(),
                **self._extra_json()}

    def _extra_json(self) -> dict:
        return {}

    @classmethod
    def _extra_fields(cls, value: dict) -> dict:
        """Constructor arguments of the subclass's own fields, from the manifest's JSON."""
        return {}

    @classmethod
    def from_json(cls, value: dict, url: str):
        if not isinstance(value, dict) or value.get("format") != cls.FORMAT:
            found = value.get("format") if isinstance(value, dict) else f"a JSON {type(value).__name__}"
            raise cls.error(f"{url} is not a {cls.FORMAT} manifest (format: {found!r})")
        try:
            for number, record in enumerate(value["shards"]):
                if (problem := record_problem(record)) is not None:
                    raise ValueError(f"shard record {number}: {problem}")
            shards = {int(r["index"]): r for r in value["shards"]}
            return cls(value["settings"], value["num_shards"], shards, **cls._extra_fields(value))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise cls.error(f"{url}: a {cls.FORMAT} manifest that cannot be read ({type(err).__name__}: {err}); "
                            f"{cls.ELSEWHERE} or remove that folder") from err

    @classmethod
    def read(cls, uri: str):
        """The manifest of the shard set at `uri` (FileNotFoundError when there is none; `cls.error` naming
        it when it is not JSON or not such a manifest)."""
        url = manifest_url(uri)
        try:
            value = storage.read_json(url)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: cut short or not JSON
            raise cls.error(f"{url}: not JSON ({err}); {cls.ELSEWHERE} or remove that folder") from err
        return cls.from_json(value, url)

    def write(self, uri: str) -> None:
        storage.write_json(manifest_url(uri), self.to_json())

    def write_in_finally(self, uri: str) -> None:
        """`write` in a `finally` that a job's error may be passing through (the full disk that failed a shard
        fails this too): a failed write is logged, so that the first error is the one reported, and the rest
        of the clean-up runs. The done-markers keep every finished shard (`resume` merges them); a job that
        goes on writes its manifest again, and fails then."""
        try:
            self.write(uri)
        except OSError as err:
            log.warning("%s: could not record the finished shards in its manifest (%s); their done-markers keep "
                        "them for the next run", uri, err)

    def is_stored(self, uri: str) -> bool:
        """Whether `{uri}/manifest.json` holds exactly this manifest (then there is nothing to write)."""
        url = manifest_url(uri)
        return storage.exists(url) and storage.read_json(url) == json.loads(json.dumps(self.to_json()))

    @classmethod
    def resume(cls, uri: str, settings: dict, num_shards: int, *, drop_missing: bool = False):
        """The manifest to continue at `uri`: the one there, or a new one, with the done-markers merged.

        Raises `cls.error` when the folder holds shards made with other settings (they would mix), or
        a marker records a shard made with other settings. A manifest that records no shard, with no
        marker beside it, is replaced by a new one (a job that failed before making anything does not
        hold the folder). `drop_missing` forgets the records of shards that storage no longer holds, or
        holds at another size than recorded (a truncated or replaced object), so they are made again.
        """
        manifest = cls.read(uri) if storage.exists(manifest_url(uri)) else None  # a missing bucket fails here
        marker_urls = [url for url in storage.listdir(storage.join(uri, MARKERS)) if url.endswith(".json")]
        with ThreadPoolExecutor(max_workers=32) as pool:  # ImageNet's 1,282 markers: ~40 rounds of reads, not 1,282
            markers = list(pool.map(cls._read_marker, marker_urls))
        if manifest is None or (not manifest.shards and not markers):
            manifest = cls(settings, num_shards)
        digests = {settings_digest(settings)}
        if manifest.settings != settings:
            written = cls._as_now(manifest.settings, settings)
            if written != settings:
                raise cls.error(f"{uri} already holds shards prepared with other settings "
                                f"({'; '.join(_differences(written, settings))}); "
                                f"{cls.ELSEWHERE} or remove that folder")
            log.info("%s: settings recorded before %s were; the same settings, resumed", uri,
                     ", ".join(sorted(settings.keys() - manifest.settings.keys())))
            digests.add(settings_digest(manifest.settings))  # the markers written before
            manifest.settings = settings
        earlier: set[str] | None = None  # computed once, and only for a marker of another digest
        for record in markers:
            if record.get("settings_sha256") not in digests:
                earlier = cls._earlier_digests(settings) if earlier is None else earlier
            if record.get("settings_sha256") not in digests | (earlier or set()):
                raise cls.error(f"{marker_url(uri, record['index'])} records a shard made with other settings; "
                                f"{cls.ELSEWHERE} or remove that folder")
            known = manifest.shards.get(int(record["index"]))
            if known is None or known.get("sha256") != record.get("sha256"):  # the manifest's copy has more timing
                manifest.add(record)
        if drop_missing:
            bad = unverified(uri, manifest.records())
            if bad:
                log.warning("%s: %d shards recorded as done are missing or not of their recorded size; they are made "
                            "again: %s", uri, len(bad), ", ".join(bad))
            manifest.shards = {i: r for i, r in manifest.shards.items() if r["name"] not in bad}
        return manifest

    @classmethod
    def _as_now(cls, written: dict, settings: dict) -> dict:
        """`written` (a folder's settings) with the keys added since filled in as such a folder meant them
        (`LEGACY`; None where `settings` holds None), so that it compares with `settings`."""
        filled = dict(written)
        for key in settings.keys() - written.keys():
            if settings[key] is None:
                filled[key] = None
            elif key in cls.LEGACY:
                filled[key] = cls.LEGACY[key]
        return filled

    @classmethod
    def _earlier_digests(cls, settings: dict) -> set[str]:
        """The digests of `settings` as versions before some of its keys recorded them (`_as_now` reversed:
        without any of the keys that are None, or hold their `LEGACY` meaning): the done-markers such a
        version wrote, in a folder whose manifest has since been brought up to date."""
        optional = [k for k, v in settings.items() if v is None or (k in cls.LEGACY and cls.LEGACY[k] == v)]
        return {settings_digest({k: v for k, v in settings.items() if k not in dropped})
                for n in range(1, len(optional) + 1) for dropped in itertools.combinations(optional, n)}

    @classmethod
    def _read_marker(cls, url: str) -> dict:
        """A done-marker's record; `cls.error` naming it when it is not one (markers are written whole: a hand
        edit, or a file system without atomic renames)."""
        try:
            record = storage.read_json(url)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise cls.error(f"{url}: a done-marker that is not JSON ({err}); remove it (its shard is made "
                            "again)") from err
        if (problem := record_problem(record)) is not None:
            raise cls.error(f"{url}: a done-marker that is no shard record ({problem}); remove it (its shard is "
                            "made again)")
        return record


class PeriodicWriter:
    """Writes `manifest` to `uri` while a job runs, when called (after each finished shard): at most every
    `every_s` seconds, and at most WRITE_SHARE of the time: a write that took w seconds is followed by none
    for w / WRITE_SHARE (ImageNet's prepare manifest is ~15 MB, seconds of JSON on the driver, between
    dispatching tasks). The done-markers keep every finished shard in between; the job writes it at its end."""

    def __init__(self, manifest: ShardManifest, uri: str, every_s: float):
        self.manifest, self.uri, self.every_s = manifest, uri, every_s
        self.due = time.monotonic() + every_s

    def __call__(self) -> None:
        start = time.monotonic()
        if start < self.due:
            return
        self.manifest.write(self.uri)
        took = time.monotonic() - start
        self.due = time.monotonic() + max(self.every_s, took / WRITE_SHARE)


def stored_sizes(uri: str, records: list[dict]) -> list[int | None]:
    """The stored size of each recorded shard (None: missing), from one listing of the folder (on S3 a
    request per 1,000 objects, not a HEAD per shard); where listing is denied (a read-only data bucket that
    grants GetObject only), one HEAD per shard, 32 at a time."""
    try:
        sizes = {posixpath.basename(e["name"]): e["size"] for e in storage.entries(uri) if e["type"] == "file"}
    except storage.StorageError as err:
        if not isinstance(err.__cause__, PermissionError):
            raise
        with ThreadPoolExecutor(max_workers=32) as pool:
            return list(pool.map(lambda record: _stored_size(storage.join(uri, record["name"])), records))
    return [sizes.get(record["name"]) for record in records]


def _stored_size(url: str) -> int | None:
    try:
        return storage.size(url)
    except FileNotFoundError:
        return None


def unverified(uri: str, records: list[dict]) -> list[str]:
    """Names of the recorded shards whose object is missing or not of the recorded size (`bytes`)."""
    sizes = stored_sizes(uri, records)
    return [r["name"] for r, n in zip(records, sizes, strict=True) if n is None or n != r.get("bytes", n)]
