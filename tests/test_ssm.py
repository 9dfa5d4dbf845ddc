"""Tests of selective_scan.ssm: HiPPO-LegS and S4D-real, ZOH and bilinear discretisation (dense and
diagonal), the convolution kernel against the recurrence, and the recurrence/convolution duality of
the scan op with time-invariant B, C and constant delta."""
import pytest
import torch

from selective_scan import selective_scan
from selective_scan.ssm import (discretize_bilinear, discretize_scan, discretize_zoh, fft_conv, hippo_legs,
                                s4d_real_init, scan_convolution_kernel, ssm_convolution_kernel, ssm_recurrence)

f64 = torch.float64


def test_hippo_legs_entries():
    N = 6
    A, B = hippo_legs(N)
    for n in range(N):
        assert B[n].item() == pytest.approx((2 * n + 1) ** 0.5)
        for k in range(N):
            if n > k:
                expected = -((2 * n + 1) ** 0.5) * ((2 * k + 1) ** 0.5)
            elif n == k:
                expected = -(n + 1)
            else:
                expected = 0.0
            assert A[n, k].item() == pytest.approx(expected), (n, k)


def test_hippo_legs_spectrum_is_minus_one_to_n():
    A, _ = hippo_legs(8)
    eig = torch.linalg.eigvals(A)
    torch.testing.assert_close(eig.real.sort().values, -torch.arange(8, 0, -1, dtype=f64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eig.imag, torch.zeros(8, dtype=f64), rtol=0, atol=1e-9)


def test_s4d_real_init():
    A, A_log = s4d_real_init(3, 5)
    assert A.shape == A_log.shape == (3, 5)
    torch.testing.assert_close(A, -torch.arange(1, 6, dtype=torch.float32).repeat(3, 1))
    torch.testing.assert_close(-torch.exp(A_log), A)


def test_zoh_dense_matches_closed_form():
    A, B = hippo_legs(5)
    dt = 0.37
    Ad, Bd = discretize_zoh(A, B, dt)
    E = torch.linalg.matrix_exp(dt * A)
    torch.testing.assert_close(Ad, E, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Bd, torch.linalg.solve(A, (E - torch.eye(5, dtype=f64)) @ B), rtol=1e-9, atol=1e-12)


def test_zoh_multi_input_and_singular_A():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 2, generator=g, dtype=f64)
    A = torch.zeros(4, 4, dtype=f64)  # singular: B' = dt B
    Ad, Bd = discretize_zoh(A, B, 0.5)
    torch.testing.assert_close(Ad, torch.eye(4, dtype=f64))
    torch.testing.assert_close(Bd, 0.5 * B)


def test_zoh_diagonal_matches_dense():
    g = torch.Generator().manual_seed(1)
    a = -torch.rand(6, generator=g, dtype=f64) * 3
    a[2] = 0.0  # the a = 0 limit: dt B
    B = torch.randn(6, generator=g, dtype=f64)
    Ad, Bd = discretize_zoh(a, B, 0.2)
    Ad_dense, Bd_dense = discretize_zoh(torch.diag(a), B, 0.2, diagonal=False)
    torch.testing.assert_close(Ad, torch.diagonal(Ad_dense), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Bd, Bd_dense, rtol=1e-10, atol=1e-12)


def test_bilinear_dense_matches_formula_and_diagonal():
    A, B = hippo_legs(4)
    dt = 0.1
    Ad, Bd = discretize_bilinear(A, B, dt)
    I = torch.eye(4, dtype=f64)
    inv = torch.linalg.inv(I - dt / 2 * A)
    torch.testing.assert_close(Ad, inv @ (I + dt / 2 * A), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Bd, inv @ (dt * B), rtol=1e-10, atol=1e-12)
    a = torch.tensor([-1.0, -2.5, -0.3], dtype=f64)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=f64)
    Ad_d, Bd_d = discretize_bilinear(a, b, dt)
    Ad_full, Bd_full = discretize_bilinear(torch.diag(a), b, dt, diagonal=False)
    torch.testing.assert_close(Ad_d, torch.diagonal(Ad_full))
    torch.testing.assert_close(Bd_d, Bd_full)


