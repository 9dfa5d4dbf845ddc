"""Tests of selective_scan.nn: the SelectiveScan module, the Mamba block (parameter names, shapes,
initialisation, forward and gradients against a float64 plain-PyTorch block, bf16), RMSNorm, Block,
MambaLMHeadModel (mamba-ssm names, vocab padding, tying, config checks) and the HF converter."""
import math

import pytest
import torch
import torch.nn.functional as F

from selective_scan import selective_scan, selective_scan_ref
from selective_scan.nn import (Block, Mamba, MambaConfig, MambaLMHeadModel, RMSNorm, SelectiveScan,
                               from_hf_state_dict, load_hf_mamba_state_dict, mamba_config_from_hf)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


def mamba_block_f64(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """The Mamba-1 block in float64 plain PyTorch (the scan by the sequential reference)."""
    p = {k: v.detach().double() for k, v in m.named_parameters()}
    L = h.shape[1]
    xz = F.linear(h.double(), p["in_proj.weight"], p.get("in_proj.bias"))
    x, z = xz.chunk(2, dim=-1)
    x = F.conv1d(x.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=m.d_conv - 1,
                 groups=m.d_inner)[..., :L]
    x = F.silu(x)
    x_dbl = x.transpose(1, 2) @ p["x_proj.weight"].T
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    y = selective_scan_ref(x, dt.transpose(1, 2), -torch.exp(p["A_log"]), B.transpose(1, 2), C.transpose(1, 2),
                           p["D"], z.transpose(1, 2))
    return F.linear(y.transpose(1, 2), p["out_proj.weight"], p.get("out_proj.bias"))


def small_mamba(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=16, d_state=8, d_conv=4, expand=2)
    args.update(kw)
    return Mamba(**args)


def test_selective_scan_module_calls_the_op():
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 4, 10, generator=g), torch.randn(2, 4, 10, generator=g)
    A = -torch.rand(4, 3, generator=g)
    B, C = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    bias = torch.randn(4, generator=g)
    mod = SelectiveScan(delta_softplus=True)
    out, last = mod(u, delta, A, B, C, delta_bias=bias, return_last_state=True)
    ref, ref_last = selective_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(last, ref_last, rtol=0, atol=0)
    ref64 = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double(),
                               delta_bias=bias.double(), delta_softplus=True)
    torch.testing.assert_close(out.double(), ref64, rtol=1e-4, atol=1e-5)
    assert "delta_softplus=True" in repr(mod)


def test_mamba_parameters_and_init():
    m = small_mamba(d_model=40, d_state=16, dt_min=0.001, dt_max=0.1)
    d_inner, dt_rank = 80, math.ceil(40 / 16)
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert shapes == {
        "A_log": (d_inner, 16), "D": (d_inner,), "in_proj.weight": (2 * d_inner, 40),
        "conv1d.weight": (d_inner, 1, 4), "conv1d.bias": (d_inner,), "x_proj.weight": (dt_rank + 32, d_inner),
        "dt_proj.weight": (d_inner, dt_rank), "dt_proj.bias": (d_inner,), "out_proj.weight": (40, d_inner)}
    assert m.conv1d.groups == d_inner and m.conv1d.padding == (3,)
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1, 17, dtype=torch.float32).repeat(d_inner, 1))
    torch.testing.assert_close(m.D, torch.ones(d_inner))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.A_log.dtype == m.D.dtype == torch.float32
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.std() > 0.005  # spread log-uniformly, not constant
    std = dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= std and m.dt_proj.weight.abs().max() > 0.5 * std


def test_mamba_dt_init_options():
    m = small_mamba(dt_init="constant", dt_scale=2.0, dt_rank=4, dt_init_floor=0.05, dt_min=0.001, dt_max=0.01)
    torch.testing.assert_close(m.dt_proj.weight, torch.full_like(m.dt_proj.weight, 2.0 * 4 ** -0.5))
    torch.testing.assert_close(F.softplus(m.dt_proj.bias), torch.full((32,), 0.05), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dt_init"):
        small_mamba(dt_init="nope")


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_forward_matches_float64_block(device):
    m = small_mamba(seed=1, bias=True).to(device)
    with torch.no_grad():  # move every parameter off its init so each one matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = torch.randn(2, 23, 16, device=device)
    out = m(h)
    assert out.shape == (2, 23, 16) and out.dtype == torch.float32
    m_cpu = m.cpu()
    ref = mamba_block_f64(m_cpu, h.cpu())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-4, atol=2e-5)


