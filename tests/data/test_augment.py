"""Per-sample augmentation as a pure function of (seed, epoch, sample index): the windows against
torchvision's algorithm written out by hand, purity, the generator's uniformity, and the DALI and
Pillow loaders cropping and flipping exactly the drawn windows, on any world size and after a
resume."""
import math
import os

import numpy as np
import pytest
import torch

from hvd_largebatch.data import FileIndex, GlobalSampler, ImageTransform
from hvd_largebatch.data.augment import ATTEMPTS, DRAWS, training_augmentation, uniforms

PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def window_by_hand(u, width, height, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, driven by the draws ``u`` of one sample."""
    area = width * height
    for k in range(ATTEMPTS):
        a, r, x, y = u[4 * k:4 * k + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(x * (width - w + 1)), math.floor(y * (height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.6, 1.0), (0.8, 1.25)),
                                         ((0.9, 1.0), (5.0, 6.0))])  # the last falls back often
def test_windows_are_torchvision_algorithm_by_hand(scale, ratio):
    rng = np.random.default_rng(0)
    n = 400
    indices = rng.permutation(10_000)[:n]
    widths, heights = rng.integers(1, 500, n), rng.integers(1, 500, n)
    got = training_augmentation(7, 3, indices, widths, heights, scale, ratio, flip=True)
    u = uniforms(7, 3, indices, DRAWS)
    fallbacks = 0
    for j in range(n):
        want = window_by_hand(u[j], int(widths[j]), int(heights[j]), scale, ratio)
        assert (got.left[j], got.top[j], got.width[j], got.height[j]) == want, j
        assert 0 <= want[0] and want[0] + want[2] <= widths[j] and want[1] + want[3] <= heights[j]
        fallbacks += (want[0], want[1]) == ((widths[j] - want[2]) // 2, (heights[j] - want[3]) // 2)
        assert got.flip[j] == (u[j, -1] < 0.5)
    assert fallbacks > (n // 4 if ratio[0] > 1 else 0)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index():
    indices = np.arange(100, 160)
    sizes = (np.full(60, 300), np.full(60, 200))
    args = ((0.08, 1.0), (3 / 4, 4 / 3), True)
    whole = training_augmentation(1, 2, indices, *sizes, *args)
    # any batch composition or order: each sample keeps its window and flip
    order = np.random.default_rng(1).permutation(60)
    shuffled = training_augmentation(1, 2, indices[order], sizes[0][order], sizes[1][order], *args)
    for field, a, b in zip(whole._fields, whole, shuffled):
        assert np.array_equal(a[order], b), field
    one = training_augmentation(1, 2, indices[7:8], sizes[0][:1], sizes[1][:1], *args)
    assert [int(f[0]) for f in one] == [int(f[7]) for f in whole]
    # another epoch or seed draws other windows
    for seed, epoch in ((1, 3), (2, 2)):
        other = training_augmentation(seed, epoch, indices, *sizes, *args)
        assert np.mean(other.left != whole.left) > 0.9
    assert training_augmentation(1, 2, indices, *sizes, (0.08, 1.0), (3 / 4, 4 / 3), False).flip.sum() == 0


def test_uniforms_are_uniform_and_uncorrelated():
    u = uniforms(0, 0, np.arange(20_000), DRAWS)
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=20, range=(0, 1))[0] / u.size
    assert np.abs(counts - 0.05).max() < 0.002  # 820,000 draws: sd of a bin share ~0.00024
    c = np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]  # neighbouring draws
    assert abs(c) < 0.005
    c = np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]  # neighbouring samples
    assert abs(c) < 0.03


# -- the loaders crop and flip the drawn windows -------------------------------------------------
def ramp_folder(root, n, width=120, height=90):
    """n PNGs whose red channel is x and green channel is y (pixels), blue 7 * sample."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    os.makedirs(os.path.join(root, "c"), exist_ok=True)
    for k in range(n):
        rgb = np.stack([xx, yy, np.full_like(xx, 7 * k)], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(root, "c", f"{k:03d}.png"))
    return FileIndex.from_folder(root)


class Batches:
    """Schedule test double: the given global batches every epoch."""

    def __init__(self, n, batches):
        self.dataset_size, self.drop_last, self.max_global_batch = n, True, max(batches)
        self._batches = batches

    def epoch_batches(self, epoch):
        return list(self._batches)


def test_dali_and_pillow_crop_and_flip_the_drawn_windows(tmp_path):
    from hvd_largebatch.data import DaliLoader
    from hvd_largebatch.data.torch_loader import pillow_train_loader

    n = 12
    index = ramp_folder(str(tmp_path), n)
    t = ImageTransform(crop_size=16, resize_shorter=16, train_antialias=True, **PLAIN)
    schedule = Batches(n, [n])
    sampler = GlobalSampler(n, schedule, 1, 0)
    ((images, _),) = list(DaliLoader(index, sampler, t, seed=3, num_threads=1).epoch(1))
    (pillow, _), = list(pillow_train_loader(index, GlobalSampler(n, schedule, 1, 0), 1, t,
                                            num_workers=0, seed=3))
    ids = sampler.global_indices(1, 0)
    aug = training_augmentation(3, 1, ids, np.full(n, 120), np.full(n, 90), t.scale, t.ratio, True)
    assert 0 < aug.flip.sum() < n
    for row in range(n):
        got = images[row].numpy() * 255
        assert np.allclose(got[2], 7 * ids[row], atol=0.51)  # the right sample
        red, green = got[0].mean(axis=0), got[1].mean(axis=1)  # x along columns, y along rows
        if aug.flip[row]:
            red = red[::-1]
        # the crop's centre and extent are the drawn window's (resampling: within a pixel)
        assert red.mean() == pytest.approx(aug.left[row] + (aug.width[row] - 1) / 2, abs=1.0)
        assert green.mean() == pytest.approx(aug.top[row] + (aug.height[row] - 1) / 2, abs=1.0)
        assert np.all(np.diff(red) >= 0) and red[-1] - red[0] == pytest.approx(
            (aug.width[row] - 1) * (15 / 16), abs=1.5 + aug.width[row] / 16)
        # Pillow draws the same window and flip (its resampling differs slightly)
        assert np.abs(pillow[row].numpy() * 255 - got).mean() < 1.0


def test_dali_batches_are_bitwise_the_same_on_1_2_3_ranks_and_after_a_resume(tmp_path):
    from hvd_largebatch.data import DaliLoader

    n = 36
    index = ramp_folder(str(tmp_path), n, width=64, height=48)
    t = ImageTransform(crop_size=12, resize_shorter=12, **PLAIN)
    schedule = Batches(n, [6, 12, 6, 12])

    def global_batches(world, micro, resume_at=None):
        """Every step's global batch (rank order, then micro-batch order) of epochs 0 and 1."""
        per_rank = []
        for rank in range(world):
            sampler = GlobalSampler(n, schedule, world, rank, seed=4)
            steps = []
            for epoch in (0, 1):
                loader = DaliLoader(index, sampler, t, micro_batches=micro, seed=9, num_threads=1)
                if resume_at is not None and epoch == 1:  # stopped after resume_at steps,
                    it = loader.epoch(1)                   # then a new loader resumes
                    got = [next(it) for _ in range(resume_at * micro)]
                    state = loader.state_dict()
                    it.close()
                    loader.close()
                    loader = DaliLoader(index, GlobalSampler(n, schedule, world, rank, seed=4), t,
                                        micro_batches=micro, seed=9, num_threads=1)
                    loader.load_state_dict(state)
                    got += list(loader.epoch(1))
                else:
                    got = list(loader.epoch(epoch))
                steps.extend(torch.cat([b[0] for b in got[s * micro:(s + 1) * micro]])
                             for s in range(len(got) // micro))
            per_rank.append(steps)
        return [torch.cat(parts) for parts in zip(*per_rank)]

    one = global_batches(1, 1)
    assert [len(b) for b in one] == [6, 12, 6, 12] * 2
    for world, micro in ((2, 1), (3, 1), (3, 2)):
        other = global_batches(world, micro)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), (world, micro)
    resumed = global_batches(2, 1, resume_at=2)
    assert all(torch.equal(a, b) for a, b in zip(one, resumed))


def test_synthetic_samples_are_the_same_on_any_world_size():
    from hvd_largebatch.data import SyntheticLoader

    n = 120
    schedule = Batches(n, [6, 12, 24])

    def global_batches(world, micro):
        per_rank = [list(SyntheticLoader(GlobalSampler(n, schedule, world, r, seed=2),
                                         image_shape=(3, 4, 4), num_classes=5, micro_batches=micro,
                                         seed=8).epoch(0)) for r in range(world)]
        return [torch.cat([torch.cat([images for images, _ in rank[s * micro:(s + 1) * micro]])
                           for rank in per_rank]) for s in range(3)]

    one = global_batches(1, 1)
    assert all(torch.equal(a, b) for a, b in zip(one, global_batches(3, 2)))
    assert not torch.equal(one[1][:6], one[1][6:])  # distinct samples, distinct images
