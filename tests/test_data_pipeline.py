import pytest
import torch
import torch.nn.functional as F

from resnetlab.data import BatchAugment, ImageArray, InMemoryLoader, prepare_data
from resnetlab.data.digits import load_digits
from resnetlab.data.loader import epoch_order
from resnetlab.data.split import stratified_split
from resnetlab.data.synthetic import load_synthetic, parse_synthetic
from resnetlab.errors import UserError


def _reference_augment(x, dy, dx, flips, pad, mode):
    xp = F.pad(x.float(), (pad,) * 4, mode="reflect" if mode == "reflect" else "constant")
    h, w = x.shape[2:]
    out = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(3), out).to(torch.uint8)


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_batch_augment_equals_pad_crop_flip_per_image(mode):
    aug = BatchAugment(crop_padding=4, flip=True, pad_mode=mode)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    dy, dx, flips = aug.params(64, torch.Generator().manual_seed(0))
    assert dy.min() >= 0 and dy.max() <= 8 and flips.any() and (~flips).any()
    assert torch.equal(aug.apply(x, dy, dx, flips), _reference_augment(x, dy, dx, flips, 4, mode))


def test_batch_augment_centre_crop_without_flip_is_the_identity():
    aug = BatchAugment(crop_padding=4)
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    four = torch.full((3,), 4)
    assert torch.equal(aug.apply(x, four, four, torch.zeros(3, dtype=torch.bool)), x)


def test_stratified_split_is_deterministic_and_balanced():
    labels = torch.arange(10).repeat_interleave(50)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(val) == 50 and len(train) == 450
    assert torch.equal(torch.bincount(labels[val]), torch.full((10,), 5))
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.equal(stratified_split(labels, 0.1, seed=3)[1], val)
    assert not torch.equal(stratified_split(labels, 0.1, seed=4)[1], val)


def test_digits_are_real_uint8_images():
    source = load_digits()
    images = source.splits["train"]
    assert images.images.shape == (1797, 1, 8, 8) and images.images.dtype == torch.uint8
    assert images.images.max() == 255 and source.classes == [str(i) for i in range(10)]
    assert torch.bincount(images.labels).min() >= 170


def test_prepare_digits_holds_out_ten_percent_and_normalises_from_train():
    data = prepare_data("digits")
    assert len(data.train) + len(data.val) == 1797 and len(data.val) == 179
    assert data.input_shape == (1, 8, 8) and data.test is None
    x = data.train.images.double() / 255
    assert data.mean[0] == pytest.approx(float(x.mean()), abs=1e-9)
    assert data.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-6)


def test_synthetic_spec():
    assert parse_synthetic("synthetic") == (3, 32, 32, 10, 5000)
    assert parse_synthetic("synthetic:3x224x224:1000:64") == (3, 224, 224, 1000, 64)
    src = load_synthetic("synthetic:1x4x4:3:20")
    assert src.splits["train"].images.shape == (20, 1, 4, 4) and src.classes == [
        "class_0",
        "class_1",
        "class_2",
    ]
    with pytest.raises(UserError, match="synthetic:CxHxW"):
        parse_synthetic("synthetic:3x32")


def test_unknown_data_is_a_clear_error():
    with pytest.raises(UserError, match="no such file or folder, and not a data set name"):
        prepare_data("/no/such/folder")


def _data(n=40):
    return ImageArray(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.arange(n) % 4)


def test_in_memory_loader_order_depends_only_on_seed_and_epoch():
    data = _data()
    loader = InMemoryLoader(data, 8, train=True, augment=BatchAugment(crop_padding=2), seed=5)
    assert len(loader) == 5
    epoch0 = list(loader.batches(0))
    again = list(loader.batches(0))
    for (xa, ya), (xb, yb) in zip(epoch0, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in loader.batches(1)]))
    # every image once per epoch
    seen = torch.cat([y for _, y in epoch0])
    assert sorted(seen.tolist()) == sorted(data.labels[epoch_order(40, 5, 0)[:40]].tolist())


def test_in_memory_loader_resumes_mid_epoch_with_the_same_batches():
    loader = InMemoryLoader(_data(), 8, train=True, augment=BatchAugment(crop_padding=2), seed=1)
    full = list(loader.batches(3))
    tail = list(loader.batches(3, start=2))
    assert len(tail) == 3
    for (xa, ya), (xb, yb) in zip(full[2:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ranks_take_slices_of_the_same_global_batch():
    data = _data(48)
    single = InMemoryLoader(data, 12, train=True, augment=BatchAugment(crop_padding=2), seed=2)
    ranks = [
        InMemoryLoader(data, 12, train=True, augment=BatchAugment(crop_padding=2), seed=2, rank=r, world_size=3)
        for r in range(3)
    ]
    for step, (x, y) in enumerate(single.batches(1)):
        parts = [list(r.batches(1))[step] for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_eval_loader_covers_every_image_once_in_order_without_augmentation():
    data = _data(21)
    loader = InMemoryLoader(data, 8, train=False, augment=BatchAugment(), seed=0)
    xs, ys = zip(*loader.batches(), strict=True)
    assert len(loader) == 3 and torch.equal(torch.cat(xs), data.images) and torch.equal(torch.cat(ys), data.labels)


def test_loader_refuses_a_batch_larger_than_the_training_split():
    with pytest.raises(ValueError, match="fewer than one batch"):
        InMemoryLoader(_data(4), 8, train=True)


def _flipped(batches, data):
    """Per image (labels are image numbers): True where the batch holds the image mirrored."""
    state = {}
    for x, y in batches:
        for image, i in zip(x, y.tolist(), strict=True):
            original = data.images[i]
            assert torch.equal(image, original) or torch.equal(image, original.flip(2))
            state[i] = not torch.equal(image, original)
    return torch.tensor([state[i] for i in range(len(state))])


def test_alternating_flips_show_each_image_the_other_way_round_in_the_next_epoch():
    data = ImageArray(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40))
    alternate = BatchAugment(crop_padding=0, alternate_flip=True)
    loader = InMemoryLoader(data, 8, train=True, augment=alternate, seed=3)
    states = [_flipped(loader.batches(e), data) for e in range(4)]
    assert 10 < int(states[0].sum()) < 30  # a random start per image
    for before, after in zip(states, states[1:], strict=False):
        assert torch.equal(after, ~before)
    # Random flips would have shown some images the same way round in epochs 0 and 1.
    random = InMemoryLoader(data, 8, train=True, augment=BatchAugment(crop_padding=0), seed=3)
    assert (_flipped(random.batches(0), data) == _flipped(random.batches(1), data)).any()


def test_alternating_flips_keep_the_crops_of_random_flips():
    data = _data()
    alternate = InMemoryLoader(data, 8, train=True, augment=BatchAugment(crop_padding=2, alternate_flip=True), seed=4)
    random = InMemoryLoader(data, 8, train=True, augment=BatchAugment(crop_padding=2), seed=4)
    differ = 0
    for (xa, ya), (xr, yr) in zip(alternate.batches(2), random.batches(2), strict=True):
        assert torch.equal(ya, yr)
        for a, r in zip(xa, xr, strict=True):
            assert torch.equal(a, r) or torch.equal(a, r.flip(2))
            differ += not torch.equal(a, r)
    assert differ > 0


def test_alternating_flips_need_an_augmentation_that_flips():
    with pytest.raises(ValueError, match="alternating flips need"):
        BatchAugment(flip=False, alternate_flip=True)
