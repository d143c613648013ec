// ATen glue for the CPU kernels: argument checks, packing, threading, registration.
//
// Schemas are defined once, in sparseticket/ops/_library.py; this file only registers
// CPU implementations (TORCH_LIBRARY_IMPL), so importing the package without the
// compiled module still works on the reference path.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "conv.h"
#include "kernels.h"
#include "parallel.h"

namespace sparseticket {
namespace cpu {
namespace {

using at::Tensor;

// Argument checks (check_float, check_ptr, check_index_range, ...) live in checks.h,
// shared with the convolution glue.
using namespace checks;

// ----------------------------------------------------------------------------- helpers

int64_t vector_lanes(at::ScalarType t) {
  return kernel_table().vector_bytes / (t == at::kFloat ? 4 : 8);
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }



// Panel width (in vectors) for a batch of B against a packed operand of K rows: wide
// enough to cover the batch (fewer passes over the sparse structure), narrow enough
// that one panel (K x width) stays in a core's L2 while the rows stream past it.
// SPARSETICKET_SPMM_NV forces a width (1, 2, 4 or 8) for sweeps in bench/.
int panel_choice(int64_t B, int64_t K, int64_t lanes, int64_t elem_bytes) {
  static const int forced = [] {
    const char* s = std::getenv("SPARSETICKET_SPMM_NV");
    const int v = s ? std::atoi(s) : 0;
    return v == 1 || v == 2 || v == 4 || v == 8 ? v : 0;
  }();
  static const int64_t budget = [] {
    const char* s = std::getenv("SPARSETICKET_L2_BUDGET");
    const long long v = s ? std::atoll(s) : 0;
    return v > 0 ? static_cast<int64_t>(v) : int64_t(512) << 10;
  }();
  if (forced) return forced;
  int nv = 1;
  while (nv < 8 && nv * lanes < B && 2 * nv * lanes * K * elem_bytes <= budget) nv *= 2;
  return nv;
}
// X rows per block and rows per group for the SDDMM (see sddmm_kernel);
// SPARSETICKET_SDDMM_KBLOCK forces the block (0 disables blocking; forced blocks use
// groups of 64 rows when they are at most 64 KB, else all rows).
struct SddmmBlocking {
  int64_t k_block = 0, row_block = 0;
};
SddmmBlocking sddmm_blocking(int64_t K, int64_t row_bytes, int64_t R, int64_t nnz) {
  static const int64_t forced = [] {
    const char* s = std::getenv("SPARSETICKET_SDDMM_KBLOCK");
    return s ? static_cast<int64_t>(std::atoll(s)) : int64_t(-1);
  }();
  SddmmBlocking b;
  if (forced >= 0) {
    b.k_block = forced;
    b.row_block = forced * row_bytes <= (int64_t(64) << 10) ? 64 : 0;
    return b;
  }
  if (K * row_bytes > (int64_t(1) << 20)) {
    // Measured (1 thread, 90%): 128x4096x4096 (X = 2 MB) 19 -> 16 ms with 512 KB blocks;
    // 256x1024x1024 (X = 1 MB) was slower blocked (2.1 -> 2.7 ms), so only larger X is.
    b.k_block = std::max<int64_t>(64, (int64_t(512) << 10) / std::max<int64_t>(1, row_bytes));
    return b;
  }
  // An X in L2: 32 KB blocks (L1) visited by 64-row groups, when a visit covers enough
  // entries to pay for its cursor scan and loop exits. At the 32 KB block the entries
  // per visit times the entry cost (ld/L loads) is a function of the density alone:
  // measured (1 thread, kernel + pack) 60x784x300 at 35% 211 -> 183 us and 65% 377 ->
  // 307, 256x784x300 at 35% 812 -> 624 and 65% 1536 -> 1096, 256x1024x1024 at 65%
  // 7.4 -> 5.9 ms; but 20% at B=60 0.99-1.08x and 10% at B=256 1.04-1.25x.
  const int64_t kb = (int64_t(32) << 10) / std::max<int64_t>(1, row_bytes);
  if (kb < 16 || kb >= K || R == 0 || 10 * nnz < 3 * R * K) return b;
  b.k_block = kb;
  b.row_block = 64;
  return b;
}

// Panel rows per column block for the SpMM (see spmm_blocked_impl), or 0 to visit each
// row's entries in one pass. A block is ~32 KB of panel (L1). Blocking costs one visit
// per (row, block) -- a cursor scan, an accumulator reload and two loop-exit
// mispredicts, ~35 cycles -- so it pays only when a visit covers enough entries, and
// only for wide panels, where an entry's row is 4-8 cache lines (measured, 1 thread,
// harness over the kernel + pack: 60x784x300 NV=4 at 35% 206 -> 165 us, 65% 382 -> 297;
// 256x1024x1024 NV=8 at 50% 5.4 -> 4.1 ms; but 10% at NV=8 (6.4 entries per visit)
// 1.18 -> 1.31 ms and every NV=2 case 1.0-1.5x slower). SPARSETICKET_SPMM_KBLOCK forces
// a block size (0 disables).
int64_t spmm_k_block(int nv, int64_t lanes, int64_t elem_bytes, int64_t K, int64_t R, int64_t nnz) {
  static const int64_t forced = [] {
    const char* s = std::getenv("SPARSETICKET_SPMM_KBLOCK");
    return s ? static_cast<int64_t>(std::atoll(s)) : int64_t(-1);
  }();
  if (forced >= 0) return forced < K ? forced : 0;
  if (nv < 4 || R == 0) return 0;
  const int64_t kb = std::max<int64_t>(16, (int64_t(32) << 10) / (nv * lanes * elem_bytes));
  if (kb >= K) return 0;
  // average entries per (row, block) visit
  if (nnz * kb < 10 * R * K) return 0;
  return kb;
}

int panel_index(int nv) { return nv == 1 ? 0 : nv == 2 ? 1 : nv == 4 ? 2 : 3; }

// P[panel][k][lane] = x[panel * pw + lane, k] (0 past B). x: [B, K] with any strides.
// Jobs are (panel, block of 64 k); the kernel core does the transposing copy. `work` is
// that of the op the panels feed, so an op runs either wholly on the calling thread or
// wholly on the pool (parallel.h).
template <typename T>
void pack_panels(const Tensor& x, T* P, int64_t pw, int64_t work) {
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t sb = x.stride(0), sk = x.stride(1);
  const T* X = x.data_ptr<T>();
  const int64_t n_panels = (B + pw - 1) / pw;
  constexpr int64_t KB = 64;
  const int64_t kblocks = (K + KB - 1) / KB;
  const PackFn fn = sizeof(T) == 4 ? kernel_table().pack_f32 : kernel_table().pack_f64;
  parallel_for_work(0, n_panels * kblocks, 4, work, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t panel = job / kblocks, k0 = (job % kblocks) * KB;
      const int64_t b0 = panel * pw;
      fn(X + b0 * sb, sb, sk, P + panel * K * pw, pw, std::min(pw, B - b0), k0, std::min(K, k0 + KB));
    }
  });
}

Tensor pack(const Tensor& x, int64_t pw, int64_t work) {
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t n_panels = std::max<int64_t>(1, (B + pw - 1) / pw);
  Tensor P = at::empty({n_panels, K, pw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparseticket_pack", [&] { pack_panels<scalar_t>(x, P.data_ptr<scalar_t>(), pw, work); });
  return P;
}

// The last few packed forward inputs, so that the backward's kept-weight gradient of the
// same layer (sparse_linear_backward) reuses the forward's packing of x when the two
// layouts agree (one panel of whole vectors covering the batch: B <= 64 fp32 on AVX-512
// for in_features <= ~1000). An entry matches only the same live TensorImpl over the same
// live StorageImpl, with the same version, dtype, data pointer, sizes and strides (the
// version is what autograd itself relies on to detect a saved input modified in place).
// One entry per tensor: a new forward of the same x replaces its entry, so the backward
// always sees the packing of the latest forward. A write that bypasses the version
// counter (through .data or a numpy view) between a forward and its backward is not
// seen: the backward then uses the x that forward used. Per thread (a CPU backward runs
// on the thread that called it); at most kPackMemoEntries packs of at most
// kPackMemoBytes each are held.
constexpr int kPackMemoEntries = 4;
constexpr int64_t kPackMemoBytes = int64_t(1) << 20;
struct PackMemo {
  // weak references keep the TensorImpl's and StorageImpl's addresses from being reused
  // by other objects while the entry exists, so address matches are the same objects
  c10::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> src;
  c10::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  uint32_t version = 0;
  const void* data = nullptr;
  int64_t B = 0, sb = 0, sk = 0;
  Tensor packed;  // [1, K, pw] of x's dtype: the rest of the key
};
thread_local PackMemo pack_memo_[kPackMemoEntries];
thread_local int pack_memo_next_ = 0;

bool memo_eligible(const Tensor& x) { return !x.is_inference() && x.has_storage(); }

bool memo_same_tensor(const PackMemo& m, const Tensor& x) {
  return m.packed.defined() && m.src->_unsafe_get_target() == x.unsafeGetTensorImpl() &&
         m.storage->_unsafe_get_target() == x.storage().unsafeGetStorageImpl();
}

bool memo_key_matches(const PackMemo& m, const Tensor& x, int64_t pw) {
  return memo_same_tensor(m, x) && m.packed.size(2) == pw && m.packed.scalar_type() == x.scalar_type() &&
         m.data == x.data_ptr() && m.B == x.size(0) && m.packed.size(1) == x.size(1) && m.sb == x.stride(0) &&
         m.sk == x.stride(1) && m.version == x._version();
}

// x packed as panels of pw columns (pack), from the memo when x's forward packed it
Tensor pack_reusing(const Tensor& x, int64_t pw, int64_t work) {
  if (memo_eligible(x)) {
    for (const PackMemo& m : pack_memo_)
      if (memo_key_matches(m, x, pw)) return m.packed;
  }
  return pack(x, pw, work);
}

// pack, remembering the result for pack_reusing when a backward could use it (the
// single-panel layout the kept-weight gradient reads)
Tensor pack_remembered(const Tensor& x, int64_t pw, int64_t work) {
  Tensor P = pack(x, pw, work);
  if (!memo_eligible(x) || P.size(0) != 1 || pw != round_up(x.size(0), vector_lanes(x.scalar_type())) ||
      P.numel() * P.element_size() > kPackMemoBytes)
    return P;
  PackMemo* slot = nullptr;
  for (PackMemo& m : pack_memo_)  // the same tensor's older entry, if any, is replaced
    if (memo_same_tensor(m, x)) slot = &m;
  if (slot == nullptr) {
    slot = &pack_memo_[pack_memo_next_];
    pack_memo_next_ = (pack_memo_next_ + 1) % kPackMemoEntries;
  }
  PackMemo& m = *slot;
  m.src.emplace(x.getIntrusivePtr());
  m.storage.emplace(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(x.storage().unsafeGetStorageImpl()));
  m.version = x._version();
  m.data = x.data_ptr();
  m.B = x.size(0);
  m.sb = x.stride(0);
  m.sk = x.stride(1);
  m.packed = P;
  return P;
}

// Row ranges with roughly equal work (entries plus a per-row cost), for parallel_for;
// inner bounds rounded to a multiple of `align` rows.
std::vector<int64_t> balanced_rows(const int32_t* ptr, int64_t R, int64_t row_cost, int64_t chunks,
                                   int64_t align = 1) {
  std::vector<int64_t> bounds{0};
  const int64_t total = static_cast<int64_t>(ptr[R]) + R * row_cost;
  chunks = std::max<int64_t>(1, std::min(chunks, R));
  int64_t r = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = total * c / chunks;
    // first row whose cumulative work reaches target
    int64_t lo = r, hi = R;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(ptr[mid]) + mid * row_cost < target) lo = mid + 1; else hi = mid;
    }
    r = align > 1 ? (lo + align / 2) / align * align : lo;
    if (r > bounds.back() && r < R) bounds.push_back(r);
  }
  bounds.push_back(R);
  return bounds;
}

