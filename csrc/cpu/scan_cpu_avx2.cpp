// The CPU kernels compiled a second time for AVX2 + FMA + F16C (x86-64, GCC): scan_fwd_cpu.cpp and
// scan_bwd_cpu.cpp are included under a function-target switch, with ATen's AVX2 Vectorized<T>.
// Elsewhere this file only says that no AVX2 kernels exist.
#include "scan_cpu_dispatch.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SELECTIVE_SCAN_CPU_HAVE_AVX2 1

// Every header outside ATen's vector headers comes first, under the default target: then only the
// kernels and the AVX2 Vectorized<T> are compiled for AVX2, never an inline function or template
// that other files of the library also instantiate.
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>
#include <x86intrin.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // notes on 256-bit arguments of unused header lambdas

// sleef.h declares the 256-bit functions that the AVX2 Vectorized<T> names only when it sees
// these macros, which the target switch does not set.
#ifndef __AVX__
#define __AVX__ 1
#define SELECTIVE_SCAN_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define SELECTIVE_SCAN_UNDEF_AVX2
#endif
#include <sleef.h>
#ifdef SELECTIVE_SCAN_UNDEF_AVX
#undef __AVX__
#endif
#ifdef SELECTIVE_SCAN_UNDEF_AVX2
#undef __AVX2__
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SELECTIVE_SCAN_CPU_ISA avx2
#define SELECTIVE_SCAN_CPU_ISA_VARIANT
#include "scan_fwd_cpu.cpp"
#include "scan_bwd_cpu.cpp"

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // x86-64 GCC

namespace selective_scan {
namespace cpu {

const IsaKernels* avx2_kernels() {
#ifdef SELECTIVE_SCAN_CPU_HAVE_AVX2
  static const IsaKernels kernels{&avx2::scan_fwd, &avx2::scan_bwd};
  static const bool usable = [] {
    const std::string capability = at::get_cpu_capability();
    const bool allowed = capability == "AVX2" || capability == "AVX512";
    return allowed && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return usable ? &kernels : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace selective_scan
