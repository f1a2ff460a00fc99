"""Tests for pipeline.data on tiny archives written here (no network, no shared data)."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import struct
import subprocess
import tarfile
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image, features

from pipeline import data
from pipeline.arrays import CifarArrays, DataError, load_arrays, save_arrays
from pipeline.data import acquire
from pipeline.transforms import sample_indices

RECORDS_PER_BATCH = 3
FOLDER_CLASSES = data.CLASS_NAMES[::-1]  # written in reverse: labels must follow CLASS_NAMES order
ALLOWED_CLASSES = (
    "allowed: exactly CIFAR-10's ten, airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck."
)


# --------------------------------------------------------------------------- helpers


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def add_member(path: Path, info: tarfile.TarInfo, payload: bytes = b"") -> None:
    """Rewrite a .tar.gz with one extra member (gzip archives cannot be appended to)."""
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    with tarfile.open(path, "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        info.size = len(payload) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png16_bytes(pixels: np.ndarray) -> bytes:
    """A real 16-bit PNG, written by hand (Pillow cannot write 16-bit RGB): gray (H, W) or RGB (H, W, 3)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 per row
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def every_class(name: str, payload: bytes) -> dict[str, bytes]:
    """One file ``name`` in each class folder of both splits."""
    return {f"{split}/{cls}/{name}": payload for split in data.SPLITS for cls in data.CLASS_NAMES}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, payload in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)
    return root


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def official(tmp_path: Path) -> dict:
    """A tiny archive in the official binary layout, with its expected contents."""
    rng = np.random.default_rng(0)
    names = [*data.OFFICIAL_TRAIN_FILES, data.OFFICIAL_TEST_FILE]
    chw = rng.integers(0, 256, size=(len(names), RECORDS_PER_BATCH, 3, 32, 32), dtype=np.uint8)
    # Record 0 of the first batch: red plane 255, green 0, blue = row index.
    chw[0, 0, 0], chw[0, 0, 1] = 255, 0
    chw[0, 0, 2] = np.arange(32, dtype=np.uint8)[:, None]
    labels = rng.integers(0, 10, size=(len(names), RECORDS_PER_BATCH), dtype=np.uint8)
    meta = ("\n".join(data.CLASS_NAMES) + "\n\n").encode()
    files = {f"{data.OFFICIAL_DIR}/{data.OFFICIAL_META_FILE}": meta}
    for i, name in enumerate(names):
        records = np.concatenate([labels[i][:, None], chw[i].reshape(RECORDS_PER_BATCH, -1)], axis=1)
        files[f"{data.OFFICIAL_DIR}/{name}"] = records.tobytes()
    folder = tmp_path / "official"
    folder.mkdir()
    archive = write_tar(folder / "cifar-10-binary.tar.gz", files)
    return {"archive": archive, "sha256": sha256_of(archive), "chw": chw, "labels": labels, "files": files}


