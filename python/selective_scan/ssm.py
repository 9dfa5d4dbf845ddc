"""SSM tools: the HiPPO-LegS and S4D-real initialisations, discretisation of a continuous (A, B) by
zero-order hold, by the bilinear transform and as the scan op does it, and the convolutional mode
of a time-invariant SSM (its kernel K and the causal FFT convolution). See docs/modules.md."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Initialisations
# --------------------------------------------------------------------------------------------

def hippo_legs(N: int, dtype: torch.dtype = torch.float64, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """HiPPO-LegS: the (A, B) of dx/dt = A x + B u whose state holds the Legendre coefficients of
    the input history scaled to [0, t] (used here in its time-invariant form, as S4 does).

    A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k;  B[n] = sqrt(2n+1).
    A is lower triangular with eigenvalues -1, ..., -N. Returns A (N, N) and B (N,).
    """
    n = torch.arange(N, dtype=dtype, device=device)
    r = torch.sqrt(2 * n + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)
    return A, r.clone()


def s4d_real_init(d_inner: int, d_state: int, dtype: torch.dtype = torch.float32,
                  device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """S4D-real: the diagonal A[d, n] = -(n+1) for every channel d (the eigenvalues of HiPPO-LegS,
    taken as a diagonal), and the parameter Mamba stores, A_log = log(-A), so that A = -exp(A_log)
    stays negative under training. Returns (A, A_log), both (d_inner, d_state)."""
    a = torch.arange(1, d_state + 1, dtype=dtype, device=device).repeat(d_inner, 1)
    return -a, torch.log(a)


# --------------------------------------------------------------------------------------------
# Discretisation
# --------------------------------------------------------------------------------------------

def _is_diagonal(A: torch.Tensor, diagonal: Optional[bool]) -> bool:
    return A.dim() == 1 if diagonal is None else bool(diagonal)


def discretize_zoh(A: torch.Tensor, B: torch.Tensor, dt: Scalar,
                   diagonal: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold (the input held constant over each step of length dt):

        A' = exp(dt A),  B' = A^{-1} (exp(dt A) - I) B = (integral_0^dt exp(s A) ds) B.

    Dense A (N, N), B (N,) or (N, M), dt a scalar: A' and B' come from one matrix exponential of
    the block matrix dt [[A, B], [0, 0]], whose top blocks are [A', B'], so singular A needs no
    inverse. Diagonal A (given as its diagonal, any shape ending in N, with diagonal=True or when
    1-D), B and dt broadcasting against it: A' = exp(dt a), B' = expm1(dt a) / a * B, and dt B where
    a = 0.
    """
    if _is_diagonal(A, diagonal):
        dt = torch.as_tensor(dt, dtype=A.dtype, device=A.device)
        dA = dt * A
        safe = torch.where(A == 0, torch.ones_like(A), A)
        gain = torch.where(A == 0, dt * torch.ones_like(A), torch.expm1(dA) / safe)
        return torch.exp(dA), gain * B
    N = A.shape[-1]
    vec = B.dim() == 1
    Bm = B[:, None] if vec else B
    M = Bm.shape[-1]
    block = A.new_zeros(N + M, N + M)
    block[:N, :N] = A
    block[:N, N:] = Bm
    E = torch.linalg.matrix_exp(block * dt)
    Ad, Bd = E[:N, :N], E[:N, N:]
    return Ad, (Bd[:, 0] if vec else Bd)


