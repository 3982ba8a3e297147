"""Image folders and archives: layouts, labels, decoding, the decode cache and streaming."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import resnetlab.data.folder as folder
from resnetlab.data.folder import (
    ImageFileDataset,
    decode_image,
    load_image_folder,
    scan_image_folder,
    sniff_channels,
)
from resnetlab.data.types import FileList, ImageArray
from resnetlab.errors import UserError


def save(path: Path, image: Image.Image | np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path, **kwargs)
    return path


def solid(path: Path, color, size=(4, 4), mode="RGB") -> Path:
    return save(path, Image.new(mode, size, color))


def noise(path: Path, size=(16, 12), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    return save(path, rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def load(root: Path, tmp_path: Path, **kwargs):
    return load_image_folder(root, cache_dir=tmp_path / "cache", **kwargs)


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """train/{ant,moth,zebra}, val/{ant,zebra}, test/{moth}: class i has every pixel equal to 10 * (i + 1)."""
    root = tmp_path / "data"
    value = {"ant": 10, "moth": 20, "zebra": 30}
    for rel in ["train/zebra/a.png", "train/ant/a.png", "train/ant/b.png", "train/moth/c.png"]:
        solid(root / rel, (value[rel.split("/")[1]],) * 3)
    for rel in ["val/zebra/x.png", "val/ant/y.png", "test/moth/z.png"]:
        solid(root / rel, (value[rel.split("/")[1]],) * 3)
    solid(root / "extra" / "wolf" / "w.png", (99, 99, 99))  # not a split folder: ignored
    return root


# --- layouts and labels --------------------------------------------------------------------------------


def test_labels_follow_sorted_train_classes_in_every_split(split_folder, tmp_path):
    source = load(split_folder, tmp_path)
    assert source.classes == ["ant", "moth", "zebra"]
    assert set(source.splits) == {"train", "val", "test"}
    expected = {"train": [0, 0, 1, 2], "val": [0, 2], "test": [1]}
    for split, labels in expected.items():
        arr = source.splits[split]
        assert isinstance(arr, ImageArray) and arr.labels.tolist() == labels
        # each image's pixels say which class folder it came from
        assert arr.images[:, :, 0, 0].tolist() == [[10 * (lb + 1)] * 3 for lb in labels]
    assert source.name == "data" and source.skipped == []


def test_class_only_in_val_is_an_error_naming_it(split_folder, tmp_path):
    solid(split_folder / "val" / "wolf" / "w.png", (1, 1, 1))
    with pytest.raises(UserError, match=r"val[/\\]wolf"):
        scan_image_folder(split_folder)
    with pytest.raises(UserError, match="wolf"):
        load(split_folder, tmp_path)


def test_empty_train_class_folder_is_an_error_naming_it(split_folder, tmp_path):
    (split_folder / "train" / "bee").mkdir()
    (split_folder / "train" / "bee" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"train[/\\]bee"):
        load(split_folder, tmp_path)


def test_hidden_and_non_image_files_are_ignored_and_single_split_is_images(tmp_path):
    root = tmp_path / "flat"
    solid(root / "cat" / "a.png", (1, 1, 1))
    solid(root / "dog" / "b.JPG", (2, 2, 2))  # extensions are case-insensitive
    solid(root / "cat" / ".hidden.jpg", (3, 3, 3))  # a valid image, but hidden
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")
    solid(root / ".ipynb_checkpoints" / "c.png", (4, 4, 4))
    solid(root / "dog" / ".ipynb_checkpoints" / "d.png", (5, 5, 5))
    classes, splits = scan_image_folder(root)
    assert classes == ["cat", "dog"] and list(splits) == ["images"]
    assert splits["images"].paths == [str(root / "cat" / "a.png"), str(root / "dog" / "b.JPG")]
    assert splits["images"].labels.tolist() == [0, 1]
    source = load(root, tmp_path)
    assert list(source.splits) == ["images"] and len(source.splits["images"]) == 2


def test_classes_argument_fixes_the_labels_of_a_test_only_folder(tmp_path):
    root = tmp_path / "eval"
    solid(root / "test" / "b" / "1.png", (1, 1, 1))
    classes, splits = scan_image_folder(root)  # no train split: the test split's own classes
    assert classes == ["b"] and splits["test"].labels.tolist() == [0]
    classes, splits = scan_image_folder(root, classes=["a", "b", "c"])
    assert classes == ["a", "b", "c"] and splits["test"].labels.tolist() == [1]
    with pytest.raises(UserError, match="b"):
        scan_image_folder(root, classes=["a", "c"])


def test_training_on_a_folder_of_one_class_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    from resnetlab.cli import main

    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    for i in range(12):
        solid(tmp_path / "one" / "train" / "cat" / f"{i}.png", (i, i, i))
    argv = ["train", "--data", str(tmp_path / "one"), "--epochs", "1", "--batch-size", "4", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"resnetlab train: error: --data {str(tmp_path / 'one')!r}: has only one class folder, 'cat'; "
        "training a classifier needs at least 2 classes"
    )
    assert not (tmp_path / "run").exists()
    source = load(tmp_path / "one", tmp_path)  # eval may still read it: a split of a class the model knows
    assert source.classes == ["cat"]


def test_missing_root_and_empty_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        load(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        load(tmp_path / "empty", tmp_path)


# --- pixels and channels -------------------------------------------------------------------------------


def test_png_pixels_come_back_exactly_in_chw_order(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # H=5, W=7
    save(tmp_path / "d" / "only" / "p.png", pixels)
    images = load(tmp_path / "d", tmp_path).splits["images"].images
    assert images.shape == (1, 3, 5, 7)
    assert np.array_equal(images[0].numpy(), pixels.transpose(2, 0, 1))


def test_mixed_grayscale_rgba_rgb_and_palette_become_rgb(tmp_path):
    root = tmp_path / "mixed"
    solid(root / "k" / "1_gray.png", 77, mode="L")
    solid(root / "k" / "2_rgba.png", (10, 20, 30, 128), mode="RGBA")
    solid(root / "k" / "3_rgb.jpg", (200, 200, 200))
    solid(root / "k" / "4_palette.gif", (40, 50, 60))  # GIF stores a palette: mode P
    images = load(root, tmp_path).splits["images"].images
    assert images.shape == (4, 3, 4, 4)
    assert images[0, :, 0, 0].tolist() == [77, 77, 77]
    assert images[1, :, 0, 0].tolist() == [10, 20, 30]  # alpha dropped, colour kept
    assert images[3, :, 0, 0].tolist() == [40, 50, 60]


def test_all_grayscale_gives_one_channel_and_16_bit_is_scaled(tmp_path):
    root = tmp_path / "gray"
    solid(root / "k" / "a.png", 77, mode="L")
    solid(root / "k" / "b.png", 1, mode="1")
    save(root / "k" / "c.png", np.full((4, 4), 100 * 256, dtype=np.uint16))  # 16-bit: mode I;16
    images = load(root, tmp_path).splits["images"].images
    assert images.shape == (3, 1, 4, 4)
    assert images[:, 0, 0, 0].tolist() == [77, 255, 100]
    assert load(root, tmp_path, channels=3).splits["images"].images.shape == (3, 3, 4, 4)


def test_decode_image_converts_and_names_bad_files(tmp_path):
    buf = io.BytesIO()
    Image.new("RGBA", (3, 2), (9, 8, 7, 6)).save(buf, format="PNG")
    img = decode_image(buf.getvalue(), channels=3)
    assert img.mode == "RGB" and img.size == (3, 2) and img.getpixel((0, 0)) == (9, 8, 7)
    assert decode_image(buf.getvalue(), channels=1).mode == "L"
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    with pytest.raises(UserError, match="bad.png"):
        decode_image(bad, channels=3)


# --- bad images and sizes ------------------------------------------------------------------------------


@pytest.fixture
def folder_with_bad_images(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    for i in range(3):
        solid(root / "k" / f"good{i}.png", (i, i, i), size=(32, 32))
    whole = noise(tmp_path / "whole.jpg", size=(32, 32)).read_bytes()
    (root / "k" / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # cut inside the pixel data
    (root / "k" / "text.jpg").write_text("this is not a JPEG")
    (root / "k" / "empty.png").write_bytes(b"")
    return root


def test_bad_images_are_user_errors_naming_the_files(folder_with_bad_images, tmp_path, monkeypatch):
    # Even with Pillow's global "load truncated images" switch on, truncated files must fail.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UserError) as err:
        load(folder_with_bad_images, tmp_path)
    for name in ["truncated.jpg", "text.jpg", "empty.png"]:
        assert name in str(err.value)
    assert "--skip-bad-images" in str(err.value)


def test_skip_bad_images_lists_them_and_loads_the_rest(folder_with_bad_images, tmp_path):
    source = load(folder_with_bad_images, tmp_path, skip_bad_images=True)
    names = ["empty.png", "text.jpg", "truncated.jpg"]
    assert sorted(source.skipped) == [str(folder_with_bad_images / "k" / n) for n in names]
    assert source.splits["images"].images.shape == (3, 3, 32, 32)


def test_different_sizes_need_image_size(tmp_path):
    root = tmp_path / "sizes"
    solid(root / "k" / "a.png", (1, 2, 3), size=(4, 4))
    solid(root / "k" / "b.png", (1, 2, 3), size=(6, 5))
    with pytest.raises(UserError, match="--image-size") as err:
        load(root, tmp_path)
    assert "a.png" in str(err.value) and "b.png" in str(err.value) and "6x5" in str(err.value)
    images = load(root, tmp_path, image_size=3).splits["images"].images
    assert images.shape == (2, 3, 3, 3)
    assert (images == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all()


def test_image_size_resizes_shorter_side_then_center_crops(tmp_path):
    pixels = np.zeros((8, 4, 3), dtype=np.uint8)  # tall: 4 wide, 8 high
    pixels[:2] = 255  # white top rows, cropped away
    save(tmp_path / "tall" / "k" / "t.png", pixels)
    images = load(tmp_path / "tall", tmp_path, image_size=2).splits["images"].images
    assert images.shape == (1, 3, 2, 2)
    assert images.max() < 128  # the white band lies outside the center crop


# --- the decode cache ----------------------------------------------------------------------------------


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache should have answered")


def test_cache_is_reused_and_invalidated_by_a_changed_file(split_folder, tmp_path, monkeypatch):
    first = load(split_folder, tmp_path)
    assert len(list((tmp_path / "cache").glob("images-*.npz"))) == 1
    with monkeypatch.context() as m:
        m.setattr(folder, "_decode_chunk", _no_decoding)
        second = load(split_folder, tmp_path)
    for split in first.splits:
        assert torch.equal(first.splits[split].images, second.splits[split].images)
        assert torch.equal(first.splits[split].labels, second.splits[split].labels)
    assert second.classes == first.classes

    changed = solid(split_folder / "train" / "moth" / "c.png", (21, 21, 21))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load(split_folder, tmp_path)
    assert third.splits["train"].images[2, 0, 0, 0] == 21


def test_settings_are_part_of_the_cache_key(split_folder, tmp_path):
    load(split_folder, tmp_path)
    assert load(split_folder, tmp_path, image_size=2).splits["train"].images.shape[2:] == (2, 2)
    assert load(split_folder, tmp_path, channels=1).splits["train"].images.shape[1] == 1
    assert len(list((tmp_path / "cache").glob("images-*.npz"))) == 3


def test_corrupt_cache_file_is_rebuilt(split_folder, tmp_path, monkeypatch):
    first = load(split_folder, tmp_path)
    (cache_file,) = (tmp_path / "cache").glob("images-*.npz")
    cache_file.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.warns(UserWarning, match="unreadable image cache"):
        second = load(split_folder, tmp_path)
    assert torch.equal(first.splits["train"].images, second.splits["train"].images)
    monkeypatch.setattr(folder, "_decode_chunk", _no_decoding)
    assert torch.equal(load(split_folder, tmp_path).splits["val"].images, first.splits["val"].images)


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "env-cache"))
    assert folder.default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("RESNETLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert folder.default_cache_dir() == tmp_path / "xdg" / "resnetlab"


def test_process_pool_gives_the_same_arrays(tmp_path, monkeypatch):
    root = tmp_path / "many"
    for i in range(40):
        noise(root / f"c{i % 3}" / f"{i:02d}.png", size=(6, 6), seed=i)
    serial = load(root, tmp_path / "serial")
    monkeypatch.setattr(folder, "POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(folder, "_worker_count", lambda: 2)
    pooled = load(root, tmp_path / "pooled")
    assert torch.equal(serial.splits["images"].images, pooled.splits["images"].images)
    assert torch.equal(serial.splits["images"].labels, pooled.splits["images"].labels)


# --- archives ------------------------------------------------------------------------------------------


def make_tar(source: Path, archive: Path, arcname: str) -> Path:
    mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tar:
        tar.add(source, arcname=arcname)
    return archive


def test_tar_gz_gives_the_same_arrays_as_the_folder(split_folder, tmp_path):
    (split_folder / "train" / "ant" / ".hidden.png").write_bytes(b"ignored")
    from_folder = load(split_folder, tmp_path)
    for arcname in [".", "wrapped"]:  # members "./train/..." or "wrapped/train/..."
        archive = make_tar(split_folder, tmp_path / f"data-{arcname.strip('.') or 'flat'}.tgz", arcname)
        from_archive = load(archive, tmp_path)
        assert from_archive.classes == from_folder.classes
        assert from_archive.name == archive.name.removesuffix(".tgz")
        for split, arr in from_folder.splits.items():
            assert torch.equal(from_archive.splits[split].images, arr.images)
            assert torch.equal(from_archive.splits[split].labels, arr.labels)
    with pytest.warns(UserWarning, match="extract it"):  # random access into gzip is slow
        streamed = load(archive, tmp_path, in_memory=False)
    assert streamed.splits["val"].paths == [
        f"{archive}::wrapped/val/ant/y.png",
        f"{archive}::wrapped/val/zebra/x.png",
    ]


def test_bad_member_in_archive_is_named_with_the_archive(folder_with_bad_images, tmp_path):
    archive = make_tar(folder_with_bad_images, tmp_path / "bad.tar.gz", "bad")
    with pytest.raises(UserError, match=r"bad\.tar\.gz::bad/k/text\.jpg"):
        load(archive, tmp_path)
    source = load(archive, tmp_path, skip_bad_images=True)
    assert f"{archive}::bad/k/empty.png" in source.skipped and len(source.splits["images"]) == 3


def test_broken_archive_is_a_user_error(tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(UserError, match="broken.tar.gz"):
        load(broken, tmp_path)


# --- streaming -----------------------------------------------------------------------------------------


@pytest.fixture
def noisy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "noisy"
    for i in range(6):
        noise(root / "train" / f"c{i % 2}" / f"{i}.png", size=(20, 14), seed=i)
    noise(root / "val" / "c1" / "v.png", size=(14, 20), seed=9)
    return root


def test_streaming_returns_file_lists_and_the_dataset_decodes_them(noisy_folder, tmp_path):
    source = load(noisy_folder, tmp_path, in_memory=False)
    train = source.splits["train"]
    assert isinstance(train, FileList) and len(train) == 6 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert not (tmp_path / "cache").exists()
    ds = ImageFileDataset(train, image_size=8, channels=3, train=True, seed=3)
    image, label = ds[4]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 1
    again = ImageFileDataset(train, image_size=8, channels=3, train=True, seed=3)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))  # same (seed, epoch, index)
    again.set_epoch(1)
    assert any(not torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))  # new crops each epoch
    gray = ImageFileDataset(train, image_size=5, channels=1, train=True)
    assert gray[0][0].shape == (1, 5, 5)
    assert ImageFileDataset(train, image_size=5, channels=None, train=False).channels == 3  # sniffed


def test_eval_transform_is_a_deterministic_center_crop(noisy_folder, tmp_path):
    val = load(noisy_folder, tmp_path, in_memory=False).splits["val"]
    ds = ImageFileDataset(val, image_size=8, channels=3, train=False, seed=1)
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and label == 1
    ds.set_epoch(5)
    assert torch.equal(ds[0][0], image)
    # shorter side 14 -> round(8 / 0.875) = 9, then the central 8 x 8
    expected = Image.open(val.paths[0]).convert("RGB").resize((9, 13), Image.Resampling.BILINEAR)
    expected = np.asarray(expected.crop((0, 2, 8, 10))).transpose(2, 0, 1)
    assert np.array_equal(image.numpy(), expected)


def test_streaming_from_a_tar_with_dataloader_workers(noisy_folder, tmp_path):
    archive = make_tar(noisy_folder, tmp_path / "noisy.tar", "noisy")
    source = load(archive, tmp_path, in_memory=False)
    train = source.splits["train"]
    assert train.paths[0] == f"{archive}::noisy/train/c0/0.png"
    ds = ImageFileDataset(train, image_size=6, channels=3, train=True, seed=0)
    ds.set_epoch(2)
    direct = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    images = torch.cat([batch for batch, _ in loader])
    assert torch.equal(images, direct)  # the same crops whichever process decodes them


def test_sniff_channels_reads_a_sample(tmp_path):
    paths = [str(solid(tmp_path / f"g{i}.png", 5, mode="L")) for i in range(5)]
    gray = FileList(paths, torch.zeros(5, dtype=torch.int64))
    assert sniff_channels(gray) == 1
    paths.append(str(solid(tmp_path / "c.png", (1, 2, 3))))
    assert sniff_channels(FileList(paths, torch.zeros(6, dtype=torch.int64))) == 3


def test_automatic_choice_streams_large_images(tmp_path):
    root = tmp_path / "large"
    for i in range(2):
        noise(root / "k" / f"{i}.png", size=(80, 70), seed=i)
    assert isinstance(load(root, tmp_path).splits["images"], FileList)
    assert isinstance(load(root, tmp_path, image_size=96).splits["images"], FileList)
    small = load(root, tmp_path, image_size=32).splits["images"]
    assert isinstance(small, ImageArray) and small.images.shape == (2, 3, 32, 32)
    assert isinstance(load(root, tmp_path, in_memory=True, image_size=70).splits["images"], ImageArray)


def test_streamed_images_alternate_their_flips_between_epochs(tmp_path):
    # A left-to-right ramp stays darker on the left under any crop unless it is mirrored.
    ramp = np.repeat(np.repeat(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], 32, 0), 3, 2)
    paths = []
    for i in range(12):
        Image.fromarray(ramp).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    files = FileList(paths, torch.zeros(12, dtype=torch.int64))

    def flipped(ds, epoch):
        ds.set_epoch(epoch)
        images = [ds[i][0].float() for i in range(12)]
        return torch.tensor([bool(x[:, :, 0].mean() > x[:, :, -1].mean()) for x in images])

    ds = ImageFileDataset(files, image_size=8, channels=3, train=True, alternate_flip=True, seed=2)
    states = [flipped(ds, e) for e in range(4)]
    assert 0 < int(states[0].sum()) < 12
    for before, after in zip(states, states[1:], strict=False):
        assert torch.equal(after, ~before)
    random = ImageFileDataset(files, image_size=8, channels=3, train=True, seed=2)
    assert any((flipped(random, e) == flipped(random, e + 1)).any() for e in range(3))


def test_make_loader_passes_alternating_flips_to_streamed_training_files_only(noisy_folder, tmp_path):
    from resnetlab.data.augment import BatchAugment
    from resnetlab.training.setup import make_loader

    train = load(noisy_folder, tmp_path, in_memory=False).splits["train"]
    args = dict(device=torch.device("cpu"), input_shape=(3, 8, 8), augment=BatchAugment(alternate_flip=True))
    assert make_loader(train, 2, train=True, **args).dataset.alternate_flip
    assert not make_loader(train, 2, train=False, **args).dataset.alternate_flip
    assert not make_loader(train, 2, train=True, **{**args, "augment": BatchAugment()}).dataset.alternate_flip


# --- bad files while streaming -------------------------------------------------------------------------


def truncated_jpeg(path: Path, size=(80, 80)) -> Path:
    whole = noise(path.with_name("whole-" + path.name), size=size, seed=99)
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])  # cut inside the pixel data
    whole.unlink()
    return path


@pytest.fixture
def streamed_with_a_bad_file(tmp_path: Path) -> tuple[FileList, str]:
    """Eight 80 x 80 images (more than the in-memory 64 px) and a truncated JPEG in the middle."""
    paths = [str(noise(tmp_path / "s" / "k" / f"{i}.png", size=(80, 80), seed=i)) for i in range(8)]
    bad = str(truncated_jpeg(tmp_path / "s" / "k" / "4.jpg"))
    paths.insert(4, bad)
    return FileList(paths, torch.tensor([0] * 4 + [1] * 5)), bad


@pytest.mark.parametrize("train", [True, False])
def test_a_bad_streamed_file_is_one_line_naming_it_not_a_worker_traceback(streamed_with_a_bad_file, train):
    from resnetlab.data.loader import StreamingLoader

    files, bad = streamed_with_a_bad_file
    loader = StreamingLoader(files, 3, train=train, image_size=72, channels=3, workers=1)
    with pytest.raises(UserError) as err:
        list(loader.batches())
    message = str(err.value)
    assert message.startswith(f"cannot decode 1 image file(s): {bad} (") and "\n" not in message
    assert "--skip-bad-images" in message and "DataLoader worker" not in message


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_while_streaming_keeps_full_training_batches_and_lists_the_file(
    streamed_with_a_bad_file, workers
):
    from resnetlab.data.loader import StreamingLoader

    files, bad = streamed_with_a_bad_file
    common = dict(image_size=72, channels=3, workers=workers, skip_bad_images=True)
    train = StreamingLoader(files, 3, train=True, **common)
    batches = list(train.batches())
    assert [len(y) for _, y in batches] == [3, 3, 3] and train.skipped == [bad]
    assert all(x.shape[1:] == (3, 72, 72) for x, _ in batches)
    # Validation leaves the file out, as in-memory loading leaves it out of the data set.
    val = StreamingLoader(files, 3, train=False, **common)
    labels = torch.cat([y for _, y in val.batches()])
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and val.skipped == [bad]


def test_training_a_streamed_folder_names_or_skips_a_truncated_jpeg(tmp_path, capsys, monkeypatch):
    from resnetlab.cli import main

    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    for i in range(12):
        noise(root / "train" / ("cat" if i % 2 else "dog") / f"{i}.png", size=(80, 76), seed=i)
    for i in range(4):
        noise(root / "val" / ("cat" if i % 2 else "dog") / f"{i}.png", size=(80, 76), seed=20 + i)
    bad_train = truncated_jpeg(root / "train" / "cat" / "zz.jpg")
    bad_val = root / "val" / "dog" / "zz.jpg"
    bad_val.write_text("not a JPEG")
    argv = ["train", "--data", str(root), "--image-size", "72", "--epochs", "1", "--batch-size", "4"]
    argv += ["--workers", "1", "--model", "resnet20"]

    assert main([*argv, "--out", str(tmp_path / "fails")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnetlab train: error: cannot decode 1 image file(s): ") and "\n" not in err
    assert str(bad_train) in err

    assert main([*argv, "--out", str(tmp_path / "skips"), "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 2 unreadable images: {bad_train}, {bad_val}" in out


def test_a_streamed_folder_of_bad_files_only_is_an_error_when_skipping(tmp_path):
    from resnetlab.data.loader import StreamingLoader

    paths = []
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
        paths.append(str(tmp_path / f"{i}.jpg"))
    loader = StreamingLoader(
        FileList(paths, torch.zeros(3, dtype=torch.int64)),
        3,
        train=True,
        image_size=72,
        channels=3,
        workers=0,
        skip_bad_images=True,
    )
    with pytest.raises(UserError, match="broken folder"):
        list(loader.batches())


def test_a_channel_count_no_image_file_has_is_refused_naming_the_folder(split_folder, tmp_path):
    with pytest.raises(
        UserError, match=r"data: image files are read as grayscale \(1 channel\) or RGB \(3\), not as 4"
    ):
        load(split_folder, tmp_path, channels=4)
