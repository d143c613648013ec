// sparseticket CPU kernel core: torch-free declarations.
//
// Kernels take plain structs of pointers, sizes and strides and a range of rows to
// work on; threading, allocation and argument checking live in the ATen glue
// (ops_cpu.cpp). The core is compiled once per ISA (kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_base.cpp) and `kernel_table()` picks the best one the CPU
// supports at run time.
#pragma once
#include <cstdint>

namespace sparseticket {
namespace cpu {

// Packed dense operand: P[panel][k][lane] with `panel_width` lanes per row, zero padded
// past the batch size. A panel row is what one sparse entry multiplies.
//
// out[b * ldo_b + r * ldo_r] = bias[r] + sum_{e in row r} val(e) * P[panel(b)][idx[e]][lane(b)]
// where val(e) = val[perm ? perm[e] : e].
struct SpmmArgs {
  const int32_t* ptr;   // [R + 1]
  const int32_t* idx;   // [nnz]
  const int32_t* perm;  // [nnz] or nullptr
  const void* val;      // [nnz]
  const void* bias;     // [R] or nullptr
  const void* packed;   // [n_panels][K][panel_width]
  int64_t panel_width;  // lanes per panel (a multiple of the vector length)
  int64_t K;            // rows of the packed operand
  int64_t B;            // valid batch entries
  int64_t k_block;      // visit the panel in blocks of this many rows (0: no blocking)
  void* out;
  int64_t ldo_b, ldo_r;  // output strides (elements) along batch and along rows
  bool relu;             // out = max(0, .) as it is written (sparse_linear_relu); NaN stays NaN
};

// g[e] = sum_b A[r][b] * X[idx[e]][b] for e in row r; rows with active[r] == 0 give 0.
// A: [R][ld], X: [K][ld], both batch-contiguous and zero padded to `ld` (a multiple of
// the vector length).
struct SddmmArgs {
  const int32_t* ptr;
  const int32_t* idx;
  const uint8_t* active;  // [R] or nullptr
  const void* a;
  const void* x;
  int64_t ld;
  int64_t K;        // rows of X
  int64_t k_block;    // visit entries in blocks of this many X rows (0: no blocking)
  int64_t row_block;  // rows that visit the blocks together (0: all rows of the call)
  void* out;          // [nnz]
  // sddmm_tile only: x row-major [B][ldx] (not packed), the batch size, and [ld] zeros
  // that the padding rows of a partial tile read
  int64_t B, ldx;
  const void* zero_row;
};

// One fused masked SGD step over elements [begin, end) of one parameter (see
// reference_masked_sgd_ in sparseticket/ops/reference.py for the maths).
struct SgdArgs {
  void* p;
  const void* g;
  void* buf;              // nullptr when momentum == 0
  const uint8_t* keep;    // per element, or nullptr
  const uint8_t* active;  // per element, or nullptr (row masks are applied by the caller)
  bool fresh;
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// One fused masked AdamW step (torch.optim.AdamW's maths; `step` is the step count
// after this update, for the bias corrections).
struct AdamWArgs {
  void* p;
  const void* g;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  const uint8_t* keep;
  const uint8_t* active;
  double lr, beta1, beta2, eps, weight_decay, step;
  bool maximize;
};

// Compact values <-> dense rows through a bitmap of the kept positions: row r keeps the
// columns whose bit is set in bits[r * words ...] (bit c % 64 of word c / 64), in
// increasing column order, with values vals[ptr[r] .. ptr[r + 1]). Expand writes the
// dense rows (0 at pruned columns); compress gathers the dense rows' kept entries.
struct BitmapArgs {
  const int32_t* ptr;     // [R + 1]
  const uint64_t* bits;   // [R][words], no bit set at or past K
  int64_t words;
  int64_t K;              // columns
  void* vals;             // [nnz]: read by expand, written by compress
  void* dense;            // row r at dense + r * ld: written by expand, read by compress
  int64_t ld;
};

// Neuron-skipping weight gradient: out[rows[j], c] = sum_b gyt[j * ldg + b] * x[b * ldx + c]
// for the k active rows, out[frozen[i], c] = 0, each element written once, over a range of
// columns. ops_cpu.cpp gives every call all columns and splits rows between threads: each
// gets its own rows, frozen rows and gyt rows (from a multiple of kRowGemmShareRows, the
// AVX-512 tile).
// A partial row tile's missing rows read `zero` (gyt's zero row) into scratch, never into
// out. (They read the row after the share's last before review 47: the next share's first,
// which its thread was writing at the time; harmless in effect, but a data race.)
struct RowGemmArgs {
  const void* gyt;          // [k][ldg]: the call's share of gy's active columns (in `rows` order), transposed
  int64_t ldg;
  const void* zero;         // [ldg] zeros
  const void* x;            // [B][ldx]
  int64_t ldx;
  int64_t B;
  const int64_t* rows;      // [k] active rows
  int64_t k;
  const int64_t* frozen;    // [O - k] frozen rows
  int64_t n_frozen;
  int64_t I;                // columns
  void* out;                // [O][ldo]
  int64_t ldo;
};
constexpr int64_t kRowGemmShareRows = 6;

using SpmmFn = void (*)(const SpmmArgs&, int64_t r_begin, int64_t r_end);
using RowGemmFn = void (*)(const RowGemmArgs&, int64_t block_begin, int64_t block_end);
using BitmapFn = void (*)(const BitmapArgs&, int64_t r_begin, int64_t r_end);
using SddmmFn = void (*)(const SddmmArgs&, int64_t r_begin, int64_t r_end);
// sddmm_tile: the same gradient by dense tiles. Each active row's whole row of gyᵀ x is
// computed with the row-subset tile (rowgemm_tile) into scratch and its kept entries are
// gathered from it, so the cost is that of the dense gradient of the active rows whatever
// the density; above a density it beats the per-entry kernel (ops_cpu.cpp, sddmm_tiles).
using SgdFn = void (*)(const SgdArgs&, int64_t begin, int64_t end);
using AdamWFn = void (*)(const AdamWArgs&, int64_t begin, int64_t end);
// dst[k * pw + lane] = X[lane * sb + k * sk] (lane < nb; 0 up to pw) for k in [k0, k1)
using PackFn = void (*)(const void* X, int64_t sb, int64_t sk, void* dst, int64_t pw, int64_t nb, int64_t k0,
                        int64_t k1);

// (min, max) of ix[0, n), n >= 1: the range check of every op's index arrays (checks.h),
// per ISA (the baseline build's SSE2 had no packed 32-bit min/max: ~1.2 cycles per index)
using IndexRangeFn = void (*)(const int32_t* ix, int64_t n, int32_t* lo, int32_t* hi);
// How many r < R have p[r + 1] < p[r] (the row-pointer check, checks.h; 0 for valid ones)
using DecreasesFn = int64_t (*)(const int32_t* p, int64_t R);

// ReLU's backward and the bias gradient of a small row-major [B, O] gy in one pass:
// out = gy where y > 0 else 0 (gy as is, out unused, when y is null), sum[o] += out[b][o]
// over b (ops_cpu.cpp, relu_grad_and_bias_grad)
using ReluGradFn = void (*)(const void* gy, const void* y, void* out, void* sum, int64_t B, int64_t O);

// Panel widths, in vectors, for which spmm is instantiated.
constexpr int kPanelChoices = 4;  // 1, 2, 4, 8 vectors

struct KernelTable {
  const char* isa;
  int vector_bytes;
  SpmmFn spmm_f32[kPanelChoices];
  SpmmFn spmm_f64[kPanelChoices];
  SddmmFn sddmm_f32;
  SddmmFn sddmm_f64;
  SddmmFn sddmm_tile_f32;
  SddmmFn sddmm_tile_f64;
  SgdFn sgd_f32;
  SgdFn sgd_f64;
  AdamWFn adamw_f32;
  AdamWFn adamw_f64;
  PackFn pack_f32;
  PackFn pack_f64;
  BitmapFn expand_f32;
  BitmapFn expand_f64;
  BitmapFn compress_f32;
  BitmapFn compress_f64;
  RowGemmFn rowgemm_f32;
  RowGemmFn rowgemm_f64;
  IndexRangeFn index_range;
  DecreasesFn decreases;
  ReluGradFn relu_grad_f32;
  ReluGradFn relu_grad_f64;
};

namespace avx512 { KernelTable make_table(); }
namespace avx2 { KernelTable make_table(); }
namespace base { KernelTable make_table(); }

// The table for the best ISA this CPU supports (or the one forced with
// SPARSETICKET_ISA=avx512|avx2|base).
const KernelTable& kernel_table();

}  // namespace cpu
}  // namespace sparseticket