def discretize_bilinear(A: torch.Tensor, B: torch.Tensor, dt: Scalar,
                        diagonal: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) transform:

        A' = (I - dt/2 A)^{-1} (I + dt/2 A),  B' = (I - dt/2 A)^{-1} dt B.

    Dense A (N, N) with B (N,) or (N, M) and scalar dt, or diagonal A as in discretize_zoh.
    """
    if _is_diagonal(A, diagonal):
        dt = torch.as_tensor(dt, dtype=A.dtype, device=A.device)
        den = 1 - dt / 2 * A
        return (1 + dt / 2 * A) / den, dt * B / den
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    left = eye - dt / 2 * A
    Ad = torch.linalg.solve(left, eye + dt / 2 * A)
    Bd = torch.linalg.solve(left, (dt * B)[:, None] if B.dim() == 1 else dt * B)
    return Ad, (Bd[:, 0] if B.dim() == 1 else Bd)


def discretize_scan(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The discretisation the selective scan op applies: A' = exp(delta A) (exact decay, as ZOH) and
    B' = delta B (Euler for the input). delta (..., dim) against diagonal A and B (..., dim, dstate).
    ZOH's B' is B expm1(delta A) / A; the two agree to first order in delta A. To run exact ZOH
    through the op with time-invariant B, pass B * expm1(delta A) / (delta A) as B."""
    d = delta[..., None]
    return torch.exp(d * A), d * B


# --------------------------------------------------------------------------------------------
# Convolutional mode
# --------------------------------------------------------------------------------------------

def ssm_convolution_kernel(Ad: torch.Tensor, Bd: torch.Tensor, C: torch.Tensor, L: int,
                           diagonal: Optional[bool] = None) -> torch.Tensor:
    """K = (C B', C A' B', C A'^2 B', ..., C A'^{L-1} B'): the impulse response of the discrete
    time-invariant SSM x_k = A' x_{k-1} + B' u_k, y_k = C x_k, so that y = K * u (causal).

    Dense A' (N, N), B' (N,), C (N,): returns (L,). Diagonal A' (..., N) with B', C broadcasting
    (diagonal=True or 1-D A'): K[..., k] = sum_n C_n B'_n A'_n^k, returns (..., L).
    """
    if _is_diagonal(Ad, diagonal):
        k = torch.arange(L, dtype=Ad.dtype, device=Ad.device)
        powers = Ad[..., None] ** k  # (..., N, L); integer exponents, so negative A' is fine
        return ((C * Bd)[..., None] * powers).sum(-2)
    out = []
    v = Bd
    for _ in range(L):
        out.append(C @ v)
        v = Ad @ v
    return torch.stack(out) if out else Bd.new_zeros(0)


def scan_convolution_kernel(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            L: int) -> torch.Tensor:
    """The kernel of the scan op run with a constant delta (dim,) and time-invariant B, C
    (dim, dstate): K[d, k] = sum_n C[d,n] exp(delta_d A[d,n])^k delta_d B[d,n]. Returns (dim, L);
    the op's output is fft_conv(u, K, D)."""
    Ad, Bd = discretize_scan(delta, A, B)
    return ssm_convolution_kernel(Ad, Bd, C, L, diagonal=True)


def fft_conv(u: torch.Tensor, K: torch.Tensor, D: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal convolution y[..., t] = sum_{k<=t} K[..., k] u[..., t-k] (+ D u) by FFT, zero-padded
    to a power of two >= 2L so it does not wrap: O(L log L). u (..., L); K (..., L) broadcasting
    against u; D broadcasting against u[..., 0] (e.g. (dim,) for u (batch, dim, L))."""
    L = u.shape[-1]
    n = 1 << max(1, (2 * L - 1).bit_length())
    Kf = torch.fft.rfft(K.to(u.dtype), n=n)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * Kf, n=n)[..., :L]
    if D is not None:
        y = y + D[..., None].to(u.dtype) * u
    return y


def ssm_recurrence(Ad: torch.Tensor, Bd: torch.Tensor, C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The recurrent mode of a dense SISO SSM, step by step: x_k = A' x_{k-1} + B' u_k, y_k = C x_k,
    from x_{-1} = 0. u (..., L) -> y (..., L). O(L N^2); the reference for the convolutional mode."""
    x = u.new_zeros(u.shape[:-1] + (Ad.shape[-1],))
    ys = []
    for t in range(u.shape[-1]):
        x = x @ Ad.T + u[..., t, None] * Bd
        ys.append(x @ C)
    return torch.stack(ys, dim=-1)


__all__ = ["hippo_legs", "s4d_real_init", "discretize_zoh", "discretize_bilinear", "discretize_scan",
           "ssm_convolution_kernel", "scan_convolution_kernel", "fft_conv", "ssm_recurrence"]