@pytest.fixture
def folder_images() -> dict[str, bytes]:
    """10 classes x 2 PNG images per split, keyed by relative path train|test/<class>/<name>."""
    rng = np.random.default_rng(1)
    return {
        f"{split}/{cls}/{i}.png": png_bytes(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
        for split in data.SPLITS
        for cls in FOLDER_CLASSES
        for i in range(2)
    }


@pytest.fixture
def folder_archive(tmp_path: Path, folder_images: dict[str, bytes]) -> Path:
    """The images in a .tar.gz under a single top folder, with no checksum beside it."""
    (tmp_path / "mirror").mkdir()
    files = {f"cifar10/{name}": payload for name, payload in folder_images.items()}
    return write_tar(tmp_path / "mirror" / "images.tar.gz", files)


def make_folder_archive(tmp_path: Path, files: dict[str, bytes]) -> Path:
    return write_tar(tmp_path / "bad.tar.gz", files)


def expected_folder_split(folder_images: dict[str, bytes], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images in label order (CLASS_NAMES), then file name order."""
    images, labels = [], []
    for label, cls in enumerate(data.CLASS_NAMES):
        for i in range(2):
            images.append(np.asarray(Image.open(io.BytesIO(folder_images[f"{split}/{cls}/{i}.png"]))))
            labels.append(label)
    return np.stack(images), np.array(labels)


# --------------------------------------------------------------------------- official binary format


def test_official_archive_decodes_exact_pixels_and_labels(official: dict) -> None:
    archive, sha256 = official["archive"], official["sha256"]
    arrays, manifest = acquire(str(archive), Path("unused"), sha256=sha256, progress=False)

    chw, labels = official["chw"], official["labels"]
    assert arrays.train_images.shape == (5 * RECORDS_PER_BATCH, 32, 32, 3)
    assert arrays.train_images.dtype == np.uint8 and arrays.train_labels.dtype == np.int64
    np.testing.assert_array_equal(arrays.train_images, chw[:5].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(arrays.test_images, chw[5].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(arrays.train_labels, labels[:5].reshape(-1))
    np.testing.assert_array_equal(arrays.test_labels, labels[5])
    # The known pattern: HWC pixel (y, x) of record 0 is (255, 0, y).
    for y, x in [(0, 0), (5, 31), (31, 7)]:
        assert tuple(arrays.train_images[0, y, x]) == (255, 0, y)
    assert arrays.class_names == data.CLASS_NAMES
    assert manifest["format"] == "official-binary"
    assert manifest["checksum"] == {"algorithm": "sha256", "value": sha256, "verified": True}
    assert manifest["splits"]["train"]["count"] == 15 and manifest["splits"]["test"]["count"] == 3
    train_counts = np.bincount(labels[:5].reshape(-1), minlength=10)
    per_class = {name: int(count) for name, count in zip(data.CLASS_NAMES, train_counts)}
    assert manifest["splits"]["train"]["per_class"] == per_class
    assert manifest["class_names"] == list(data.CLASS_NAMES)


def test_official_layout_without_sha256_must_match_official_md5(official: dict) -> None:
    with pytest.raises(DataError, match="md5 mismatch") as error:
        acquire(str(official["archive"]), Path("unused"), progress=False)
    message = str(error.value)
    assert official["archive"].name in message and data.OFFICIAL_MD5 in message
    assert hashlib.md5(official["archive"].read_bytes()).hexdigest() in message
    assert "download.source" in message


def test_official_layout_uses_default_class_names_without_meta(tmp_path: Path, official: dict) -> None:
    files = {name: payload for name, payload in official["files"].items() if not name.endswith(".txt")}
    archive = write_tar(tmp_path / "nometa.tar", files, mode="w")
    arrays, _ = acquire(str(archive), Path("unused"), sha256=sha256_of(archive), progress=False)
    assert arrays.class_names == data.CLASS_NAMES


def test_official_layout_with_a_partial_record_is_rejected(tmp_path: Path, official: dict) -> None:
    files = dict(official["files"])
    files[f"{data.OFFICIAL_DIR}/data_batch_3.bin"] += b"\x00"
    archive = write_tar(tmp_path / "partial.tar.gz", files)
    with pytest.raises(DataError, match="data_batch_3.bin.*3073-byte"):
        acquire(str(archive), Path("unused"), sha256=sha256_of(archive), progress=False)


def test_official_layout_missing_a_batch_is_rejected(tmp_path: Path, official: dict) -> None:
    files = {name: payload for name, payload in official["files"].items() if "test_batch" not in name}
    archive = write_tar(tmp_path / "missing.tar.gz", files)
    with pytest.raises(DataError, match="missing.tar.gz: missing cifar-10-batches-bin/test_batch.bin"):
        acquire(str(archive), Path("unused"), sha256=sha256_of(archive), progress=False)


@pytest.mark.parametrize(
    "names",
    [
        ("a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"),
        data.CLASS_NAMES[::-1],  # the right ten in another order would relabel everything
        data.CLASS_NAMES[:9],
    ],
)
def test_official_meta_must_list_cifar10_classes_in_order(
    tmp_path: Path, official: dict, names: tuple[str, ...]
) -> None:
    files = {**official["files"], f"{data.OFFICIAL_DIR}/{data.OFFICIAL_META_FILE}": "\n".join(names).encode()}
    archive = write_tar(tmp_path / "renamed.tar.gz", files)
    with pytest.raises(DataError) as error:
        acquire(str(archive), Path("unused"), sha256=sha256_of(archive), progress=False)
    assert str(error.value) == (
        f"{archive} member 'cifar-10-batches-bin/batches.meta.txt': class names {', '.join(names)}; "
        "allowed: exactly CIFAR-10's ten, in label order: "
        "airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck."
    )


# --------------------------------------------------------------------------- the "official" source


def test_official_source_offline_points_at_download_source(monkeypatch, tmp_path: Path) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    with pytest.raises(data.DownloadError, match="download.source") as error:
        acquire("official", tmp_path / "dl", progress=False)
    assert data.OFFICIAL_URL in str(error.value)


def test_the_download_stage_exits_with_the_retryable_status_only_on_a_network_failure(monkeypatch, tmp_path, capsys):
    from stages import download as download_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("download:\n  source: official\n")
    for error, status in [(data.DownloadError("Download of x failed"), data.DownloadError.exit_status),
                          (DataError("x: sha256 mismatch"), "[download] x: sha256 mismatch")]:
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(download_stage, "acquire", failing)
        with pytest.raises(SystemExit) as exited:
            download_stage.main()
        assert exited.value.code == status
    assert data.DownloadError.exit_status == 75
    assert not (tmp_path / "data").exists()


def fake_download(archive: Path):
    def download_url(url: str, root: str, md5: str | None = None, **kwargs) -> None:
        assert url == data.OFFICIAL_URL and md5 == data.OFFICIAL_MD5
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-binary.tar.gz").write_bytes(archive.read_bytes())

    return download_url


def test_official_source_decodes_the_downloaded_archive(monkeypatch, tmp_path: Path, official: dict) -> None:
    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download(official["archive"]))
    arrays, manifest = acquire("official", tmp_path / "dl", sha256=official["sha256"], progress=False)
    assert manifest["source"] == "official" and manifest["format"] == "official-binary"
    np.testing.assert_array_equal(arrays.test_labels, official["labels"][5])


def test_official_source_checks_md5_itself(monkeypatch, tmp_path: Path, official: dict) -> None:
    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download(official["archive"]))
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz: md5 mismatch"):
        acquire("official", tmp_path / "dl", progress=False)


# --------------------------------------------------------------------------- image-folder format


def test_image_folder_archive_decodes_exact_pixels_in_class_names_order(
    folder_archive: Path, folder_images: dict[str, bytes], caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        arrays, manifest = acquire(str(folder_archive), Path("unused"), progress=False)

    assert arrays.class_names == data.CLASS_NAMES
    for split in data.SPLITS:
        images, labels = expected_folder_split(folder_images, split)
        np.testing.assert_array_equal(getattr(arrays, f"{split}_images"), images)
        np.testing.assert_array_equal(getattr(arrays, f"{split}_labels"), labels)
    assert manifest["format"] == "image-folder"
    assert manifest["source"] == str(folder_archive)
    assert manifest["splits"]["test"] == {"count": 20, "per_class": {name: 2 for name in data.CLASS_NAMES}}
    expected = {"algorithm": "sha256", "value": sha256_of(folder_archive), "verified": False}
    assert manifest["checksum"] == expected
    assert "unverified" in caplog.text and folder_archive.name in caplog.text


def test_image_folder_directory_gives_the_same_arrays(
    tmp_path: Path, folder_archive: Path, folder_images: dict[str, bytes]
) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    (root / "train" / ".DS_Store").write_bytes(b"litter")

    from_folder, manifest = acquire(str(root), Path("unused"), progress=False)
    from_archive, _ = acquire(str(folder_archive), Path("unused"), progress=False)

    for field in ("train_images", "train_labels", "test_images", "test_labels", "class_names"):
        np.testing.assert_array_equal(getattr(from_folder, field), getattr(from_archive, field))
    assert manifest["checksum"]["verified"] is False and manifest["format"] == "image-folder"


def test_jpeg_and_grayscale_images_decode_to_rgb(tmp_path: Path) -> None:
    def encoded(mode: str, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, (32, 32), color=128 if mode == "L" else (10, 200, 30)).save(buffer, format=fmt)
        return buffer.getvalue()

    files = every_class("0.jpg", encoded("RGB", "JPEG"))
    files["train/airplane/gray.png"] = encoded("L", "PNG")
    arrays, _ = acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    assert arrays.train_images.shape == (11, 32, 32, 3)
    assert tuple(arrays.train_images[1, 0, 0]) == (128, 128, 128)
    assert np.abs(arrays.test_images[0].astype(int) - (10, 200, 30)).max() <= 3  # JPEG is lossy


def test_16_bit_rgb_png_decodes_to_its_high_bytes(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    # Pillow opens a 48-bit PNG as "RGB" keeping each sample's high byte: within 1 of v / 257 rounded.
    deep = np.random.default_rng(3).integers(0, 1 << 16, size=(32, 32, 3), dtype=np.uint16)
    files = {**folder_images, "train/airplane/0.png": png16_bytes(deep)}
    arrays, _ = acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    np.testing.assert_array_equal(arrays.train_images[0], (deep >> 8).astype(np.uint8))


def mode_i_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 300, dtype=np.int32)).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, payload",
    [
        ("deep.png", png16_bytes(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)),
        ("deep.tif", mode_i_tiff()),
    ],
)
def test_image_with_more_than_8_bits_per_sample_is_rejected(
    tmp_path: Path, folder_images: dict[str, bytes], name: str, payload: bytes
) -> None:
    # convert("RGB") clips such an image: almost every pixel of a 16-bit one would become 255.
    mode = Image.open(io.BytesIO(payload)).mode  # "I;16" or "I", depending on the Pillow version
    files = {**folder_images, f"test/bird/{name}": payload}
    with pytest.raises(DataError) as error:
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'bad.tar.gz'} member 'test/bird/{name}': image mode {mode} is not allowed; "
        "allowed: the 8-bit modes RGB, L, P, RGBA, LA (RGBA and LA only fully opaque). "
        "Convert the image to 8-bit RGB."
    )


def test_opaque_rgba_image_decodes_to_its_rgb(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    rgba = np.random.default_rng(5).integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    files = {**folder_images, "train/airplane/0.png": png_bytes(rgba)}
    arrays, _ = acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    np.testing.assert_array_equal(arrays.train_images[0], rgba[..., :3])


def transparent_png(mode: str) -> bytes:
    buffer = io.BytesIO()
    if mode == "P":  # palette entry 0 marked transparent, as GIF and palette PNG do
        Image.new("P", (32, 32), 0).save(buffer, format="PNG", transparency=0)
    else:
        pixels = np.full((32, 32, len(mode)), 200, dtype=np.uint8)
        pixels[5, 7, -1] = 0  # one transparent pixel
        Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_image_with_transparent_pixels_is_rejected(
    tmp_path: Path, folder_images: dict[str, bytes], mode: str
) -> None:
    files = {**folder_images, "train/frog/clear.png": transparent_png(mode)}
    with pytest.raises(DataError) as error:
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'bad.tar.gz'} member 'train/frog/clear.png': image mode {mode} has transparent pixels; "
        "allowed: fully opaque images only, as CIFAR-10 has no background to put them on. "
        "Flatten the image onto one."
    )


# --------------------------------------------------------------------------- symlinks in a folder source


def test_symlinked_class_folder_and_file_inside_the_folder_decode_like_real_ones(
    tmp_path: Path, folder_archive: Path, folder_images: dict[str, bytes]
) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    (root / ".store").mkdir()
    shutil.move(root / "train" / "cat", root / ".store" / "cat")
    (root / "train" / "cat").symlink_to(Path("..") / ".store" / "cat")  # relative link to a folder
    shutil.move(root / "test" / "dog" / "0.png", root / ".store" / "dog-0.png")
    (root / "test" / "dog" / "0.png").symlink_to(root / ".store" / "dog-0.png")  # absolute link to a file

    from_folder, _ = acquire(str(root), Path("unused"), progress=False)
    from_archive, _ = acquire(str(folder_archive), Path("unused"), progress=False)
    for field in ("train_images", "train_labels", "test_images", "test_labels", "class_names"):
        np.testing.assert_array_equal(getattr(from_folder, field), getattr(from_archive, field))


@pytest.mark.parametrize("linked", ["train/cat", "test/dog/0.png"])
def test_symlink_out_of_the_folder_is_rejected(
    tmp_path: Path, folder_images: dict[str, bytes], linked: str
) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    outside = tmp_path / "outside" / Path(linked).name
    outside.parent.mkdir()
    shutil.move(root / linked, outside)
    (root / linked).symlink_to(outside)
    with pytest.raises(DataError) as error:
        acquire(str(root), Path("unused"), progress=False)
    assert str(error.value) == (
        f"{root / linked}: symlink to {os.path.realpath(outside)}, outside the source folder "
        f"{os.path.realpath(root)}; only links to files or folders inside the source folder are allowed."
    )


def test_symlink_loop_is_rejected(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    (root / "train" / "cat" / "up").symlink_to(Path(".."))  # would be walked forever
    with pytest.raises(DataError) as error:
        acquire(str(root), Path("unused"), progress=False)
    assert str(error.value) == (
        f"{root / 'train' / 'cat' / 'up'}: symlink loop: it points at {os.path.realpath(root / 'train')}, "
        "a folder that contains it; links must not point at a folder above them."
    )


# --------------------------------------------------------------------------- checksums


def test_sha256_param_mismatch_names_file_and_both_hashes(folder_archive: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(DataError, match="sha256 mismatch") as error:
        acquire(str(folder_archive), Path("unused"), sha256=wrong, progress=False)
    message = str(error.value)
    assert folder_archive.name in message and wrong in message and sha256_of(folder_archive) in message
    assert "download.sha256" in message


def test_sha256_param_must_be_a_hash(folder_archive: Path) -> None:
    with pytest.raises(DataError, match="download.sha256.*64 hexadecimal"):
        acquire(str(folder_archive), Path("unused"), sha256="abc", progress=False)


def test_sha256sums_beside_the_archive_is_checked(folder_archive: Path) -> None:
    sums = folder_archive.parent / "SHA256SUMS"
    sums.write_text(f"{'1' * 64}  other.tar.gz\n{sha256_of(folder_archive).upper()} *{folder_archive.name}\n")
    _, manifest = acquire(str(folder_archive), Path("unused"), progress=False)
    expected = {"algorithm": "sha256", "value": sha256_of(folder_archive), "verified": True}
    assert manifest["checksum"] == expected


def test_sha256sums_mismatch_names_the_file(folder_archive: Path) -> None:
    (folder_archive.parent / "SHA256SUMS").write_text(f"{'f' * 64}  {folder_archive.name}\n")
    with pytest.raises(DataError, match="sha256 mismatch") as error:
        acquire(str(folder_archive), Path("unused"), progress=False)
    assert folder_archive.name in str(error.value) and "SHA256SUMS" in str(error.value)


def test_sha256sums_not_listing_the_archive_leaves_it_unverified(folder_archive: Path) -> None:
    (folder_archive.parent / "SHA256SUMS").write_text(f"{'f' * 64}  other.tar.gz\n")
    _, manifest = acquire(str(folder_archive), Path("unused"), progress=False)
    assert manifest["checksum"]["verified"] is False


def test_sha256_param_wins_over_sha256sums(folder_archive: Path) -> None:
    (folder_archive.parent / "SHA256SUMS").write_text(f"{'f' * 64}  {folder_archive.name}\n")
    sha256 = sha256_of(folder_archive)
    _, manifest = acquire(str(folder_archive), Path("unused"), sha256=sha256, progress=False)
    assert manifest["checksum"]["verified"] is True


def sha256sum_listing_digest(root: Path) -> str:
    """A folder's tree sha256 as data.TREE_SHA256 defines it, computed here independently: the sha256 of
    `sha256sum --zero`'s listing of its non-hidden files, in byte order of their relative paths."""
    files = sorted(
        path.relative_to(root).as_posix().encode()
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    file_hashes = [hashlib.sha256((root / name.decode()).read_bytes()).hexdigest().encode() for name in files]
    listing = b"".join(file_hash + b"  " + name + b"\0" for file_hash, name in zip(file_hashes, files))
    return hashlib.sha256(listing).hexdigest()


def test_folder_is_verified_against_the_sha256_param_as_its_tree_sha256(
    tmp_path: Path, folder_images: dict[str, bytes]
) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    (root / "train" / ".DS_Store").write_bytes(b"litter")  # hidden files are neither decoded nor hashed
    digest = sha256sum_listing_digest(root)
    _, manifest = acquire(str(root), Path("unused"), sha256=digest.upper(), progress=False)
    assert manifest["checksum"] == {"algorithm": "sha256-tree", "value": digest, "verified": True}


def test_folder_tree_sha256_is_what_sha256sum_prints_for_its_listing(
    tmp_path: Path, folder_images: dict[str, bytes]
) -> None:
    if not all(shutil.which(tool) for tool in ("find", "sort", "xargs", "sha256sum")):
        pytest.skip("needs GNU find, sort, xargs and sha256sum")
    root = write_folder(tmp_path / "folder", {**folder_images, "train/cat/.hidden.png": b"x"})
    (root / "train" / "cat" / "linked.png").symlink_to(root / "train" / "dog" / "0.png")  # links are followed
    # The command of data.TREE_SHA256's comment and docs/stages.md, word for word.
    command = ("find -L . -type f -not -path '*/.*' -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum -z "
               "| sha256sum")
    printed = subprocess.run(["sh", "-c", command], cwd=root, check=True, capture_output=True, text=True).stdout
    _, manifest = acquire(str(root), Path("unused"), progress=False)
    assert printed.split()[0] == manifest["checksum"]["value"] == sha256sum_listing_digest(root)


def test_folder_sha256_param_mismatch_names_the_folder_and_both_digests(
    tmp_path: Path, folder_images: dict[str, bytes]
) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    pinned = sha256sum_listing_digest(root)
    (root / "test" / "cat" / "0.png").write_bytes(folder_images["train/cat/0.png"])  # one image replaced
    with pytest.raises(DataError) as error:
        acquire(str(root), Path("unused"), sha256=pinned, progress=False)
    assert str(error.value) == (
        f"{root}: sha256-tree mismatch: expected {pinned} (from the download.sha256 param), "
        f"got {sha256sum_listing_digest(root)}. A file of the folder changed, was added or was removed, or it is "
        "not the expected folder. Point the download.source param at the right file or folder, or set "
        "download.sha256 to the hash of the one you trust."
    )


def test_sha256sums_beside_the_folder_is_checked(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    (tmp_path / "SHA256SUMS").write_text(f"{'f' * 64}  folder\n")
    with pytest.raises(DataError, match=f"{root}: sha256-tree mismatch: expected {'f' * 64} "
                                        f"\\(from {tmp_path / 'SHA256SUMS'}\\)"):
        acquire(str(root), Path("unused"), progress=False)
    (tmp_path / "SHA256SUMS").write_text(f"{sha256sum_listing_digest(root)}  folder\n")
    _, manifest = acquire(str(root), Path("unused"), progress=False)
    assert manifest["checksum"]["verified"] is True


def test_folder_without_a_pinned_digest_is_used_unverified_and_its_digest_logged(
    tmp_path: Path, folder_images: dict[str, bytes], caplog
) -> None:
    root = write_folder(tmp_path / "folder", folder_images)
    digest = sha256sum_listing_digest(root)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        _, manifest = acquire(str(root), Path("unused"), progress=False)
    assert manifest["checksum"] == {"algorithm": "sha256-tree", "value": digest, "verified": False}
    assert caplog.messages == [
        f"{root} has no checksum to verify against (no download.sha256, no SHA256SUMS beside it); using it "
        f"unverified. Its sha256-tree is {digest}: set download.sha256 to it to pin it."
    ]


# --------------------------------------------------------------------------- damaged archives


def test_truncated_archive_is_reported(folder_archive: Path) -> None:
    payload = folder_archive.read_bytes()
    folder_archive.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="corrupted or truncated") as error:
        acquire(str(folder_archive), Path("unused"), progress=False)
    assert folder_archive.name in str(error.value)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_corrupted_archive_is_reported(folder_archive: Path, fraction: float) -> None:
    payload = bytearray(folder_archive.read_bytes())
    start = int(len(payload) * fraction)
    payload[start : start + 16] = bytes(b ^ 0xFF for b in payload[start : start + 16])
    folder_archive.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="corrupted or truncated") as error:
        acquire(str(folder_archive), Path("unused"), progress=False)
    assert folder_archive.name in str(error.value)


def test_damaged_member_header_is_not_taken_for_the_end(
    tmp_path: Path, folder_images: dict[str, bytes]
) -> None:
    # tarfile stops silently at a bad header past the first one; the rest of the archive must not be lost.
    archive = write_tar(tmp_path / "plain.tar", folder_images, mode="w")
    with tarfile.open(archive) as tar:
        offset = tar.getmembers()[len(folder_images) // 2].offset
    payload = bytearray(archive.read_bytes())
    payload[offset : offset + 8] = b"XXXXXXXX"
    archive.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="plain.tar: the archive is corrupted or truncated"):
        acquire(str(archive), Path("unused"), progress=False)


def test_not_an_archive_is_reported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match="junk.tar.gz.*corrupted or truncated"):
        acquire(str(junk), Path("unused"), progress=False)


def test_missing_source_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.tar.gz: no such file"):
        acquire(str(tmp_path / "nope.tar.gz"), Path("unused"), progress=False)


# --------------------------------------------------------------------------- layout problems


def test_missing_test_split_is_reported(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    files = {name: payload for name, payload in folder_images.items() if name.startswith("train/")}
    with pytest.raises(DataError, match="bad.tar.gz: no 'test' split"):
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)


def test_class_missing_from_test_is_reported(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    files = {name: payload for name, payload in folder_images.items() if not name.startswith("test/cat/")}
    with pytest.raises(DataError, match="class 'cat' is in train but not in test"):
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)


def test_file_outside_the_layout_is_reported(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    files = {**folder_images, "train/stray.png": folder_images["train/cat/0.png"]}
    with pytest.raises(DataError, match="'train/stray.png': does not fit the image-folder layout"):
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)


def test_image_of_wrong_size_is_reported(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    files = {**folder_images, "train/cat/big.png": png_bytes(np.zeros((32, 33, 3), np.uint8))}
    with pytest.raises(DataError, match="'train/cat/big.png': image is 33x32, every image must be 32x32"):
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)


def test_unreadable_image_is_reported(tmp_path: Path, folder_images: dict[str, bytes]) -> None:
    files = {**folder_images, "test/airplane/broken.jpg": b"\xff\xd8 not really a jpeg" * 10}
    with pytest.raises(DataError, match="'test/airplane/broken.jpg': unreadable image"):
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)


