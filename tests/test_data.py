"""Tests for pipeline.data on tiny archives written here (no network, no shared data)."""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import data
from pipeline.data import CifarArrays, DataError, acquire, load_arrays, save_arrays

RECORDS_PER_BATCH = 3
META_NAMES = ("a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9")
FOLDER_CLASSES = ("cat", "airplane")  # deliberately unsorted: labels must follow sorted order


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
    files = {f"{data.OFFICIAL_DIR}/{data.OFFICIAL_META_FILE}": ("\n".join(META_NAMES) + "\n\n").encode()}
    for i, name in enumerate(names):
        records = np.concatenate([labels[i][:, None], chw[i].reshape(RECORDS_PER_BATCH, -1)], axis=1)
        files[f"{data.OFFICIAL_DIR}/{name}"] = records.tobytes()
    folder = tmp_path / "official"
    folder.mkdir()
    archive = write_tar(folder / "cifar-10-binary.tar.gz", files)
    return {"archive": archive, "sha256": sha256_of(archive), "chw": chw, "labels": labels, "files": files}


@pytest.fixture
def folder_images() -> dict[str, bytes]:
    """2 classes x 2 PNG images per split, keyed by relative path train|test/<class>/<name>."""
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
    """Images in label order (sorted classes), then file name order."""
    images, labels = [], []
    for label, cls in enumerate(sorted(FOLDER_CLASSES)):
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
    assert arrays.class_names == META_NAMES
    assert manifest["format"] == "official-binary"
    assert manifest["checksum"] == {"algorithm": "sha256", "value": sha256, "verified": True}
    assert manifest["splits"]["train"]["count"] == 15 and manifest["splits"]["test"]["count"] == 3
    train_counts = np.bincount(labels[:5].reshape(-1), minlength=10)
    assert manifest["splits"]["train"]["per_class"] == {n: int(c) for n, c in zip(META_NAMES, train_counts)}
    assert manifest["class_names"] == list(META_NAMES)


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


# --------------------------------------------------------------------------- the "official" source


def test_official_source_offline_points_at_download_source(monkeypatch, tmp_path: Path) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    with pytest.raises(DataError, match="download.source") as error:
        acquire("official", tmp_path / "dl", progress=False)
    assert data.OFFICIAL_URL in str(error.value)


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


def test_image_folder_archive_decodes_exact_pixels_in_sorted_class_order(
    folder_archive: Path, folder_images: dict[str, bytes], caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        arrays, manifest = acquire(str(folder_archive), Path("unused"), progress=False)

    assert arrays.class_names == ("airplane", "cat")
    for split in data.SPLITS:
        images, labels = expected_folder_split(folder_images, split)
        np.testing.assert_array_equal(getattr(arrays, f"{split}_images"), images)
        np.testing.assert_array_equal(getattr(arrays, f"{split}_labels"), labels)
    assert manifest["format"] == "image-folder"
    assert manifest["source"] == str(folder_archive)
    assert manifest["splits"]["test"] == {"count": 4, "per_class": {"airplane": 2, "cat": 2}}
    expected = {"algorithm": "sha256", "value": sha256_of(folder_archive), "verified": False}
    assert manifest["checksum"] == expected
    assert "unverified" in caplog.text and folder_archive.name in caplog.text


def test_image_folder_directory_gives_the_same_arrays(
    tmp_path: Path, folder_archive: Path, folder_images: dict[str, bytes]
) -> None:
    root = tmp_path / "folder"
    for name, payload in folder_images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)
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

    files = {f"{split}/c/{i}.jpg": encoded("RGB", "JPEG") for split in data.SPLITS for i in range(2)}
    files["train/c/gray.png"] = encoded("L", "PNG")
    arrays, _ = acquire(str(make_folder_archive(tmp_path, files)), Path("unused"), progress=False)
    assert arrays.train_images.shape == (3, 32, 32, 3)
    assert tuple(arrays.train_images[2, 0, 0]) == (128, 128, 128)
    assert np.abs(arrays.test_images[0].astype(int) - (10, 200, 30)).max() <= 3  # JPEG is lossy


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
    chosen = data.sample_indices(len(labels), 50, seed=0)
    assert len(np.unique(chosen)) == 50 and chosen.min() >= 0 and chosen.max() < len(labels)
    assert list(chosen) == sorted(chosen)
    assert (chosen == data.sample_indices(len(labels), 50, seed=0)).all()
    assert not (chosen == data.sample_indices(len(labels), 50, seed=1)).all()
    assert len(np.unique(labels[chosen])) == 10  # a prefix of 50 would be one class
    assert len(data.sample_indices(7, 7, seed=3)) == 7 and len(data.sample_indices(7, 0, seed=3)) == 0
    with pytest.raises(ValueError, match=r"count: value 8 is out of range; allowed: 0..7"):
        data.sample_indices(7, 8, seed=0)
