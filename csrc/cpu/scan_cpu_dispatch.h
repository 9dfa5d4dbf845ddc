// Entry points of the CPU kernels per instruction set, and the run-time choice between them:
// scan_fwd_cpu.cpp / scan_bwd_cpu.cpp compile as the portable `generic` set, and again inside
// scan_cpu_avx2.cpp as `avx2` (AVX2 + FMA), used when the CPU and ATen's capability allow it.
#pragma once

#include "../selective_scan.h"

namespace selective_scan {
namespace cpu {

namespace generic {
void scan_fwd(const ScanParams& params);
void scan_bwd(const ScanBwdParams& params);
}  // namespace generic

struct IsaKernels {
  void (*scan_fwd)(const ScanParams&);
  void (*scan_bwd)(const ScanBwdParams&);
};

// The AVX2 kernels, or nullptr where they are not compiled in (not x86-64 GCC), the CPU lacks
// AVX2/FMA/F16C, or ATen's CPU capability (ATEN_CPU_CAPABILITY) is set below AVX2.
const IsaKernels* avx2_kernels();

}  // namespace cpu
}  // namespace selective_scan