@pytest.mark.parametrize(
    "add, remove, found",
    [
        ("zebra", None, "unexpected class folders zebra"),  # train would crash: Target 10 is out of bounds
        (None, "truck", "missing class folders truck"),  # labels would silently cover nine classes
        ("Truck", "truck", "unexpected class folders Truck; missing class folders truck"),
    ],
)
def test_class_folders_must_be_the_cifar10_ten(
    tmp_path: Path, folder_images: dict[str, bytes], add: str | None, remove: str | None, found: str
) -> None:
    files = {name: image for name, image in folder_images.items() if name.split("/")[1] != remove}
    if add:
        image = folder_images["train/cat/0.png"]
        files.update({f"{split}/{add}/0.png": image for split in data.SPLITS})
    with pytest.raises(DataError) as error:
        acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    assert str(error.value) == f"{tmp_path / 'bad.tar.gz'}: {found}; {ALLOWED_CLASSES}"


# --------------------------------------------------------------------------- unsafe members


def unsafe_member(kind: str) -> tarfile.TarInfo:
    if kind == "parent":
        return tarfile.TarInfo("../evil.png")
    if kind == "nested-parent":
        return tarfile.TarInfo("train/cat/../../../evil.png")
    if kind == "absolute":
        return tarfile.TarInfo("/abs/evil.png")
    info = tarfile.TarInfo("train/cat/link.png")
    info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
    info.linkname = "/etc/passwd"
    return info


