"""Blur kernels of the Real-ESRGAN degradation model (SPEC §8.1).

Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", arXiv:2107.10833,
§3.2 (blur and sinc filters), with the kernel settings OSEDiff (arXiv:2406.08177) trains with.

On a square grid of integer offsets x = (column offset, row offset) centred at 0, with
Σ = R(θ) diag(σx², σy²) R(θ)ᵀ and R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]:

* Gaussian      k(x) ∝ exp(−½ xᵀΣ⁻¹x)
* generalized   k(x) ∝ exp(−½ (xᵀΣ⁻¹x)^β)
* plateau       k(x) ∝ 1 / ((xᵀΣ⁻¹x)^β + 1)
* sinc          k(r) = ω_c J₁(ω_c r) / (2π r), r = |x|, with the limit k(0) = ω_c² / (4π) (circular low-pass)

Every kernel is normalised to sum 1 and zero-padded, centred, to ``pad_to`` (21). Kernels are computed in float64
and returned as float32 on the CPU. "Isotropic" types set σy = σx and θ = 0.

Random draws go through a ``torch.Generator`` only (``draw_*`` helpers below; ``training.degradation`` uses the
same helpers). β follows BasicSR's rule for both families: U[β_lo, 1] with probability ½, else U[1, β_hi]. For the
generalized Gaussian (0.5, 4) this is SPEC's rule; for the plateau range (1, 2) it gives β = 1 half of the time,
which is what the reference code that OSEDiff trains with does (SPEC §8.1 abbreviates it to U[1, 2]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)


# ---------------------------------------------------------------- scalar draws from a torch.Generator


def draw_uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float from U[low, high)."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return low + (high - low) * u


def draw_bernoulli(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p`` (``p = 1`` is always True, ``p = 0`` never)."""
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def draw_index(generator: torch.Generator, probs: Sequence[float]) -> int:
    """An index drawn with the given probabilities (which sum to 1)."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    cumulative = 0.0
    for index, p in enumerate(probs):
        cumulative += p
        if u < cumulative:
            return index
    return max(i for i, p in enumerate(probs) if p > 0)  # u within rounding of 1: the last possible index


def draw_choice(generator: torch.Generator, options: Sequence):
    """One element of ``options``, uniformly."""
    return options[int(torch.randint(len(options), (), generator=generator).item())]


# ---------------------------------------------------------------- validation shared with training.degradation


def check_probability(name: str, value) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1]; got {value!r}.")


def check_range(name: str, value, *, low: float = -math.inf, high: float = math.inf, around: float | None = None,
                integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is an ordered pair (lo, hi) with low <= lo <= hi <= high.

    ``around`` additionally requires lo <= around <= hi (resize ranges straddle 1, β ranges straddle 1).
    """
    kinds = (int,) if integer else (int, float)
    if (not isinstance(value, tuple) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, kinds) for v in value)):
        kind = "integers" if integer else "numbers"
        raise ValueError(f"`{name}` must be a pair (lo, hi) of {kind}; got {value!r}.")
    lo, hi = value
    if not low <= lo <= hi <= high:
        raise ValueError(f"`{name}` must satisfy {low} <= lo <= hi <= {high}; got {value!r}. Order the pair.")
    if around is not None and not lo <= around <= hi:
        raise ValueError(f"`{name}` must contain {around} (lo <= {around} <= hi); got {value!r}.")


