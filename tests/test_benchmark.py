"""The benchmark script runs end to end on a tiny shape and writes the documented JSON: a machine
header and one record per provider and direction, with times and peak memory."""
import importlib.util
import json
import os
import sys

import pytest

from scan_utils import DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"provider", "batch", "dim", "seqlen", "dstate", "dtype", "has_z", "direction", "median_us",
          "p20_us", "p80_us", "peak_mem_bytes"}


def _load_script(name):
    """benchmarks/<name>.py as a module (benchmarks/ on the path while it loads: op_breakdown
    imports bench_scan)."""
    folder = os.path.join(ROOT, "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(folder)
    return mod


def _load_bench():
    return _load_script("bench_scan")


@pytest.mark.parametrize("device", DEVICES)
def test_benchmark_writes_json(device, tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    bench.main(["--device", device, "--quick", "--shapes", "2x8x70x4", "--dtypes", "fp32",
                "--providers", "selective_scan,ref_sequential,ref_parallel", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "median ms" in printed and "vs ref_sequential" in printed
    data = json.loads(out.read_text())
    machine = data["machine"]
    for key in ("cpu", "gpu", "torch", "cuda", "commit", "date"):
        assert key in machine
    records = data["records"]
    directions = {"fwd", "fwdbwd"} | ({"bwd"} if device == "cuda" else set())
    seen = {(r["provider"], r["direction"]) for r in records}
    assert seen == {(p, d) for p in ("selective_scan", "ref_sequential", "ref_parallel") for d in directions}
    for r in records:
        assert FIELDS <= set(r)
        assert (r["batch"], r["dim"], r["seqlen"], r["dstate"], r["dtype"]) == (2, 8, 70, 4, "fp32")
        assert r["has_z"] is True and r["skipped"] is None
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] > 0
    par = {r["direction"]: r["peak_mem_bytes"] for r in records if r["provider"] == "ref_parallel"}
    ours = {r["direction"]: r["peak_mem_bytes"] for r in records if r["provider"] == "selective_scan"}
    assert par["fwdbwd"] > ours["fwdbwd"]  # the materialised scan holds more than the op


@pytest.mark.parametrize("device", DEVICES)
def test_op_breakdown(device, tmp_path, capsys):
    """benchmarks/op_breakdown.py splits a forward and a backward by what runs (device kernels on
    CUDA, operators on the CPU): the op's own kernel or operator is a row of each table, the shares
    add up to one, and the JSON holds the machine header and both tables."""
    script = _load_script("op_breakdown")
    out = tmp_path / "breakdown.json"
    tables = script.main(["--device", device, "--shapes", "2x8x70x4", "--dtype", "fp32", "--calls", "2",
                          "--out", str(out)])
    assert "us per call" in capsys.readouterr().out
    assert [t["direction"] for t in tables] == ["fwd", "bwd"]
    for t in tables:
        names = [r["name"] for r in t["rows"]]
        own = f"scan_{t['direction']}_kernel" if device == "cuda" else f"selective_scan::{t['direction']}"
        assert any(own in n for n in names), f"{own} not among {names}"
        assert t["total_us"] > 0 and abs(sum(r["share"] for r in t["rows"]) - 1.0) < 1e-6
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == device and len(data["tables"]) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_host_cost(device, tmp_path, capsys):
    """benchmarks/host_cost.py times every case it names (a CUDA-graph replay on CUDA only) and
    writes them with the machine header."""
    script = _load_script("host_cost")
    out = tmp_path / "host.json"
    records = script.main(["--device", device, "--shapes", "1x8x70x4,2x4x9x2", "--dtype", "fp32", "--calls", "3",
                           "--rounds", "2", "--out", str(out)])
    assert "host time per call" in capsys.readouterr().out
    cases = ["op fwd", "op bwd", "autograd fwd", "autograd bwd", "no-work Function fwd",
             "no-work Function bwd", "autograd fwd+bwd"] + (["CUDA graph fwd+bwd"] if device == "cuda" else [])
    assert [(r["shape"], r["case"]) for r in records] == [(s, c) for s in ("1x8x70x4", "2x4x9x2") for c in cases]
    for r in records:
        assert 0 < r["host_min_us"] <= r["host_us"] <= r["host_max_us"] and r["wall_us"] > 0
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == device and data["records"] == records


@pytest.mark.parametrize("device", DEVICES)
def test_generate_benchmark(device, tmp_path, capsys):
    """benchmarks/bench_generate.py times eager generation (and the CUDA-graph one on CUDA) per
    batch and writes the records with the machine header."""
    script = _load_script("bench_generate")
    out = tmp_path / "generate.json"
    records = script.main(["--device", device, "--small", "--batches", "1,2", "--tokens", "4", "--reps", "1",
                           "--out", str(out)])
    assert "per token" in capsys.readouterr().out
    modes = ["eager"] + (["cuda_graph"] if device == "cuda" else [])
    assert [(r["batch"], r["mode"]) for r in records] == [(b, m) for b in (1, 2) for m in modes]
    for r in records:
        assert r["first_token_ms"] > 0 and r["tokens"] == 4
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == device and data["records"] == records


def test_op_breakdown_rejects_bad_arguments():
    script = _load_script("op_breakdown")
    with pytest.raises(SystemExit, match="BATCHxDIMxSEQLENxDSTATE"):
        script.main(["--device", "cpu", "--shapes", "2x8x70"])
    with pytest.raises(SystemExit, match="--directions"):
        script.main(["--device", "cpu", "--directions", "up"])


def test_benchmark_rejects_bad_shapes(tmp_path):
    bench = _load_bench()
    with pytest.raises(SystemExit, match="BATCHxDIMxSEQLENxDSTATE"):
        bench.main(["--device", "cpu", "--shapes", "2x8x70", "--out", str(tmp_path / "x.json")])


def test_floor_model_matches_the_h200_floors():
    """The floor model of the benchmark gives the documented H200 floors (docs/design.md): at
    (8, 1536, 2048, 16) bf16 the forward is bound by the exp rate (19 exps per element, 114 us) and
    the backward by FP32 issue (232 instructions per element, 175 us); fwdbwd is their sum."""
    bench = _load_bench()
    shape = (8, 1536, 2048, 16)
    exps, bytes_, fwd = bench.floor_model(shape, "bf16", "fwd", 132)
    assert exps == 8 * 1536 * 2048 * 19
    assert fwd == pytest.approx(8 * 1536 * 2048 * 19 / (132 * 16 * 1.98e9) * 1e6)
    assert 113 < fwd < 115
    _, _, bwd = bench.floor_model(shape, "bf16", "bwd", 132)
    assert 174 < bwd < 176
    assert bench.floor_model(shape, "bf16", "fwdbwd", 132)[2] == pytest.approx(fwd + bwd)
    # fp32 inputs move twice the bytes; at dstate 4 the forward becomes bound by HBM, not exps.
    assert bench.floor_model(shape, "fp32", "fwd", 132)[1] > 1.9 * bytes_
    _, bytes4, fwd4 = bench.floor_model((8, 1536, 2048, 4), "bf16", "fwd", 132)
    assert fwd4 == pytest.approx(bytes4 / 4.24e12 * 1e6)
    rec = {"batch": 8, "dim": 1536, "seqlen": 2048, "dstate": 16, "dtype": "bf16", "direction": "fwd",
           "median_us": 2 * fwd}
    bench.add_rates(rec, 132)
    assert rec["pct_of_floor"] == pytest.approx(50.0)
    assert rec["official_h200_us"] == 448
    assert rec["texp_per_s"] == pytest.approx(exps / (2 * fwd * 1e-6) / 1e12)


def test_gpu_cases_cover_the_sweeps():
    """The GPU run covers seqlen 128..65536 at (8, 1536, L, 16) and dstate 4..256 at (8, 1536, 2048),
    plus batch 1 and fp16; without sweeps only the anchor shapes run."""
    bench = _load_bench()
    cases = bench.bench_cases(bench.GPU_SHAPES, ["fp32", "bf16"], sweeps=True)
    seq = [s for s, dt, suite in cases if suite == "seqlen_sweep"]
    assert [s[2] for s in seq] == [2 ** k for k in range(7, 17)] and {s[:2] + s[3:] for s in seq} == {(8, 1536, 16)}
    nst = [s for s, dt, suite in cases if suite == "dstate_sweep"]
    assert [s[3] for s in nst] == [4, 8, 16, 32, 64, 128, 256] and {s[:3] for s in nst} == {(8, 1536, 2048)}
    off = [(s, dt) for s, dt, suite in cases if suite == "off_path"]
    assert any(s[0] == 1 for s, _ in off) and any(dt == "fp16" for _, dt in off)
    anchors = bench.bench_cases(bench.GPU_SHAPES, ["fp32", "bf16"], sweeps=False)
    assert len(anchors) == 2 * len(bench.GPU_SHAPES) and all(suite == "anchor" for _, _, suite in anchors)


def test_ab_table_compares_fastest_runs(tmp_path, capsys):
    """The `ab` stage's table: per shape, dtype and direction, each run's median and the change of
    the new build's fastest run against the baseline's (not the means: here those would give
    -23.2% and +23.8%); shapes only one side timed are left out."""
    ab = _load_script("ab_table")

    def write(name, fwd, bwd, extra=False):
        timings = [{"shape": [8, 1536, 2048, 16], "dtype": "torch.bfloat16", "fwd_us": fwd, "bwd_us": bwd}]
        if extra:
            timings.append({"shape": [1, 2, 3, 4], "dtype": "torch.float32", "fwd_us": 1.0, "bwd_us": 2.0})
        path = tmp_path / name
        path.write_text(json.dumps({"timings": timings}))
        return str(path)

    base = [write("b1.json", 400.0, 1000.0), write("b2.json", 420.0, 1100.0, extra=True)]
    new = [write("n1.json", 300.0, 1200.0), write("n2.json", 330.0, 1400.0)]
    ab.main(base + ["--"] + new)
    rows = {tuple(line.split()[:3]): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {("8x1536x2048x16", "bfloat16", "fwd"), ("8x1536x2048x16", "bfloat16", "bwd")}
    fwd, bwd = rows[("8x1536x2048x16", "bfloat16", "fwd")], rows[("8x1536x2048x16", "bfloat16", "bwd")]
    assert "400 420" in fwd and "300 330" in fwd and fwd.endswith("-25.0%")
    assert "1000 1100" in bwd and "1200 1400" in bwd and bwd.endswith("+20.0%")
    with pytest.raises(SystemExit):
        ab.main(base)


def _write_sass_page(path, kernels):
    """A CSV in the layout of ncu's SASS page: per kernel a "Kernel Name" line, the header, then one
    row per instruction (address, SASS, samples, executed, shared wavefronts, excessive, stalls)."""
    import csv
    import gzip
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "L1 Wavefronts Shared", "L1 Wavefronts Shared Excessive", "stall_short_sb", "stall_selected",
              "stall_short_sb (Not Issued)"]
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        for name, rows in kernels.items():
            w.writerow(["Kernel Name", name])
            w.writerow(header)
            for address, sass, samples, executed, wavefronts, excessive, short_sb in rows:
                w.writerow([hex(address), sass, samples, executed, wavefronts, excessive, short_sb,
                            samples - short_sb, 999])


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_ncu_sass_summary(tmp_path, capsys, suffix):
    summary = _load_script("ncu_sass_summary")
    base = 0x7f0000001000
    loop_kernel = [  # a prologue, a five-instruction loop run 800000 times by all warps, an epilogue
        (base + 0x00, "LDC R1, c[0x0][0x28]", 10, 8, 0, 0, 0),
        (base + 0x10, "LDS.128 R4, [R2]", 30, 800000, 3200000, 0, 20),
        (base + 0x20, "SHFL.BFLY PT, R5, R4, 0x1, 0x1f", 20, 800000, 0, 0, 10),
        (base + 0x30, "FADD R6, R4, R5", 100, 800000, 0, 0, 90),
        (base + 0x40, "STS [R3], R6", 30, 800000, 3200000, 2400000, 0),
        (base + 0x50, f"@P0 BRA {base + 0x10:#x}", 10, 800000, 0, 0, 0),
        (base + 0x60, "EXIT", 0, 8, 0, 0, 0),
    ]
    path = tmp_path / f"page{suffix}"
    _write_sass_page(path, {"kernel_a(int)": loop_kernel, "kernel_b(float)": loop_kernel[:1]})
    kernels = summary.read_kernels(str(path))
    assert list(kernels) == ["kernel_a(int)", "kernel_b(float)"]
    assert [len(r) for r in kernels.values()] == [7, 1]
    assert summary.loops(kernels["kernel_a(int)"]) == [(1, 5)]
    summary.main([str(path), "--kernel", "kernel_a", "--top", "2", "--window", "0x30", "0x40"])
    out = capsys.readouterr().out
    assert "kernel_b" not in out
    assert "warp instructions 4.0 M, stall samples 200, shared wavefronts 6.4 M (excessive 2.4 M)" in out
    # stall reasons over the issued-or-not samples only (the "(Not Issued)" columns are left out)
    assert "short_sb 60.0%, selected 40.0%" in out
    # the loop: 190 of 200 samples, all but 16 of the instructions, 5 per trip, its wavefronts and
    # shuffles
    loop_line = next(line for line in out.splitlines() if line.strip().startswith("0x10-"))
    assert loop_line.split()[1:] == ["0x50", "n=5", "95.0%", "100.0%", "5", "6.4", "/", "2.4", "0.8"]
    top = out.split("top 2 instructions by samples")[1].splitlines()[1:3]
    assert top[0].split()[:3] == ["0x30", "100", "short_sb"] and top[1].split()[:2] in (["0x10", "30"], ["0x40", "30"])
    window = out.split("instructions 0x30-0x40")[1].splitlines()[1:]
    assert [w.split()[0] for w in window] == ["0x30", "0x40"]


def test_ncu_sass_summary_rejects_a_page_without_kernels(tmp_path):
    summary = _load_script("ncu_sass_summary")
    empty = tmp_path / "empty.csv"
    empty.write_text("nothing here\n")
    with pytest.raises(SystemExit, match="no kernel"):
        summary.main([str(empty)])


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_benchmark_writes_json(device, tmp_path):
    bench = _load_script("bench_varlen")
    out = tmp_path / "varlen.json"
    bench.main(["--device", device, "--num-seqs", "4", "--min-len", "3", "--max-len", "40", "--dim", "8",
                "--dstate", "4", "--reps", "2", "--dtype", "fp32", "--block", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"date", "commit", "torch", "device"} <= set(result["machine"])
    case = result["case"]
    assert case["num_seqs"] == 4 and case["total_steps"] == sum(case["lengths"])
    records = result["records"]
    assert {(r["provider"], r["direction"]) for r in records} == {
        (p, d) for p in ("varlen", "padded_batch", "per_sequence", "block_varlen", "block_padded_batch",
                         "block_per_sequence") for d in ("fwd", "fwdbwd")}
    for r in records:
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
    steps = {r["provider"]: r["steps_scanned"] for r in records}
    assert steps["per_sequence"] == case["total_steps"] <= steps["varlen"] <= 2 * case["total_steps"] + 8 * 4