@pytest.mark.parametrize("kind", ["parent", "nested-parent", "absolute", "symlink", "hardlink"])
def test_unsafe_members_are_rejected(
    folder_archive: Path, folder_images: dict[str, bytes], kind: str
) -> None:
    info = unsafe_member(kind)
    add_member(folder_archive, info, folder_images["train/cat/0.png"])
    with pytest.raises(DataError, match="not allowed") as error:
        acquire(str(folder_archive), Path("unused"), progress=False)
    assert folder_archive.name in str(error.value) and info.name in str(error.value)


# --------------------------------------------------------------------------- manifest


def decoded_sha256(arrays: CifarArrays) -> dict[str, str]:
    fields = ("train_images", "train_labels", "test_images", "test_labels")
    return {field: hashlib.sha256(getattr(arrays, field).tobytes()).hexdigest() for field in fields}


def test_manifest_records_decoded_hashes_and_decoders_reproducibly(folder_archive: Path) -> None:
    arrays, manifest = acquire(str(folder_archive), Path("unused"), progress=False)
    assert manifest["decoded_sha256"] == decoded_sha256(arrays)
    assert manifest["decoders"] == {
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "libwebp": features.version("webp"),
    }
    _, again = acquire(str(folder_archive), Path("unused"), progress=False)
    assert again == manifest


