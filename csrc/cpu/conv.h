// sparseticket direct sparse convolution: torch-free kernel core.
//
// No im2col. The glue (ops_conv.cpp) copies one image at a time into a zero-padded,
// per-thread buffer ("packing", see pack_planes) and turns the ticket into lists of
// (offset into that buffer, weight) entries, one list per output plane. Then
//
//   out[l][r][q] = bias[l] + sum_{e in list l} val[e] * in[off[e] + r * in_row + q]
//
// is the whole forward (a list per output channel, `in` the padded input) and the whole
// input gradient (a list per input channel and output phase, `in` the padded gy, taps
// flipped). Each list entry is a shifted axpy over a tile of R output rows x NV vectors
// held in registers while the list's entries stream past (correlate).
//
// Row groups: entries of a list whose offsets are in_row (one output row) or 2*in_row
// apart read the same input rows, so correlate takes each list as kRunKinds runs: triples
// at offsets (o, o + in_row, o + 2 in_row), pairs at (o, o + in_row), pairs at
// (o, o + 2 in_row), singles. A group's entries are consecutive and the group's offset is
// its first entry's; the grouping is pure offset arithmetic, so it is valid for any
// layout (group_rows in ops_conv.cpp builds it).
//
// Blocks: each list is split into `blocks` sub-lists by the input plane its entries read
// (input channels in the forward, output channels' gy in the input gradient), and
// correlate runs tile by tile and, within a tile, block by block over all its lists, so
// the block's rows of the packed operand are reread from L1 by every list instead of
// streamed from L2 once per list (at low density each line fetched from L2 fed less than
// one FMA). Partial tiles wait in `scratch` between blocks.
//
// The kept-weight gradient uses the forward's buffer and lists (in runs, one block): for
// each entry, the dot product of the gy plane of its output channel with the shifted
// input (dots). With stride 1 along columns at middle densities it uses its own input
// layout (rows of whole vectors, no column shift in the offsets) and shifts gy instead
// (dots_shifted).
#pragma once
#include <cstdint>

namespace sparseticket {
namespace cpu {

struct CorrArgs {
  const void* in;           // packed operand
  int64_t in_row;           // elements of `in` between consecutive output rows
  const int32_t* ptr;       // [lists][blocks][kRunKinds] + 1: run boundaries of (list, block)
  int64_t blocks;           // >= 1
  void* scratch;            // blocks > 1: [l1 - l0][R][NV * L] partial tiles
  const int32_t* off;       // [entries] offset of each entry's (0, 0) input in `in`
  const void* val;          // [entries] weights, list order
  const void* bias;         // [lists] or nullptr
  void* out;                // plane of list l at out + l * out_plane
  int64_t out_plane, ldo;   // elements between planes / between rows of a plane
  // Valid output rows and columns. Stores are clipped to them, except that with AVX2 and
  // one column tile (ldo == cols) a row's ragged last vector may be stored whole, its
  // extra lanes on later rows [.., rows) of the same plane: the call must be given every
  // row in [0, rows) of each of its planes (it then writes them afterwards).
  int64_t rows, cols;
  int64_t col_tiles;        // column tiles of NV vectors per row tile
  bool relu;                // stores max(0, .) (sparse_conv2d_relu); a NaN stays NaN, as in torch.relu
};

struct DotArgs {
  const void* x;            // packed input (dots: the forward's layout; dots_shifted: its own)
  int64_t x_row;            // elements of `x` between consecutive output rows
  const void* g;            // gy of one image: plane l at g + l * g_plane, rows g_row apart
  int64_t g_plane, g_row;
  int64_t rows, cols;       // output rows and columns summed (dots_shifted: x's row width)
  const int32_t* ptr;       // [lists][kRunKinds] + 1: the runs of each list, as CorrArgs (one block)
  const int32_t* off;       // [entries]
  const uint8_t* active;    // [lists] or nullptr: lists with 0 are skipped
  void* out;                // [entries] accumulated into (+=), list order
  // dots_shifted only (stride 1 along columns): each list is `shifts` sub-lists, one per
  // tap column j, whose offsets leave out the column shift; for each sub-list the kernel
  // copies gy's plane (rows of g_row values) shifted right by j * shift_step (zeros
  // elsewhere, rows `cols` wide, a whole number of vectors) into `gbuf` ([rows][cols] per
  // thread), so every load of x and of gy is a whole, aligned vector.
  int64_t shifts, shift_step;
  void* gbuf;
};

// dst[c][b][r][q] = src[c][r - top][q * step + b - left] (0 outside src), for c < C,
// b < step, r < rows, q < cols; src planes are contiguous [H][W], dst is contiguous.
using PackPlanesFn = void (*)(const void* src, int64_t C, int64_t H, int64_t W, int64_t top, int64_t left,
                              int64_t step, int64_t rows, int64_t cols, void* dst);
using CorrFn = void (*)(const CorrArgs&, int64_t l0, int64_t l1);
using DotFn = void (*)(const DotArgs&, int64_t l0, int64_t l1);

constexpr int kRunKinds = 4;

// Row-tile heights instantiated for correlate, per width of NV vectors (1..kMaxNV); a
// (NV, R) pair is instantiated when NV * R fits the ISA's accumulator registers.
constexpr int kMaxNV = 4;
constexpr int kRowChoices = 11;
constexpr int kRows[kRowChoices] = {1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14};

// 2x2, stride-2 max-pool of `planes` contiguous [H][W] planes to [H/2][W/2] (floor), with
// aten's CPU rule for NCHW (the window read in the order (0,0), (0,1), (1,0), (1,1); an
// element replaces the running max when it is greater or NaN); where[i] = 2a + b of the
// element (2r + a, 2q + b) kept. The backward writes every element of gx: gy at the kept
// element, +0 elsewhere (also the odd last row and column).
using Pool2Fn = void (*)(const void* x, int64_t planes, int64_t H, int64_t W, void* y, uint8_t* where);
using Pool2BackwardFn = void (*)(const void* gy, const uint8_t* where, int64_t planes, int64_t H, int64_t W,
                                 void* gx);

struct ConvKernelTable {
  const char* isa;
  int vector_bytes;
  int acc_budget;  // vector accumulators a tile may use
  CorrFn corr_f32[kMaxNV][kRowChoices];  // nullptr where not instantiated
  CorrFn corr_f64[kMaxNV][kRowChoices];
  // Rows of NV vectors whose last one is a half vector (CorrArgs::cols == NV - 1/2 vectors,
  // one column tile); nullptr where not instantiated (only AVX2 builds fill it)
  CorrFn corr_half_f32[kMaxNV][kRowChoices];
  DotFn dot_f32, dot_f64;
  DotFn dot_shifted_f32, dot_shifted_f64;
  PackPlanesFn pack_f32, pack_f64;
  Pool2Fn pool2_f32, pool2_f64;
  Pool2BackwardFn pool2_backward_f32, pool2_backward_f64;
};

namespace avx512 { ConvKernelTable make_conv_table(); }
namespace avx2 { ConvKernelTable make_conv_table(); }
namespace base { ConvKernelTable make_conv_table(); }

// The table for the ISA kernel_table() picked (same CPU check, same SPARSETICKET_ISA).
const ConvKernelTable& conv_kernel_table();

// Which measured thresholds pick the conv layouts (ops_conv.cpp): "intel" on Intel CPUs,
// "zen4" (measured on an AMD Zen 4) on every other CPU. (With the AVX2 kernel table, the
// weight gradient's gy-shifted kernel starts at a lower density, whatever the vendor.)
const char* conv_tuning();

}  // namespace cpu
}  // namespace sparseticket
