"""Input pipelines on real image files made here with Pillow: indexes, DALI (CPU mode), the
synthetic and Pillow loaders, bad input, and the digits writer."""
import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
from PIL import Image  # noqa: E402

from hvd_largebatch.data import (  # noqa: E402
    DIGITS_MEAN, DIGITS_STD, DaliLoader, FileIndex, GlobalSampler, ImageTransform,
    SyntheticLoader, split_micro_batches, write_digits_folder)
from hvd_largebatch.data.torch_loader import pillow_train_loader  # noqa: E402
from hvd_largebatch.errors import ConfigError, DataError  # noqa: E402

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = pixel / 255


class ListSchedule:
    """Test double of the schedule contract (docs/ARCHITECTURE.md): fixed per-epoch batch lists."""

    def __init__(self, dataset_size, epochs, drop_last=False):
        self.dataset_size = dataset_size
        self.drop_last = drop_last
        self._epochs = [list(b) for b in epochs]
        self.max_global_batch = max(max(b) for b in self._epochs)

    def epoch_batches(self, epoch):
        return list(self._epochs[epoch % len(self._epochs)])


def smooth_image(width, height, seed):
    """RGB test picture with smooth gradients (so resampling differences stay small)."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([128 + 100 * np.sin(xx / 7 + seed), 128 + 100 * np.cos(yy / 5 + seed),
                    128 + 100 * np.sin((xx + 2 * yy) / 9 - seed)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def write_coded_folder(root, n, classes=3):
    """n <= 31 uniform grey PNGs; sample i (in index order) has grey level 8*i + 4, so a decoded
    (cropped, resized) image tells which sample it was. Class c holds every classes-th sample."""
    assert n <= 31
    per_class = [list(range(c, n, classes)) for c in range(classes)]
    order = [i for members in per_class for i in members]  # index order = class, then name
    for c, members in enumerate(per_class):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in members:
            k = order.index(i)
            size = (20 + k % 7, 16 + k % 5)
            Image.new("L", size, color=8 * k + 4).save(os.path.join(root, f"class{c}", f"{i:03d}.png"))
    return FileIndex.from_folder(root)


def decoded_sample_ids(images):
    """Sample index of every image of a PLAIN-normalized batch of coded pictures."""
    if len(images) == 0:
        return np.empty(0, dtype=np.int64)
    grey = images.float().mean(dim=(1, 2, 3)).numpy() * 255.0
    assert np.abs(images.float().amax(dim=(1, 2, 3)).numpy() * 255 - grey).max() < 0.51
    return np.rint((grey - 4) / 8).astype(np.int64)


@pytest.fixture(scope="module")
def jpeg_index(tmp_path_factory):
    """JPEGs whose shorter side is 48 (or 50) and whose resized long side is a whole number."""
    root = tmp_path_factory.mktemp("jpegs")
    sizes = [(60, 48), (48, 72), (80, 64), (50, 50), (96, 48)]
    for k, (w, h) in enumerate(sizes):
        os.makedirs(root / f"c{k % 2}", exist_ok=True)
        smooth_image(w, h, k).save(root / f"c{k % 2}" / f"img{k}.jpg", quality=95)
    return FileIndex.from_folder(str(root))


@pytest.fixture(scope="module")
def coded_index(tmp_path_factory):
    return write_coded_folder(str(tmp_path_factory.mktemp("coded")), 24)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("digits") / "digits")
    write_digits_folder(root)
    return root


# -- indexes --------------------------------------------------------------------------------
def test_folder_index_sorted_classes_and_labels(tmp_path):
    for cls, names in {"b": ["2.jpg", "1.JPEG"], "a": ["x.png"], "c": ["z.bmp", "notes.txt"]}.items():
        os.makedirs(tmp_path / cls)
        for name in names:
            (tmp_path / cls / name).write_bytes(b"data")
    index = FileIndex.from_folder(str(tmp_path))
    assert index.classes == ("a", "b", "c") and index.num_classes == 3
    assert [index.rel_path(i) for i in range(len(index))] == ["a/x.png", "b/1.JPEG", "b/2.jpg", "c/z.bmp"]
    assert index.labels.tolist() == [0, 1, 1, 2] and index.labels.dtype == np.int64
    assert index.path(3) == os.path.join(str(tmp_path), "c/z.bmp")
    assert index.read(0).tobytes() == b"data"


def test_file_list_index(tmp_path):
    (tmp_path / "list.txt").write_text("# comment\nimgs/a b.jpg 3\n\nimgs/c.jpg 0\n")
    with pytest.raises(DataError, match=r"list\.txt:2: .*imgs/a b\.jpg: listed file not found"):
        FileIndex.from_file_list(str(tmp_path / "list.txt"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a b.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "c.jpg").write_bytes(b"x")
    index = FileIndex.from_file_list(str(tmp_path / "list.txt"))
    assert index.rel_path(0) == "imgs/a b.jpg" and index.labels.tolist() == [3, 0]
    assert index.path(1) == os.path.join(str(tmp_path), "imgs/c.jpg")
    assert index.num_classes == 4
    other = FileIndex.from_file_list(str(tmp_path / "list.txt"), root="/data", num_classes=5,
                                     check_files=False)
    assert other.path(1) == "/data/imgs/c.jpg" and other.num_classes == 5


def test_index_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="cannot list"):
        FileIndex.from_folder(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "root" / "cat")
    (tmp_path / "root" / "cat" / "1.jpg").write_bytes(b"x")
    os.makedirs(tmp_path / "root" / "dog")
    (tmp_path / "root" / "dog" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"dog.*holds no image files"):
        FileIndex.from_folder(str(tmp_path / "root"))
    (tmp_path / "bad.txt").write_text("a.jpg 1\nb.jpg\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected 'path label'"):
        FileIndex.from_file_list(str(tmp_path / "bad.txt"))
    (tmp_path / "range.txt").write_text("a.jpg 1\nb.jpg 10\n")
    with pytest.raises(DataError, match=r"range.txt:2: label 10 of 'b.jpg' is not \[0, 10\)"):
        FileIndex.from_file_list(str(tmp_path / "range.txt"), num_classes=10)
    index = FileIndex.from_file_list(str(tmp_path / "range.txt"), check_files=False)
    with pytest.raises(DataError, match=r"b.jpg: label 10 is outside \[0, 5\)"):
        index.check_labels(5)
    with pytest.raises(DataError, match=r"a.jpg: cannot read sample 0"):
        index.read(0)


def test_file_list_names_the_first_missing_file_and_its_line(tmp_path, monkeypatch):
    from hvd_largebatch.data import sources

    monkeypatch.setattr(sources, "STAT_CHUNK", 7)  # 100 files: 15 tasks over the thread pool
    lines = ["# 100 files, two of them missing, one a folder"]
    for i in range(100):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        lines.append(f"{i}.png {i % 10}")
    (tmp_path / "41.png").unlink()  # line 43 (after the comment)
    (tmp_path / "80.png").unlink()
    (tmp_path / "30.png").unlink()
    (tmp_path / "30.png").mkdir()  # line 32: there, but not a file
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        FileIndex.from_file_list(str(tmp_path / "list.txt"))
    assert str(error.value) == (f"{tmp_path / 'list.txt'}:32: {tmp_path / '30.png'}: listed file "
                                f"is not a regular file")
    (tmp_path / "30.png").rmdir()
    (tmp_path / "30.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"list\.txt:43: .*/41\.png: listed file not found$"):
        FileIndex.from_file_list(str(tmp_path / "list.txt"))
    assert len(FileIndex.from_file_list(str(tmp_path / "list.txt"), check_files=False)) == 100
    # the ranks of a node share the check: of 4, rank 1 finds sample 41, rank 0 sample 80
    for k in (2, 3):
        FileIndex.from_file_list(str(tmp_path / "list.txt"), check_share=(k, 4))
    with pytest.raises(DataError, match=r"list\.txt:43: .*/41\.png"):
        FileIndex.from_file_list(str(tmp_path / "list.txt"), check_share=(1, 4))
    with pytest.raises(DataError, match=r"list\.txt:82: .*/80\.png"):
        FileIndex.from_file_list(str(tmp_path / "list.txt"), check_share=(0, 4))


# -- DALI pipelines -------------------------------------------------------------------------
def test_validation_pipeline_matches_pillow_reference(jpeg_index):
    t = ImageTransform(crop_size=32, resize_shorter=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    sampler = GlobalSampler.for_validation(len(jpeg_index), len(jpeg_index), 1, 0)
    ((images, labels),) = list(DaliLoader(jpeg_index, sampler, t, train=False).epoch(0))
    assert images.shape == (len(jpeg_index), 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == jpeg_index.labels.tolist()
    pixels = (images.numpy() * np.array(t.std)[:, None, None] + np.array(t.mean)[:, None, None]) * 255
    for i in range(len(jpeg_index)):
        # Reference: Pillow bilinear (antialiased when shrinking, like DALI's default) to
        # shorter side 40, then the central 32x32. The sizes are chosen so the long side and the
        # crop offset are whole numbers, where DALI and torchvision-style rounding agree.
        image = Image.open(jpeg_index.path(i)).convert("RGB")
        scale = 40 / min(image.size)
        w, h = round(image.width * scale), round(image.height * scale)
        resized = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
        top, left = (h - 32) // 2, (w - 32) // 2
        ref = resized[top:top + 32, left:left + 32].transpose(2, 0, 1)
        err = np.abs(pixels[i] - ref)
        # Both sides round to 8 bits after resizing and both decode with libjpeg-turbo (DALI may
        # upsample chroma differently): allow 0.5 grey levels on average and 3 at any pixel.
        assert err.mean() < 0.5 and err.max() <= 3, (jpeg_index.path(i), err.mean(), err.max())
        # the tolerance is tight enough to see a crop one pixel off (mean error ~5 levels)
        shifted = resized[top:top + 32, left + 1:left + 33].transpose(2, 0, 1)
        if w > 32:
            assert np.abs(pixels[i] - shifted).mean() > 1.0


def test_output_dtypes(jpeg_index):
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        t = ImageTransform(crop_size=24, resize_shorter=30, dtype=dtype)
        sampler = GlobalSampler.for_validation(len(jpeg_index), len(jpeg_index), 1, 0)
        ((images, _),) = list(DaliLoader(jpeg_index, sampler, t, train=False).epoch(0))
        assert images.dtype == getattr(torch, dtype) and images.shape == (5, 3, 24, 24)
        out[dtype] = images
    # fp16 is DALI's own conversion of the same values; bf16 is torch's conversion of fp32
    torch.testing.assert_close(out["float16"].float(), out["float32"], rtol=1e-3, atol=1e-3)
    assert torch.equal(out["bfloat16"], out["float32"].to(torch.bfloat16))


@pytest.mark.parametrize("train", [False, True], ids=["validation", "training"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_channels_last_output_is_the_same_batch_in_nhwc_memory(jpeg_index, dtype, train):
    """With channels_last the pipeline writes NHWC: the same values (bitwise) as the NCHW
    output, in the autocast dtype, in memory an NHWC model reads without a copy."""
    out = {}
    for nhwc in (False, True):
        t = ImageTransform(crop_size=24, resize_shorter=30, dtype=dtype, channels_last=nhwc)
        sampler = GlobalSampler(len(jpeg_index), ListSchedule(len(jpeg_index), [[5]]), 1, 0,
                                drop_last=False)
        ((images, _),) = list(DaliLoader(jpeg_index, sampler, t, train=train).epoch(0))
        out[nhwc] = images
    assert out[True].dtype == getattr(torch, dtype) and out[True].shape == (5, 3, 24, 24)
    assert out[True].is_contiguous(memory_format=torch.channels_last)
    assert not out[True].is_contiguous() and out[False].is_contiguous()
    assert torch.equal(out[True], out[False])


def test_synthetic_loader_channels_last_and_dtype():
    sampler = GlobalSampler(8, ListSchedule(8, [[4, 4]]), 1, 0, drop_last=False)
    batches = {}
    for nhwc in (False, True):
        loader = SyntheticLoader(sampler, image_shape=(3, 6, 6), num_classes=3, dtype="bfloat16",
                                 channels_last=nhwc, seed=1)
        batches[nhwc] = [images for images, _ in loader.epoch(0)]
    for a, b in zip(batches[False], batches[True]):
        assert b.dtype == torch.bfloat16 and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b)


def test_training_pipeline_whole_image_crop_is_resize_or_mirror(tmp_path):
    # scale (1, 1) and ratio (1, 1) on square pictures: the random crop is the whole image, so
    # each output is the resized picture, mirrored or not
    n = 8
    os.makedirs(tmp_path / "c")
    for k in range(n):
        smooth_image(48, 48, k).save(tmp_path / "c" / f"{k}.png")
    index = FileIndex.from_folder(str(tmp_path))
    t = ImageTransform(crop_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), train_antialias=True, **PLAIN)
    sampler = GlobalSampler(n, ListSchedule(n, [[n]]), 1, 0, drop_last=False)
    loader = DaliLoader(index, sampler, t, train=True)
    flips = []
    for epoch in range(2):
        ((images, labels),) = list(loader.epoch(epoch))
        for row, i in enumerate(sampler.rank_indices(epoch, 0)):
            image = Image.open(index.path(i)).convert("RGB")
            ref = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
            ref = ref.transpose(2, 0, 1)
            got = images[row].numpy() * 255
            err, err_mirror = np.abs(got - ref), np.abs(got - ref[:, :, ::-1])
            mirrored = err_mirror.mean() < err.mean()
            best = err_mirror if mirrored else err
            # same tolerance and reasons as the validation test
            assert best.mean() < 0.5 and best.max() <= 3, (best.mean(), best.max())
            flips.append(mirrored)
    assert any(flips) and not all(flips)  # both orientations occur (16 coin flips)


def test_loaders_follow_the_schedule_across_ranks_and_batch_changes(coded_index):
    n = len(coded_index)
    schedule = ListSchedule(n, [[4, 4, 8, 6, 2], [12, 12]])  # batch changes mid-epoch
    world = 2
    t = ImageTransform(crop_size=8, resize_shorter=8, scale=(0.3, 1.0), **PLAIN)
    loaders = [DaliLoader(coded_index, GlobalSampler(n, schedule, world, r, drop_last=False), t,
                          micro_batches=2) for r in range(world)]
    for epoch in (0, 1):
        seen = []
        for rank, loader in enumerate(loaders):
            expected = [part for s in range(loader.steps(epoch)) for part in
                        split_micro_batches(loader.sampler.rank_indices(epoch, s), 2)]
            got = list(loader.epoch(epoch))
            assert len(got) == len(expected) == 2 * len(schedule.epoch_batches(epoch))
            for (images, labels), want in zip(got, expected):
                assert images.shape == (len(want), 3, 8, 8)
                assert decoded_sample_ids(images).tolist() == want.tolist()  # the right pixels
                assert labels.tolist() == coded_index.labels[want].tolist()
                seen.extend(want.tolist())
        assert sorted(seen) == list(range(n))  # every sample exactly once over both ranks


def test_loader_resumes_on_another_world_size_and_survives_abandoned_epochs(coded_index):
    n = len(coded_index)
    schedule = ListSchedule(n, [[4, 4, 8, 8]])
    t = ImageTransform(crop_size=8, resize_shorter=8, **PLAIN)
    before = DaliLoader(coded_index, GlobalSampler(n, schedule, 2, 0, drop_last=False), t)
    it = before.epoch(0)
    next(it), next(it)  # two iterations consumed, DALI has read further ahead
    state = before.state_dict()
    assert (state["epoch"], state["step"], state["samples_seen"]) == (0, 2, 8)
    after = DaliLoader(coded_index, GlobalSampler(n, schedule, 1, 0, drop_last=False), t)
    after.load_state_dict(state)
    rest = [decoded_sample_ids(images).tolist() for images, _ in after.epoch(0)]
    reference = GlobalSampler(n, schedule, 1, 0, drop_last=False)
    assert rest == [reference.rank_indices(0, s).tolist() for s in (2, 3)]
    # the abandoned epoch of `before` leaves work in flight; the next epoch starts clean
    got = [decoded_sample_ids(images).tolist() for images, _ in before.epoch(1)]
    assert got == [before.sampler.rank_indices(1, s).tolist() for s in range(4)]


def test_schedule_larger_than_its_max_global_batch_is_refused(coded_index):
    schedule = ListSchedule(len(coded_index), [[8, 16]])
    schedule.max_global_batch = 8
    sampler = GlobalSampler(len(coded_index), schedule, 1, 0, drop_last=False)
    loader = DaliLoader(coded_index, sampler, ImageTransform(crop_size=8, resize_shorter=8))
    with pytest.raises(ConfigError, match="max_global_batch"):
        list(loader.epoch(0))


# -- bad input ------------------------------------------------------------------------------
def broken_folder(root):
    index = write_coded_folder(root, 6, classes=2)
    missing, corrupt = index.path(1), index.path(4)
    os.remove(missing)
    with open(corrupt, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"definitely not a png body" * 4)
    return index, missing, corrupt


def run_epoch(index, **kwargs):
    schedule = ListSchedule(len(index), [[2, 2, 2]])
    sampler = GlobalSampler(len(index), schedule, 1, 0, drop_last=False, shuffle=False)
    loader = DaliLoader(index, sampler, ImageTransform(crop_size=8, resize_shorter=8, **PLAIN), **kwargs)
    return loader, list(loader.epoch(0))


def test_missing_and_corrupt_files_raise_data_error_naming_them(tmp_path):
    index, missing, corrupt = broken_folder(str(tmp_path))
    with pytest.raises(DataError, match=f"{missing}: cannot read sample 1"):
        run_epoch(index)
    os.remove(corrupt)
    Image.new("L", (9, 9), color=0).save(missing)  # repair the first, break the second way
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DataError, match=f"{corrupt}: cannot decode sample 4"):
        run_epoch(index)


def test_skip_bad_files_drops_counts_and_logs_them(tmp_path, caplog):
    index, missing, corrupt = broken_folder(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="hvd_largebatch.data.dali_loader"):
        loader, batches = run_epoch(index, skip_bad_files=True)
    ids = [decoded_sample_ids(images).tolist() for images, _ in batches]
    assert ids == [[0], [2, 3], [5]]  # samples 1 (missing) and 4 (corrupt) dropped, order kept
    assert [labels.tolist() for _, labels in batches] == [index.labels[i].tolist() for i in ids]
    assert sorted(loader.skipped) == [1, 4]
    assert missing in loader.skipped[1] and corrupt in loader.skipped[4]
    assert sum("skipping sample" in r.message for r in caplog.records) == 2


# -- synthetic and Pillow loaders -------------------------------------------------------------
def test_synthetic_loader_follows_the_sampler():
    n = 60
    schedule = ListSchedule(n, [[12, 24, 24]])
    sampler = GlobalSampler(n, schedule, 3, 2, drop_last=False)
    loader = SyntheticLoader(sampler, image_shape=(3, 5, 5), num_classes=7, dtype="bfloat16",
                             micro_batches=2)
    got = list(loader.epoch(0))
    expected = [p for s in range(3) for p in split_micro_batches(sampler.rank_indices(0, s), 2)]
    assert [len(y) for _, y in got] == [2, 2, 4, 4, 4, 4]
    for (images, labels), want in zip(got, expected):
        assert images.shape == (len(want), 3, 5, 5) and images.dtype == torch.bfloat16
        assert labels.dtype == torch.int64 and labels.tolist() == (want % 7).tolist()
    assert loader.state_dict()["step"] == 3


def test_pillow_baseline_loader(coded_index):
    n = len(coded_index)
    sampler = GlobalSampler(n, ListSchedule(n, [[8, 16]]), 2, 1, drop_last=False)
    t = ImageTransform(crop_size=8, resize_shorter=8, **PLAIN)
    batches = list(pillow_train_loader(coded_index, sampler, 0, t, num_workers=0))
    expected = [GlobalSampler(n, sampler.schedule, 2, 1, drop_last=False).rank_indices(0, s)
                for s in range(2)]
    for (images, labels), want in zip(batches, expected):
        assert images.shape == (len(want), 3, 8, 8) and images.dtype == torch.float32
        assert decoded_sample_ids(images).tolist() == want.tolist()
        assert labels.tolist() == coded_index.labels[want].tolist()


# -- digits ---------------------------------------------------------------------------------
def test_digits_folder(digits_root):
    from sklearn.datasets import load_digits

    train = FileIndex.from_folder(os.path.join(digits_root, "train"))
    val = FileIndex.from_folder(os.path.join(digits_root, "val"))
    assert len(train) + len(val) == 1797 and train.num_classes == val.num_classes == 10
    assert np.all(np.bincount(val.labels) >= 34) and len(val) == 359  # ~20% of every class
    listed = FileIndex.from_file_list(os.path.join(digits_root, "train.txt"))
    assert [listed.path(i) for i in range(len(listed))] == [train.path(i) for i in range(len(train))]
    assert np.array_equal(listed.labels, train.labels)
    digits = load_digits()
    rows = [int(os.path.basename(train.path(i))[:4]) for i in range(len(train))]
    assert np.array_equal(digits.target[rows], train.labels)
    # every picture is its 8x8 digit scaled to 0..255 and upscaled bilinearly; torch's bilinear
    # interpolation (half-pixel centres, edges clamped) is the independent reference
    stack = np.stack([np.asarray(Image.open(train.path(i)), dtype=np.float64) for i in range(len(train))])
    assert stack.shape == (len(train), 32, 32)
    small = torch.from_numpy(np.rint(digits.images[rows] * 255 / 16))[:, None]
    ref = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    assert np.abs(stack - ref[:, 0].numpy()).max() <= 1.0  # 8-bit rounding
    assert abs(stack.mean() / 255 - DIGITS_MEAN[0]) < 0.01 and abs(stack.std() / 255 - DIGITS_STD[0]) < 0.01
    # writing again with the same parameters keeps the files; other parameters are refused
    before = os.path.getmtime(train.path(0))
    assert write_digits_folder(digits_root)["train"] == len(train)
    assert os.path.getmtime(train.path(0)) == before
    with pytest.raises(DataError, match="overwrite"):
        write_digits_folder(digits_root, seed=1)


def test_digits_through_the_validation_pipeline(digits_root):
    # 32x32 pictures, shorter side 32, central 32x32: DALI must return the PNG pixels exactly
    val = FileIndex.from_folder(os.path.join(digits_root, "val"))
    t = ImageTransform(crop_size=32, resize_shorter=32, mean=DIGITS_MEAN, std=DIGITS_STD)
    sampler = GlobalSampler.for_validation(len(val), 128, 2, 1)
    loader = DaliLoader(val, sampler, t, train=False)
    batches = list(loader.epoch(0))
    assert [len(y) for _, y in batches] == [64, 64, 52]  # 359 = 2*128 + 103; rank 1 gets 52
    images, labels = batches[-1]
    idx = sampler.rank_indices(0, 2)
    ref = np.stack([np.asarray(Image.open(val.path(i)), dtype=np.float64) for i in idx]) / 255
    ref = (ref - DIGITS_MEAN[0]) / DIGITS_STD[0]
    for c in range(3):
        np.testing.assert_allclose(images[:, c].numpy(), ref, atol=1e-5)
    assert labels.tolist() == val.labels[idx].tolist()


def test_prepare_data_command(tmp_path, capsys):
    from hvd_largebatch.cli.main import main

    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "mine.txt").write_text("user file")
    with pytest.raises(DataError, match="not empty"):
        main(["prepare-data", "--out", str(tmp_path / "occupied")])
    assert main(["prepare-data", "--out", str(tmp_path / "d"), "--size", "16", "--format", "jpeg"]) == 0
    assert "1438 train, 359 val" in capsys.readouterr().out
    image = Image.open(tmp_path / "d" / "val" / "3" / sorted(os.listdir(tmp_path / "d" / "val" / "3"))[0])
    assert image.format == "JPEG" and image.size == (16, 16)