def check_modes(name: str, value, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is a non-empty tuple of names from ``allowed``."""
    if not isinstance(value, tuple) or not value or any(v not in allowed for v in value):
        raise ValueError(f"`{name}` must be a non-empty tuple of names from {tuple(allowed)}; got {value!r}.")


def _check_sizes(name: str, sizes, pad_to: int) -> None:
    if (not isinstance(sizes, tuple) or not sizes
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 or s % 2 == 0 or s > pad_to
                   for s in sizes)):
        raise ValueError(f"`{name}` must be a non-empty tuple of odd kernel sizes in [1, pad_to={pad_to}]; "
                         f"got {sizes!r}. The default is {KERNEL_SIZES}.")


def _as_tuples(config) -> None:
    """Turn list fields (from JSON) into tuples, in place on a frozen dataclass."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


def _config_from_dict(cls, data: dict):
    if not isinstance(data, dict):
        raise TypeError(f"`{cls.__name__}.from_dict` needs a dict; got {type(data).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}.")
    return cls(**data)


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    """How one blur kernel is drawn (Real-ESRGAN ``kernel_list``, ``kernel_prob``, ``blur_sigma``, ...).

    The defaults are OSEDiff's kernel 1; kernel 2 differs only in ``sigma_range = (0.2, 1.5)``.
    """

    sizes: tuple[int, ...] = KERNEL_SIZES
    pad_to: int = 21
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    sinc_large_from: int = 13  # sizes >= this draw ω_c from omega_range_large
    omega_range_small: tuple[float, float] = (math.pi / 3, math.pi)
    omega_range_large: tuple[float, float] = (math.pi / 5, math.pi)

    def __post_init__(self) -> None:
        _as_tuples(self)
        if isinstance(self.pad_to, bool) or not isinstance(self.pad_to, int) or self.pad_to < 1 or self.pad_to % 2 == 0:
            raise ValueError(f"`pad_to` must be an odd positive integer; got {self.pad_to!r}. The default is 21.")
        _check_sizes("sizes", self.sizes, self.pad_to)
        check_modes("kernel_types", self.kernel_types, KERNEL_TYPES)
        if not isinstance(self.kernel_probs, tuple) or len(self.kernel_probs) != len(self.kernel_types):
            raise ValueError(f"`kernel_probs` must hold one probability per kernel type ({len(self.kernel_types)}); "
                             f"got {self.kernel_probs!r}.")
        for p in self.kernel_probs:
            check_probability("kernel_probs", p)
        if abs(sum(self.kernel_probs) - 1.0) > 1e-6:
            raise ValueError(f"`kernel_probs` must sum to 1; got {self.kernel_probs!r} (sum {sum(self.kernel_probs)}).")
        check_range("sigma_range", self.sigma_range, low=1e-6)
        check_range("rotation_range", self.rotation_range)
        check_range("betag_range", self.betag_range, low=1e-6, around=1.0)
        check_range("betap_range", self.betap_range, low=1e-6, around=1.0)
        check_probability("sinc_prob", self.sinc_prob)
        if isinstance(self.sinc_large_from, bool) or not isinstance(self.sinc_large_from, int):
            raise ValueError(f"`sinc_large_from` must be an integer kernel size; got {self.sinc_large_from!r}.")
        check_range("omega_range_small", self.omega_range_small, low=1e-6)
        check_range("omega_range_large", self.omega_range_large, low=1e-6)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KernelConfig:
        return _config_from_dict(cls, data)


@dataclass(frozen=True)
class FinalSincConfig:
    """The final sinc filter: applied with probability ``prob``, else a unit impulse (the identity)."""

    prob: float = 0.8
    sizes: tuple[int, ...] = KERNEL_SIZES
    pad_to: int = 21
    omega_range: tuple[float, float] = (math.pi / 3, math.pi)

    def __post_init__(self) -> None:
        _as_tuples(self)
        check_probability("final_sinc.prob", self.prob)
        if isinstance(self.pad_to, bool) or not isinstance(self.pad_to, int) or self.pad_to < 1 or self.pad_to % 2 == 0:
            raise ValueError(f"`final_sinc.pad_to` must be an odd positive integer; got {self.pad_to!r}.")
        _check_sizes("final_sinc.sizes", self.sizes, self.pad_to)
        check_range("final_sinc.omega_range", self.omega_range, low=1e-6)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FinalSincConfig:
        return _config_from_dict(cls, data)


# ---------------------------------------------------------------- deterministic kernels


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel `size` must be an odd positive integer; got {size!r}. Use e.g. 7, 9, ..., 21.")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0; got {value!r}.")


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row offsets, each (size, size) float64, centred at 0."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # (size,)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")  # (size, size) each
    return cols, rows


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """xᵀΣ⁻¹x on the grid, (size, size) float64."""
    _check_size(size)
    _check_positive("sigma_x", sigma_x)
    _check_positive("sigma_y", sigma_y)
    cos, sin = math.cos(theta), math.sin(theta)
    inv_x, inv_y = 1.0 / sigma_x**2, 1.0 / sigma_y**2
    # Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ because R is orthogonal
    a = cos * cos * inv_x + sin * sin * inv_y
    b = cos * sin * (inv_x - inv_y)
    d = sin * sin * inv_x + cos * cos * inv_y
    cols, rows = _grid(size)
    return a * cols**2 + 2 * b * cols * rows + d * rows**2  # (size, size)


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Bivariate Gaussian exp(−½ xᵀΣ⁻¹x), normalised; (size, size) float32."""
    return _normalised(torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta)))


def generalized_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    """Generalized Gaussian exp(−½ (xᵀΣ⁻¹x)^β), normalised; (size, size) float32."""
    _check_positive("beta", beta)
    return _normalised(torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    """Plateau kernel 1 / ((xᵀΣ⁻¹x)^β + 1), normalised; (size, size) float32."""
    _check_positive("beta", beta)
    return _normalised(1.0 / (_mahalanobis(size, sigma_x, sigma_y, theta) ** beta + 1.0))


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """Circular low-pass ω_c J₁(ω_c r) / (2π r) with centre ω_c² / (4π), normalised; (size, size) float32."""
    _check_size(size)
    _check_positive("omega_c", omega_c)
    cols, rows = _grid(size)
    r = torch.sqrt(cols**2 + rows**2)  # (size, size)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))  # the centre is replaced by its limit below
    kernel = omega_c * torch.special.bessel_j1(omega_c * safe_r) / (2 * math.pi * safe_r)  # (size, size)
    kernel = torch.where(r > 0, kernel, torch.full_like(kernel, omega_c**2 / (4 * math.pi)))
    return _normalised(kernel)


def impulse_kernel(size: int) -> torch.Tensor:
    """A unit impulse (filtering with it is the identity); (size, size) float32."""
    _check_size(size)
    kernel = torch.zeros(size, size, dtype=torch.float32)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def pad_kernel(kernel: torch.Tensor, pad_to: int) -> torch.Tensor:
    """Zero-pad a square odd kernel, centred, to (pad_to, pad_to)."""
    size = kernel.shape[-1]
    if kernel.shape != (size, size) or size > pad_to or (pad_to - size) % 2:
        raise ValueError(f"cannot centre a kernel of shape {tuple(kernel.shape)} in {pad_to}x{pad_to}; "
                         f"the kernel must be square, odd and at most {pad_to} wide.")
    margin = (pad_to - size) // 2
    return torch.nn.functional.pad(kernel, (margin, margin, margin, margin))  # (pad_to, pad_to)


# ---------------------------------------------------------------- random kernels


@dataclass(frozen=True)
class KernelSpec:
    """The drawn parameters of one kernel; ``build()`` makes it. Unused parameters keep their defaults.

    ``kind`` is one of KERNEL_TYPES, ``"sinc"`` or ``"impulse"``.
    """

    kind: str
    size: int
    pad_to: int = 21
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    omega_c: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_TYPES + ("sinc", "impulse"):
            raise ValueError(f"`kind` must be one of {KERNEL_TYPES + ('sinc', 'impulse')}; got {self.kind!r}.")

    def build(self) -> torch.Tensor:
        """The kernel, normalised and padded: (pad_to, pad_to) float32 on the CPU."""
        if self.kind == "impulse":
            kernel = impulse_kernel(self.size)
        elif self.kind == "sinc":
            kernel = sinc_kernel(self.size, self.omega_c)
        elif self.kind.startswith("generalized"):
            kernel = generalized_kernel(self.size, self.sigma_x, self.sigma_y, self.theta, self.beta)
        elif self.kind.startswith("plateau"):
            kernel = plateau_kernel(self.size, self.sigma_x, self.sigma_y, self.theta, self.beta)
        else:
            kernel = gaussian_kernel(self.size, self.sigma_x, self.sigma_y, self.theta)
        return pad_kernel(kernel, self.pad_to)  # (pad_to, pad_to)


def _draw_beta(generator: torch.Generator, beta_range: tuple[float, float]) -> float:
    if draw_bernoulli(generator, 0.5):
        return draw_uniform(generator, beta_range[0], 1.0)
    return draw_uniform(generator, 1.0, beta_range[1])


def draw_blur_spec(generator: torch.Generator, config: KernelConfig) -> KernelSpec:
    """Draw a blur kernel: sinc with probability ``sinc_prob``, else a mixed kernel (SPEC §8.1)."""
    size = draw_choice(generator, config.sizes)
    if draw_bernoulli(generator, config.sinc_prob):
        omega_range = config.omega_range_small if size < config.sinc_large_from else config.omega_range_large
        return KernelSpec("sinc", size, config.pad_to, omega_c=draw_uniform(generator, *omega_range))
    kind = config.kernel_types[draw_index(generator, config.kernel_probs)]
    sigma_x = draw_uniform(generator, *config.sigma_range)
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y = draw_uniform(generator, *config.sigma_range)
        theta = draw_uniform(generator, *config.rotation_range)
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _draw_beta(generator, config.betag_range)
    elif kind.startswith("plateau"):
        beta = _draw_beta(generator, config.betap_range)
    return KernelSpec(kind, size, config.pad_to, sigma_x=sigma_x, sigma_y=sigma_y, theta=theta, beta=beta)


def draw_final_spec(generator: torch.Generator, config: FinalSincConfig) -> KernelSpec:
    """Draw the final filter: sinc with probability ``prob``, else a unit impulse of size ``pad_to``."""
    if draw_bernoulli(generator, config.prob):
        size = draw_choice(generator, config.sizes)
        return KernelSpec("sinc", size, config.pad_to, omega_c=draw_uniform(generator, *config.omega_range))
    return KernelSpec("impulse", config.pad_to, config.pad_to)


def random_mixed_kernel(generator: torch.Generator, config: KernelConfig | None = None) -> torch.Tensor:
    """A random blur kernel (sinc branch included), (pad_to, pad_to) float32 summing to 1."""
    return draw_blur_spec(generator, config or KernelConfig()).build()


def random_final_kernel(generator: torch.Generator, config: FinalSincConfig | None = None) -> torch.Tensor:
    """The random final filter (sinc or unit impulse), (pad_to, pad_to) float32 summing to 1."""
    return draw_final_spec(generator, config or FinalSincConfig()).build()