def test_mamba_gradients_match_float64_block():
    m = small_mamba(seed=2)
    h = torch.randn(2, 19, 16, requires_grad=True)
    w = torch.randn(2, 19, 16)
    (m(h) * w).sum().backward()
    m64 = small_mamba(seed=2).double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    h64 = h.detach().double().requires_grad_()
    params64 = dict(m64.named_parameters())
    out = mamba_block_f64_autograd(m64, h64)
    (out * w.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-3, atol=1e-5)
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad.double(), params64[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def mamba_block_f64_autograd(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """mamba_block_f64 with gradients flowing to m's (float64) parameters."""
    L = h.shape[1]
    x, z = m.in_proj(h).chunk(2, dim=-1)
    x = F.silu(m.conv1d(x.transpose(1, 2))[..., :L])
    dt, B, C = torch.split(m.x_proj(x.transpose(1, 2)), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(m.dt_proj(dt))
    y = selective_scan_ref(x, dt.transpose(1, 2), -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2),
                           m.D, z.transpose(1, 2))
    return m.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_bf16_autocast(device):
    m = small_mamba(seed=3).to(device)
    h = torch.randn(2, 12, 16, device=device)
    ref = m(h)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = m(h)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.03)
    out.float().sum().backward()
    assert m.A_log.grad is not None and m.dt_proj.bias.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_bf16_weights(device):
    m = small_mamba(seed=4).to(device)
    h = torch.randn(2, 12, 16, device=device)
    ref = m(h)
    mb = small_mamba(seed=4).to(device).to(torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    out = mb(h.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)
    out.float().sum().backward()
    assert mb.A_log.grad.dtype == torch.bfloat16 and mb.in_proj.weight.grad.abs().sum() > 0


class Mixer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, h, inference_params=None):
        return self.lin(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_against_float64(device, dtype):
    """RMSNorm computes in fp32 and rounds once to x's dtype: against the float64 formula, fp32 to a
    few ulps, bf16 to within one bf16 rounding."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 3, 768, generator=g) * 3).to(dtype)
    weight = (1 + 0.2 * torch.randn(768, generator=g)).to(dtype)
    norm = RMSNorm(768, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    out = norm(x.to(device))
    assert out.dtype == dtype and out.shape == x.shape
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    err = ((out.cpu().double() - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
    assert err <= (1e-6 if dtype == torch.float32 else 2 ** -8), err


def test_rms_norm_and_block():
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    x = torch.randn(3, 8, generator=g)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm.bias is None and [k for k, _ in norm.named_parameters()] == ["weight"]

    block = Block(8, Mixer, norm_cls=lambda d: RMSNorm(d), residual_in_fp32=True)
    h, r = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    out, res = block(h, r)
    torch.testing.assert_close(res, h + r)
    torch.testing.assert_close(out, block.mixer(block.norm(h + r)))
    _, res0 = block(h)
    torch.testing.assert_close(res0, h)
    with pytest.raises(NotImplementedError, match="MLP"):
        Block(8, lambda d: torch.nn.Identity(), mlp_cls=lambda d: torch.nn.Linear(d, d))


def mamba_ssm_keys(n_layer, bias=False, conv_bias=True):
    keys = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(n_layer):
        pre = f"backbone.layers.{i}."
        keys |= {pre + "norm.weight", pre + "mixer.A_log", pre + "mixer.D", pre + "mixer.in_proj.weight",
                 pre + "mixer.x_proj.weight", pre + "mixer.dt_proj.weight", pre + "mixer.dt_proj.bias",
                 pre + "mixer.out_proj.weight", pre + "mixer.conv1d.weight"}
        if conv_bias:
            keys.add(pre + "mixer.conv1d.bias")
        if bias:
            keys |= {pre + "mixer.in_proj.bias", pre + "mixer.out_proj.bias"}
    return keys


def tiny_config(**kw):
    args = dict(d_model=16, n_layer=2, vocab_size=37, ssm_cfg=dict(d_state=4), pad_vocab_size_multiple=8)
    args.update(kw)
    return MambaConfig(**args)


def test_lm_names_padding_tying_and_init():
    torch.manual_seed(0)
    model = MambaLMHeadModel(tiny_config())
    sd = model.state_dict()
    assert set(sd) == mamba_ssm_keys(2)
    assert sd["backbone.embedding.weight"].shape == (40, 16)  # 37 padded to a multiple of 8
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.005
    # out_proj rescaled by 1/sqrt(n_layer): kaiming-uniform bound 1/sqrt(fan_in) / sqrt(2)
    bound = 1 / math.sqrt(32) / math.sqrt(2)
    w = model.backbone.layers[0].mixer.out_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    # dt_proj.bias keeps its inverse-softplus init (not zeroed by the LM init)
    assert model.backbone.layers[0].mixer.dt_proj.bias.abs().min() > 1.0
    untied = MambaLMHeadModel(tiny_config(tie_embeddings=False, rms_norm=False))
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    assert "backbone.norm_f.bias" in untied.state_dict()  # LayerNorm


def test_mamba_ssm_state_dict_loads():
    """A state_dict with mamba-ssm's names and shapes (here: another instance's) loads strictly and
    gives the same logits."""
    torch.manual_seed(1)
    src = MambaLMHeadModel(tiny_config(ssm_cfg=dict(d_state=4, bias=True)))
    torch.manual_seed(2)
    dst = MambaLMHeadModel(tiny_config(ssm_cfg=dict(d_state=4, bias=True)))
    ids = torch.randint(0, 37, (2, 9))
    assert not torch.allclose(src(ids).logits, dst(ids).logits)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert set(sd) == mamba_ssm_keys(2, bias=True)
    dst.load_state_dict(sd)
    torch.testing.assert_close(dst(ids).logits, src(ids).logits, rtol=0, atol=0)


def test_lm_forward_shapes_and_num_last_tokens():
    torch.manual_seed(3)
    model = MambaLMHeadModel(tiny_config())
    ids = torch.randint(0, 37, (3, 11))
    logits = model(ids).logits
    assert logits.shape == (3, 11, 40)
    torch.testing.assert_close(model(ids, num_last_tokens=2).logits, logits[:, -2:])
    causal = model(ids[:, :6]).logits  # causal: a prefix's logits do not see the future
    torch.testing.assert_close(causal, logits[:, :6], rtol=1e-5, atol=1e-5)


def test_lm_training_step_reduces_loss():
    torch.manual_seed(4)
    model = MambaLMHeadModel(tiny_config())
    ids = torch.randint(0, 37, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("kw, match", [
    (dict(d_intermediate=64), "d_intermediate"),
    (dict(attn_layer_idx=[1]), "attn_layer_idx"),
    (dict(ssm_cfg=dict(layer="Mamba2")), "Mamba2"),
])
def test_unsupported_configs_are_rejected(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        MambaLMHeadModel(tiny_config(**kw))


def to_hf(model: MambaLMHeadModel, drop_lm_head=False):
    """Our state_dict under transformers' MambaForCausalLM names, and the matching config dict."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "backbone.embedding.weight":
            sd["backbone.embeddings.weight"] = v.clone()
        elif not (drop_lm_head and k == "lm_head.weight"):
            sd[k] = v.clone()
    c = model.config
    mixer = model.backbone.layers[0].mixer
    cfg = dict(hidden_size=c.d_model, state_size=mixer.d_state, num_hidden_layers=c.n_layer,
               vocab_size=c.padded_vocab_size(), conv_kernel=mixer.d_conv, expand=mixer.expand,
               intermediate_size=mixer.d_inner, time_step_rank=mixer.dt_rank, use_bias=False,
               use_conv_bias=True, layer_norm_epsilon=c.norm_epsilon, residual_in_fp32=True,
               tie_word_embeddings=c.tie_embeddings, model_type="mamba")
    return sd, cfg


def test_hf_converter_synthetic_checkpoint():
    torch.manual_seed(5)
    src = MambaLMHeadModel(tiny_config(d_model=24, ssm_cfg=dict(d_state=6, d_conv=3)))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd, cfg = to_hf(src)
    assert "backbone.embeddings.weight" in sd and "backbone.embedding.weight" not in sd
    model = from_hf_state_dict(sd, cfg)
    conf = model.config
    assert (conf.d_model, conf.n_layer, conf.vocab_size, conf.pad_vocab_size_multiple) == (24, 2, 40, 1)
    assert conf.ssm_cfg == dict(d_state=6, d_conv=3, expand=2, dt_rank=2, bias=False, conv_bias=True)
    ids = torch.randint(0, 37, (2, 7))
    torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=0, atol=0)
    # A tied checkpoint that omits lm_head.weight, through the classmethod and an object config.
    sd2, cfg2 = to_hf(src, drop_lm_head=True)
    obj = type("HFConfig", (), dict(cfg2, time_step_rank="auto"))()
    model2 = MambaLMHeadModel.from_hf_state_dict(sd2, obj)
    assert model2.lm_head.weight is model2.backbone.embedding.weight
    torch.testing.assert_close(model2(ids).logits, src(ids).logits, rtol=0, atol=0)


def test_hf_converter_errors_and_config_mapping():
    cfg = mamba_config_from_hf(dict(hidden_size=40, state_size=8, num_hidden_layers=3, vocab_size=100,
                                    conv_kernel=4, expand=2, time_step_rank="auto", use_bias=True,
                                    use_conv_bias=False, layer_norm_epsilon=1e-6, residual_in_fp32=False,
                                    tie_word_embeddings=False))
    assert cfg.ssm_cfg["dt_rank"] == 3 and cfg.ssm_cfg["bias"] and not cfg.ssm_cfg["conv_bias"]
    assert cfg.norm_epsilon == 1e-6 and not cfg.residual_in_fp32 and not cfg.tie_embeddings and cfg.rms_norm
    with pytest.raises(KeyError, match="unexpected keys"):
        load_hf_mamba_state_dict({"backbone.embeddings.weight": torch.zeros(1), "foo.bar": torch.zeros(1)})
    with pytest.raises(KeyError, match="lm_head"):
        load_hf_mamba_state_dict({"backbone.embeddings.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="intermediate_size"):
        mamba_config_from_hf(dict(hidden_size=16, num_hidden_layers=1, vocab_size=8, intermediate_size=48))
