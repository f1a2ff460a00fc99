"""Acquire, verify and decode CIFAR-10 into uint8 arrays.

Sources:

* ``"official"``: the official binary archive, downloaded with an md5 check.
* a local path to the official binary archive, to an image-folder archive
  (``.tar``, ``.tar.gz``, ``.tgz``) laid out ``[top/]train|test/<class>/<image>``,
  or to a folder with that layout.

A local source is verified before any of its contents is parsed: against the
``sha256`` given by the caller, else against a ``SHA256SUMS`` file beside it,
else (an archive in the official layout only) against the official md5. A
folder's hash is its tree sha256 (``TREE_SHA256``), so that it can be pinned
like an archive's. Archives are read as a stream, never extracted, and members
that are links or that would escape the archive root are rejected. Nothing is
ever unpickled. A folder source may use symlinks to files and folders inside
it, never outside it.

The classes must be CIFAR-10's ten (``CLASS_NAMES``), and images must have 8-bit
samples, so that decoding to uint8 RGB is exact. The manifest records a sha256 of
each decoded array and the decoder versions, so two machines can compare pixels.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import http.client
import io
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import PIL
from PIL import Image, features

from pipeline.arrays import CifarArrays, DataError, DownloadError
from pipeline.io import HASH_CHUNK_BYTES, file_hash
from pipeline.progress import progress_bar

logger = logging.getLogger(__name__)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
OFFICIAL_SIZE = 170_052_171  # bytes
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

OFFICIAL_DIR = "cifar-10-batches-bin"
OFFICIAL_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
OFFICIAL_TEST_FILE = "test_batch.bin"
OFFICIAL_META_FILE = "batches.meta.txt"
IMAGE_SIZE = 32
RECORD_BYTES = 1 + 3 * IMAGE_SIZE * IMAGE_SIZE  # label byte + CHW pixels
SPLITS = ("train", "test")
ARRAY_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_FOLDER_LAYOUT = "[top folder/]train|test/<class>/<image>"
# Plain raster formats only: some Pillow plugins (EPS) run external programs on load.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "PPM", "TIFF", "WEBP")
# Modes with 8-bit samples, whose conversion to 8-bit RGB is exact; others would be clipped
# ("I;16", "I": 99% of a 16-bit grayscale image turns 255) or converted without colour
# management ("CMYK"). A 16-bit RGB PNG opens as "RGB" holding each sample's high byte, within
# 1 of exact rounding, so it is accepted. RGBA and LA are accepted when fully opaque: tools often
# write opaque images with an alpha channel, and dropping an all-255 alpha loses nothing; under
# transparent pixels the colour is arbitrary and CIFAR-10 has no background to composite onto.
IMAGE_MODES = ("RGB", "L", "P", "RGBA", "LA")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A folder's hash: the sha256 of `sha256sum --zero`'s listing of the files it is decoded from (the
# non-hidden ones, links followed), in byte order of their paths relative to it. That is what
# `find -L . -type f -not -path '*/.*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 sha256sum -z | sha256sum`
# prints inside the folder, so a user can pin a folder with standard tools, as an archive.
TREE_SHA256 = "sha256-tree"
_FIX_HINT = (
    "Point the download.source param at the right file or folder, or set download.sha256 "
    "to the hash of the one you trust."
)


@dataclass(frozen=True)
class _Entry:
    """One regular file of a source, as path components relative to its root."""

    parts: tuple[str, ...]
    data: bytes
    where: str  # names the file in error messages


# --------------------------------------------------------------------------- public API


def acquire(
    source: str, download_dir: Path, sha256: str | None = None, progress: bool | None = None
) -> tuple[CifarArrays, dict]:
    """Get CIFAR-10 from ``source``, verify it, and decode it to uint8 arrays.

    Returns the arrays and a manifest (source, format, checksum, per-split counts,
    class names). Raises DataError for every problem with the data or its source.
    ``progress=None`` shows the decoding bars only when stderr is a terminal.
    """
    expected_sha256 = _normalize_sha256(sha256)
    if source == "official":
        return _acquire_archive(_download_official(Path(download_dir)), source, expected_sha256, progress)
    path = Path(source)
    if path.is_dir():
        return _acquire_folder(path, source, expected_sha256, progress)
    if path.is_file():
        return _acquire_archive(path, source, expected_sha256, progress)
    raise DataError(
        f"{path}: no such file or folder. download.source must be 'official', a CIFAR-10 "
        f"archive (.tar, .tar.gz, .tgz) or a folder laid out {IMAGE_FOLDER_LAYOUT}."
    )


# --------------------------------------------------------------------------- acquisition


def _download_official(download_dir: Path) -> Path:
    # Imported here: torchvision is heavy and only this path needs it.
    from torchvision.datasets.utils import download_url

    try:
        # Reuses an already-downloaded file whose md5 matches.
        download_url(OFFICIAL_URL, root=str(download_dir), md5=OFFICIAL_MD5)
    except (OSError, RuntimeError, http.client.HTTPException) as exc:
        raise DownloadError(
            f"Download of {OFFICIAL_URL} failed ({exc}). Without internet access, set "
            "download.source in params.yaml to a local copy: the official archive or an "
            "image-folder archive such as ../shared/data/cifar10-jpeg.tar.gz."
        ) from exc
    return download_dir / PurePosixPath(OFFICIAL_URL).name


def _acquire_archive(
    path: Path, source: str, expected_sha256: str | None, progress: bool | None
) -> tuple[CifarArrays, dict]:
    checksum = _verify_archive(path, expected_sha256)
    arrays, fmt = _decode_entries(_tar_entries(path), str(path), progress)
    return arrays, _manifest(source, fmt, checksum, arrays)


def _acquire_folder(
    root: Path, source: str, expected_sha256: str | None, progress: bool | None
) -> tuple[CifarArrays, dict]:
    entries = _folder_entries(root)
    checksum = _verify_folder(root, entries, expected_sha256)
    arrays, fmt = _decode_entries(entries, str(root), progress)
    return arrays, _manifest(source, fmt, checksum, arrays)


def _manifest(source: str, fmt: str, checksum: dict, arrays: CifarArrays) -> dict:
    def split(labels: np.ndarray) -> dict:
        counts = np.bincount(labels, minlength=len(arrays.class_names))
        return {
            "count": int(labels.size),
            "per_class": {name: int(n) for name, n in zip(arrays.class_names, counts)},
        }

    return {
        "source": source,
        "format": fmt,
        "checksum": checksum,
        "splits": {"train": split(arrays.train_labels), "test": split(arrays.test_labels)},
        "class_names": list(arrays.class_names),
        # Over each array's little-endian C-order bytes: images uint8 (N, 32, 32, 3) HWC RGB,
        # labels int64 (N,), N as in "splits".
        "decoded_sha256": {field: _array_sha256(getattr(arrays, field)) for field in ARRAY_FIELDS},
        # Binary records are copied, not decoded: no library version can change their pixels.
        "decoders": _decoder_versions() if fmt == "image-folder" else None,
    }


def _array_sha256(array: np.ndarray) -> str:
    # Little-endian whatever the machine, so that hashes compare across machines.
    return hashlib.sha256(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))).hexdigest()


def _decoder_versions() -> dict:
    """Versions of what turns image files into pixels: JPEG decoding (IDCT, chroma upsampling)
    and lossy WebP's YUV to RGB conversion differ across library versions; None if not built in."""
    return {
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "libwebp": features.version("webp"),
    }