int64_t n_chunks() { return static_cast<int64_t>(at::get_num_threads()) * 4; }



// vals[perm] (perm holds valid indices, checked by the caller's ticket checks). A plain
// loop: index_select's generic path cost ~0.65 ns per entry (300x784 at 65%: 91 us).
Tensor gather(const Tensor& vals, const Tensor& perm) {
  Tensor out = at::empty({perm.numel()}, vals.options());
  const int32_t* p = perm.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(vals.scalar_type(), "sparseticket_gather", [&] {
    const scalar_t* v = vals.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, perm.numel(), int64_t(1) << 15, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = v[p[i]];
    });
  });
  return out;
}

// out[b, r] (row-major [B, R]) = bias[r] + sum over row r of ptr/idx/perm/val x P, the
// panel visited in column blocks of k_block rows (0: unblocked; see spmm_k_block).
SpmmArgs spmm_args(const Tensor& packed, int64_t k_block, const Tensor& ptr, const Tensor& idx, const int32_t* perm,
                   const Tensor& val, const c10::optional<Tensor>& bias, int64_t B, const Tensor& out, bool relu) {
  SpmmArgs a{};
  a.ptr = ptr.data_ptr<int32_t>();
  a.idx = idx.data_ptr<int32_t>();
  a.perm = perm;
  a.val = val.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.packed = packed.data_ptr();
  a.panel_width = packed.size(2);
  a.K = packed.size(1);
  a.B = B;
  a.k_block = k_block;
  a.out = out.data_ptr();
  a.ldo_b = out.stride(0);
  a.ldo_r = out.stride(1);
  a.relu = relu;
  return a;
}

SpmmFn spmm_fn(const Tensor& val, int nv) {
  const KernelTable& kt = kernel_table();
  return val.scalar_type() == at::kFloat ? kt.spmm_f32[panel_index(nv)] : kt.spmm_f64[panel_index(nv)];
}

void run_spmm(const Tensor& packed, int nv, int64_t k_block, const Tensor& ptr, const Tensor& idx,
              const c10::optional<Tensor>& perm, const Tensor& val, const c10::optional<Tensor>& bias, int64_t B,
              const Tensor& out, bool relu = false) {
  const int64_t R = ptr.numel() - 1;
  if (R == 0 || B == 0) return;
  const SpmmArgs a = spmm_args(packed, k_block, ptr, idx, perm ? perm->data_ptr<int32_t>() : nullptr, val, bias, B,
                               out, relu);
  const SpmmFn fn = spmm_fn(val, nv);
  const int64_t n_panels = (B + a.panel_width - 1) / a.panel_width;
  // Each thread writes its rows' columns of every batch entry of the row-major output, so
  // a bound inside a cache line has both threads write that line (false sharing). Bounds
  // fall on multiples of a line's worth of rows: on a line boundary in every batch entry
  // when R is a multiple of that, in every fourth one for R = 300 (1200-byte rows). Only
  // where every chunk keeps at least that many rows (n_chunks of them). LeNet-300-100
  // drop-in step at 95% (fc1 on the pool), in-process A/B: 4.7-8.7 us less per step of
  // ~430 (in a process where pooled ops ran slow); 90%: 0.7-1.6 us.
  const int64_t line_rows = 64 / static_cast<int64_t>(val.element_size());
  const int64_t align = a.ldo_r == 1 && R >= line_rows * n_chunks() ? line_rows : 1;
  const auto bounds = balanced_rows(a.ptr, R, 8 * n_panels, n_chunks(), align);
  const int64_t work = static_cast<int64_t>(a.ptr[R]) * B;
  parallel_for_work(0, static_cast<int64_t>(bounds.size()) - 1, 1, work, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(a, bounds[c], bounds[c + 1]);
  });
}


// ----------------------------------------------------------------------------- batch shards
//
// Row-split, every thread reads every panel of the packed operand, and about half of it
// was packed by the other thread: those reads come from the other core's cache. On these
// VMs that transfer is what a slow run pays for (256x1024x1024 at 95%, forward: 0.37 ms
// in some processes, 0.63 ms in others, where one thread took 0.64 ms). When the batch
// covers at least one whole panel per thread, each thread instead takes a shard of whole
// panels and does the op for its batch rows alone: it packs its shard, multiplies it by
// every row of the ticket and writes its own output rows. Threads then share only the
// read-only ticket; the kept-weight gradient sums one partial result per shard.
// SPARSETICKET_BATCH_SHARDS=0 turns shards off at start-up, sparseticket.runtime.set_batch_shards
// at run time (A/B runs and the tests of both paths).
struct BatchShards {
  std::vector<int64_t> b;  // shard s: batch rows [b[s], b[s + 1]); empty when not sharded
  bool on() const { return !b.empty(); }
  int64_t n() const { return static_cast<int64_t>(b.size()) - 1; }
};

std::atomic<bool>& batch_shards_setting() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("SPARSETICKET_BATCH_SHARDS");
    return !(e && *e == '0');
  }()};
  return on;
}

// Every shard reads the whole ticket (indices and values), once per panel, so shards are
// used only while a ticket fits a core's L2. Measured (2 threads, in-process A/B, median
// of 8 alternations; forward / input gradient / kept-weight gradient / training step):
// 256x1024x1024 at 95% (420 KB) 0.90 / 0.90 / 0.88 / 0.87x the time, at 90% (840 KB)
// 0.76 / 0.85 / 0.74 / 0.80x, 256x784x300 at 90% 0.82 / 0.92 / 0.82 / 0.88x; larger
// tickets gained less or lost: 256x1024x1024 at 70% (2.5 MB) 0.88-1.01x, at 50% (4.2 MB)
// the kept-weight gradient 1.16x, 128x4096x4096 at 90% (13 MB) 1.08x for the step.
constexpr int64_t kShardTicketBytes = int64_t(1) << 20;

BatchShards batch_shards(int64_t B, int64_t pw, int64_t work, int64_t ticket_bytes) {
  BatchShards sh;
  const int64_t T = at::get_num_threads(), n_panels = (B + pw - 1) / pw;
  if (!batch_shards_setting().load(std::memory_order_relaxed) || at::in_parallel_region() || T < 2 ||
      work < serial_work() || ticket_bytes > kShardTicketBytes || n_panels < T || n_panels % T != 0)
    return sh;
  for (int64_t t = 0; t <= T; ++t) sh.b.push_back(std::min(B, n_panels / T * t * pw));
  return sh;
}

// Rows [b0, b0 + nb) of x packed as panels of pw columns, on the calling thread (pack with
// no work of its own: inline, or inline anyway inside the shards' parallel region).
Tensor pack_shard(const Tensor& x, int64_t b0, int64_t nb, int64_t pw) { return pack(x.narrow(0, b0, nb), pw, 0); }

// run_spmm for one shard (nb batch rows packed in P, written to out's nb rows), on the
// calling thread
void run_spmm_shard(const Tensor& P, int nv, int64_t k_block, const Tensor& ptr, const Tensor& idx,
                    const int32_t* perm, const Tensor& val, const c10::optional<Tensor>& bias, int64_t nb,
                    const Tensor& out, bool relu = false) {
  spmm_fn(val, nv)(spmm_args(P, k_block, ptr, idx, perm, val, bias, nb, out, relu), 0, ptr.numel() - 1);
}

// ----------------------------------------------------------------------------- ops


