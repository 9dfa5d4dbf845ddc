"""Determinism: repeated backward (and forward) runs give bitwise-identical results, on CPU also
whatever the number of threads; on CUDA for shapes where many blocks add into one gradient."""
import pytest
import torch

from scan_utils import CUDA, DEVICES, grads_of, make_inputs, run_op, upstream_grads

CONFIGS = {
    "var_group": dict(batch=4, dim=64, seqlen=300, dstate=16, B_form="var", C_form="group",
                      C_groups=4, initial_state=True),
    "const": dict(batch=3, dim=32, seqlen=200, dstate=8, B_form="const", C_form="const"),
    "group_bf16": dict(batch=2, dim=48, seqlen=257, dstate=16, B_form="group", C_form="group",
                       B_groups=2, C_groups=3, dtype=torch.bfloat16, initial_state=True),
}


def _run(kw, dout, dlast):
    return grads_of(lambda k: run_op(k, True), kw, dout, dlast)


def _assert_bitwise(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), f"d{name} differs between runs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_backward_bitwise_repeatable(device, config):
    kw = make_inputs(device=device, seed=51, **CONFIGS[config])
    dout, dlast = upstream_grads(kw)
    first = _run(kw, dout, dlast)
    assert all(torch.count_nonzero(g) > 0 for g in first[2].values())
    for _ in range(2):
        _assert_bitwise(first, _run(kw, dout, dlast))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cpu_results_independent_of_thread_count(config):
    kw = make_inputs(device="cpu", seed=52, **CONFIGS[config])
    dout, dlast = upstream_grads(kw)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(kw, dout, dlast))
    finally:
        torch.set_num_threads(before)
    _assert_bitwise(results[0], results[1])
    _assert_bitwise(results[0], results[2])


@CUDA
@pytest.mark.parametrize("shape", [(1, 4096, 2048, 16), (8, 1536, 512, 16), (2, 256, 4100, 64)],
                         ids=["long_rows", "many_rows", "dstate64"])
@pytest.mark.parametrize("forms", [("var", "var"), ("group", "group"), ("const", "const")],
                         ids=["var", "group", "const"])
def test_cuda_backward_bitwise_large(shape, forms):
    batch, dim, seqlen, dstate = shape
    kw = make_inputs(device="cuda", batch=batch, dim=dim, seqlen=seqlen, dstate=dstate,
                     B_form=forms[0], C_form=forms[1], B_groups=8, C_groups=4,
                     dtype=torch.bfloat16, initial_state=True, seed=53)
    dout, dlast = upstream_grads(kw)
    first = _run(kw, dout, dlast)
    for _ in range(3):
        _assert_bitwise(first, _run(kw, dout, dlast))