# --------------------------------------------------------------------------- verification


def _normalize_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    return _parse_sha256(sha256, "the download.sha256 param")


def _parse_sha256(value: str, origin: str) -> str:
    normalized = value.strip().lower()
    if not _SHA256_RE.match(normalized):
        raise DataError(f"{origin}: {value!r} is not a sha256 hash; allowed: 64 hexadecimal digits.")
    return normalized


def _verify_archive(path: Path, expected_sha256: str | None) -> dict:
    """Check the archive against the strongest expectation available; return the manifest's checksum."""
    expected_sha256, origin = _pinned_sha256(path, expected_sha256)
    if expected_sha256 is not None:
        _check_digest(path, "sha256", expected_sha256, file_hash(path, "sha256"), origin)
        return {"algorithm": "sha256", "value": expected_sha256, "verified": True}
    if _first_file_is_official(path):
        origin = f"the official CIFAR-10 archive, {OFFICIAL_SIZE} bytes; this file has {path.stat().st_size}"
        _check_digest(path, "md5", OFFICIAL_MD5, file_hash(path, "md5"), origin)
        return {"algorithm": "md5", "value": OFFICIAL_MD5, "verified": True}
    return _unverified(path, "sha256", file_hash(path, "sha256"))


def _verify_folder(root: Path, entries: list[_Entry], expected_sha256: str | None) -> dict:
    """Check the folder's tree sha256 as :func:`_verify_archive` checks an archive's sha256."""
    actual = _tree_sha256(entries)
    expected_sha256, origin = _pinned_sha256(root, expected_sha256)
    if expected_sha256 is None:
        return _unverified(root, TREE_SHA256, actual)
    _check_digest(root, TREE_SHA256, expected_sha256, actual, origin)
    return {"algorithm": TREE_SHA256, "value": expected_sha256, "verified": True}


