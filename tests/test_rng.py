"""Counter-based draws: the device path against the reference hashing, and the draws' statistics."""

import math

import pytest
import torch

from pipeline import rng
from pipeline.rng import Draw, reference_integers, reference_normal, reference_uniform, ulps_apart

M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
    """C. Wellons' lowbias32 in Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _hash(*words: int) -> int:
    """hash_words written out: each word absorbed as two 32-bit halves."""
    h = 0x2545F491
    for w in words:
        h = _lowbias32(h ^ (w & M32))
        h = _lowbias32(((h + 0x9E3779B9) & M32) ^ ((w >> 32) & M32))
    return h


def _draw(seed=5, ids=(0, 1, 7, 2**40 + 3, -9), calls=(0, 3, 1, 0, 2)):
    return Draw(seed, torch.tensor(ids), torch.tensor(calls))


def test_the_reference_hash_is_lowbias32_merkle_damgard():
    words = [(0, 0), (1, 2, 3), (2**40 + 17, -1, 7), (-(2**62), 2**63 - 1), (123456789, 0, 5, 99)]
    for w in words:
        assert int(rng.hash_words(*w)) == _hash(*w), w
    d = _draw()
    index = torch.tensor([0, 5, 2**33 + 1])
    u = reference_uniform(d, 3, index)
    for r, (ex, call) in enumerate(zip(d.example_ids.tolist(), d.calls.tolist())):
        for j, i in enumerate(index.tolist()):
            assert u[r, j].item() == (_hash(5, 3, ex, call, i) + 0.5) / 2**32


def test_scalar_words_hashed_in_python_integers_equal_the_tensor_hash():
    words = [(0,), (1, 2, 3), (2**40 + 17, -1, 7), (-(2**62), 2**63 - 1)]
    for w in words:
        hi, lo = int(rng.hash_words(*w, 1)), int(rng.hash_words(*w, 2))
        assert rng.seed_of(*w) == ((hi << 32) | lo) & (2**63 - 1), w
        assert rng.seed_of(*(torch.tensor(v) for v in w)) == rng.seed_of(*w)
        ids = torch.tensor([0, 5, -3, 2**41])
        assert torch.equal(rng._hash_on(torch.device("cpu"), *w, ids), rng.hash_words(*w, ids)), w
    with pytest.raises(TypeError):
        rng.seed_of(1, 2.5)


def test_the_int32_mixer_gives_the_int64_mixers_bits():
    x = torch.cat([torch.arange(0, 70000), torch.randint(0, 2**32, (200000,), generator=torch.Generator().manual_seed(1)),
                   torch.tensor([2**31 - 1, 2**31, 2**32 - 1])])
    assert torch.equal(rng._mix_i32(rng._to_int32(x)).long() & M32, rng._mix(x))


@pytest.mark.parametrize("shape", [(1,), (3,), (1, 8, 8), (3, 5, 7), (17,)])
def test_device_path_on_the_cpu_equals_the_reference(shape):
    d = _draw()
    index = torch.cat([torch.arange(0, 40) * 13, torch.tensor([2**31 + 5, 2**35])])
    for stream in (rng.ELBO_NOISE, rng.LM_NOISE):
        for dtype in (torch.float32, torch.float64):
            new = d.normal(stream, index, shape, dtype=dtype)
            assert new.shape == (5, index.numel(), *shape) and new.dtype == dtype
            assert torch.equal(new, reference_normal(d, stream, index, shape, dtype=dtype))


def test_uniforms_and_integers_equal_the_reference_bit_for_bit():
    d = _draw()
    index = torch.arange(-45, 3000).view(-1, 7)
    assert torch.equal(d.uniform(rng.MI_CLASS, index), reference_uniform(d, rng.MI_CLASS, index))
    high = torch.arange(1, 8)  # broadcast against (B, 435, 7)
    for h in (9, 1000, 2**31 - 1, high):
        assert torch.equal(d.integers(rng.MI_SAMPLE, index, h), reference_integers(d, rng.MI_SAMPLE, index, h))


@pytest.mark.slow  # torch.compile runs the C compiler in subprocesses (seconds on a fresh cache)
def test_the_compiled_cpu_kernel_gives_the_eager_and_reference_bits(monkeypatch):
    """Large fields go through the compiled kernel and small ones run eager: a draw's bits must
    not depend on which (a batch decides), so both equal the reference exactly."""
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    d = _draw(ids=(0, 1, 2, 3), calls=(0, 0, 1, 5))
    ts = torch.arange(0, 1000, 9)
    big = d.normal(rng.ELBO_NOISE, ts, (3, 32, 32))  # 4 x 112 x 3072 values: above COMPILE_MIN_ELEMENTS
    assert big.numel() >= rng.COMPILE_MIN_ELEMENTS and not rng._EAGER_ONLY
    assert torch.equal(big, reference_normal(d, rng.ELBO_NOISE, ts, (3, 32, 32)))
    monkeypatch.setattr(rng, "COMPILE_MIN_ELEMENTS", 0)  # every field compiled, odd sizes and one row too
    for draw, shape in ((d, (1,)), (d, (3, 5, 7)), (d.subset(torch.tensor([2])), (1, 8, 8))):
        for index in (ts[:1], ts[:13]):
            assert torch.equal(draw.normal(rng.LM_NOISE, index, shape),
                               reference_normal(draw, rng.LM_NOISE, index, shape))
    assert not rng._EAGER_ONLY


def test_a_draw_does_not_depend_on_its_batch():
    d = _draw()
    ts = torch.arange(0, 1000, 37)
    full = d.normal(rng.ELBO_NOISE, ts, (2, 3, 3))
    for rows in (torch.tensor([3]), torch.tensor([4, 0])):
        assert torch.equal(d.subset(rows).normal(rng.ELBO_NOISE, ts, (2, 3, 3)), full[rows])
    assert torch.equal(d.normal(rng.ELBO_NOISE, ts[5:9], (2, 3, 3)), full[:, 5:9])


def test_a_million_normals_have_normal_moments_and_pass_kolmogorov_smirnov():
    from scipy import stats

    z = Draw(11, torch.arange(4), torch.zeros(4, dtype=torch.int64)).normal(
        rng.ELBO_NOISE, torch.arange(250), (1000,), dtype=torch.float64).flatten()
    n = z.numel()
    assert n == 1_000_000
    mean, var = z.mean().item(), z.var().item()
    c = (z - mean) / math.sqrt(var)
    skew, kurt = c.pow(3).mean().item(), c.pow(4).mean().item() - 3
    # Five standard errors of each sample moment of N(0, 1).
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(kurt) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # The tails: the fraction beyond 3 sigma is 0.27%, within five of its standard errors.
    p3 = 2 * stats.norm.sf(3)
    assert abs((z.abs() > 3).double().mean().item() - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_neighbouring_indices_calls_streams_examples_and_values_are_uncorrelated():
    ids = torch.arange(64)
    index = torch.arange(65)
    shape = (48,)
    base = Draw(3, ids, torch.zeros(64, dtype=torch.int64))
    z = base.normal(rng.ELBO_NOISE, index, shape)  # (64, 65, 48)
    pairs = {
        "index": (z[:, :-1], z[:, 1:]),
        "example": (z[:-1], z[1:]),
        "value": (z[..., :-1], z[..., 1:]),
        "call": (z, Draw(3, ids, torch.ones(64, dtype=torch.int64)).normal(rng.ELBO_NOISE, index, shape)),
        "stream": (z, base.normal(rng.ELBO_NOISE + 1, index, shape)),
        "seed": (z, Draw(4, ids, torch.zeros(64, dtype=torch.int64)).normal(rng.ELBO_NOISE, index, shape)),
    }
    for name, (a, b) in pairs.items():
        assert abs(_corr(a, b)) < 5 / math.sqrt(a.numel()), name
        assert abs(_corr(a.abs(), b.abs())) < 5 * 1.7 / math.sqrt(a.numel()), name  # no dependence in magnitude
    u = base.uniform(rng.MI_CLASS, torch.arange(4096))
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
        assert abs(_corr(a, b)) < 5 / math.sqrt(a.numel())
    # Integers: every value of [0, 10) about equally often (chi-square, 9 degrees of freedom).
    k = base.integers(rng.MI_SAMPLE, torch.arange(4096), 10).flatten()
    counts = torch.bincount(k, minlength=10).double()
    chi2 = ((counts - k.numel() / 10) ** 2 / (k.numel() / 10)).sum().item()
    assert chi2 < 27.9  # the 0.1% point of chi-square(9)


def test_ulps_apart_counts_representable_floats():
    one = torch.tensor([1.0])
    up = torch.nextafter(one, torch.tensor([2.0]))
    assert ulps_apart(one, up).item() == 1 and ulps_apart(up, one).item() == 1
    tiny = torch.tensor([1e-45])  # the smallest float32 subnormal
    assert ulps_apart(-tiny, tiny).item() == 2 and ulps_apart(torch.tensor([-0.0]), torch.tensor([0.0])).item() == 0
    assert ulps_apart(one.double(), torch.nextafter(one.double(), torch.tensor([0.0], dtype=torch.float64))).item() == 1
    with pytest.raises(TypeError, match="float32 or two float64"):
        ulps_apart(one, one.double())
