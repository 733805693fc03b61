"""Seeded CPU noise: determinism, batch semantics, seed range."""

import pytest
import torch

from osd_core.noise import cpu_generator, gaussian_noise


def test_same_seed_same_noise_and_different_seed_differs():
    a = gaussian_noise((4, 5, 6), 7, batch=1, device="cpu", dtype=torch.float32)
    b = gaussian_noise((4, 5, 6), 7, batch=1, device="cpu", dtype=torch.float32)
    c = gaussian_noise((4, 5, 6), 8, batch=1, device="cpu", dtype=torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_batch_item_gets_the_single_item_noise():
    single = gaussian_noise((4, 5, 6), 3, batch=1, device="cpu", dtype=torch.float32)
    batch = gaussian_noise((4, 5, 6), 3, batch=3, device="cpu", dtype=torch.float32)
    assert batch.shape == (3, 4, 5, 6) and all(torch.equal(batch[i], single[0]) for i in range(3))


def test_is_standard_normal_and_casts():
    eps = gaussian_noise((4, 64, 64), 0, batch=1, device="cpu", dtype=torch.float16)
    assert eps.dtype == torch.float16
    assert abs(eps.float().mean()) < 0.05 and abs(eps.float().std() - 1) < 0.05


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_seed_range(seed):
    with pytest.raises(ValueError, match="seed"):
        cpu_generator(seed)


def test_largest_seed_is_accepted():
    assert torch.randn(1, generator=cpu_generator(2**64 - 1)).isfinite().all()


def test_is_the_cpu_generator_draw():
    expected = torch.randn(4, 3, 5, generator=torch.Generator("cpu").manual_seed(123), dtype=torch.float32)
    got = gaussian_noise((4, 3, 5), 123, batch=2, device=torch.device("cpu"), dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got[1], expected.double())


def test_output_is_a_fresh_contiguous_tensor():
    eps = gaussian_noise((2, 3, 3), 5, batch=3, device="cpu", dtype=torch.float32)
    assert eps.is_contiguous()
    eps[0].zero_()  # the batch items must not share memory
    assert eps[1].abs().sum() > 0


def test_numpy_style_integer_seeds_are_accepted():
    class Index:
        def __index__(self):
            return 9

    assert torch.equal(torch.randn(3, generator=cpu_generator(Index())), torch.randn(3, generator=cpu_generator(9)))


@pytest.mark.parametrize("kwargs,pattern", [
    ({"shape": (4, 5, 6), "batch": 0}, r"`batch` must be an integer of at least 1; got 0"),
    ({"shape": (4, 0, 6), "batch": 1}, r"`shape` .*got \(4, 0, 6\)"),
    ({"shape": (), "batch": 1}, r"`shape`"),
    ({"shape": (4, 5.0, 6), "batch": 1}, r"`shape`"),
])
def test_bad_shape_and_batch(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        gaussian_noise(kwargs["shape"], 0, batch=kwargs["batch"], device="cpu", dtype=torch.float32)
