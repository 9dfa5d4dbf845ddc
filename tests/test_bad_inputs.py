"""Input validation: every malformed call raises ValueError/TypeError/RuntimeError whose message
names the argument, the expected value and the actual one; for the public op, for the two
registered ops directly, and (CUDA) for shapes, mismatched devices and float64 on the GPU."""
import pytest
import torch

import selective_scan
from scan_utils import CUDA, make_inputs

BATCH, DIM, SEQLEN, DSTATE = 2, 8, 16, 4


def base(device="cpu", dtype=torch.float32):
    return make_inputs(batch=BATCH, dim=DIM, seqlen=SEQLEN, dstate=DSTATE, dtype=dtype,
                       device=device, B_form="var", C_form="group", C_groups=2,
                       initial_state=True, seed=31)


def call(kw):
    return selective_scan.selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                                         kw["z"], kw["delta_bias"], kw["delta_softplus"], True,
                                         initial_state=kw["initial_state"])


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (id, {argument: replacement (a callable of the base inputs)}, exception, message fragments:
#  the argument's name, what was expected, what was given)
CASES = [
    ("u_rank", {"u": lambda k: k["u"][0]}, ValueError, ["u:", "expected 3 dims", "[8, 16]"]),
    ("u_rank4", {"u": lambda k: k["u"][None]}, ValueError, ["u:", "expected 3 dims", "[1, 2, 8, 16]"]),
    ("u_int", {"u": lambda k: k["u"].to(torch.int32)}, TypeError, ["u:", "float32", "Int"]),
    ("u_complex", {"u": lambda k: k["u"].to(torch.complex64)}, TypeError, ["u:", "float32", "ComplexFloat"]),
    ("u_not_tensor", {"u": lambda k: k["u"].tolist()}, TypeError, ["u:", "Tensor", "list"]),
    ("delta_shape", {"delta": lambda k: k["delta"][..., :-1]}, ValueError,
     ["delta:", "[2, 8, 16]", "[2, 8, 15]"]),
    ("delta_dtype", {"delta": lambda k: k["delta"].double()}, TypeError, ["delta:", "Float", "Double"]),
    ("delta_not_tensor", {"delta": lambda k: 0.5}, TypeError, ["delta:", "Tensor", "float"]),
    ("A_dim_mismatch", {"A": lambda k: k["A"][:-1]}, ValueError, ["A:", "dim = 8", "[7, 4]"]),
    ("A_rank", {"A": lambda k: k["A"][:, 0]}, ValueError, ["A:", "(dim, dstate)", "[8]"]),
    ("A_dstate_257", {"A": lambda k: -torch.rand(DIM, 257), "B": lambda k: r(DIM, 257),
                      "C": lambda k: r(DIM, 257), "initial_state": lambda k: None},
     ValueError, ["A:", "256", "257"]),
    ("A_dstate_0", {"A": lambda k: k["A"][:, :0]}, ValueError, ["A:", "1 <= dstate", "0"]),
    ("A_complex", {"A": lambda k: k["A"].to(torch.complex64)}, TypeError, ["A:", "complex", "ComplexFloat"]),
    ("A_fp16", {"A": lambda k: k["A"].half()}, TypeError, ["A:", "Float", "Half"]),
    ("A_fp64_with_fp32", {"A": lambda k: k["A"].double()}, TypeError, ["A:", "Float", "Double"]),
    ("B_rank1", {"B": lambda k: r(DSTATE)}, ValueError, ["B:", "(batch, n_groups, dstate, seqlen)", "[4]"]),
    ("B_rank5", {"B": lambda k: r(BATCH, 1, 1, DSTATE, SEQLEN)}, ValueError,
     ["B:", "(dim, dstate)", "[2, 1, 1, 4, 16]"]),
    ("B_const_shape", {"B": lambda k: r(DIM, DSTATE + 1)}, ValueError, ["B:", "[8, 4]", "[8, 5]"]),
    ("B_const_dim", {"B": lambda k: r(DIM + 1, DSTATE)}, ValueError, ["B:", "[8, 4]", "[9, 4]"]),
    ("B_var_batch", {"B": lambda k: r(BATCH + 1, DSTATE, SEQLEN)}, ValueError,
     ["B:", "[2, 4, 16]", "[3, 4, 16]"]),
    ("B_var_seqlen", {"B": lambda k: r(BATCH, DSTATE, SEQLEN - 1)}, ValueError,
     ["B:", "[2, 4, 16]", "[2, 4, 15]"]),
    ("B_var_dstate", {"B": lambda k: r(BATCH, DSTATE + 2, SEQLEN)}, ValueError,
     ["B:", "[2, 4, 16]", "[2, 6, 16]"]),
    ("B_groups_not_dividing", {"B": lambda k: r(BATCH, 3, DSTATE, SEQLEN)}, ValueError,
     ["B:", "n_groups dividing dim = 8", "n_groups = 3"]),
    ("B_groups_more_than_dim", {"B": lambda k: r(BATCH, 16, DSTATE, SEQLEN)}, ValueError,
     ["B:", "n_groups dividing dim = 8", "n_groups = 16"]),
    ("B_group_shape", {"B": lambda k: r(BATCH, 2, DSTATE, SEQLEN + 1)}, ValueError,
     ["B:", "[2, 2, 4, 16]", "[2, 2, 4, 17]"]),
    ("B_dtype", {"B": lambda k: k["B"].double()}, TypeError, ["B:", "Float", "Double"]),
    ("B_int", {"B": lambda k: k["B"].to(torch.int64)}, TypeError, ["B:", "Float", "Long"]),
    ("B_not_tensor", {"B": lambda k: None}, TypeError, ["B:", "Tensor", "NoneType"]),
    ("C_rank", {"C": lambda k: r(DSTATE)}, ValueError, ["C:", "(dim, dstate)", "[4]"]),
    ("C_groups_not_dividing", {"C": lambda k: r(BATCH, 5, DSTATE, SEQLEN)}, ValueError,
     ["C:", "n_groups dividing dim = 8", "n_groups = 5"]),
    ("C_var_seqlen", {"C": lambda k: r(BATCH, DSTATE, SEQLEN + 3)}, ValueError,
     ["C:", "[2, 4, 16]", "[2, 4, 19]"]),
    ("C_const_shape", {"C": lambda k: r(DIM, DSTATE - 1)}, ValueError, ["C:", "[8, 4]", "[8, 3]"]),
    ("C_dtype", {"C": lambda k: k["C"].half()}, TypeError, ["C:", "Float", "Half"]),
    ("D_shape", {"D": lambda k: r(DIM - 1)}, ValueError, ["D:", "[8]", "[7]"]),
    ("D_rank", {"D": lambda k: r(1, DIM)}, ValueError, ["D:", "[8]", "[1, 8]"]),
    ("D_dtype", {"D": lambda k: k["D"].half()}, TypeError, ["D:", "Float", "Half"]),
    ("z_shape", {"z": lambda k: k["z"][:, :-1]}, ValueError, ["z:", "[2, 8, 16]", "[2, 7, 16]"]),
    ("z_dtype", {"z": lambda k: k["z"].bfloat16()}, TypeError, ["z:", "Float", "BFloat16"]),
    ("delta_bias_shape", {"delta_bias": lambda k: r(DIM + 2)}, ValueError,
     ["delta_bias:", "[8]", "[10]"]),
    ("delta_bias_dtype", {"delta_bias": lambda k: k["delta_bias"].double()}, TypeError,
     ["delta_bias:", "Float", "Double"]),
    ("initial_state_shape", {"initial_state": lambda k: r(BATCH, DIM, DSTATE + 1)}, ValueError,
     ["initial_state:", "[2, 8, 4]", "[2, 8, 5]"]),
    ("initial_state_rank", {"initial_state": lambda k: r(DIM, DSTATE)}, ValueError,
     ["initial_state:", "[2, 8, 4]", "[8, 4]"]),
    ("initial_state_batch", {"initial_state": lambda k: r(BATCH + 1, DIM, DSTATE)}, ValueError,
     ["initial_state:", "[2, 8, 4]", "[3, 8, 4]"]),
    ("initial_state_dtype", {"initial_state": lambda k: k["initial_state"].bfloat16()}, TypeError,
     ["initial_state:", "Float", "BFloat16"]),
]


def check_raises(kw, changes, exc, fragments):
    """Applies `changes` to the inputs `kw`; the call must raise `exc` with every fragment in its
    message."""
    for arg, fn in changes.items():
        kw[arg] = fn(kw)
    with pytest.raises(exc) as info:
        call(kw)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in the message {msg!r}"


@pytest.mark.parametrize("name,changes,exc,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, changes, exc, fragments):
    check_raises(base(), changes, exc, fragments)


@CUDA
@pytest.mark.parametrize("name", ["u_rank", "delta_shape", "A_dim_mismatch", "A_dstate_0"])
def test_bad_input_on_cuda(name):
    """Some of the cases above with CUDA tensors, whose messages print shapes and numbers: the
    extension formats those without std::ostream (csrc/message_text.h); with libstdc++ linked into
    the extension statically, as some toolchains do, inserting an integer into the message's stream
    crashed the process."""
    _, changes, exc, fragments = next(c for c in CASES if c[0] == name)
    check_raises(base(device="cuda"), changes, exc, fragments)


LOWP_CASES = [
    ("delta_dtype_mismatch", {"delta": lambda k: k["delta"].half()}, TypeError,
     ["delta:", "BFloat16", "Half"]),
    ("B_other_half_type", {"B": lambda k: k["B"].half()}, TypeError, ["B:", "BFloat16", "Float", "Half"]),
    ("C_fp64", {"C": lambda k: k["C"].double()}, TypeError, ["C:", "BFloat16", "Double"]),
    ("z_fp32", {"z": lambda k: k["z"].float()}, TypeError, ["z:", "BFloat16", "Float"]),
    ("A_bf16", {"A": lambda k: k["A"].bfloat16()}, TypeError, ["A:", "Float", "BFloat16"]),
    ("D_bf16", {"D": lambda k: k["D"].bfloat16()}, TypeError, ["D:", "Float", "BFloat16"]),
    ("initial_state_bf16", {"initial_state": lambda k: k["initial_state"].bfloat16()}, TypeError,
     ["initial_state:", "Float", "BFloat16"]),
]


@pytest.mark.parametrize("name,changes,exc,fragments", LOWP_CASES, ids=[c[0] for c in LOWP_CASES])
def test_bad_input_bf16(name, changes, exc, fragments):
    check_raises(base(dtype=torch.bfloat16), changes, exc, fragments)


def test_fp64_inputs_need_fp64_A():
    kw = base(dtype=torch.float64)
    kw["A"] = kw["A"].float()
    with pytest.raises(TypeError, match=r"A: expected dtype Double, got Float"):
        call(kw)


def _bwd_args(kw):
    ckpt = torch.empty(BATCH, DIM, (SEQLEN + selective_scan.CHECKPOINT_CHUNK - 1)
                       // selective_scan.CHECKPOINT_CHUNK, DSTATE)
    return dict(dout=torch.randn_like(kw["u"]), dlast_state=torch.randn(BATCH, DIM, DSTATE),
                checkpoints=ckpt)


def _call_bwd(kw, extra):
    return torch.ops.selective_scan.bwd(
        extra["dout"], extra["dlast_state"], kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"],
        kw["D"], kw["z"], kw["delta_bias"], kw["initial_state"], extra["checkpoints"],
        kw["delta_softplus"])


BWD_CASES = [
    ("dout_shape", "dout", lambda t: t[..., :-1], ValueError, ["dout:", "[2, 8, 16]", "[2, 8, 15]"]),
    ("dout_dtype", "dout", lambda t: t.double(), TypeError, ["dout:", "Float", "Double"]),
    ("dlast_state_shape", "dlast_state", lambda t: t[:, :, :-1], ValueError,
     ["dlast_state:", "[2, 8, 4]", "[2, 8, 3]"]),
    ("dlast_state_dtype", "dlast_state", lambda t: t.half(), TypeError, ["dlast_state:", "Float", "Half"]),
    ("checkpoints_shape", "checkpoints", lambda t: t[:, :, :, :-1], ValueError,
     ["checkpoints:", "[2, 8, 1, 4]", "[2, 8, 1, 3]"]),
    ("checkpoints_dtype", "checkpoints", lambda t: t.double(), TypeError,
     ["checkpoints:", "Float", "Double"]),
]


@pytest.mark.parametrize("name,arg,fn,exc,fragments", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_bad_input_bwd_op(name, arg, fn, exc, fragments):
    kw = base()
    extra = _bwd_args(kw)
    extra[arg] = fn(extra[arg])
    with pytest.raises(exc) as info:
        _call_bwd(kw, extra)
    for frag in fragments:
        assert frag in str(info.value), f"{frag!r} not in the message {str(info.value)!r}"


def test_bad_input_fwd_op_directly():
    kw = base()
    with pytest.raises(ValueError, match=r"B: expected n_groups dividing dim = 8, got n_groups = 3"):
        torch.ops.selective_scan.fwd(kw["u"], kw["delta"], kw["A"], r(BATCH, 3, DSTATE, SEQLEN),
                                     kw["C"], kw["D"], kw["z"], kw["delta_bias"],
                                     kw["initial_state"], True)


@CUDA
@pytest.mark.parametrize("arg", ["delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_device_mismatch(arg):
    kw = base(device="cuda")
    kw[arg] = kw[arg].cpu()
    with pytest.raises(RuntimeError) as info:
        call(kw)
    msg = str(info.value)
    assert f"{arg}:" in msg and "cuda" in msg and "cpu" in msg, msg


@CUDA
def test_u_on_cpu_others_on_cuda():
    kw = base(device="cuda")
    kw["u"] = kw["u"].cpu()
    with pytest.raises(RuntimeError) as info:
        call(kw)
    msg = str(info.value)
    assert "delta:" in msg and "cuda" in msg and "cpu" in msg, msg


@CUDA
def test_fp64_on_cuda_rejected():
    kw = base(device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError) as info:
        call(kw)
    msg = str(info.value)
    assert "u:" in msg and "float64" in msg and "CPU" in msg and "cuda" in msg, msg