// x Wᵀ + b, through max(0, .) when relu (sparse_linear_relu)
Tensor spmm_impl(const Tensor& x, const Tensor& values, const Tensor& crow_, const Tensor& col_,
                 const c10::optional<Tensor>& bias_, bool relu) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_cpu(x, "x");
  check_dim(values, 1, "values");
  check_same_dtype(values, "values", x, "x");
  check_cpu(values, "values");
  check_index(crow_, "crow");
  check_index(col_, "col");
  TORCH_CHECK(col_.numel() == values.numel(), "sparseticket: col has ", col_.numel(), " entries but values has ",
              values.numel());
  const int64_t B = x.size(0), O = crow_.numel() - 1;
  c10::optional<Tensor> bias;
  if (bias_) {
    check_dim(*bias_, 1, "bias");
    check_cpu(*bias_, "bias");
    TORCH_CHECK(bias_->size(0) == O, "sparseticket: bias has ", bias_->size(0), " entries, expected out_features=", O);
    check_same_dtype(*bias_, "bias", x, "x");
    bias = contiguous_1d(*bias_);
  }
  const Tensor crow = contiguous_1d(crow_), col = contiguous_1d(col_), vals = contiguous_1d(values);
  check_ptr(crow, vals.numel(), "crow");
  check_index_range(col, x.size(1), "col", "x's feature dimension (x.size(1))");
  Tensor out = at::empty({B, O}, x.options());
  if (B == 0 || O == 0) return out;
  const int nv = panel_choice(B, x.size(1), vector_lanes(x.scalar_type()), x.element_size());
  const int64_t k_block = spmm_k_block(nv, vector_lanes(x.scalar_type()), x.element_size(), x.size(1), O,
                                       vals.numel());
  const BatchShards sh = batch_shards(B, nv * vector_lanes(x.scalar_type()), vals.numel() * B,
                                      vals.numel() * (4 + vals.element_size()));
  if (sh.on()) {
    at::parallel_for(0, sh.n(), 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b0 = sh.b[s], nb = sh.b[s + 1] - b0, pw = nv * vector_lanes(x.scalar_type());
        Tensor P = pack_shard(x, b0, nb, pw);
        run_spmm_shard(P, nv, k_block, crow, col, nullptr, vals, bias, nb, out.narrow(0, b0, nb), relu);
      }
    });
    return out;
  }
  const Tensor packed = pack_remembered(x, nv * vector_lanes(x.scalar_type()), vals.numel() * B);
  run_spmm(packed, nv, k_block, crow, col, c10::nullopt, vals, bias, B, out, relu);
  return out;
}

Tensor spmm_cpu(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                const c10::optional<Tensor>& bias) {
  return spmm_impl(x, values, crow, col, bias, false);
}

// spmm_t's operands, checked and contiguous
struct TransposedTicket {
  Tensor vals, ccol, row, perm;
};
TransposedTicket checked_spmm_t_args(const Tensor& gy, const Tensor& values, const Tensor& ccol_, const Tensor& row_,
                                     const Tensor& perm_, bool read = true) {
  check_float(gy, "gy");
  check_dim(gy, 2, "gy");
  check_cpu(gy, "gy");
  check_dim(values, 1, "values");
  check_same_dtype(values, "values", gy, "gy");
  check_cpu(values, "values");
  check_index(ccol_, "ccol");
  check_index(row_, "row");
  check_index(perm_, "perm");
  TORCH_CHECK(row_.numel() == values.numel(), "sparseticket: row has ", row_.numel(), " entries but values has ",
              values.numel());
  TORCH_CHECK(perm_.numel() == values.numel(), "sparseticket: perm has ", perm_.numel(), " entries but values has ",
              values.numel());
  TransposedTicket t{contiguous_1d(values), contiguous_1d(ccol_), contiguous_1d(row_), contiguous_1d(perm_)};
  TORCH_CHECK(t.ccol.numel() >= 1, "sparseticket: ccol must have I + 1 >= 1 entries");
  if (!read) return t;  // sizes only: the caller will not read through these indices
  check_ptr(t.ccol, t.vals.numel(), "ccol");
  check_index_range(t.row, gy.size(1), "row", "gy's feature dimension (gy.size(1))");
  check_index_range(t.perm, t.vals.numel(), "perm", "values");
  return t;
}

Tensor spmm_t_packed(const Tensor& packed, int nv, int64_t B, const Tensor& vals, const Tensor& ccol,
                     const Tensor& row, const Tensor& perm);

Tensor spmm_t_cpu(const Tensor& gy, const Tensor& values, const Tensor& ccol, const Tensor& row,
                  const Tensor& perm) {
  const TransposedTicket t = checked_spmm_t_args(gy, values, ccol, row, perm);
  const int64_t B = gy.size(0), I = t.ccol.numel() - 1;
  if (B == 0 || I == 0) return at::empty({B, I}, gy.options());
  const int64_t lanes = vector_lanes(gy.scalar_type()), nnz = t.vals.numel();
  const int nv = panel_choice(B, gy.size(1), lanes, gy.element_size());
  const BatchShards sh = batch_shards(B, nv * lanes, nnz * B, nnz * (4 + gy.element_size()));
  if (sh.on()) {
    Tensor out = at::empty({B, I}, gy.options());
    const int64_t k_block = spmm_k_block(nv, lanes, gy.element_size(), gy.size(1), I, nnz);
    const bool by_perm = k_block > 0 && sh.b[1] - sh.b[0] <= 2 * nv * lanes;  // as spmm_t_packed
    const Tensor vals = by_perm ? t.vals : gather(t.vals, t.perm);
    at::parallel_for(0, sh.n(), 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b0 = sh.b[s], nb = sh.b[s + 1] - b0;
        run_spmm_shard(pack_shard(gy, b0, nb, nv * lanes), nv, k_block, t.ccol, t.row,
                       by_perm ? t.perm.data_ptr<int32_t>() : nullptr, vals, c10::nullopt, nb, out.narrow(0, b0, nb));
      }
    });
    return out;
  }
  return spmm_t_packed(pack(gy, nv * lanes, nnz * B), nv, B, t.vals, t.ccol, t.row, t.perm);
}

// gx [B, I] = gy W from gy packed as panels of nv vectors (spmm_t, sparse_linear_backward);
// ccol/row/perm/vals contiguous and checked
Tensor spmm_t_packed(const Tensor& packed, int nv, int64_t B, const Tensor& vals, const Tensor& ccol,
                     const Tensor& row, const Tensor& perm) {
  const int64_t I = ccol.numel() - 1;
  Tensor out = at::empty({B, I}, packed.options());
  if (B == 0 || I == 0) return out;
  // The values in column order. Blocked with one or two panels, the kernel reads them
  // through perm: they are then cache-resident and the loads independent, and it saves
  // a pass (60x784x300 at 35%: 259 -> 229 us; 256x1024x1024 at 50%: 6.56 -> 5.23 ms);
  // with more panels the indirect loads repeat per panel (1000x784x300: 0.98-1.06x).
  // Unblocked, gathering first (one pass, independent loads) beats an indirect load
  // inside the FMA loop, where each cache miss stalls the row (128x4096x4096, one
  // thread: 244 -> 146 ms at 50%); gathered by a plain loop, as index_select's generic
  // path cost ~0.65 ns per entry.
  const int64_t lanes = vector_lanes(packed.scalar_type());
  const int64_t k_block = spmm_k_block(nv, lanes, packed.element_size(), packed.size(1), I, vals.numel());
  if (k_block > 0 && B <= 2 * nv * lanes)
    run_spmm(packed, nv, k_block, ccol, row, perm, vals, c10::nullopt, B, out);
  else
    run_spmm(packed, nv, k_block, ccol, row, c10::nullopt, gather(vals, perm), c10::nullopt, B, out);
  return out;
}

// sddmm's index operands, checked and contiguous
struct KeptRows {
  Tensor crow, col;
  c10::optional<Tensor> active;
};
KeptRows checked_sddmm_args(const Tensor& gy, const Tensor& x, const Tensor& crow_, const Tensor& col_,
                            const c10::optional<Tensor>& active_) {
  check_float(gy, "gy");
  check_dim(gy, 2, "gy");
  check_cpu(gy, "gy");
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_cpu(x, "x");
  check_same_dtype(x, "x", gy, "gy");
  TORCH_CHECK(gy.size(0) == x.size(0), "sparseticket: gy has batch ", gy.size(0), " but x has batch ", x.size(0));
  check_index(crow_, "crow");
  check_index(col_, "col");
  const int64_t O = crow_.numel() - 1;
  TORCH_CHECK(gy.size(1) == O, "sparseticket: gy has ", gy.size(1), " columns but crow describes ", O, " rows");
  check_active(active_, O);
  KeptRows k{contiguous_1d(crow_), contiguous_1d(col_), c10::nullopt};
  if (active_) k.active = contiguous_1d(*active_);
  check_ptr(k.crow, k.col.numel(), "crow");
  check_index_range(k.col, x.size(1), "col", "x's feature dimension (x.size(1))");
  return k;
}

Tensor sddmm_packed(const Tensor& A, const Tensor& X, int64_t B, const Tensor& crow, const Tensor& col,
                    const c10::optional<Tensor>& active);

// spmm_t's part of sharded_grads: gx's rows of each shard from the shard's packed gy
struct ShardedGx {
  Tensor out;  // [B, I]
  int nv;
  int64_t k_block;
  Tensor ccol, row, vals;  // vals in column order, or in row order read through perm
  const int32_t* perm;
};
Tensor sharded_grads(const Tensor& gy, const Tensor& x, const BatchShards& sh, const KeptRows& k,
                     const ShardedGx* gx);

// Whether the kept-weight gradient goes by dense tiles (kernels.h, sddmm_tile): their cost
// is that of the dense gradient of the active rows, the per-entry kernel's grows with the
// kept entries, so the choice is a density threshold. Measured crossovers (2 threads,
// in-process, tile vs per-entry us): 60x784x300 ~33% (at 51%: 133 vs 158, at 80%: 145 vs
// 224), 60x300x100 ~30% (at 80%: 29 vs 50), 64x6272x256 ~41% (bench_kernels: ~50%, at 45%
// 1.29 vs 1.25 ms), 64x256x256 ~45% (at 41%: 53
// vs 49), 256x1024x1024 ~55% (at 80%: 2222 vs 2770; a batch over 64 no longer keeps a
// tile's block of x in L1). Hence 45% up to a batch of 64, 65% above.
// SPARSETICKET_SDDMM_TILE_DENSITY (in percent) overrides both: 0 always tiles, above 100 never.
bool use_sddmm_tiles(int64_t nnz, int64_t B, int64_t O, int64_t I) {
  static const int64_t forced = [] {
    const char* e = std::getenv("SPARSETICKET_SDDMM_TILE_DENSITY");
    if (!e || !*e) return int64_t(-1);
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    return *end == '\0' && v >= 0 ? static_cast<int64_t>(v) : int64_t(-1);  // not a number: ignored
  }();
  const int64_t percent = forced >= 0 ? forced : B <= 64 ? 45 : 65;
  return nnz > 0 && 100 * nnz >= percent * O * I;
}