def test_official_manifest_records_decoded_hashes_and_no_decoder(official: dict) -> None:
    archive, sha256 = official["archive"], official["sha256"]
    arrays, manifest = acquire(str(archive), Path("unused"), sha256=sha256, progress=False)
    assert manifest["decoded_sha256"] == decoded_sha256(arrays)
    assert manifest["decoders"] is None  # binary records are copied, not decoded


# --------------------------------------------------------------------------- saved arrays


def tiny_arrays() -> CifarArrays:
    rng = np.random.default_rng(2)
    return CifarArrays(
        train_images=rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8),
        train_labels=np.array([0, 1, 1, 0], dtype=np.int64),
        test_images=rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8),
        test_labels=np.array([1, 0], dtype=np.int64),
        class_names=("airplane", "cat"),
    )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    path = tmp_path / "out" / "cifar10.npz"
    save_arrays(arrays, path)
    loaded = load_arrays(path)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(arrays, field))
        assert getattr(loaded, field).dtype == getattr(arrays, field).dtype
    assert loaded.class_names == arrays.class_names
    assert sorted(p.name for p in path.parent.iterdir()) == ["cifar10.npz"]


def test_failed_save_leaves_no_file_behind(tmp_path: Path, monkeypatch) -> None:
    def half_written(file, **arrays):
        file.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        save_arrays(tiny_arrays(), tmp_path / "cifar10.npz")
    assert list(tmp_path.iterdir()) == []


def test_loading_something_else_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(DataError, match="other.npz: not a readable CIFAR arrays file"):
        load_arrays(path)


# --------------------------------------------------------------------------- subsets


def test_sample_indices_is_a_sorted_reproducible_subset_that_spans_class_ordered_data():
    labels = np.repeat(np.arange(10), 100)  # grouped by class, as an image-folder source stores them
    chosen = sample_indices(len(labels), 50, seed=0)
    assert len(np.unique(chosen)) == 50 and chosen.min() >= 0 and chosen.max() < len(labels)
    assert list(chosen) == sorted(chosen)
    assert (chosen == sample_indices(len(labels), 50, seed=0)).all()
    assert not (chosen == sample_indices(len(labels), 50, seed=1)).all()
    assert len(np.unique(labels[chosen])) == 10  # a prefix of 50 would be one class
    assert len(sample_indices(7, 7, seed=3)) == 7 and len(sample_indices(7, 0, seed=3)) == 0
    with pytest.raises(ValueError, match=r"count: value 8 is out of range; allowed: 0..7"):
        sample_indices(7, 8, seed=0)
