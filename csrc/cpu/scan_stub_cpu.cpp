// Placeholder until the CPU kernels land.
#include <stdexcept>
#include "../selective_scan.h"
namespace selective_scan {
void scan_fwd_cpu(const ScanParams&) { throw std::runtime_error("not implemented"); }
void scan_bwd_cpu(const ScanBwdParams&) { throw std::runtime_error("not implemented"); }
}