// The batch shards of a kept-weight gradient call (sddmm, sparse_linear_backward) of a
// ticket with O rows at batch B
BatchShards kept_grad_shards(int64_t nnz, int64_t B, int64_t O, at::ScalarType dtype) {
  const int64_t lanes = vector_lanes(dtype), elem = static_cast<int64_t>(c10::elementSize(dtype));
  return batch_shards(B, panel_choice(B, O, lanes, elem) * lanes, nnz * B, nnz * (4 + elem));
}

// The decision sddmm and sparse_linear_backward take (and _C.sddmm_uses_tiles reports to
// the FLOP counter): tiles above the density, unless the call runs in batch shards (a
// small ticket and a large batch, see batch_shards), which are kept as they were.
bool kept_grad_tiles(int64_t nnz, int64_t B, int64_t O, int64_t I, const BatchShards& sh) {
  return !sh.on() && use_sddmm_tiles(nnz, B, O, I);
}

// The kept-weight gradient by dense tiles from gy packed as one panel (A: [1, O, ld]) and
// x as it is; threads split the rows evenly (the cost is per row, not per entry).
Tensor sddmm_tiles(const Tensor& A, const Tensor& x_, int64_t B, const KeptRows& k) {
  const Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();
  const int64_t nnz = k.col.numel(), O = k.crow.numel() - 1, ld = A.size(2);
  Tensor out = at::empty({nnz}, A.options());
  const Tensor zero = at::zeros({ld}, A.options());
  SddmmArgs s{};
  s.ptr = k.crow.data_ptr<int32_t>();
  s.idx = k.col.data_ptr<int32_t>();
  s.active = k.active ? reinterpret_cast<const uint8_t*>(k.active->data_ptr<bool>()) : nullptr;
  s.a = A.data_ptr();
  s.x = x.data_ptr();
  s.ld = ld;
  s.K = x.size(1);
  s.B = B;
  s.ldx = x.stride(0);
  s.zero_row = zero.data_ptr();
  s.out = out.data_ptr();
  const SddmmFn fn = A.scalar_type() == at::kFloat ? kernel_table().sddmm_tile_f32 : kernel_table().sddmm_tile_f64;
  const int64_t T = at::get_num_threads();
  parallel_for_work(0, T, 1, O * s.K * B, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(s, O * t / T, O * (t + 1) / T);
  });
  return out;
}

Tensor sddmm_cpu(const Tensor& gy, const Tensor& x, const Tensor& crow, const Tensor& col,
                 const c10::optional<Tensor>& active) {
  const KeptRows k = checked_sddmm_args(gy, x, crow, col, active);
  const int64_t nnz = k.col.numel(), B = gy.size(0);
  if (B == 0 || nnz == 0) return at::zeros({nnz}, gy.options());
  const int64_t ld = round_up(B, vector_lanes(gy.scalar_type()));
  const BatchShards sh = kept_grad_shards(nnz, B, gy.size(1), gy.scalar_type());
  if (kept_grad_tiles(nnz, B, gy.size(1), x.size(1), sh)) return sddmm_tiles(pack(gy, ld, nnz * B), x, B, k);
  if (sh.on()) return sharded_grads(gy, x, sh, k, nullptr);
  return sddmm_packed(pack(gy, ld, nnz * B), pack(x, ld, nnz * B), B, k.crow, k.col, k.active);
}

// gW at the kept entries from gy [B, O] and x [B, K] each packed as one panel of ld =
// A.size(2) >= B columns (sddmm, sparse_linear_backward); crow/col/active contiguous and checked
SddmmArgs sddmm_args(const Tensor& A, const Tensor& X, const Tensor& crow, const Tensor& col,
                     const c10::optional<Tensor>& active, const Tensor& out) {
  const int64_t nnz = col.numel(), O = crow.numel() - 1, ld = A.size(2);
  SddmmArgs s{};
  s.ptr = crow.data_ptr<int32_t>();
  s.idx = col.data_ptr<int32_t>();
  s.active = active ? reinterpret_cast<const uint8_t*>(active->data_ptr<bool>()) : nullptr;
  s.a = A.data_ptr();
  s.x = X.data_ptr();
  s.ld = ld;
  s.K = X.size(1);
  const SddmmBlocking blocking = sddmm_blocking(X.size(1), ld * X.element_size(), O, nnz);
  s.k_block = blocking.k_block;
  s.row_block = blocking.row_block;
  s.out = out.data_ptr();
  return s;
}

SddmmFn sddmm_fn(at::ScalarType t) {
  return t == at::kFloat ? kernel_table().sddmm_f32 : kernel_table().sddmm_f64;
}

Tensor sddmm_packed(const Tensor& A, const Tensor& X, int64_t B, const Tensor& crow, const Tensor& col,
                    const c10::optional<Tensor>& active) {
  const int64_t nnz = col.numel(), O = crow.numel() - 1;
  if (B == 0 || nnz == 0) return at::zeros({nnz}, A.options());
  Tensor out = at::empty({nnz}, A.options());
  const SddmmArgs s = sddmm_args(A, X, crow, col, active, out);
  const SddmmFn fn = sddmm_fn(A.scalar_type());
  const auto bounds = balanced_rows(s.ptr, O, 4, n_chunks());
  parallel_for_work(0, static_cast<int64_t>(bounds.size()) - 1, 1, nnz * B, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(s, bounds[c], bounds[c + 1]);
  });
  return out;
}

// The kept-weight gradient (and gx when gx is given) over batch shards, each shard on one
// thread: its rows of gy are packed once for both products (when the layouts agree) and
// its rows of x once, and the kept-weight gradient is the sum of the shards' partial
// results, added in shard order.
Tensor sharded_grads(const Tensor& gy, const Tensor& x, const BatchShards& sh, const KeptRows& k,
                     const ShardedGx* gx) {
  const int64_t nnz = k.col.numel(), O = k.crow.numel() - 1, lanes = vector_lanes(gy.scalar_type());
  Tensor parts = at::empty({sh.n(), nnz}, gy.options());
  const SddmmFn fn = sddmm_fn(gy.scalar_type());
  at::parallel_for(0, sh.n(), 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = sh.b[s], nb = sh.b[s + 1] - b0, ld = round_up(nb, lanes);
      Tensor P, A;
      if (gx) {
        P = pack_shard(gy, b0, nb, gx->nv * lanes);
        if (P.size(0) == 1 && P.size(2) == ld) A = P;
        run_spmm_shard(P, gx->nv, gx->k_block, gx->ccol, gx->row, gx->perm, gx->vals, c10::nullopt, nb,
                       gx->out.narrow(0, b0, nb));
      }
      if (!A.defined()) A = pack_shard(gy, b0, nb, ld);
      fn(sddmm_args(A, pack_shard(x, b0, nb, ld), k.crow, k.col, k.active, parts[s]), 0, O);
    }
  });
  Tensor gv = at::add(parts[0], parts[1]);
  for (int64_t s = 2; s < sh.n(); ++s) gv.add_(parts[s]);
  return gv;
}

// A per-thread scratch buffer for row_masked_grad_weight's product. Buffers up to
// kWorkspaceKeepBytes stay allocated between calls (their pages stay mapped); a larger
// one is freed after use, where the page faults are small next to its GEMM.
constexpr int64_t kWorkspaceKeepBytes = int64_t(16) << 20;
thread_local Tensor grad_workspace_;

Tensor grad_workspace(int64_t numel, const at::TensorOptions& opts) {
  Tensor& w = grad_workspace_;
  if (!w.defined() || w.scalar_type() != opts.dtype().toScalarType() || w.numel() < numel)
    w = at::empty({numel}, opts);
  return w.narrow(0, 0, numel);
}

void release_grad_workspace() { grad_workspace_ = Tensor(); }

// The row-subset kernel (kernels.inl, rowgemm_kernel) for float and double, MKL on the
// gathered rows otherwise. Time / dense gy.t() @ x, half the rows frozen unless noted,
// 1 thread, thread_time, alternating processes (MKL path -> kernel): 60x784x300 0.63 ->
// 0.49, 60x300x100 0.78 -> 0.53, 60x100x10 1.96 -> 0.89, 64x6272x256 0.65 -> 0.49,
// 256x1024x1024 at f = 0.25 / 0.5 / 0.75: 0.78 / 0.55 / 0.28 -> 0.71 / 0.52 / 0.25; with
// 2 threads the kernel's lead grows (256x1024x1024: 0.88 / 0.58 / 0.45 -> 0.71 / 0.50 /
// 0.34). No shape measured favoured MKL, so there is no shape rule.
// SPARSETICKET_ROWGEMM=0 / 1 forces a path (A/B runs and the tests of the MKL path).
bool use_rowgemm(at::ScalarType dtype) {
  static const int forced = [] {
    const char* e = std::getenv("SPARSETICKET_ROWGEMM");
    return e && *e ? std::atoi(e) : -1;
  }();
  if (forced >= 0) return forced == 1 && (dtype == at::kFloat || dtype == at::kDouble);
  return dtype == at::kFloat || dtype == at::kDouble;
}

