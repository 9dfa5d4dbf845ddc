"""Tests of O(1)-per-token generation: the causal-conv1d state step, prefill + fused steps against one
scan over the whole sequence (op level and block level), greedy generation with the cache against
re-running the full sequence, constant cache size, sampling (top-k, top-p, temperature) and eos."""
import pytest
import torch
import torch.nn.functional as F

from selective_scan import selective_scan, selective_scan_ref, selective_state_update
from selective_scan.nn import (DecodeStepGraph, InferenceParams, Mamba, MambaConfig, MambaLMHeadModel, causal_conv1d_step,
                               sample_logits)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


def perturbed(module, scale=0.05, seed=0):
    """Move every parameter off its init (so each one matters) and return the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return module


def test_causal_conv1d_step_matches_conv1d():
    g = torch.Generator().manual_seed(0)
    dim, width, L = 6, 4, 9
    x = torch.randn(2, dim, L, generator=g)
    w, b = torch.randn(dim, 1, width, generator=g), torch.randn(dim, generator=g)
    full = F.silu(F.conv1d(x, w, b, padding=width - 1, groups=dim)[..., :L])
    state = torch.zeros(2, dim, width)
    for t in range(L):
        y = causal_conv1d_step(x[:, :, t], state, w, b)
        torch.testing.assert_close(y, full[:, :, t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[:, :, -width:])  # the last `width` inputs, oldest first


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [None, 2])
def test_scan_prefix_then_steps_equal_one_scan(device, groups):
    """selective_scan over a prefix (return_last_state) then selective_state_update per token gives
    the outputs and last state of one scan over the whole sequence (float64 reference)."""
    g = torch.Generator().manual_seed(1)
    batch, dim, dstate, L, P = 2, 8, 16, 20, 13
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    u, delta, z = r(batch, dim, L), r(batch, dim, L) * 0.5, r(batch, dim, L)
    A = (-torch.rand(dim, dstate, generator=g) - 0.1).to(device)
    bc_shape = (batch, dstate, L) if groups is None else (batch, groups, dstate, L)
    B, C = r(*bc_shape), r(*bc_shape)
    D, bias = r(dim), r(dim) * 0.5
    ref, ref_last = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                                       z.double(), bias.double(), True, True)
    out_p, state = selective_scan(u[..., :P], delta[..., :P], A, B[..., :P], C[..., :P], D, z[..., :P], bias, True,
                                  return_last_state=True)
    outs = [out_p]
    for t in range(P, L):
        outs.append(selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t],
                                           bias, True)[..., None])
    torch.testing.assert_close(torch.cat(outs, -1).double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.double().cpu(), ref_last.cpu(), rtol=1e-4, atol=1e-5)
    # initial_state: the scan of the suffix from the prefix's state gives the same again.
    _, mid = selective_scan(u[..., :P], delta[..., :P], A, B[..., :P], C[..., :P], D, z[..., :P], bias, True,
                            return_last_state=True)
    out_s, last = selective_scan(u[..., P:], delta[..., P:], A, B[..., P:], C[..., P:], D, z[..., P:], bias, True,
                                 return_last_state=True, initial_state=mid)
    torch.testing.assert_close(out_s.double().cpu(), ref[..., P:].cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double().cpu(), ref_last.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prompt", [2, 9])
def test_block_prefill_steps_and_chunks_equal_full_forward(device, prompt):
    """The Mamba block with a cache: prefill (shorter or longer than d_conv), then single tokens
    (fused step), then a chunk of tokens (scan from the cached states) equals one forward."""
    torch.manual_seed(2)
    m = perturbed(Mamba(d_model=16, d_state=8, d_conv=4, layer_idx=0)).to(device)
    h = torch.randn(2, prompt + 9, 16, device=device)
    full = m(h)
    params = InferenceParams(max_seqlen=h.shape[1], max_batch_size=2)
    outs = [m(h[:, :prompt], inference_params=params)]
    params.seqlen_offset += prompt
    for t in range(prompt, prompt + 5):
        outs.append(m(h[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    outs.append(m(h[:, prompt + 5:], inference_params=params))  # a 4-token chunk
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def small_lm(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_layer=2, vocab_size=61, ssm_cfg=dict(d_state=8), pad_vocab_size_multiple=8)
    args.update(kw)
    return perturbed(MambaLMHeadModel(MambaConfig(**args)), scale=0.05, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_with_cache_equals_full_recompute(device):
    model = small_lm(seed=3).to(device).eval()
    ids = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(3)).to(device)
    out, logits = model.generate(ids, 24, temperature=0, output_logits=True)
    ref, ref_logits = model.generate(ids, 24, temperature=0, use_cache=False, output_logits=True)
    assert out.shape == (3, 31) and torch.equal(out[:, :7], ids)
    assert torch.equal(out, ref)
    assert logits.shape == (3, 24, 61)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(set(out[:, 7:].flatten().tolist())) > 3  # not a degenerate constant output
    assert torch.equal(model.generate(ids, 24, top_k=1), out)  # top_k = 1 is greedy too


def test_generation_bf16_autocast_runs_from_a_bf16_cache():
    model = small_lm(seed=4).eval()
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = model.generate(ids, 8, temperature=0, output_logits=True)
        _, ref_logits = model.generate(ids, 8, temperature=0, use_cache=False, output_logits=True)
    fp32_out = model.generate(ids, 8, temperature=0)
    assert out.shape == (2, 13)
    assert torch.equal(out[:, :6], fp32_out[:, :6])  # the first token: bf16 noise is far below the margins
    torch.testing.assert_close(logits[:, 0], ref_logits[:, 0], rtol=0.05, atol=0.05)


def test_cache_size_is_constant_and_steps_take_one_token():
    model = small_lm(seed=5).eval()
    seen = []
    model.backbone.embedding.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    ids = torch.randint(0, 61, (2, 6))
    params = InferenceParams(max_seqlen=100, max_batch_size=2)
    with torch.no_grad():
        logits = model(ids, inference_params=params).logits
        params.seqlen_offset += 6
        sizes = {params.cache_numel()}
        shapes = {tuple(tuple(t.shape) for pair in params.key_value_memory_dict.values() for t in pair)}
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(40):
            logits = model(token, inference_params=params).logits
            params.seqlen_offset += 1
            token = logits[:, -1].argmax(-1, keepdim=True)
            sizes.add(params.cache_numel())
            shapes.add(tuple(tuple(t.shape) for pair in params.key_value_memory_dict.values() for t in pair))
    d_inner = 64
    assert sizes == {2 * 2 * d_inner * (4 + 8)}  # layers x batch x d_inner x (d_conv + d_state)
    assert len(shapes) == 1
    assert seen == [(2, 6)] + [(2, 1)] * 40


def test_sampling_top_k_top_p_temperature():
    g = torch.Generator().manual_seed(6)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    draws = sample_logits(logits, temperature=1.0, top_k=3, generator=g)
    assert set(draws.tolist()) == {0, 1, 2}
    # top_p = 0.8: softmax of the row is (.64, .24, .09, ...): the nucleus is {0, 1}.
    draws = sample_logits(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(draws.tolist()) == {0, 1}
    p0 = (draws == 0).float().mean().item()
    assert abs(p0 - 0.64 / 0.88) < 0.03
    # High temperature flattens the distribution; zero is greedy.
    hot = sample_logits(logits, temperature=100.0, generator=g)
    assert len(set(hot.tolist())) == 6
    assert torch.equal(sample_logits(logits[:2], temperature=0), torch.zeros(2, dtype=torch.long))


def test_generate_sampling_is_reproducible_and_stops_at_eos():
    model = small_lm(seed=7).eval()
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(7))
    a = model.generate(ids, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 14)
    greedy = model.generate(ids, 10, temperature=0)
    eos = int(greedy[0, 6])  # the 3rd generated token of row 0
    out = model.generate(ids, 10, temperature=0, eos_token_id=eos)
    assert torch.equal(out[0, :7], greedy[0, :7])
    assert (out[0, 7:] == eos).all()
    if (greedy[1, 4:] != eos).all():  # row 1 never emits eos: it runs to max_new_tokens
        assert out.shape == (2, 14) and torch.equal(out[1], greedy[1])


@pytest.mark.cuda
@CUDA
def test_generation_with_cuda_graph_equals_eager():
    """cuda_graph=True replays one captured decode step per token: the same tokens as the eager
    steps, greedy and sampled with the same generator, for a batch and for prompts of different
    lengths, with the logits of the same kernels; the cache ends where the eager one does."""
    model = small_lm(seed=9).cuda().eval()
    ids = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(9)).cuda()
    out, logits = model.generate(ids, 20, temperature=0, output_logits=True, cuda_graph=True)
    ref, ref_logits = model.generate(ids, 20, temperature=0, output_logits=True)
    assert torch.equal(out, ref) and len(set(out[:, 7:].flatten().tolist())) > 1  # not one constant token
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits[:, 1], logits[:, 2])  # each step's logits kept, not the last buffer
    g1, g2 = (torch.Generator(device="cuda").manual_seed(5) for _ in range(2))
    sampled = model.generate(ids, 12, temperature=1.0, top_k=10, generator=g1, cuda_graph=True)
    assert torch.equal(sampled, model.generate(ids, 12, temperature=1.0, top_k=10, generator=g2))
    prompts = [torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(n)).cuda() for n in (5, 1, 9)]
    got = model.generate(prompts, 8, temperature=0, cuda_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, model.generate(prompts, 8, temperature=0)))
    # the captured step advances the caller's cache in place, as the eager step does
    params = {}
    with torch.no_grad():
        for graph in (False, True):
            p = InferenceParams(max_seqlen=32, max_batch_size=3)
            model(ids, inference_params=p)
            p.seqlen_offset = ids.shape[1]
            step = ids[:, -1:]
            if graph:
                g = DecodeStepGraph(model, p, step)
                for _ in range(3):
                    g.step(step)
            else:
                for _ in range(3):
                    model(step, inference_params=p, num_last_tokens=1)
            params[graph] = p
    for layer, (conv, ssm) in params[False].key_value_memory_dict.items():
        conv_g, ssm_g = params[True].key_value_memory_dict[layer]
        torch.testing.assert_close(conv_g, conv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ssm_g, ssm, rtol=1e-5, atol=1e-5)


def test_cuda_graph_generation_needs_the_cache_on_a_cuda_device():
    model = small_lm(seed=10).eval()
    ids = torch.randint(0, 61, (2, 4))
    with pytest.raises(ValueError, match=r"cuda_graph: expected use_cache=True and input_ids on a CUDA device, "
                                         r"got use_cache=True and device cpu"):
        model.generate(ids, 2, cuda_graph=True)
    with pytest.raises(ValueError, match=r"got use_cache=False"):
        model.generate([ids[0], ids[1]], 2, cuda_graph=True, use_cache=False)
    with pytest.raises(ValueError, match=r"input_ids: expected at least one prompt, got an empty list"):
        model.generate([], 2, cuda_graph=True)