def test_bilinear_approximates_zoh_to_third_order():
    """Both are exact for constant input over a step up to O(dt^3) in A': halving dt divides the
    A' gap by about 8."""
    A, B = hippo_legs(4)
    gaps = []
    for dt in (0.02, 0.01):
        gaps.append((discretize_bilinear(A, B, dt)[0] - discretize_zoh(A, B, dt)[0]).abs().max().item())
    assert 6.0 < gaps[0] / gaps[1] < 10.0


@pytest.mark.parametrize("method", [discretize_zoh, discretize_bilinear])
def test_convolution_kernel_equals_recurrence_dense(method):
    A, B = hippo_legs(8)
    g = torch.Generator().manual_seed(2)
    C = torch.randn(8, generator=g, dtype=f64)
    u = torch.randn(3, 50, generator=g, dtype=f64)
    Ad, Bd = method(A, B, 0.05)
    K = ssm_convolution_kernel(Ad, Bd, C, 50)
    assert K.shape == (50,)
    torch.testing.assert_close(K[:3], torch.stack([C @ Bd, C @ Ad @ Bd, C @ Ad @ Ad @ Bd]))
    torch.testing.assert_close(fft_conv(u, K), ssm_recurrence(Ad, Bd, C, u), rtol=1e-9, atol=1e-10)


def test_fft_conv_is_causal_convolution():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 17, generator=g, dtype=f64)
    K = torch.randn(3, 17, generator=g, dtype=f64)
    D = torch.randn(3, generator=g, dtype=f64)
    direct = torch.zeros_like(u)
    for t in range(17):
        for k in range(t + 1):
            direct[..., t] += K[:, k] * u[..., t - k]
    torch.testing.assert_close(fft_conv(u, K, D), direct + D[:, None] * u, rtol=1e-10, atol=1e-10)


def _lti_inputs(batch=2, dim=6, dstate=8, L=40, seed=4):
    g = torch.Generator().manual_seed(seed)
    A = -torch.rand(dim, dstate, generator=g, dtype=f64) * 2 - 0.05
    B = torch.randn(dim, dstate, generator=g, dtype=f64)
    C = torch.randn(dim, dstate, generator=g, dtype=f64)
    D = torch.randn(dim, generator=g, dtype=f64)
    delta = torch.rand(dim, generator=g, dtype=f64) * 0.5 + 0.01
    u = torch.randn(batch, dim, L, generator=g, dtype=f64)
    return u, delta, A, B, C, D


def test_scan_op_lti_equals_fft_convolution():
    """The op (recurrent mode) with constant delta and time-invariant B, C equals the causal
    convolution with K[d, k] = sum_n C exp(delta A)^k delta B (convolutional mode)."""
    u, delta, A, B, C, D = _lti_inputs()
    L = u.shape[-1]
    y_scan = selective_scan(u, delta[None, :, None].expand_as(u).contiguous(), A, B, C, D)
    K = scan_convolution_kernel(delta, A, B, C, L)
    assert K.shape == (6, L)
    torch.testing.assert_close(fft_conv(u, K, D), y_scan, rtol=1e-9, atol=1e-10)


def test_scan_op_runs_exact_zoh_with_rescaled_B():
    """Passing B expm1(delta A) / (delta A) as B makes the op's Euler input step the exact ZOH one."""
    u, delta, A, B, C, D = _lti_inputs(seed=5)
    L = u.shape[-1]
    dA = delta[:, None] * A
    y_scan = selective_scan(u, delta[None, :, None].expand_as(u).contiguous(), A, B * torch.expm1(dA) / dA, C)
    Ad, Bd = discretize_zoh(A, B, delta[:, None], diagonal=True)
    K = ssm_convolution_kernel(Ad, Bd, C, L, diagonal=True)
    torch.testing.assert_close(fft_conv(u, K), y_scan, rtol=1e-9, atol=1e-10)
    # ...and differs from the op's own (Euler) discretisation by more than rounding.
    Ad_s, Bd_s = discretize_scan(delta, A, B)
    torch.testing.assert_close(Ad_s, Ad)
    assert (Bd_s - Bd).abs().max() > 1e-3


def test_scan_kernel_float32_against_float64():
    u, delta, A, B, C, D = _lti_inputs(seed=6)
    L = u.shape[-1]
    y32 = selective_scan(u.float(), delta.float()[None, :, None].expand(u.shape).contiguous(), A.float(),
                         B.float(), C.float(), D.float())
    y64 = fft_conv(u, scan_convolution_kernel(delta, A, B, C, L), D)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