// gW of the active rows straight into the output, frozen rows zeroed in the same pass.
Tensor rowgemm(const Tensor& gy_, const Tensor& x_, const int64_t* rows, int64_t k, const bool* active) {
  const Tensor gy = gy_.stride(1) == 1 ? gy_ : gy_.contiguous();
  const Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();
  const int64_t B = gy.size(0), O = gy.size(1), I = x.size(1);
  std::vector<int64_t> frozen;
  frozen.reserve(O - k);
  for (int64_t r = 0; r < O; ++r)
    if (!active[r]) frozen.push_back(r);
  Tensor out = at::empty({O, I}, gy.options());
  Tensor gyt = at::empty({k + 1, B}, gy.options());  // the active columns of gy as rows; row k zeros
  const int64_t sb = gy.stride(0);
  std::memset(static_cast<char*>(gyt.data_ptr()) + k * B * gy.element_size(), 0, B * gy.element_size());
  // gyt's rows [j0, j1), 16 batch entries at a time: 16 rows of gy read at the active
  // columns, 64-byte runs written per active column. Each thread transposes the rows it
  // then multiplies, in the same parallel region (a region of its own cost ~5 us a call).
  auto transpose = [&](int64_t j0, int64_t j1) {
    AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "sparseticket_rowgemm", [&] {
      const scalar_t* g = gy.data_ptr<scalar_t>();
      scalar_t* t = gyt.data_ptr<scalar_t>();
      for (int64_t bb = 0; bb < B; bb += 16) {
        const int64_t be = std::min(bb + 16, B);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t b = bb; b < be; ++b) t[j * B + b] = g[b * sb + rows[j]];
      }
    });
  };
  RowGemmArgs a{};
  a.gyt = gyt.data_ptr();
  a.ldg = B;
  a.zero = static_cast<const char*>(gyt.data_ptr()) + k * B * gy.element_size();  // gyt's row k
  a.x = x.data_ptr();
  a.ldx = x.stride(0);
  a.B = B;
  a.rows = rows;
  a.k = k;
  a.frozen = frozen.data();
  a.n_frozen = static_cast<int64_t>(frozen.size());
  a.I = I;
  a.out = out.data_ptr();
  a.ldo = I;
  const RowGemmFn fn = gy.scalar_type() == at::kFloat ? kernel_table().rowgemm_f32 : kernel_table().rowgemm_f64;
  // On the pool, threads split the rows: each takes a contiguous share of the active rows'
  // tiles and of the frozen rows, over every column. (Split by columns instead, each
  // thread wrote half of every output row; in some processes of this VM that ran 1.4x
  // slower. In-process A/B, 2 threads, time rows / columns: 256x1024x1024 at f = 0.5 /
  // 0.75 / 0.95: 0.82-0.98 / 0.69-1.0 / 0.36-0.88, 60x784x300 at 0.5 / 0.9: 0.84 /
  // 0.18-0.45, 60x300x100 0.80, 64x6272x256 0.95, 128x4096x4096 at 0.5 0.97-1.0.)
  const int64_t T = at::get_num_threads();
  if (T > 1 && k * B * I >= serial_work() && !at::in_parallel_region()) {
    const int64_t tiles = (k + kRowGemmShareRows - 1) / kRowGemmShareRows;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = std::min(k, tiles * t / T * kRowGemmShareRows);
        const int64_t j1 = std::min(k, tiles * (t + 1) / T * kRowGemmShareRows);
        const int64_t f0 = a.n_frozen * t / T, f1 = a.n_frozen * (t + 1) / T;
        // rows [j0, j1) of gyt; a share's partial last tile reads gyt's zero row (a.zero) into
        // scratch (with AVX2's 5-row tiles every share can end in one)
        RowGemmArgs la = a;
        la.gyt = static_cast<const char*>(a.gyt) + j0 * B * gy.element_size();
        la.rows = rows + j0;
        la.k = j1 - j0;
        la.frozen = frozen.data() + f0;
        la.n_frozen = f1 - f0;
        transpose(j0, j1);
        fn(la, 0, I);
      }
    });
  } else {
    transpose(0, k);
    fn(a, 0, I);
  }
  return out;
}

Tensor row_masked_grad_weight_cpu(const Tensor& gy, const Tensor& x, const c10::optional<Tensor>& active) {
  check_float(gy, "gy");
  check_dim(gy, 2, "gy");
  check_cpu(gy, "gy");
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_cpu(x, "x");
  check_same_dtype(x, "x", gy, "gy");
  TORCH_CHECK(gy.size(0) == x.size(0), "sparseticket: gy has batch ", gy.size(0), " but x has batch ", x.size(0));
  check_active(active, gy.size(1));
  if (!active) return gy.t().mm(x);
  // Only the active neurons' rows are multiplied: cost scales with (1 - frozen fraction).
  const Tensor act = active->contiguous();
  const bool* am = act.data_ptr<bool>();
  const int64_t O = gy.size(1);
  // indices of the active rows, and for every row its row of the product (-1: frozen);
  // a loop here is a few hundred ns where nonzero() cost ~6 us at LeNet sizes
  Tensor rows = at::empty({O}, gy.options().dtype(at::kLong));
  int64_t* rp = rows.data_ptr<int64_t>();
  std::vector<int64_t> src(O);
  int64_t k = 0;
  for (int64_t r = 0; r < O; ++r) {
    src[r] = am[r] ? k : -1;
    if (am[r]) rp[k++] = r;
  }
  if (k == 0) return at::zeros({O, x.size(1)}, gy.options());
  if (k == O) return gy.t().mm(x);
  if (use_rowgemm(gy.scalar_type())) return rowgemm(gy, x, rp, k, am);
  // The product of the active rows goes into a per-thread workspace (reused between calls:
  // a fresh [k, I] buffer each call paid its page faults), then every output row is
  // filled in parallel: an active row copies its product row, a frozen row is zeroed.
  // (Writing the product into the output's first k rows and moving them down in place
  // needs a serial pass from the last row, which cost ~0.1 of the dense time at f=0.75.)
  const int64_t I = x.size(1);
  Tensor prod = grad_workspace(k * I, gy.options()).view({k, I});
  at::mm_out(prod, gy.index_select(1, rows.narrow(0, 0, k)).t(), x);
  Tensor out = at::empty({O, I}, gy.options());
  const size_t row_bytes = static_cast<size_t>(I) * out.element_size();
  const char* pp = static_cast<const char*>(prod.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<size_t>(1, row_bytes));
  at::parallel_for(0, O, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (src[r] >= 0) std::memcpy(op + r * row_bytes, pp + src[r] * row_bytes, row_bytes);
      else std::memset(op + r * row_bytes, 0, row_bytes);
    }
  });
  if (prod.numel() * prod.element_size() > kWorkspaceKeepBytes) release_grad_workspace();
  return out;
}

void check_sparse_linear_extra(const Tensor& x, const Tensor& crow, const Tensor& ccol,
                               const c10::optional<Tensor>& active) {
  check_active(active, crow.numel() - 1);
  check_index(ccol, "ccol");
  TORCH_CHECK(x.dim() != 2 || x.size(1) == ccol.numel() - 1, "sparseticket: x has ", x.dim() == 2 ? x.size(1) : 0,
              " features but the ticket expects in_features=", ccol.numel() - 1, " (ccol has ", ccol.numel(),
              " entries)");
}

Tensor sparse_linear_cpu(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                         const Tensor& ccol, const Tensor& row, const Tensor& perm, const c10::optional<Tensor>& bias,
                         const c10::optional<Tensor>& active) {
  check_sparse_linear_extra(x, crow, ccol, active);
  return spmm_impl(x, values, crow, col, bias, false);
}

// relu(sparse_linear(...)) in one pass: the ReLU is applied as the output tile is written
Tensor sparse_linear_relu_cpu(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                              const Tensor& ccol, const Tensor& row, const Tensor& perm,
                              const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active) {
  check_sparse_linear_extra(x, crow, ccol, active);
  return spmm_impl(x, values, crow, col, bias, true);
}

// gb[o] = 0 where active[o] is false (the bias gradient of frozen neurons), gb a fresh
// contiguous [O]: a loop, where at::where's dispatch and set-up cost ~5 us a layer at
// LeNet's sizes. Assignment, not a multiply, so an inf/NaN sum at a frozen entry is 0 too.
void zero_frozen(Tensor& gb, const c10::optional<Tensor>& active) {
  if (!active) return;
  const Tensor keep_mask = active->contiguous();
  const bool* keep = keep_mask.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(gb.scalar_type(), "sparseticket_zero_frozen", [&] {
    scalar_t* out = gb.mutable_data_ptr<scalar_t>();
    for (int64_t o = 0, n = gb.numel(); o < n; ++o)
      if (!keep[o]) out[o] = scalar_t(0);
  });
}

// (g, gb): g = gy where y > 0, else 0 (ReLU's backward, as threshold_backward; gy as is
// when y is undefined), and gb[o] = sum over the batch of g[:, o], 0 for frozen rows.
// Small row-major layers take one plain loop for both, where threshold_backward's and
// sum's dispatch and TensorIterator set-up cost more than the arithmetic (~4-5 us each
// against ~1 us at LeNet's 60x300); larger ones those ops (threaded, cascade sum).
std::pair<Tensor, Tensor> relu_grad_and_bias_grad(const Tensor& gy, const Tensor& y,
                                                  const c10::optional<Tensor>& active) {
  const int64_t B = gy.size(0), O = gy.size(1);
  // (B <= 1024: a batch summed in order, not pairwise as at::sum does, stays short)
  const bool small = B <= 1024 && B * O <= (int64_t(1) << 16) && gy.is_contiguous() &&
                     (!y.defined() || y.is_contiguous());
  Tensor g, gb;
  if (!small) {
    g = y.defined() ? at::threshold_backward(gy, y, 0) : gy;
    gb = g.sum(0);
  } else {
    g = y.defined() ? at::empty({B, O}, gy.options()) : gy;
    gb = at::zeros({O}, gy.options());
    const ReluGradFn fn = gy.scalar_type() == at::kFloat ? kernel_table().relu_grad_f32 : kernel_table().relu_grad_f64;
    fn(gy.data_ptr(), y.defined() ? y.data_ptr() : nullptr, g.data_ptr(), gb.data_ptr(), B, O);
  }
  zero_frozen(gb, active);
  return {g, gb};
}

Tensor masked_bias_grad_cpu(const Tensor& gy, const c10::optional<Tensor>& active) {
  check_float(gy, "gy");
  check_cpu(gy, "gy");
  TORCH_CHECK(gy.dim() >= 2, "sparseticket: gy must have at least 2 dims (batch, out_features, ...), got shape ",
              gy.sizes());
  check_active(active, gy.size(1));
  if (active) check_cpu(*active, "active");
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < gy.dim(); ++d) dims.push_back(d);
  Tensor gb = gy.sum(dims);
  zero_frozen(gb, active);
  return gb;
}

