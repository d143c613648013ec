// parallel_for that keeps small jobs on the calling thread.
//
// Waking the OpenMP pool and joining it costs a few microseconds per parallel region on
// the project's 2-core VMs, and a LeNet-sized training step opens a dozen regions whose
// work is a few microseconds each: there the second thread loses time. Each call site
// passes an estimate of its work (multiply-adds, or elements read and written by a
// copy); below kSerialWork the whole range runs inline. The threshold comes from timing
// spmm, spmm_t and sddmm at 1 and 2 threads over LeNet and 1024-square shapes: two
// threads start to pay between 0.5M and 1M multiply-adds (784x300x60 at 5% density,
// 0.7M: 1.00-1.05x; at 2%, 0.28M: 0.69-0.86x; 300x100x60 at 50%, 0.9M: 1.03-1.09x).
// SPARSETICKET_SERIAL_WORK sets it at start-up, sparseticket.runtime.set_serial_work at
// run time (0: every op on the pool, as before this threshold existed).
#pragma once
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace sparseticket {
namespace cpu {

constexpr int64_t kSerialWork = int64_t(1) << 19;

inline std::atomic<int64_t>& serial_work_setting() {
  static std::atomic<int64_t> w{[] {
    const char* s = std::getenv("SPARSETICKET_SERIAL_WORK");
    return s && *s ? static_cast<int64_t>(std::atoll(s)) : kSerialWork;
  }()};
  return w;
}

inline int64_t serial_work() { return serial_work_setting().load(std::memory_order_relaxed); }

// Sets the threshold, returns the previous one.
inline int64_t set_serial_work(int64_t w) { return serial_work_setting().exchange(w < 0 ? 0 : w); }

// at::parallel_for(begin, end, grain, f), except that f(begin, end) runs on the calling
// thread when `work` is below serial_work(). f must accept any sub-range, as for
// at::parallel_for, and may call at::get_thread_num() (0 when inline).
template <class F>
inline void parallel_for_work(int64_t begin, int64_t end, int64_t grain, int64_t work, const F& f) {
  if (begin >= end) return;
  if (work < serial_work()) {
    f(begin, end);
    return;
  }
  at::parallel_for(begin, end, grain, f);
}

}  // namespace cpu
}  // namespace sparseticket