def _tree_sha256(entries: list[_Entry]) -> str:
    """The folder's ``TREE_SHA256``: NUL ends each listing line, so no file name can fake another line."""
    # surrogateescape gives back the bytes of a file name that is not UTF-8, as sha256sum prints them.
    listing = sorted(
        ("/".join(entry.parts).encode("utf-8", "surrogateescape"), hashlib.sha256(entry.data).hexdigest().encode())
        for entry in entries
    )
    return hashlib.sha256(b"".join(b"%s  %s\0" % (file_hash, path) for path, file_hash in listing)).hexdigest()


def _pinned_sha256(path: Path, expected_sha256: str | None) -> tuple[str | None, str]:
    """The sha256 ``path`` must have and where it comes from: the download.sha256 param, else SHA256SUMS beside it."""
    if expected_sha256 is not None:
        return expected_sha256, "the download.sha256 param"
    return _sha256_from_sums_file(path), str(path.parent / "SHA256SUMS")


def _unverified(path: Path, algorithm: str, actual: str) -> dict:
    logger.warning(
        "%s has no checksum to verify against (no download.sha256, no SHA256SUMS beside it); "
        "using it unverified. Its %s is %s: set download.sha256 to it to pin it.",
        path,
        algorithm,
        actual,
    )
    return {"algorithm": algorithm, "value": actual, "verified": False}


def _sha256_from_sums_file(path: Path) -> str | None:
    """The hash listed for ``path`` in a SHA256SUMS file beside it (``sha256sum`` format), if any."""
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text(errors="replace").splitlines():
        fields = line.split(maxsplit=1)
        # "*name" marks binary mode in sha256sum output.
        if len(fields) == 2 and fields[1].strip().lstrip("*") == path.name:
            return _parse_sha256(fields[0], str(sums))
    return None


def _check_digest(path: Path, algorithm: str, expected: str, actual: str, origin: str) -> None:
    if actual != expected:
        cause = (
            "A file of the folder changed, was added or was removed, or it is not the expected folder."
            if path.is_dir()
            else "The file is corrupted or not the expected one."
        )
        raise DataError(
            f"{path}: {algorithm} mismatch: expected {expected} (from {origin}), got {actual}. {cause} {_FIX_HINT}"
        )
    logger.info("%s: %s verified (%s)", path, algorithm, expected)


def _first_file_is_official(path: Path) -> bool:
    """Whether the archive's first file lies in the official binary layout.

    Reads tar headers only, up to the first regular file: enough to choose the
    md5 check without parsing any contents.
    """
    with _open_tar(path) as tar:
        for member, parts in _safe_members(tar, path):
            if member.isfile() and not _is_hidden(parts):
                return _is_official(parts)
    return False