// The gradients of sparse_linear / sparse_linear_relu (y given: gy is first masked where
// y <= 0, ReLU's backward) in one op: gx (when input_grad; else an empty [0, I]), the
// kept-weight gradient and the bias gradient. Against spmm_t + sddmm + sum (+
// threshold_backward) it packs gy once when both products read the same layout (one
// panel of whole vectors covering the batch, e.g. B <= 128 in float32 on AVX-512),
// checks the shared operands once, and is one dispatcher call instead of four to six.
std::tuple<Tensor, Tensor, Tensor> sparse_linear_backward_cpu(
    const Tensor& gy_, const c10::optional<Tensor>& y, const Tensor& x, const Tensor& values, const Tensor& crow,
    const Tensor& col, const Tensor& ccol, const Tensor& row, const Tensor& perm,
    const c10::optional<Tensor>& active, bool input_grad) {
  check_float(gy_, "gy");
  check_dim(gy_, 2, "gy");
  check_cpu(gy_, "gy");
  if (y) {
    check_cpu(*y, "y");
    check_same_dtype(*y, "y", gy_, "gy");
    TORCH_CHECK(y->sizes() == gy_.sizes(), "sparseticket: y has shape ", y->sizes(), " but gy has shape ",
                gy_.sizes());
  }
  const KeptRows k = checked_sddmm_args(gy_, x, crow, col, active);
  TORCH_CHECK(k.col.numel() == values.numel(), "sparseticket: col has ", k.col.numel(), " entries but values has ",
              values.numel());
  // the transposed structure's indices are range-checked only when gx reads through them
  const TransposedTicket t = checked_spmm_t_args(gy_, values, ccol, row, perm, input_grad);
  const int64_t B = gy_.size(0), O = gy_.size(1), I = t.ccol.numel() - 1, nnz = t.vals.numel();
  TORCH_CHECK(x.size(1) == I, "sparseticket: x has ", x.size(1), " features but the ticket expects in_features=", I,
              " (ccol has ", I + 1, " entries)");
  Tensor gy, gb;
  std::tie(gy, gb) = relu_grad_and_bias_grad(gy_, y ? *y : Tensor(), k.active);
  if (B == 0) return {at::empty({input_grad ? B : 0, I}, gy.options()), at::zeros({nnz}, gy.options()), gb};
  const int64_t lanes = vector_lanes(gy.scalar_type()), ld = round_up(B, lanes);
  Tensor panels, A;  // gy packed for spmm_t (panels of nv vectors) and for sddmm (one panel of ld)
  const int nv = panel_choice(B, O, lanes, gy.element_size());
  const BatchShards sh = nnz > 0 && (!input_grad || I > 0) ? kept_grad_shards(nnz, B, O, gy.scalar_type())
                                                            : BatchShards{};
  const bool gw_tiles = kept_grad_tiles(nnz, B, O, I, sh);
  if (sh.on()) {
    if (!input_grad) return {at::empty({0, I}, gy.options()), sharded_grads(gy, x, sh, k, nullptr), gb};
    ShardedGx g{at::empty({B, I}, gy.options()), nv,
                spmm_k_block(nv, lanes, gy.element_size(), O, I, nnz), t.ccol, t.row, t.vals, nullptr};
    if (g.k_block > 0 && sh.b[1] - sh.b[0] <= 2 * nv * lanes)
      g.perm = t.perm.data_ptr<int32_t>();  // as spmm_t_packed: perm read in the kernel
    else
      g.vals = gather(t.vals, t.perm);
    Tensor gv = sharded_grads(gy, x, sh, k, &g);
    return {g.out, gv, gb};
  }
  if (input_grad && I > 0) {
    panels = pack(gy, nv * lanes, nnz * B);
    if (nv * lanes == ld) A = panels;
  }
  Tensor gv;
  if (nnz == 0) {
    gv = at::zeros({0}, gy.options());
  } else {
    if (!A.defined()) A = pack(gy, ld, nnz * B);
    gv = gw_tiles ? sddmm_tiles(A, x, B, k)
                  : sddmm_packed(A, pack_reusing(x, ld, nnz * B), B, k.crow, k.col, k.active);
  }
  Tensor gx;
  if (!input_grad)
    gx = at::empty({0, I}, gy.options());
  else if (I == 0)
    gx = at::empty({B, 0}, gy.options());
  else
    gx = spmm_t_packed(panels, nv, B, t.vals, t.ccol, t.row, t.perm);
  return {gx, gv, gb};
}

Tensor neq_linear_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                      const c10::optional<Tensor>& active) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_cpu(x, "x");
  check_dim(weight, 2, "weight");
  check_cpu(weight, "weight");
  check_same_dtype(weight, "weight", x, "x");
  TORCH_CHECK(weight.size(1) == x.size(1), "sparseticket: weight has in_features ", weight.size(1), " but x has ",
              x.size(1));
  if (bias) {
    check_dim(*bias, 1, "bias");
    check_cpu(*bias, "bias");
    check_same_dtype(*bias, "bias", x, "x");
    TORCH_CHECK(bias->size(0) == weight.size(0), "sparseticket: bias has ", bias->size(0),
                " entries, expected out_features=", weight.size(0));
  }
  check_active(active, weight.size(0));
  return at::linear(x, weight, bias).contiguous();
}

// ----------------------------------------------------------------------------- masked optimizers
//
// Both fused optimizers share the plan: check every list, make every tensor
// contiguous (non-contiguous params/state are updated through a copy and written
// back), and cut the elements to update into jobs of at most kChunk. Frozen rows,
// given per row of a dense parameter or per CSR row of compact ticket values, never
// become jobs, so their memory is not even read.

struct UpdateJob {
  int64_t param;
  int64_t begin, end;
};

struct UpdatePlan {
  std::vector<std::vector<void*>> state;  // [n][n_state]: contiguous data of each state tensor
  std::vector<void*> p;
  std::vector<const void*> g;
  std::vector<const uint8_t*> keep, active;
  std::vector<UpdateJob> jobs;
  std::vector<Tensor> hold;
  std::vector<std::pair<Tensor, Tensor>> copy_back;  // (original, contiguous copy)
  void finish() {
    for (auto& pr : copy_back) pr.first.copy_(pr.second);
  }
};

std::string nth(const char* name, int64_t j) { return std::string(name) + "[" + std::to_string(j) + "]"; }

UpdatePlan plan_update(const char* op, at::TensorList params, at::TensorList grads,
                       const std::vector<std::pair<const char*, at::TensorList>>& states,
                       const c10::List<c10::optional<Tensor>>& keeps, const c10::List<c10::optional<Tensor>>& actives,
                       const c10::List<c10::optional<Tensor>>& row_ptrs) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto len_check = [&](int64_t got, const char* name) {
    TORCH_CHECK(got == n, "sparseticket: ", op, ": ", name, " has ", got, " entries but params has ", n);
  };
  len_check(grads.size(), "grads");
  for (const auto& st : states) len_check(st.second.size(), st.first);
  len_check(keeps.size(), "keep_masks");
  len_check(actives.size(), "active_masks");
  len_check(row_ptrs.size(), "row_ptrs");

  UpdatePlan plan;
  plan.state.resize(n);
  plan.p.resize(n);
  plan.g.resize(n);
  plan.keep.assign(n, nullptr);
  plan.active.assign(n, nullptr);
  constexpr int64_t kChunk = 1 << 15;
  auto add_range = [&](int64_t j, int64_t b, int64_t e) {
    for (int64_t s = b; s < e; s += kChunk) plan.jobs.push_back({j, s, std::min(e, s + kChunk)});
  };
  auto writable = [&](const Tensor& t) -> void* {
    if (t.is_contiguous()) return t.data_ptr();
    Tensor c = t.contiguous();
    plan.copy_back.emplace_back(t, c);
    return c.data_ptr();
  };
  for (int64_t j = 0; j < n; ++j) {
    const Tensor& p = params[j];
    const std::string pj = nth("params", j);
    check_float(p, pj.c_str());
    check_cpu(p, pj.c_str());
    const Tensor& g = grads[j];
    const std::string gj = nth("grads", j);
    check_cpu(g, gj.c_str());
    TORCH_CHECK(g.sizes() == p.sizes(), "sparseticket: ", gj, " has shape ", g.sizes(), " but ", pj, " has ", p.sizes());
    check_same_dtype(g, gj.c_str(), p, pj.c_str());
    plan.p[j] = writable(p);
    const Tensor gc = g.contiguous();
    plan.hold.push_back(gc);
    plan.g[j] = gc.data_ptr();
    for (const auto& st : states) {
      const Tensor& b = st.second[j];
      const std::string bj = nth(st.first, j);
      check_cpu(b, bj.c_str());
      TORCH_CHECK(b.sizes() == p.sizes(), "sparseticket: ", bj, " has shape ", b.sizes(), " but ", pj, " has ",
                  p.sizes());
      check_same_dtype(b, bj.c_str(), p, pj.c_str());
      plan.state[j].push_back(writable(b));
    }
    if (keeps[j].has_value()) {
      const Tensor& k = *keeps[j];
      const std::string kj = nth("keep_masks", j);
      check_bool_mask(k, kj.c_str());
      TORCH_CHECK(k.sizes() == p.sizes(), "sparseticket: ", kj, " has shape ", k.sizes(), " but ", pj, " has ",
                  p.sizes());
      const Tensor kc = k.contiguous();
      plan.hold.push_back(kc);
      plan.keep[j] = reinterpret_cast<const uint8_t*>(kc.data_ptr<bool>());
    }
    const int64_t numel = p.numel();
    c10::optional<Tensor> rp;
    if (row_ptrs[j].has_value()) {
      const std::string rj = nth("row_ptrs", j);
      check_index(*row_ptrs[j], rj.c_str());
      TORCH_CHECK(p.dim() == 1, "sparseticket: ", pj, " has row_ptrs so must be 1-D compact values, got shape ",
                  p.sizes());
      rp = contiguous_1d(*row_ptrs[j]);
      plan.hold.push_back(*rp);
      check_ptr(*rp, numel, rj.c_str());
    }
    if (!actives[j].has_value()) {
      add_range(j, 0, numel);
      continue;
    }
    const std::string aj = nth("active_masks", j);
    check_bool_mask(*actives[j], aj.c_str());
    const Tensor act = actives[j]->contiguous();
    plan.hold.push_back(act);
    const bool* am = act.data_ptr<bool>();
    // consecutive active rows become one range; frozen rows are skipped entirely
    auto add_rows = [&](int64_t R, auto row_begin) {
      for (int64_t i = 0; i < R;) {
        if (!am[i]) {
          ++i;
          continue;
        }
        int64_t k = i;
        while (k < R && am[k]) ++k;
        add_range(j, row_begin(i), row_begin(k));
        i = k;
      }
    };
    if (rp) {
      TORCH_CHECK(act.dim() == 1 && act.size(0) == rp->numel() - 1, "sparseticket: ", aj, " has shape ", act.sizes(),
                  " but row_ptrs[", j, "] describes ", rp->numel() - 1, " rows");
      const int32_t* r = rp->data_ptr<int32_t>();
      add_rows(act.size(0), [r](int64_t i) { return static_cast<int64_t>(r[i]); });
    } else if (act.sizes() == p.sizes()) {
      plan.active[j] = reinterpret_cast<const uint8_t*>(am);
      add_range(j, 0, numel);
    } else {
      TORCH_CHECK(act.dim() == 1 && p.dim() >= 1 && act.size(0) == p.size(0), "sparseticket: ", aj, " has shape ",
                  act.sizes(), "; expected ", p.sizes(), " (elements) or [", p.dim() ? p.size(0) : 1,
                  "] (rows) for ", pj);
      const int64_t R = act.size(0), row_len = R ? numel / R : 0;
      add_rows(R, [row_len](int64_t i) { return i * row_len; });
    }
  }
  return plan;
}

