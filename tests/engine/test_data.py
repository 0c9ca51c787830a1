"""Image loading: alpha over white, shorter-side resize, seeded random crops, center crops."""
import pytest
import torch
from PIL import Image

from worker.engine.data import ImageDataset, multi_hot


def test_multi_hot_rows_and_bad_indices():
    assert multi_hot([0, [1, 2], []], 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError):
        multi_hot([3], 3)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (40, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    image, condition = ImageDataset([tmp_path / "clear.png"], multi_hot([1], 2), 32, train=False)[0]
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image, torch.ones_like(image))
    assert condition.tolist() == [0.0, 1.0]


def test_center_crop_of_a_resized_image(tmp_path):
    # A 64x128 (w x h) image: resized to 32x64, the center crop is rows 16..48.
    canvas = Image.new("RGB", (64, 128), (0, 0, 0))
    canvas.paste((255, 255, 255), (0, 32, 64, 96))  # the middle half is white
    canvas.save(tmp_path / "tall.png")
    image, _ = ImageDataset([tmp_path / "tall.png"], multi_hot([0], 1), 32, train=False)[0]
    assert image.shape == (3, 32, 32) and image[:, 1:-1].min() > 0.9  # edge rows blend (bicubic)


def test_seeded_random_crops_replay(tmp_path):
    noise = (torch.rand(80, 48, 3) * 255).byte().numpy()
    Image.fromarray(noise).save(tmp_path / "noise.png")
    dataset = ImageDataset([tmp_path / "noise.png"], multi_hot([0], 1), 32, train=True)
    assert torch.equal(dataset[(0, 7)][0], dataset[(0, 7)][0])
    crops = {tuple(dataset[(0, seed)][0].flatten()[:8].tolist()) for seed in range(10)}
    assert len(crops) > 1


def test_one_condition_row_per_path():
    with pytest.raises(ValueError):
        ImageDataset(["a.png", "b.png"], multi_hot([0], 1), 32)


def test_load_views_are_the_scoring_views_of_the_dataset(tmp_path):
    from worker.engine.data import load_views

    paths = []
    for i, size in enumerate([(40, 24), (24, 40), (32, 32)]):
        paths.append(tmp_path / f"{i}.png")
        Image.effect_noise(size, 60 + 20 * i).convert("RGB").save(paths[-1])
    dataset = ImageDataset(paths, multi_hot([0, 0, 0], 1), resolution=16, train=False)
    expected = torch.stack([dataset[i][0] for i in range(3)])
    torch.testing.assert_close(load_views(paths, 16), expected, rtol=0, atol=0)
