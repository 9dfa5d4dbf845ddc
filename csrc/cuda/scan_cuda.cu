// Host entry points of the CUDA scan: choose the block shape for a problem, dispatch on the input
// dtype to the per-dtype launchers, report the compiled archs.
#include <algorithm>
#include <numeric>

#include "../env_setting.h"
#include "scan_launch.cuh"

namespace selective_scan {
namespace cuda_detail {
namespace {

int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

int max_smem_per_block() { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

enum class Direction { kForward, kBackward };

// Threads per channel at four states per thread: dstate 5-8 takes four, its states padded to 16
// (see block_shape).
int tpc_at_four_states(int64_t dstate) {
  const int tpc = next_pow2((static_cast<int>(dstate) + 3) / 4);
  return dstate > 4 && tpc < 4 ? 4 : tpc;
}

// Threads the problem's rows give at four states per thread.
int64_t threads_at_four_states(const ScanParams& p) { return p.batch * p.dim * tpc_at_four_states(p.dstate); }

// SELECTIVE_SCAN_SPT (1 or 4; read per call, for tuning and tests): states per thread forced, or 0.
int forced_spt() { return static_cast<int>(env_choice("SELECTIVE_SCAN_SPT", 0, {1, 4})); }

// Fewer threads than this leave the GPU short of warps: below it (counted at four states per
// thread) dstate 9-32 takes one state per thread, which multiplies them by up to four, and the
// forward at dstate 2-4 takes the padded layout instead of one state per thread (block_shape).
constexpr int64_t kFewThreads = 32768;

// States per thread: SELECTIVE_SCAN_SPT overrides the choice, for tuning.
int states_per_thread(const ScanParams& p) {
  const int n = static_cast<int>(p.dstate);
  const int forced = forced_spt();
  if (forced == 4 || (forced == 1 && n <= 32)) return forced;
  return (n <= 32 && threads_at_four_states(p) < kFewThreads) ? 1 : 4;
}

// At most this many rows (batch * dim) leave most of the GPU idle: the forward and the backward
// split their sequence, into pieces giving about kSplitThreads threads (at four states per thread).
// Measured on the H200 (bf16; docs/design.md): at dstate 16 a split is 1.4-2.4x faster with
// 1536-4096 rows, 1.5x (forward) and 2.9x (backward) at 5120 rows, and slower from 12288 (the
// extra pass costs more than the parallelism gains); at dstate 4, 12288 rows, it is 2x slower.
constexpr int64_t kFewRows = 8192;
constexpr int64_t kSplitThreads = 131072;

// SELECTIVE_SCAN_SEQ_SPLITS (1 to 65535, read per call, for tests): the forced piece count, or 0.
int64_t forced_seq_splits() { return env_integer("SELECTIVE_SCAN_SEQ_SPLITS", 0, 1, 65535, "a number of pieces"); }

// The sequence pieces: SELECTIVE_SCAN_SEQ_SPLITS forces the count; otherwise few rows split. Pieces
// hold at least two chunks (the forward's state-only pass uses two checkpoint slots per piece) and
// there are at most 65535 (gridDim.y).
int64_t seq_splits(const ScanParams& p) {
  const int64_t n_chunks = num_checkpoints(p.seqlen);
  int64_t want = forced_seq_splits();
  if (want == 0 && p.batch * p.dim <= kFewRows) {
    const int64_t threads4 = threads_at_four_states(p);
    want = (kSplitThreads + threads4 - 1) / threads4;
  }
  return std::max<int64_t>(1, std::min({want, n_chunks / 2, int64_t{65535}}));
}

// Blocks of the backward an SM holds at once: its kernels are held to three blocks' registers
// (__launch_bounds__(128, 3)), fewer where their shared memory allows fewer.
int64_t bwd_blocks_per_sm(const BlockShape& s) {
  const int64_t smem_per_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>();
  constexpr int64_t kReservedPerBlock = 1024;  // what the runtime keeps of each block's shared memory
  return std::max<int64_t>(1, std::min<int64_t>(3, smem_per_sm / (s.smem_bytes + kReservedPerBlock)));
}

// The backward's piece length, in chunks, with few rows. The split's count `splits` gives the
// threads the GPU needs, but the last wave of blocks may be nearly empty: (1, 2048, 16384, 16) in
// 16 pieces of 64 blocks is 1024 blocks, 2.6 waves of 396 on an H200. Among splits / 2 to
// 4 splits pieces of at least four chunks (shorter pieces would make the blocks' fixed costs
// count), this takes the length that minimises waves x chunks per piece (the time the last block
// ends if every block of a wave takes the same time), ties going to the count nearest `splits`,
// and keeps the rule's length where none is better (docs/design.md, item 54). The forward keeps
// the rule's count: it measured within 0.3% of its best (item 53).
int64_t bwd_chunks_per_piece(int64_t n_chunks, int64_t splits, int64_t blocks_per_piece, int64_t resident_blocks) {
  auto pieces_of = [&](int64_t chunks) { return (n_chunks + chunks - 1) / chunks; };
  auto cost = [&](int64_t chunks) {
    const int64_t blocks = pieces_of(chunks) * blocks_per_piece;
    return (blocks + resident_blocks - 1) / resident_blocks * chunks;
  };
  // how far a piece count is from `splits`, as the ratio max / min, compared without division
  auto nearer = [&](int64_t a, int64_t b) {
    const int64_t ra_num = std::max(a, splits), ra_den = std::min(a, splits);
    const int64_t rb_num = std::max(b, splits), rb_den = std::min(b, splits);
    return ra_num * rb_den < rb_num * ra_den;
  };
  int64_t best = (n_chunks + splits - 1) / splits;
  const int64_t most = std::min(4 * splits, n_chunks / 2);
  for (int64_t pieces = std::max<int64_t>(2, splits / 2); pieces <= most; ++pieces) {
    const int64_t chunks = (n_chunks + pieces - 1) / pieces;
    if (chunks < 4) continue;
    const int64_t c = cost(chunks), c_best = cost(best);
    if (c < c_best || (c == c_best && nearer(pieces_of(chunks), pieces_of(best)))) best = chunks;
  }
  return best;
}

BlockShape block_shape(const ScanParams& p, Direction dir) {
  if (p.dstate < 1 || p.dstate > kMaxLaunchStates)
    throw std::runtime_error("selective_scan: the CUDA kernels take 1 to 64 states per launch (larger: state slices)");
  BlockShape s;
  const int64_t splits = seq_splits(p);
  s.spt = states_per_thread(p);
  // The pieces give the parallelism one state per thread would; the split passes are compiled for
  // four states per thread only (launch_scan_fwd / launch_scan_bwd rely on this).
  if (splits > 1 && s.spt == 1) s.spt = 4;
  s.tpc = next_pow2(static_cast<int>((p.dstate + s.spt - 1) / s.spt));
  // Up to eight states (docs/design.md, items 39, 40 and 42) run at four threads per channel of four
  // states, padded to 16 (the forward's fixed layout, the backward's fast path), or at one state per
  // thread: at dstate 2-4, in one piece (the split passes have four states per thread), and
  // in the forward only where that gives at least kFewThreads threads (with fewer its warps are too
  // few). SELECTIVE_SCAN_SPT keeps the unpadded layouts.
  if (forced_spt() == 0 && p.dstate <= 8) {
    const int one_state_tpc = next_pow2(static_cast<int>(p.dstate));
    const bool one_state =
        splits == 1 && p.dstate >= 2 && p.dstate <= 4 &&
        (dir == Direction::kBackward || p.batch * p.dim * one_state_tpc >= kFewThreads);
    s.spt = one_state ? 1 : 4;
    s.tpc = one_state ? one_state_tpc : 4;
  }
  s.cpb = std::max(1, std::min(32, 128 / s.tpc));
  const int64_t gB = p.B.is_variable ? p.B.n_groups : 1;
  const int64_t gC = p.C.is_variable ? p.C.n_groups : 1;
  s.segments = std::lcm(gB, gC);
  s.seg_dim = p.dim / s.segments;
  const int limit = max_smem_per_block();
  for (;;) {
    s.threads = s.cpb * s.tpc;
    const int floats = dir == Direction::kForward ? fwd_smem_floats(s) : bwd_smem_layout(s).total;
    s.smem_bytes = floats * static_cast<int>(sizeof(float));
    if (s.smem_bytes <= limit || s.cpb == 1) break;
    s.cpb /= 2;
  }
  if (s.smem_bytes > limit) throw std::runtime_error("selective_scan: dstate needs more shared memory than the GPU has");
  s.blocks_per_seg = (s.seg_dim + s.cpb - 1) / s.cpb;
  if (splits > 1) {
    const int64_t n_chunks = num_checkpoints(p.seqlen);
    s.chunks_per_split = (n_chunks + splits - 1) / splits;
    if (dir == Direction::kBackward && forced_seq_splits() == 0)
      s.chunks_per_split = bwd_chunks_per_piece(n_chunks, splits, grid_blocks(p, s), bwd_blocks_per_sm(s) * sm_count());
    s.seq_splits = (n_chunks + s.chunks_per_split - 1) / s.chunks_per_split;
  }
  if (dir == Direction::kForward) {
    // The 16-bit four-threads-per-channel forward takes its 128-register build where the grid
    // needs no more waves at four blocks per SM than at five (docs/design.md, items 33 and 34);
    // SELECTIVE_SCAN_FWD_REGS (128 or 102, read per call, for tuning and tests) forces a build.
    const int64_t forced = env_choice("SELECTIVE_SCAN_FWD_REGS", 0, {102, 128});
    const int64_t blocks = grid_blocks(p, s) * s.seq_splits, sms = sm_count();
    auto waves = [&](int64_t blocks_per_sm) { return (blocks + blocks_per_sm * sms - 1) / (blocks_per_sm * sms); };
    s.fwd_more_regs = forced == 128 || (forced != 102 && waves(4) <= waves(5));
  }
  return s;
}

// params with checkpoint_row set (0 means dstate) and checked: the kernels that index the
// checkpoints by it (the forward's, the backward's fp32-gradient build) read it as an int.
ScanParams with_checkpoint_row(ScanParams params) {
  if (params.checkpoint_row == 0) params.checkpoint_row = params.dstate;
  if (params.checkpoint_row < params.dstate || params.checkpoint_row > 2147483647)
    throw std::runtime_error("selective_scan: checkpoint rows shorter than dstate, or too long");
  return params;
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

ScanBwdPartialShape scan_bwd_cuda_partial_shape(const ScanParams& params) {
  const BlockShape s = block_shape(params, Direction::kBackward);
  ScanBwdPartialShape shape;
  shape.seq_splits = s.seq_splits;
  shape.B_slots = (s.segments / params.B.n_groups) * s.blocks_per_seg;
  shape.C_slots = (s.segments / params.C.n_groups) * s.blocks_per_seg;
  return shape;
}

bool scan_fwd_cuda(const ScanParams& params_in, cudaStream_t stream) {
  const ScanParams params = with_checkpoint_row(params_in);
  const BlockShape s = block_shape(params, Direction::kForward);
  switch (params.input_type) {
    case ScalarKind::kFloat32: return launch_scan_fwd<float>(params, s, stream);
    case ScalarKind::kFloat16: return launch_scan_fwd<__half>(params, s, stream);
    case ScalarKind::kBFloat16: return launch_scan_fwd<__nv_bfloat16>(params, s, stream);
    default: throw std::runtime_error("selective_scan: unsupported input dtype on CUDA");
  }
}

bool scan_bwd_cuda(const ScanBwdParams& params_in, const ScanBwdPartials& partials, cudaStream_t stream) {
  ScanBwdParams params = params_in;
  params.fwd = with_checkpoint_row(params.fwd);
  const BlockShape s = block_shape(params.fwd, Direction::kBackward);
  switch (params.fwd.input_type) {
    case ScalarKind::kFloat32: return launch_scan_bwd<float>(params, partials, s, stream);
    case ScalarKind::kFloat16: return launch_scan_bwd<__half>(params, partials, s, stream);
    case ScalarKind::kBFloat16: return launch_scan_bwd<__nv_bfloat16>(params, partials, s, stream);
    default: throw std::runtime_error("selective_scan: unsupported input dtype on CUDA");
  }
}

#define SELECTIVE_SCAN_STR2(x) #x
#define SELECTIVE_SCAN_STR(x) SELECTIVE_SCAN_STR2(x)
const char* scan_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SELECTIVE_SCAN_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace selective_scan