// Runs the plan's jobs in parallel with the kernel of each parameter's dtype.
template <typename Args, typename Fn>
void run_update(UpdatePlan& plan, at::TensorList params, const std::vector<Args>& args, Fn f32, Fn f64) {
  int64_t work = 0;  // elements updated, weighted 8x a multiply-add (3-4 memory streams each)
  for (const UpdateJob& job : plan.jobs) work += 8 * (job.end - job.begin);
  parallel_for_work(0, static_cast<int64_t>(plan.jobs.size()), 1, work, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const UpdateJob& job = plan.jobs[q];
      (params[job.param].scalar_type() == at::kFloat ? f32 : f64)(args[job.param], job.begin, job.end);
    }
  });
  plan.finish();
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                    const c10::List<c10::optional<Tensor>>& keeps, const c10::List<c10::optional<Tensor>>& actives,
                    const c10::List<c10::optional<Tensor>>& row_ptrs, c10::List<bool> fresh, double lr,
                    double momentum, double dampening, double weight_decay, bool nesterov, bool maximize) {
  TORCH_CHECK(static_cast<int64_t>(fresh.size()) == static_cast<int64_t>(params.size()),
              "sparseticket: masked_sgd_: fresh has ", fresh.size(), " entries but params has ", params.size());
  std::vector<std::pair<const char*, at::TensorList>> states;
  if (momentum != 0) states.emplace_back("momentum_buffers", bufs);
  UpdatePlan plan = plan_update("masked_sgd_", params, grads, states, keeps, actives, row_ptrs);
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<SgdArgs> args(n);
  for (int64_t j = 0; j < n; ++j) {
    SgdArgs& a = args[j];
    a.p = plan.p[j];
    a.g = plan.g[j];
    a.buf = momentum != 0 ? plan.state[j][0] : nullptr;
    a.keep = plan.keep[j];
    a.active = plan.active[j];
    a.fresh = fresh.get(j);
    a.lr = lr;
    a.momentum = momentum;
    a.dampening = dampening;
    a.weight_decay = weight_decay;
    a.nesterov = nesterov;
    a.maximize = maximize;
  }
  run_update(plan, params, args, kernel_table().sgd_f32, kernel_table().sgd_f64);
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      const c10::List<c10::optional<Tensor>>& keeps, const c10::List<c10::optional<Tensor>>& actives,
                      const c10::List<c10::optional<Tensor>>& row_ptrs, c10::ArrayRef<double> steps, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize) {
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == static_cast<int64_t>(params.size()),
              "sparseticket: masked_adamw_: steps has ", steps.size(), " entries but params has ", params.size());
  std::vector<std::pair<const char*, at::TensorList>> states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) states.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
  for (size_t j = 0; j < steps.size(); ++j)
    TORCH_CHECK(steps[j] >= 1, "sparseticket: masked_adamw_: steps[", j, "] is ", steps[j],
                "; it must be >= 1 (the count after this step)");
  UpdatePlan plan = plan_update("masked_adamw_", params, grads, states, keeps, actives, row_ptrs);
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<AdamWArgs> args(n);
  for (int64_t j = 0; j < n; ++j) {
    AdamWArgs& a = args[j];
    a.p = plan.p[j];
    a.g = plan.g[j];
    a.exp_avg = plan.state[j][0];
    a.exp_avg_sq = plan.state[j][1];
    a.max_exp_avg_sq = amsgrad ? plan.state[j][2] : nullptr;
    a.keep = plan.keep[j];
    a.active = plan.active[j];
    a.lr = lr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.weight_decay = weight_decay;
    a.step = steps[j];
    a.maximize = maximize;
  }
  run_update(plan, params, args, kernel_table().adamw_f32, kernel_table().adamw_f64);
}

// ----------------------------------------------------------------------------- conversions

std::tuple<Tensor, Tensor, Tensor> dense_to_ticket_cpu(const Tensor& weight_, const Tensor& mask_) {
  check_float(weight_, "weight");
  check_dim(weight_, 2, "weight");
  check_cpu(weight_, "weight");
  check_bool_mask(mask_, "mask");
  TORCH_CHECK(mask_.sizes() == weight_.sizes(), "sparseticket: mask has shape ", mask_.sizes(), " but weight has ",
              weight_.sizes());
  const Tensor weight = weight_.contiguous(), mask = mask_.contiguous();
  const int64_t O = weight.size(0), I = weight.size(1);
  TORCH_CHECK(I < (int64_t(1) << 31) && O < (int64_t(1) << 31), "sparseticket: weight is too large for int32 indices");
  Tensor crow = at::empty({O + 1}, weight.options().dtype(at::kInt));
  int32_t* cr = crow.data_ptr<int32_t>();
  const bool* m = mask.data_ptr<bool>();
  std::vector<int64_t> counts(O);
  at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t c = 0;
      const bool* mr = m + r * I;
      for (int64_t i = 0; i < I; ++i) c += mr[i];
      counts[r] = c;
    }
  });
  int64_t nnz = 0;
  cr[0] = 0;
  for (int64_t r = 0; r < O; ++r) {
    nnz += counts[r];
    TORCH_CHECK(nnz < (int64_t(1) << 31), "sparseticket: more than 2^31 kept weights");
    cr[r + 1] = static_cast<int32_t>(nnz);
  }
  Tensor values = at::empty({nnz}, weight.options());
  Tensor col = at::empty({nnz}, weight.options().dtype(at::kInt));
  int32_t* cc = col.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "dense_to_ticket", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* v = values.data_ptr<scalar_t>();
    at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t k = cr[r];
        const bool* mr = m + r * I;
        const scalar_t* wr = w + r * I;
        for (int64_t i = 0; i < I; ++i) {
          if (mr[i]) {
            v[k] = wr[i];
            cc[k] = static_cast<int32_t>(i);
            ++k;
          }
        }
      }
    });
  });
  return {values, crow, col};
}

std::tuple<Tensor, Tensor, Tensor> ticket_transpose_cpu(const Tensor& crow_, const Tensor& col_, int64_t n_cols) {
  check_index(crow_, "crow");
  check_index(col_, "col");
  TORCH_CHECK(n_cols >= 0, "sparseticket: n_cols must be >= 0, got ", n_cols);
  const Tensor crow = contiguous_1d(crow_), col = contiguous_1d(col_);
  const int64_t O = crow.numel() - 1, nnz = col.numel();
  check_ptr(crow, nnz, "crow");
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cc = col.data_ptr<int32_t>();
  // check_ptr has checked crow; the indices must be in range and, once per mask,
  // strictly increasing within each row (the kernels' blocked loops rely on the order).
  check_index_range(col, n_cols, "col", "n_cols");
  for (int64_t r = 0; r < O; ++r)
    for (int64_t e = cr[r] + 1; e < cr[r + 1]; ++e)
      TORCH_CHECK(cc[e] > cc[e - 1], "sparseticket: col must be strictly increasing within a row (row ", r, ")");
  Tensor ccol = at::zeros({n_cols + 1}, crow.options());
  Tensor row = at::empty({nnz}, crow.options());
  Tensor perm = at::empty({nnz}, crow.options());
  int32_t* cp = ccol.data_ptr<int32_t>();
  int32_t* rw = row.data_ptr<int32_t>();
  int32_t* pm = perm.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e) ++cp[cc[e] + 1];
  for (int64_t c = 0; c < n_cols; ++c) cp[c + 1] += cp[c];
  std::vector<int32_t> next(cp, cp + n_cols);
  for (int64_t r = 0; r < O; ++r) {
    for (int64_t e = cr[r]; e < cr[r + 1]; ++e) {
      const int32_t dst = next[cc[e]]++;
      rw[dst] = static_cast<int32_t>(r);
      pm[dst] = static_cast<int32_t>(e);
    }
  }
  return {ccol, row, perm};
}