# --------------------------------------------------------------------------- reading sources


_DAMAGED = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
# Compressed-stream readers by magic bytes; anything else is read as a plain tar.
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """Open the archive as a sequential stream (nothing extracted), turning damage into a DataError."""
    try:
        with open(path, "rb") as raw:
            head = raw.read(6)
            raw.seek(0)
            opener = next((op for magic, op in _DECOMPRESSORS.items() if head.startswith(magic)), None)
            # Decompressing through a large buffer is about twice as fast as tarfile's
            # own "r|*" stream for an archive of 60k small members.
            stream = io.BufferedReader(opener(raw), 1 << 20) if opener else raw
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar
    except _DAMAGED as exc:
        raise _corrupted(path, exc) from exc


def _corrupted(path: Path, exc: BaseException) -> DataError:
    return DataError(
        f"{path}: the archive is corrupted or truncated ({type(exc).__name__}: {exc}). "
        "Download it again or point download.source at an intact copy."
    )


def _safe_members(tar: tarfile.TarFile, path: Path) -> Iterator[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """Yield each member with its path components, rejecting any member that could
    escape the archive root if extracted: we never extract, but such an archive is
    malicious or broken and must not be half-trusted."""
    for member in tar:
        where = f"{path} member {member.name!r}"
        # Plain string operations: PurePosixPath costs seconds over 60k members.
        parts = tuple(part for part in member.name.split("/") if part not in ("", "."))
        if member.issym() or member.islnk():
            raise DataError(f"{where}: links are not allowed in a dataset archive.")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{where}: only regular files and folders are allowed in a dataset archive.")
        if member.name.startswith("/") or ".." in parts:
            raise DataError(f"{where}: absolute paths and '..' are not allowed in a dataset archive.")
        yield member, parts


def _tar_entries(path: Path) -> list[_Entry]:
    entries = []
    with _open_tar(path) as tar:
        for member, parts in _safe_members(tar, path):
            if member.isfile() and not _is_hidden(parts):
                data = tar.extractfile(member).read()
                entries.append(_Entry(parts, data, f"{path} member {member.name!r}"))
        _check_only_padding_left(tar)
    return entries


def _check_only_padding_left(tar: tarfile.TarFile) -> None:
    """Read the stream to its end: only zero padding may follow the last member.

    tarfile ends the archive silently at a damaged header, so a corrupted archive
    could otherwise pass as a shorter one; reading to the end also makes the
    decompressor check its CRC and detect truncation.
    """
    while chunk := tar.fileobj.read(HASH_CHUNK_BYTES):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError("unreadable data after the last readable member")


def _folder_entries(root: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    real_root = Path(os.path.realpath(root))
    try:
        _walk_folder(root, (), real_root, frozenset({real_root}), entries)
    except OSError as exc:
        raise DataError(
            f"{exc.filename}: unreadable ({exc.strerror}); every file of the source must be readable."
        ) from exc
    return entries


def _walk_folder(
    folder: Path, parts: tuple[str, ...], real_root: Path, ancestors: frozenset[Path], entries: list[_Entry]
) -> None:
    """Append the files under ``folder`` in name order (deterministic), following symlinks.

    os.walk does not follow folder links, which silently dropped a linked class folder.
    ``ancestors`` holds the real paths of the folders above, so that a link back up to
    one of them is reported instead of walked forever.
    """
    with os.scandir(folder) as scan:
        children = sorted(scan, key=lambda child: child.name)
    for child in children:
        path, child_parts = Path(child.path), (*parts, child.name)
        if _is_hidden(child_parts):
            continue
        if child.is_symlink():
            _check_link(path, real_root)
        if child.is_dir():
            real = Path(os.path.realpath(path))
            if real in ancestors:
                raise DataError(
                    f"{path}: symlink loop: it points at {real}, a folder that contains it; "
                    "links must not point at a folder above them."
                )
            _walk_folder(path, child_parts, real_root, ancestors | {real}, entries)
        else:
            entries.append(_Entry(child_parts, path.read_bytes(), str(path)))


def _check_link(link: Path, real_root: Path) -> None:
    target = Path(os.path.realpath(link))
    if not target.is_relative_to(real_root):
        raise DataError(
            f"{link}: symlink to {target}, outside the source folder {real_root}; "
            "only links to files or folders inside the source folder are allowed."
        )
    if not link.exists():
        raise DataError(f"{link}: broken symlink: its target {target} does not exist or is a symlink loop.")


def _is_hidden(parts: tuple[str, ...]) -> bool:
    # Skips OS litter such as .DS_Store and macOS tar's "._name" resource forks.
    return any(part.startswith(".") for part in parts)


# --------------------------------------------------------------------------- decoding


def _is_official(parts: tuple[str, ...]) -> bool:
    return bool(parts) and parts[0] == OFFICIAL_DIR


def _decode_entries(entries: list[_Entry], where: str, progress: bool | None) -> tuple[CifarArrays, str]:
    """Decode a source's files (``where`` names the source), choosing the format from its
    first file, as verification did."""
    if not entries:
        raise DataError(f"{where}: no files; expected the official binary layout or {IMAGE_FOLDER_LAYOUT}.")
    if _is_official(entries[0].parts):
        return _decode_official(entries, where), "official-binary"
    return _decode_image_folder(entries, where, progress), "image-folder"


def _decode_official(entries: list[_Entry], where: str) -> CifarArrays:
    files = {entry.parts[-1]: entry for entry in entries if len(entry.parts) == 2}
    missing = [name for name in (*OFFICIAL_TRAIN_FILES, OFFICIAL_TEST_FILE) if name not in files]
    if missing:
        raise DataError(f"{where}: missing {', '.join(f'{OFFICIAL_DIR}/{m}' for m in missing)}.")
    class_names = _official_class_names(files.get(OFFICIAL_META_FILE))
    train = [_decode_batch(files[name], len(class_names)) for name in OFFICIAL_TRAIN_FILES]
    test_images, test_labels = _decode_batch(files[OFFICIAL_TEST_FILE], len(class_names))
    return CifarArrays(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
    )


def _official_class_names(meta: _Entry | None) -> tuple[str, ...]:
    if meta is None:
        return CLASS_NAMES
    lines = (line.strip() for line in meta.data.decode("ascii", errors="replace").splitlines())
    names = tuple(name for name in lines if name)
    # Label i means CLASS_NAMES[i] everywhere downstream (the model has ten outputs), so the order counts too.
    if names != CLASS_NAMES:
        raise DataError(
            f"{meta.where}: class names {', '.join(names) or '(none)'}; allowed: exactly CIFAR-10's ten, "
            f"in label order: {', '.join(CLASS_NAMES)}."
        )
    return names


def _decode_batch(entry: _Entry, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records are 1 label byte + 1024 R, 1024 G, 1024 B bytes (rows of 32); return HWC images."""
    if not entry.data or len(entry.data) % RECORD_BYTES:
        raise DataError(
            f"{entry.where}: {len(entry.data)} bytes is not a positive multiple of the "
            f"{RECORD_BYTES}-byte CIFAR record."
        )
    records = np.frombuffer(entry.data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= num_classes:
        raise DataError(f"{entry.where}: label {labels.max()} but only {num_classes} class names.")
    chw = records[:, 1:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return np.ascontiguousarray(chw.transpose(0, 2, 3, 1)), labels


def _decode_image_folder(entries: list[_Entry], where: str, progress: bool | None) -> CifarArrays:
    layout = _image_folder_layout(entries)
    class_names = _class_names(layout, where)
    train_images, train_labels = _decode_split(layout["train"], class_names, progress, "train")
    test_images, test_labels = _decode_split(layout["test"], class_names, progress, "test")
    return CifarArrays(train_images, train_labels, test_images, test_labels, class_names)


def _image_folder_layout(entries: list[_Entry]) -> dict[str, dict[str, list[_Entry]]]:
    """Group files as split -> class -> files, allowing one optional top folder."""
    # A single top folder wraps everything when the first file is not directly under a split.
    top = 1 if entries[0].parts[0] not in SPLITS else 0
    layout: dict[str, dict[str, list[_Entry]]] = {split: {} for split in SPLITS}
    for entry in entries:
        parts = entry.parts
        if len(parts) != top + 3 or parts[top] not in SPLITS or parts[:top] != entries[0].parts[:top]:
            raise DataError(f"{entry.where}: does not fit the image-folder layout {IMAGE_FOLDER_LAYOUT}.")
        split, class_name = parts[top], parts[top + 1]
        layout[split].setdefault(class_name, []).append(entry)
    return layout


def _class_names(layout: dict[str, dict[str, list[_Entry]]], where: str) -> tuple[str, ...]:
    """The class folders must be CIFAR-10's ten; labels follow ``CLASS_NAMES``, which is sorted."""
    for split in SPLITS:
        if not layout[split]:
            raise DataError(f"{where}: no '{split}' split; expected {IMAGE_FOLDER_LAYOUT}.")
    train, test = set(layout["train"]), set(layout["test"])
    if train != test:
        only = ", ".join(
            [f"class '{c}' is in train but not in test" for c in sorted(train - test)]
            + [f"class '{c}' is in test but not in train" for c in sorted(test - train)]
        )
        raise DataError(f"{where}: {only}; both splits need the same class folders.")
    # An 11th class crashes training (the model has ten outputs); a missing one shifts labels.
    extra, missing = sorted(train - set(CLASS_NAMES)), sorted(set(CLASS_NAMES) - train)
    if extra or missing:
        found = "; ".join(
            ([f"unexpected class folders {', '.join(extra)}"] if extra else [])
            + ([f"missing class folders {', '.join(missing)}"] if missing else [])
        )
        raise DataError(f"{where}: {found}; allowed: exactly CIFAR-10's ten, {', '.join(CLASS_NAMES)}.")
    return CLASS_NAMES


def _decode_split(
    classes: dict[str, list[_Entry]], class_names: tuple[str, ...], progress: bool | None, split: str
) -> tuple[np.ndarray, np.ndarray]:
    # Sorted by file name within each class, so the order does not depend on the archive's.
    files = [
        (label, entry)
        for label, name in enumerate(class_names)
        for entry in sorted(classes[name], key=lambda e: e.parts[-1])
    ]
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (label, entry) in enumerate(progress_bar(files, f"decode {split}", progress, unit="img")):
        images[i] = _decode_image(entry)
        labels[i] = label
    return images, labels


def _decode_image(entry: _Entry) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(entry.data), formats=IMAGE_FORMATS) as image:
            _check_image(image, entry.where)
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{entry.where}: unreadable image ({type(exc).__name__}: {exc}).") from exc


def _check_image(image: Image.Image, where: str) -> None:
    """Reject what ``convert("RGB")`` would not turn into exact 8-bit RGB (see IMAGE_MODES)."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{where}: image is {image.size[0]}x{image.size[1]}, "
            f"every image must be {IMAGE_SIZE}x{IMAGE_SIZE}."
        )
    if image.mode not in IMAGE_MODES:
        raise DataError(
            f"{where}: image mode {image.mode} is not allowed; allowed: the 8-bit modes "
            f"{', '.join(IMAGE_MODES)} (RGBA and LA only fully opaque). Convert the image to 8-bit RGB."
        )
    # An alpha channel, or a palette entry or colour key marked transparent.
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        if image.convert("RGBA").getchannel("A").getextrema()[0] < 255:
            raise DataError(
                f"{where}: image mode {image.mode} has transparent pixels; allowed: fully opaque images "
                "only, as CIFAR-10 has no background to put them on. Flatten the image onto one."
            )