Tensor ticket_to_dense_cpu(const Tensor& values_, const Tensor& crow_, const Tensor& col_, int64_t n_cols) {
  check_float(values_, "values");
  check_dim(values_, 1, "values");
  check_cpu(values_, "values");
  check_index(crow_, "crow");
  check_index(col_, "col");
  TORCH_CHECK(col_.numel() == values_.numel(), "sparseticket: col has ", col_.numel(), " entries but values has ",
              values_.numel());
  const Tensor values = contiguous_1d(values_), crow = contiguous_1d(crow_), col = contiguous_1d(col_);
  check_ptr(crow, values.numel(), "crow");
  check_index_range(col, n_cols, "col", "n_cols");
  const int64_t O = crow.numel() - 1;
  Tensor out = at::zeros({O, n_cols}, values.options());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cc = col.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ticket_to_dense", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t k = cr[r]; k < cr[r + 1]; ++k) o[r * n_cols + cc[k]] = v[k];
    });
  });
  return out;
}

// Set bits in words[0, n). This file is built for the baseline ISA, where
// __builtin_popcountll is a call into libgcc's bit-twiddling loop (check_bitmap of a
// 300x784 ticket: ~7 us of ticket_expand's ~40); the POPCNT instruction is taken when the
// CPU has it (every x86-64 since ~2008).
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("popcnt"))) int64_t count_bits_popcnt(const uint64_t* words, int64_t n) {
  int64_t c = 0;
  for (int64_t w = 0; w < n; ++w) c += __builtin_popcountll(words[w]);
  return c;
}
#endif
int64_t count_bits(const uint64_t* words, int64_t n) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("popcnt");
  if (hw) return count_bits_popcnt(words, n);
#endif
  int64_t c = 0;
  for (int64_t w = 0; w < n; ++w) c += __builtin_popcountll(words[w]);
  return c;
}

// bits: int64 [R, ceil(K / 64)] whose row r has exactly ptr[r + 1] - ptr[r] bits set,
// none at or past column K. O(R * words) popcounts: cheap next to the O(R * K) copy.
void check_bitmap(const Tensor& bits, const Tensor& ptr, int64_t K) {
  TORCH_CHECK(bits.scalar_type() == at::kLong, "sparseticket: bits must be int64, got ", bits.scalar_type());
  check_cpu(bits, "bits");
  check_dim(bits, 2, "bits");
  const int64_t R = ptr.numel() - 1, words = (K + 63) / 64;
  TORCH_CHECK(bits.size(0) == R && bits.size(1) == words, "sparseticket: bits has shape ", bits.sizes(),
              ", expected [", R, ", ", words, "] (rows, ceil(n_cols / 64))");
  TORCH_CHECK(bits.is_contiguous(), "sparseticket: bits must be contiguous");
  const uint64_t* b = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  const int32_t* p = ptr.data_ptr<int32_t>();
  const uint64_t tail = K % 64 ? ~uint64_t(0) << (K % 64) : 0;
  int64_t bad = -1;
  for (int64_t r = 0; r < R && bad < 0; ++r) {
    const int64_t n = count_bits(b + r * words, words);
    if (n != p[r + 1] - p[r] || (words && (b[r * words + words - 1] & tail))) bad = r;
  }
  TORCH_CHECK(bad < 0, "sparseticket: bits row ", bad, " does not match the ticket (it must set exactly crow[r+1]-crow[r]",
              " bits, none at or past n_cols=", K, ")");
}

BitmapArgs bitmap_args(const Tensor& crow, const Tensor& bits, int64_t K) {
  BitmapArgs a{};
  a.ptr = crow.data_ptr<int32_t>();
  a.bits = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  a.words = bits.size(1);
  a.K = K;
  return a;
}

// Grain: rows of at least ~16K elements per task, so small layers stay on one thread.
int64_t bitmap_grain(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, K)); }

Tensor ticket_bitmap_cpu(const Tensor& crow_, const Tensor& col_, int64_t n_cols) {
  check_index(crow_, "crow");
  check_index(col_, "col");
  const Tensor crow = contiguous_1d(crow_), col = contiguous_1d(col_);
  check_ptr(crow, col.numel(), "crow");
  check_index_range(col, n_cols, "col", "n_cols");
  const int64_t R = crow.numel() - 1, words = (n_cols + 63) / 64;
  Tensor bits = at::zeros({R, words}, crow.options().dtype(at::kLong));
  uint64_t* b = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  const int32_t* p = crow.data_ptr<int32_t>();
  const int32_t* c = col.data_ptr<int32_t>();
  int64_t bad = -1;
  for (int64_t r = 0; r < R && bad < 0; ++r)
    for (int64_t k = p[r]; k < p[r + 1]; ++k) {
      if (k > p[r] && c[k] <= c[k - 1]) {  // expand/compress visit columns in order
        bad = r;
        break;
      }
      b[r * words + (c[k] >> 6)] |= uint64_t(1) << (c[k] & 63);
    }
  TORCH_CHECK(bad < 0, "sparseticket: ticket_bitmap: the columns of row ", bad,
              " are not strictly increasing (sort them, e.g. by rebuilding the ticket with dense_to_ticket)");
  return bits;
}

Tensor ticket_expand_cpu(const Tensor& values_, const Tensor& crow_, const Tensor& bits, int64_t n_cols) {
  check_float(values_, "values");
  check_dim(values_, 1, "values");
  check_cpu(values_, "values");
  check_index(crow_, "crow");
  const Tensor values = contiguous_1d(values_), crow = contiguous_1d(crow_);
  check_ptr(crow, values.numel(), "crow");
  check_bitmap(bits, crow, n_cols);
  const int64_t R = crow.numel() - 1;
  Tensor out = at::empty({R, n_cols}, values.options());
  BitmapArgs a = bitmap_args(crow, bits, n_cols);
  a.vals = values.data_ptr();
  a.dense = out.data_ptr();
  a.ld = n_cols;
  const BitmapFn fn = values.scalar_type() == at::kFloat ? kernel_table().expand_f32 : kernel_table().expand_f64;
  at::parallel_for(0, R, bitmap_grain(n_cols), [&](int64_t b, int64_t e) { fn(a, b, e); });
  return out;
}

Tensor ticket_compress_cpu(const Tensor& dense_, const Tensor& crow_, const Tensor& bits, c10::SymInt nnz_) {
  check_float(dense_, "dense");
  check_dim(dense_, 2, "dense");
  check_cpu(dense_, "dense");
  check_index(crow_, "crow");
  const int64_t nnz = nnz_.expect_int();
  const Tensor crow = contiguous_1d(crow_);
  TORCH_CHECK(dense_.size(0) == crow.numel() - 1, "sparseticket: dense has ", dense_.size(0), " rows but crow has ",
              crow.numel() - 1);
  check_ptr(crow, nnz, "crow");
  const int64_t K = dense_.size(1);
  check_bitmap(bits, crow, K);
  const Tensor dense = dense_.stride(1) == 1 ? dense_ : dense_.contiguous();
  Tensor out = at::empty({nnz}, dense.options());
  BitmapArgs a = bitmap_args(crow, bits, K);
  a.vals = out.data_ptr();
  a.dense = const_cast<void*>(dense.const_data_ptr());
  a.ld = dense.stride(0);
  const BitmapFn fn = dense.scalar_type() == at::kFloat ? kernel_table().compress_f32 : kernel_table().compress_f64;
  at::parallel_for(0, crow.numel() - 1, bitmap_grain(K), [&](int64_t b, int64_t e) { fn(a, b, e); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseticket, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("spmm_t", &spmm_t_cpu);
  m.impl("sddmm", &sddmm_cpu);
  m.impl("row_masked_grad_weight", &row_masked_grad_weight_cpu);
  m.impl("masked_bias_grad", &masked_bias_grad_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear_relu", &sparse_linear_relu_cpu);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cpu);
  m.impl("neq_linear", &neq_linear_cpu);
  m.impl("masked_sgd_", &masked_sgd_cpu);
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("dense_to_ticket", &dense_to_ticket_cpu);
  m.impl("ticket_transpose", &ticket_transpose_cpu);
  m.impl("ticket_to_dense", &ticket_to_dense_cpu);
  m.impl("ticket_bitmap", &ticket_bitmap_cpu);
  m.impl("ticket_expand", &ticket_expand_cpu);
  m.impl("ticket_compress", &ticket_compress_cpu);
}

}  // namespace cpu
}  // namespace sparseticket

namespace sparseticket {
void register_mlp_step(pybind11::module& m);    // csrc/mlp_step.cpp
void register_fast_calls(pybind11::module& m);  // csrc/fast_calls.cpp
}  // namespace sparseticket

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparseticket compiled kernels (registered into torch.ops.sparseticket on import)";
  sparseticket::register_mlp_step(m);
  sparseticket::register_fast_calls(m);
  m.def("cpu_isa", [] { return std::string(sparseticket::cpu::kernel_table().isa); },
        "ISA of the CPU kernel table in use: avx512, avx2 or base");
  m.def("cpu_vector_bytes", [] { return sparseticket::cpu::kernel_table().vector_bytes; });
  m.def("cpu_conv_tuning", [] { return std::string(sparseticket::cpu::conv_tuning()); },
        "Which measured thresholds pick the direct conv's layouts: intel or zen4 (csrc/cpu/ops_conv.cpp)");
  m.def("set_serial_work", [](int64_t w) { return sparseticket::cpu::set_serial_work(w); },
        "Sets the work (multiply-adds) below which a CPU op runs on the calling thread; returns the previous value.");
  m.def("sddmm_uses_tiles",
        [](int64_t nnz, int64_t B, int64_t O, int64_t I, bool double_precision) {
          const at::ScalarType t = double_precision ? at::kDouble : at::kFloat;
          return sparseticket::cpu::kept_grad_tiles(nnz, B, O, I, sparseticket::cpu::kept_grad_shards(nnz, B, O, t));
        },
        pybind11::arg("nnz"), pybind11::arg("B"), pybind11::arg("O"), pybind11::arg("I"),
        pybind11::arg("double_precision") = false,
        "Whether the CPU kept-weight gradient of a [O, I] ticket with nnz kept weights at batch B runs by dense "
        "tiles (every column of each active row computed; ops_cpu.cpp, kept_grad_tiles): what FLOP accounting reads.");
  m.def("set_batch_shards", [](bool on) { return sparseticket::cpu::batch_shards_setting().exchange(on); },
        "Turns batch shards (ops_cpu.cpp) on or off; returns the previous setting.");
  m.def("with_cuda", [] {
#ifdef SPARSETICKET_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
