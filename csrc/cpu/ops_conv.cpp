// ATen glue for the direct sparse convolution (conv.h): checks, entry lists, per-thread
// image buffers, threading, registration. Schemas live in sparseticket/ops/_library.py.
//
// Geometry, for x [N, C, H, W], weight taps (i, j) < (kh, kw), output [N, O, oh, ow]:
// y[n, o, h, w] = b[o] + sum_{c,i,j} W[o, c, i, j] x[n, c, h*sh + i*dh - ph, w*sw + j*dw - pw].
// The ticket is [O, kh*kw*C] with column (i*kw + j)*C + c.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <list>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "checks.h"
#include "conv.h"

namespace sparseticket {
namespace cpu {
namespace {

using at::Tensor;
using namespace checks;

struct Geom {
  int64_t N, C, H, W, O, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw;
};

Geom make_geom(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, at::IntArrayRef ks, at::IntArrayRef st,
               at::IntArrayRef pad, at::IntArrayRef dil) {
  TORCH_CHECK(ks.size() == 2 && st.size() == 2 && pad.size() == 2 && dil.size() == 2,
              "sparseticket: kernel_size, stride, padding and dilation must have two entries each");
  TORCH_CHECK(ks[0] >= 1 && ks[1] >= 1 && st[0] >= 1 && st[1] >= 1 && dil[0] >= 1 && dil[1] >= 1 && pad[0] >= 0 &&
                  pad[1] >= 0,
              "sparseticket: kernel_size, stride and dilation must be >= 1 and padding >= 0, got kernel_size ", ks,
              ", stride ", st, ", padding ", pad, ", dilation ", dil);
  Geom g{N, C, H, W, O, 0, 0, ks[0], ks[1], st[0], st[1], pad[0], pad[1], dil[0], dil[1]};
  g.OH = (H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(H + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 && W + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0,
              "sparseticket: input of spatial size (", H, ", ", W,
              ") is smaller than the dilated kernel after padding");
  return g;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Register tile for an output plane of rows x cols: NV vectors per row (the fewest column
// tiles of at most kMaxNV vectors), R rows from kRows with the least padded work, counting
// each row tile as two extra rows (zeroing, storing, one pass over the list).
struct Tile {
  int nv = 1, ri = 0;
  int64_t r = 1, col_tiles = 1, lanes = 1;
};

Tile choose_tile(int64_t rows, int64_t cols, bool f64) {
  const ConvKernelTable& t = conv_kernel_table();
  Tile tl;
  tl.lanes = t.vector_bytes / (f64 ? 8 : 4);
  cols = std::max<int64_t>(cols, 1);
  rows = std::max<int64_t>(rows, 1);
  tl.col_tiles = cdiv(cols, kMaxNV * tl.lanes);
  tl.nv = static_cast<int>(cdiv(cols, tl.col_tiles * tl.lanes));
  int64_t best = -1;
  for (int ri = 0; ri < kRowChoices; ++ri) {
    const CorrFn fn = f64 ? t.corr_f64[tl.nv - 1][ri] : t.corr_f32[tl.nv - 1][ri];
    if (!fn) continue;
    const int64_t R = kRows[ri];
    const int64_t cost = cdiv(rows, R) * (R + 2);
    if (best < 0 || cost <= best) {
      best = cost;
      tl.ri = ri;
      tl.r = R;
    }
  }
  return tl;
}

// The correlate kernel of tile tl for output planes `cols` wide: the half-vector variant
// (conv.h, CHalf in conv.inl) when the table has one and the row is exactly nv - 1/2
// vectors in one column tile (fp32 28-wide planes with AVX2: 3.5 vectors, not 4).
// SPARSETICKET_CONV_HALF=0 turns it off (A/B sweeps).
CorrFn corr_fn(const Tile& tl, bool f64, int64_t cols) {
  const ConvKernelTable& t = conv_kernel_table();
  static const bool half_on = [] {
    const char* s = std::getenv("SPARSETICKET_CONV_HALF");
    return !(s && std::atoi(s) == 0);
  }();
  const CorrFn half = f64 ? nullptr : t.corr_half_f32[tl.nv - 1][tl.ri];
  if (half && half_on && tl.col_tiles == 1 && tl.lanes % 2 == 0 && cols == (tl.nv - 1) * tl.lanes + tl.lanes / 2)
    return half;
  return f64 ? t.corr_f64[tl.nv - 1][tl.ri] : t.corr_f32[tl.nv - 1][tl.ri];
}

// The padded, column-phase-split input of one image: [C][sw][rows][cols]. Column phase b
// holds padded columns b, b + sw, ..., so every tap reads contiguous vectors.
//
// Dense-ish tickets with stride 1 along columns use `shifts` = kw copies instead: copy j
// holds the image shifted left by j*dw columns, rows a whole number of vectors, so every
// load is 64-byte aligned (an unaligned 64-byte load nearly always splits a cache line).
// That paid when every FMA had its own load. Since correlate's row groups (conv.h) share
// loads, it pays only for planes one vector wide: measured (1 thread, thread_time, batch
// 64, 3x3), unshifted -> shifted, forward / input gradient, 64->64@28 at density 1.0: 44.8
// -> 51.4 / 44.3 -> 46.5 ms, at 0.5: 26.4 -> 28.1 / 29.5 -> 28.8, at 0.2: 16.3 -> 17.7 /
// 15.9 -> 17.8 (slower at every density); 128->128@14 at 0.5: 26.4 -> 23.3 / 29.6 -> 25.0,
// at 0.2: 13.9 -> 12.7 / 14.1 -> 12.7, at 0.1: 8.0 -> 8.4 / 8.3 -> 8.4 (64->128@14
// alike). Hence one vector per row and the density threshold below.
struct InputLayout {
  int64_t rows, cols, phase, chan;  // rows/cols of a phase plane; elements per phase / channel
  int64_t in_row;                   // elements between consecutive output rows
  int64_t shifts, copy;             // copies (1, or kw shifted ones) and elements per copy
  int64_t off(int64_t c, int64_t i, int64_t j, const Geom& g) const {
    if (shifts > 1) return j * copy + c * chan + i * g.dh * cols;
    return c * chan + ((j * g.dw) % g.sw) * phase + i * g.dh * cols + (j * g.dw) / g.sw;
  }
  int64_t total() const { return shifts * copy; }
  // the band of output rows starting at `row0`: padded input rows row0*sh onwards
  void pack(PackPlanesFn fn, const void* src, const Geom& g, int64_t row0, void* dst, size_t elem) const {
    const int64_t top = g.ph - row0 * g.sh;
    if (shifts == 1) return fn(src, g.C, g.H, g.W, top, g.pw, g.sw, rows, cols, dst);
    for (int64_t j = 0; j < shifts; ++j)
      fn(src, g.C, g.H, g.W, top, g.pw - j * g.dw, 1, rows, cols, static_cast<char*>(dst) + j * copy * elem);
  }
};

// The figures above InputLayout are from an AMD Zen 4. On an Intel Xeon (48 KB L1, 2 MB
// L2, session 18; same method, four alternating processes, bench/results/conv_shifted.csv,
// unshifted -> shifted, ms, forward / input gradient) the copies also pay for planes two
// vectors wide: 64->64@28 at density 0.5 21.8, 20.7 -> 20.5, 17.9 / 24.1, 21.9 -> 20.8,
// 18.7; 0.33 2-5% faster; 0.13 and 0.10 forward 4-14% faster, input gradient even; 0.2
// forward even, input gradient 5-10% slower. One-vector planes gain from 0.12:
// 128->128@14 at 0.13 8.3, 8.2 -> 7.9, 7.0 / 8.8, 8.2 -> 7.9, 7.0. Hence, on Intel CPUs,
// any width from kShiftedMinDensityIntel.
constexpr double kShiftedMinDensity = 0.15, kShiftedMinDensityIntel = 0.12;
constexpr double kDotGroupMinDensity = 0.65;  // see sparse_conv2d_grad_weight_cpu

// The CPU's vendor picks between thresholds measured on an AMD Zen 4 and an Intel Xeon
// (the two machines this project has run on): their load units differ in what an unaligned
// or L2-bound load costs, which decides the layout choices below.
bool cpu_is_intel() {
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
}

bool use_shifted_copies(const Geom& g, int64_t nnz, const Tile& tl) {
  if (g.sw != 1 || g.kw == 1) return false;
  // SPARSETICKET_CONV_SHIFTED=0/1 forces it off/on (A/B sweeps)
  static const int forced = [] {
    const char* s = std::getenv("SPARSETICKET_CONV_SHIFTED");
    return s ? std::atoi(s) : -1;
  }();
  if (forced >= 0) return forced > 0;
  const double dense = static_cast<double>(g.O) * g.kh * g.kw * g.C;
  if (cpu_is_intel()) return dense > 0 && nnz >= kShiftedMinDensityIntel * dense;
  return tl.col_tiles * tl.nv == 1 && dense > 0 && nnz >= kShiftedMinDensity * dense;
}

// The layout of `shifts` copies of the padded input for `out_rows` output rows, phase
// planes of rows `cols` wide.
InputLayout layout_of(const Geom& g, int64_t shifts, int64_t out_rows, int64_t cols) {
  InputLayout L;
  L.shifts = shifts;
  L.rows = (out_rows - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  L.cols = cols;
  L.phase = L.rows * L.cols;
  L.chan = g.sw * L.phase;
  L.in_row = g.sh * L.cols;
  L.copy = g.C * L.chan;
  TORCH_CHECK(L.total() < (int64_t(1) << 31), "sparseticket: sparse_conv2d: image too large for int32 offsets");
  return L;
}

InputLayout input_layout(const Geom& g, const Tile& tl, int64_t row_tiles_rows, int64_t nnz) {
  const int64_t shifts = use_shifted_copies(g, nnz, tl) ? g.kw : 1;
  return layout_of(g, shifts, row_tiles_rows,
                   tl.col_tiles * tl.nv * tl.lanes + (shifts > 1 ? 0 : ((g.kw - 1) * g.dw) / g.sw));
}

// Lists of the ticket's entries in (channel, tap) order, so the taps of one input channel,
// which read overlapping rows, run back to back (the ticket's own order is (tap, channel)):
// the entry (o, c, i, j) goes to list bucket(o, c, i, j) at offset(c, i, j) in the packed
// operand; vidx is each entry's position in `values`. list_bounds gives the lists'
// boundaries (a CSR row pointer when bucket is o).
struct Lists {
  std::vector<int32_t> off, vidx;
};

template <typename Bucket>
std::vector<int32_t> list_bounds(const Geom& g, const int32_t* ccol, const int32_t* row, int64_t lists,
                                 Bucket bucket) {
  std::vector<int32_t> ptr(lists + 1, 0);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t column = (i * g.kw + j) * g.C + c;
        for (int64_t k = ccol[column]; k < ccol[column + 1]; ++k) ++ptr[bucket(row[k], c, i, j) + 1];
      }
  for (int64_t l = 0; l < lists; ++l) ptr[l + 1] += ptr[l];
  return ptr;
}

template <typename Bucket, typename Offset>
Lists fill_lists(const Geom& g, const int32_t* ptr, int64_t lists, const int32_t* ccol, const int32_t* row,
                 const int32_t* perm, Bucket bucket, Offset offset) {
  const int64_t nnz = ptr[lists];
  Lists ls;
  ls.off.resize(nnz);
  ls.vidx.resize(nnz);
  std::vector<int32_t> cursor(ptr, ptr + lists);
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t column = (i * g.kw + j) * g.C + c;
        const int32_t o = static_cast<int32_t>(offset(c, i, j));
        for (int64_t k = ccol[column]; k < ccol[column + 1]; ++k) {
          const int32_t dst = cursor[bucket(row[k], c, i, j)]++;
          ls.off[dst] = o;
          ls.vidx[dst] = perm[k];
        }
      }
  return ls;
}

// The forward fills its lists from the column-ordered arrays (ccol, row, perm) with cursors
// that start at the ticket's row pointers (crow): each is checked alone, so a crow that
// counts an output channel's entries otherwise than `row` does would run a cursor past the
// lists (review 47: heap corruption on a direct op call with mismatched arrays).
void check_row_counts(const Geom& g, const int32_t* crow, const int32_t* ccol, const int32_t* row) {
  const std::vector<int32_t> counted = list_bounds(g, ccol, row, g.O, [](int64_t o, int64_t, int64_t, int64_t) {
    return o;
  });
  for (int64_t o = 0; o < g.O; ++o)
    TORCH_CHECK(counted[o + 1] - counted[o] == crow[o + 1] - crow[o],
                "sparseticket: crow and ccol/row/perm describe different tickets: output channel ", o, " has ",
                crow[o + 1] - crow[o], " entries by crow and ", counted[o + 1] - counted[o],
                " by row (build both with dense_to_ticket and ticket_transpose)");
}

// One list per output channel (crow: the ticket's row pointers).
Lists output_channel_lists(const Geom& g, const InputLayout& L, const int32_t* crow, const int32_t* ccol,
                           const int32_t* row, const int32_t* perm) {
  return fill_lists(
      g, crow, g.O, ccol, row, perm, [](int64_t o, int64_t, int64_t, int64_t) { return o; },
      [&](int64_t c, int64_t i, int64_t j) { return L.off(c, i, j, g); });
}

// Reorders the entries of each list [ptr[l], ptr[l + 1]) into correlate's row-group runs
// (conv.h) and returns the runs' boundaries, kRunKinds per list. off and vidx are
// permuted together and only within lists, so ptr still delimits the lists. Entries whose
// offsets are in_row apart form chains (a column of taps); each chain is cut into triples
// from its head, a remainder of two is an adjacent pair, a remainder of one may still pair
// with an entry 2*in_row further on (taps {0, 2}). Linear time: offsets are looked up in
// a table over the operand (a sort per list cost ~5 ms per call at 128x128x3x3).
std::vector<int32_t> group_rows(const int32_t* ptr, int64_t lists, int64_t in_row, std::vector<int32_t>& off,
                                std::vector<int32_t>& vidx) {
  std::vector<int32_t> runs(kRunKinds * lists + 1);
  int64_t top = 0;
  for (int32_t o : off) top = std::max<int64_t>(top, o);
  std::vector<int32_t> at(top + 1, -1);  // at[offset]: the entry of the current list there
  std::vector<char> used;
  std::vector<int32_t> kind[kRunKinds];
  std::vector<int32_t> off2, vidx2;
  for (int64_t l = 0; l < lists; ++l) {
    const int32_t e0 = ptr[l], e1 = ptr[l + 1];
    used.assign(e1 - e0, 0);
    for (int32_t e = e0; e < e1; ++e) {
      if (at[off[e]] >= 0)
        used[e - e0] = 2;  // a duplicate offset stays single (never met in practice)
      else
        at[off[e]] = e;
    }
    auto entry = [&](int64_t o) -> int32_t {  // the unused entry at offset o, or -1
      if (o < 0 || o > top) return -1;
      const int32_t e = at[o];
      return e >= 0 && !used[e - e0] ? e : -1;
    };
    for (auto& k : kind) k.clear();
    for (int32_t e = e0; e < e1; ++e) {  // chains, from their heads
      if (used[e - e0] || entry(int64_t(off[e]) - in_row) >= 0) continue;
      int32_t c = e;
      while (c >= 0) {
        const int32_t c1 = entry(int64_t(off[c]) + in_row);
        const int32_t c2 = c1 >= 0 ? entry(int64_t(off[c]) + 2 * in_row) : -1;
        if (c1 < 0) break;  // a remainder of one: left for the gap pairs and singles
        used[c - e0] = used[c1 - e0] = 1;
        if (c2 < 0) {
          kind[1].insert(kind[1].end(), {c, c1});
          break;
        }
        used[c2 - e0] = 1;
        kind[0].insert(kind[0].end(), {c, c1, c2});
        c = entry(int64_t(off[c]) + 3 * in_row);
      }
    }
    for (int32_t e = e0; e < e1; ++e) {  // gap pairs, then singles
      if (used[e - e0] == 1) continue;
      const int32_t g2 = used[e - e0] ? -1 : entry(int64_t(off[e]) + 2 * in_row);
      used[e - e0] = 1;
      if (g2 >= 0) {
        used[g2 - e0] = 1;
        kind[2].insert(kind[2].end(), {e, g2});
      } else {
        kind[3].push_back(e);
      }
    }
    for (int32_t e = e0; e < e1; ++e)
      if (at[off[e]] == e) at[off[e]] = -1;
    off2.clear();
    vidx2.clear();
    for (int k = 0; k < kRunKinds; ++k) {
      runs[kRunKinds * l + k] = e0 + static_cast<int32_t>(off2.size());
      for (int32_t e : kind[k]) {
        off2.push_back(off[e]);
        vidx2.push_back(vidx[e]);
      }
    }
    std::copy(off2.begin(), off2.end(), off.begin() + e0);
    std::copy(vidx2.begin(), vidx2.end(), vidx.begin() + e0);
  }
  runs[kRunKinds * lists] = lists > 0 ? ptr[lists] : 0;
  return runs;
}

// Boundaries of the sub-lists (o, block) of output_channel_lists' lists, blocks of cb
// input channels: list o's entries are in channel order, so sub-list o * blocks + b is a
// contiguous range.
std::vector<int32_t> channel_blocks(const Geom& g, const int32_t* ccol, const int32_t* row, int64_t cb,
                                    int64_t blocks) {
  return list_bounds(g, ccol, row, g.O * blocks,
                     [&](int64_t o, int64_t c, int64_t, int64_t) { return o * blocks + c / cb; });
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;

// 64-byte aligned scratch (rows of the packed buffers start on cache lines when their
// length is a multiple of the vector length).
template <typename T>
Buffer<T> buffer(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
  return Buffer<T>(static_cast<T*>(std::aligned_alloc(64, bytes)));
}

// Images are processed in bands of output rows whose packed operand fits in kBandBytes
// of a core's L2 (one band, the whole plane, whenever it fits: every Conv-4 layer). For a
// 64-channel 112x112 image the whole padded plane is ~3.5 MB, and each output channel's
// pass over it came from L3 (forward at 90%: 22 GFLOP/s per core against 33 at 28x28).
// SPARSETICKET_CONV_BAND_BYTES overrides it (sweeps in bench/).
int64_t band_bytes() {
  static const int64_t v = [] {
    const char* s = std::getenv("SPARSETICKET_CONV_BAND_BYTES");
    const long long b = s ? std::atoll(s) : 0;
    return b > 0 ? static_cast<int64_t>(b) : int64_t(512) << 10;
  }();
  return v;
}

// Planes (input channels in the forward, gy planes in the input gradient) per correlate
// block (conv.h): the fewest that give a sub-list ~24 entries, so that reloading and
// storing the partial tile between blocks stays small next to the entries' FMAs. Measured
// (1 thread, thread_time, Conv-4 shapes, densities 0.1-0.8), targets of 8 / 16 / 24-32
// entries and unblocked: 24-32 best at 14x14 (up to 18% faster than unblocked), within
// noise at 28x28; sizing blocks to fit 4-32 KB of L1 instead did no better.
// SPARSETICKET_CONV_BLOCK_ENTRIES overrides the target (sweeps; 1e9 means one block).
//
// Those figures are from AVX-512 machines, whose row tiles are up to 14 rows deep. With AVX2's
// 16 registers a tile is 3-7 rows, a plane's share of a block's reads is a few hundred
// bytes, and what counted on the Zen 1 (AVX2, 32 KB L1, session 26) was the block's bytes,
// not its entries: forward, 1 thread, planes per block 8 / 16 / 24 / 32 / 48 / all, ms,
// 64->64@28 at density 0.5 94.7 / 91.1 / 89.5 / 91.5 / 96.5 / 110.4, at 0.25 59.2 / 55.0 /
// 54.6 / 53.9 / 57.7 / 65.0, at 0.1 32.8 / 29.4 / 28.5 / 28.1 / 29.6 / 31.6; 128->128@14
// alike (0.5: 89.0 / 84.6 / 83.9 / 82.3 / 86.5 / 95.7) -- 24-32 planes (~16-20 KB) at every
// density, where the entry target gives 27 at 0.1 but 11 at 0.25 and 6 at 0.5. So with
// 32-byte vectors a block also takes at least the planes whose rows fill kAvx2BlockBytes
// (plane_bytes: what one plane contributes to a row tile's reads).
// SPARSETICKET_CONV_BLOCK_BYTES overrides that floor (an integer count of bytes; 0 turns it
// off; any ISA).
constexpr int64_t kAvx2BlockBytes = int64_t(16) << 10;

int64_t block_bytes_floor() {
  static const int64_t v = [] {
    const char* s = std::getenv("SPARSETICKET_CONV_BLOCK_BYTES");
    if (s) return static_cast<int64_t>(std::max(0LL, std::atoll(s)));
    return conv_kernel_table().vector_bytes == 32 ? kAvx2BlockBytes : int64_t(0);
  }();
  return v;
}

int64_t block_planes(int64_t planes, int64_t nnz, int64_t lists, int64_t plane_bytes) {
  static const double target = [] {
    const char* s = std::getenv("SPARSETICKET_CONV_BLOCK_ENTRIES");
    const double v = s ? std::atof(s) : 0.0;
    return v > 0 ? v : 24.0;
  }();
  const double per_plane = static_cast<double>(nnz) / std::max<double>(1.0, static_cast<double>(lists) * planes);
  double want = std::ceil(target / std::max(per_plane, 1e-6));
  const int64_t floor_bytes = block_bytes_floor();
  if (floor_bytes > 0 && plane_bytes > 0)
    want = std::max(want, static_cast<double>(floor_bytes / plane_bytes));
  return want >= static_cast<double>(planes) ? std::max<int64_t>(planes, 1)
                                             : std::max<int64_t>(1, static_cast<int64_t>(want));
}

// What one plane adds to a row tile's reads: rows x one tile's width, per shifted copy.
int64_t tile_plane_bytes(const Tile& tl, int64_t rows, int64_t shifts, size_t elem) {
  return shifts * rows * tl.nv * tl.lanes * static_cast<int64_t>(elem);
}

// Output rows per band (a multiple of r): `per_row` bytes per output row plus `fixed`.
int64_t band_rows(int64_t out_rows, int64_t r, int64_t per_row, int64_t fixed) {
  const int64_t kBandBytes = band_bytes();
  const int64_t whole = cdiv(std::max<int64_t>(out_rows, 1), r) * r;
  if (fixed + whole * per_row <= kBandBytes) return whole;
  const int64_t fit = (kBandBytes - fixed) / std::max<int64_t>(per_row, 1);
  return std::max<int64_t>(r, fit / r * r);
}

// The layout make(out_rows) of bands of output rows (a multiple of r) that fit
// kBandBytes, and the band height.
template <typename Make>
std::pair<InputLayout, int64_t> banded(const Geom& g, int64_t r, size_t elem, Make make) {
  const InputLayout one = make(r);
  const int64_t per_row = one.shifts * g.C * g.sw * g.sh * one.cols * static_cast<int64_t>(elem);
  const int64_t band = band_rows(g.OH, r, per_row, one.total() * static_cast<int64_t>(elem) - r * per_row);
  return {make(band), band};
}

std::pair<InputLayout, int64_t> banded_layout(const Geom& g, const Tile& tl, int64_t r, int64_t nnz, size_t elem) {
  return banded(g, r, elem, [&](int64_t out_rows) { return input_layout(g, tl, out_rows, nnz); });
}

// Work items (image, block of planes) so that small batches still use every thread;
// a thread's items are consecutive, so it packs each of its images once.
int64_t plane_blocks(int64_t N, int64_t planes) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(planes, cdiv(want, std::max<int64_t>(N, 1))));
}

void check_ticket(const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor& ccol, const Tensor& row,
                  const Tensor& perm, int64_t n_cols, int64_t O) {
  check_ptr(crow, values.numel(), "crow");
  check_ptr(ccol, values.numel(), "ccol");
  check_index_range(col, n_cols, "col", "the ticket's kh*kw*C columns");
  check_index_range(row, O, "row", "the output channels");
  check_index_range(perm, values.numel(), "perm", "values");
}

// ----------------------------------------------------------------------------- plan cache
//
// The entry lists (offsets, values order, row-group runs) depend only on the ticket's index
// arrays and the geometry, yet building them cost 0.1-1.7 ms per call (1 thread, batch 64:
// 1-7% of the forward and the input gradient at Conv-4 shapes), on every call although a
// ticket changes only at an IMP level. A call looks its plan up by (op, geometry, dtype,
// nnz) and the *contents* of the index arrays it reads: the entry keeps a copy and compares
// it (memcmp; with the values gather, what stays per call is 0.02-0.14 ms), so no change of
// the ticket can ever meet a stale plan (new tensors, the same tensors rewritten in place
// with or without a version bump, a freed tensor's address reused), and the ops stay pure
// functions of their arguments (no schema change: opcheck, fake kernels, torch.compile as
// before). An explicit plan argument would depend on the input's spatial size, unknown when
// the mask is set, and would still need an O(nnz) check per call to be safe against a plan
// that does not match its ticket.
// SPARSETICKET_CONV_PLAN_CACHE_MB bounds the cache (default 256; 0 turns it off).
struct Plan {
  std::vector<int32_t> off, vidx, runs;
};
using PlanPtr = std::shared_ptr<const Plan>;

struct IndexArray {
  const int32_t* data;
  int64_t n;
};

class PlanCache {
 public:
  PlanPtr get(std::vector<int64_t> key, std::initializer_list<IndexArray> arrays, const std::function<Plan()>& build) {
    if (capacity() == 0) return std::make_shared<const Plan>(build());
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        if (it->key != key || !same(it->arrays, arrays)) continue;
        lru_.splice(lru_.begin(), lru_, it);
        return lru_.front().plan;
      }
    }
    // built outside the lock: other threads' lookups do not wait for it
    Entry e;
    e.key = std::move(key);
    e.plan = std::make_shared<const Plan>(build());
    e.bytes = sizeof(int32_t) * (e.plan->off.size() + e.plan->vidx.size() + e.plan->runs.size());
    for (const IndexArray& a : arrays) {
      e.arrays.emplace_back(a.data, a.data + a.n);
      e.bytes += sizeof(int32_t) * a.n;
    }
    PlanPtr plan = e.plan;
    if (e.bytes > capacity()) return plan;
    std::lock_guard<std::mutex> lock(mu_);
    bytes_ += e.bytes;
    lru_.push_front(std::move(e));
    while (bytes_ > capacity()) {
      bytes_ -= lru_.back().bytes;
      lru_.pop_back();
    }
    return plan;
  }

 private:
  struct Entry {
    std::vector<int64_t> key;
    std::vector<std::vector<int32_t>> arrays;
    PlanPtr plan;
    size_t bytes = 0;
  };

  static size_t capacity() {
    static const size_t cap = [] {
      const char* s = std::getenv("SPARSETICKET_CONV_PLAN_CACHE_MB");
      const double mb = s ? std::atof(s) : 256.0;
      return static_cast<size_t>(std::max(0.0, mb) * (1 << 20));
    }();
    return cap;
  }

  static bool same(const std::vector<std::vector<int32_t>>& kept, std::initializer_list<IndexArray> arrays) {
    if (kept.size() != arrays.size()) return false;
    size_t k = 0;
    for (const IndexArray& a : arrays) {
      const std::vector<int32_t>& v = kept[k++];
      if (static_cast<int64_t>(v.size()) != a.n) return false;
      if (a.n > 0 && std::memcmp(v.data(), a.data, sizeof(int32_t) * a.n) != 0) return false;
    }
    return true;
  }

  std::mutex mu_;
  std::list<Entry> lru_;
  size_t bytes_ = 0;
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();  // never destroyed: ops may run during interpreter exit
  return *cache;
}

enum PlanOp : int64_t { kPlanForward = 0, kPlanGradWeight = 1, kPlanGradInput = 2, kPlanGradWeightShifted = 3 };

std::vector<int64_t> plan_key(PlanOp op, const Geom& g, bool f64, int64_t nnz) {
  return {op, g.C, g.H, g.W, g.O, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, f64, nnz};
}

IndexArray index_array(const Tensor& t) { return {t.data_ptr<int32_t>(), t.numel()}; }

// ----------------------------------------------------------------------------- forward

// relu: the output is written through max(0, .) (sparse_conv2d_relu)
Tensor sparse_conv2d_impl(const Tensor& x_, const Tensor& values_, const Tensor& crow_, const Tensor& col_,
                          const Tensor& ccol_, const Tensor& row_, const Tensor& perm_,
                          const c10::optional<Tensor>& bias_, const c10::optional<Tensor>& active,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool relu) {
  check_float(x_, "x");
  check_dim(x_, 4, "x");
  check_cpu(x_, "x");
  check_dim(values_, 1, "values");
  check_same_dtype(values_, "values", x_, "x");
  check_cpu(values_, "values");
  for (auto [t, n] : {std::pair<const Tensor&, const char*>{crow_, "crow"}, {col_, "col"}, {ccol_, "ccol"},
                      {row_, "row"}, {perm_, "perm"}})
    check_index(t, n);
  TORCH_CHECK(col_.numel() == values_.numel() && row_.numel() == values_.numel() && perm_.numel() == values_.numel(),
              "sparseticket: col, row and perm must have one entry per value (", values_.numel(), "), got ",
              col_.numel(), ", ", row_.numel(), ", ", perm_.numel());
  const int64_t O = crow_.numel() - 1;
  const Geom g = make_geom(x_.size(0), x_.size(1), x_.size(2), x_.size(3), O, kernel_size, stride, padding, dilation);
  TORCH_CHECK(ccol_.numel() - 1 == g.kh * g.kw * g.C, "sparseticket: the ticket has ", ccol_.numel() - 1,
              " columns but kernel_size ", kernel_size, " and ", g.C, " input channels need kh*kw*C=",
              g.kh * g.kw * g.C);
  c10::optional<Tensor> bias;
  if (bias_) {
    check_dim(*bias_, 1, "bias");
    check_cpu(*bias_, "bias");
    TORCH_CHECK(bias_->size(0) == O, "sparseticket: bias has ", bias_->size(0), " entries, expected out_channels=", O);
    check_same_dtype(*bias_, "bias", x_, "x");
    bias = contiguous_1d(*bias_);
  }
  check_active(active, O);
  const Tensor crow = contiguous_1d(crow_), col = contiguous_1d(col_), ccol = contiguous_1d(ccol_);
  const Tensor row = contiguous_1d(row_), perm = contiguous_1d(perm_), values = contiguous_1d(values_);
  check_ticket(values, crow, col, ccol, row, perm, g.kh * g.kw * g.C, O);
  Tensor y = at::empty({g.N, O, g.OH, g.OW}, x_.options());
  if (y.numel() == 0) return y;
  const Tensor x = x_.contiguous();
  const bool f64 = x.scalar_type() == at::kDouble;
  const Tile tl = choose_tile(g.OH, g.OW, f64);
  const auto layout = banded_layout(g, tl, tl.r, values.numel(), x.element_size());
  const InputLayout& L = layout.first;
  const int64_t band = layout.second;
  const int64_t n_bands = cdiv(g.OH, band);
  // Blocks of input channels (conv.h). A list's entries are in
  // channel order, so its sub-list (l, block) is a contiguous range, l * blocks + block.
  const int64_t cb = block_planes(g.C, values.numel(), O,
                                  tile_plane_bytes(tl, tl.r * g.sh + (g.kh - 1) * g.dh, L.shifts, x.element_size()));
  const int64_t blocks = std::max<int64_t>(1, cdiv(g.C, cb));
  const PlanPtr plan = plan_cache().get(
      plan_key(kPlanForward, g, f64, values.numel()),
      {index_array(crow), index_array(ccol), index_array(row), index_array(perm)}, [&] {
        check_row_counts(g, crow.data_ptr<int32_t>(), ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>());
        Lists ls = output_channel_lists(g, L, crow.data_ptr<int32_t>(), ccol.data_ptr<int32_t>(),
                                        row.data_ptr<int32_t>(), perm.data_ptr<int32_t>());
        const std::vector<int32_t> sub =
            channel_blocks(g, ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), cb, blocks);
        Plan p;
        p.runs = group_rows(sub.data(), O * blocks, L.in_row, ls.off, ls.vidx);
        p.off = std::move(ls.off);
        p.vidx = std::move(ls.vidx);
        return p;
      });
  const std::vector<int32_t>& runs = plan->runs;
  const CorrFn fn = corr_fn(tl, f64, g.OW);
  const ConvKernelTable& kt = conv_kernel_table();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d", [&] {
    std::vector<scalar_t> val(plan->vidx.size());
    const scalar_t* v = values.data_ptr<scalar_t>();
    for (size_t k = 0; k < val.size(); ++k) val[k] = v[plan->vidx[k]];
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t pblocks = plane_blocks(g.N * n_bands, O), per = cdiv(O, pblocks);
    at::parallel_for(0, g.N * n_bands * pblocks, 1, [&](int64_t b0, int64_t b1) {
      auto buf = buffer<scalar_t>(L.total());
      Buffer<scalar_t> scratch;
      if (blocks > 1) scratch = buffer<scalar_t>(per * tl.r * tl.nv * tl.lanes);
      int64_t packed = -1;
      for (int64_t item = b0; item < b1; ++item) {
        const int64_t nb = item / pblocks, n = nb / n_bands, r0 = (nb % n_bands) * band;
        const int64_t l0 = (item % pblocks) * per, l1 = std::min(O, l0 + per);
        if (l0 >= l1) continue;
        if (nb != packed) {
          L.pack(f64 ? kt.pack_f64 : kt.pack_f32, xp + n * g.C * g.H * g.W, g, r0, buf.get(), sizeof(scalar_t));
          packed = nb;
        }
        CorrArgs a{};
        a.in = buf.get();
        a.in_row = L.in_row;
        a.ptr = runs.data();
        a.blocks = blocks;
        a.scratch = scratch.get();
        a.off = plan->off.data();
        a.val = val.data();
        a.bias = bias ? bias->data_ptr<scalar_t>() : nullptr;
        a.out = yp + n * O * g.OH * g.OW + r0 * g.OW;
        a.out_plane = g.OH * g.OW;
        a.ldo = g.OW;
        a.rows = std::min(band, g.OH - r0);
        a.cols = g.OW;
        a.col_tiles = tl.col_tiles;
        a.relu = relu;
        fn(a, l0, l1);
      }
    });
  });
  return y;
}

Tensor sparse_conv2d_cpu(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                         const Tensor& ccol, const Tensor& row, const Tensor& perm, const c10::optional<Tensor>& bias,
                         const c10::optional<Tensor>& active, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  return sparse_conv2d_impl(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding,
                            dilation, false);
}

Tensor sparse_conv2d_relu_cpu(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                              const Tensor& ccol, const Tensor& row, const Tensor& perm,
                              const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  return sparse_conv2d_impl(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding,
                            dilation, true);
}

// ----------------------------------------------------------------------------- weight gradient
//
// Two kernels (conv.h, dots and dots_shifted). With stride 1 along columns the tap column's
// shift can move from x to gy (dots_shifted): x is packed with rows a whole number of
// vectors and no column shift in any entry's offset, so the 8 loads of x per gy load in
// dot_groups are aligned. Measured (1 thread, thread_time, batch 64, 3x3; dots ->
// dots_shifted, ms): 64->64@28 at density 0.4 43.1 -> 34.6, 0.5 36.4 -> 30.7, 0.6 29.9 ->
// 26.6, 0.7 23.8 -> 22.5, but 0.2 17.6 -> 19.1 and 0.1 11.3 -> 12.1 (a list is kw
// sub-lists, so more groups run short and gy is copied kw times per list); at 14x14
// (64->128, 128->128) within +-3% at every density. Hence the band below, where x's loads
// rather than its trips from L2 are what a sparse dot product waits for. Those figures are
// from an AMD Zen 4. On an Intel Xeon (48 KB L1, 2 MB L2, session 18; same method, four
// alternating processes, bench/results/conv_gw_shifted.csv, dots / dots_shifted time) the
// shifted kernel also wins on planes one vector wide at low density: 128->128@14 at
// density 0.13 / 0.10 / 0.08 / 0.05 1.04-1.08 / 1.27-1.29 / 1.21-1.30 / 1.15, 64->128@14
// 0.91-1.0 / 1.07-1.09 / 0.98-0.99 / 0.76-0.80; not at 28x28 (0.81-1.05 at 0.05-0.2).
// Hence, on Intel CPUs, the extra band [kGyShiftedMinDensityIntel, kGyShiftedMinDensity)
// for one-vector rows.
// On the AVX2 Zen 1 (session 27), once the shifted copies of gy were built without masked
// loads (vmaskmovps, slow there), dots_shifted took 0.82-0.89 of its former time at
// densities 0.25-0.5, and against dots (ms, two alternating pairs) it won from 0.2:
// 128->128@14 at 0.2 42.3, 43.2 -> 37.4, 37.6; 64->128@14 20.3, 20.4 -> 18.7, 19.3;
// 64->64@28 even (42-43 / 40-42); at 0.15 mixed (28x28 even, 64->128 slower, 128->128
// faster) and at 0.1 dots ahead. Hence kGyShiftedMinDensityAvx2 for 32-byte vectors.
// SPARSETICKET_CONV_GW_SHIFTED=0/1 forces it off/on (A/B sweeps, tests).
constexpr double kGyShiftedMinDensity = 0.25, kGyShiftedMinDensityIntel = 0.08, kGyShiftedMaxDensity = 0.75;
constexpr double kGyShiftedMinDensityAvx2 = 0.2;

// lanes: vector lanes of the element type (one-vector rows: OW + (kw - 1) * dw <= lanes)
bool use_gy_shifted(const Geom& g, int64_t nnz, int64_t lanes) {
  if (g.sw != 1 || g.kw == 1) return false;  // (kw = 1: no column shift to move)
  static const int forced = [] {
    const char* s = std::getenv("SPARSETICKET_CONV_GW_SHIFTED");
    return s ? std::atoi(s) : -1;
  }();
  if (forced >= 0) return forced > 0;
  const double dense = static_cast<double>(g.O) * g.kh * g.kw * g.C;
  if (dense <= 0 || nnz >= kGyShiftedMaxDensity * dense) return false;
  const bool avx2 = conv_kernel_table().vector_bytes == 32;
  if (nnz >= (avx2 ? kGyShiftedMinDensityAvx2 : kGyShiftedMinDensity) * dense) return true;
  const bool one_vector_rows = g.OW + (g.kw - 1) * g.dw <= lanes;
  return cpu_is_intel() && one_vector_rows && nnz >= kGyShiftedMinDensityIntel * dense;
}

// dots_shifted's x (stride 1 along columns): [C][rows][cols], cols the padded row
// OW + (kw - 1) * dw rounded up to whole vectors, in bands as the forward's.
std::pair<InputLayout, int64_t> banded_aligned_layout(const Geom& g, int64_t lanes, size_t elem) {
  const int64_t cols = cdiv(g.OW + (g.kw - 1) * g.dw, lanes) * lanes;
  return banded(g, 1, elem, [&](int64_t out_rows) { return layout_of(g, 1, out_rows, cols); });
}

// dots_shifted's lists: sub-list (o, j) holds output channel o's taps of column j in
// (channel, tap row) order, offsets without the column shift; returns the sub-lists'
// boundaries [O * kw + 1].
std::vector<int32_t> shifted_lists(const Geom& g, const InputLayout& L, const int32_t* ccol, const int32_t* row,
                                   const int32_t* perm, Lists& ls) {
  auto bucket = [&](int64_t o, int64_t, int64_t, int64_t j) { return o * g.kw + j; };
  std::vector<int32_t> sub = list_bounds(g, ccol, row, g.O * g.kw, bucket);
  ls = fill_lists(g, sub.data(), g.O * g.kw, ccol, row, perm, bucket,
                  [&](int64_t c, int64_t i, int64_t) { return c * L.chan + i * g.dh * L.cols; });
  return sub;
}

// The dot kernels multiply whole vectors: x lanes that an entry never reads (past a row's
// end, or another tap's column) meet gy lanes set to zero, which is exact for finite x
// but turns an Inf or NaN there into NaN. So an entry whose result is not finite (rare:
// only with non-finite inputs) is summed again here, in double, over exactly its products:
// gy at each output position times the x element its tap reads there, or times the
// padding's zero (an Inf in gy against padding gives NaN, as the im2col reference does).
// out is in values order; frozen channels' entries (active) stay 0. A sum that has become
// NaN stays NaN, so an entry stops at its first NaN row: with a NaN loss every gy is NaN,
// and the pass then costs about one row per entry and image.
template <typename T>
void recompute_nonfinite_grad_weight(const Geom& g, const T* gy, const T* x, const Tensor& ccol, const Tensor& row,
                                     const Tensor& perm, const uint8_t* active, T* out) {
  const int32_t *cc = ccol.data_ptr<int32_t>(), *rw = row.data_ptr<int32_t>(), *pm = perm.data_ptr<int32_t>();
  std::vector<int64_t> bad, col_of;  // CSC positions k of the entries to redo, and their columns
  for (int64_t col = 0; col < g.kh * g.kw * g.C; ++col)
    for (int64_t k = cc[col]; k < cc[col + 1]; ++k)
      if (!std::isfinite(out[pm[k]]) && (!active || active[rw[k]])) {
        bad.push_back(k);
        col_of.push_back(col);
      }
  at::parallel_for(0, static_cast<int64_t>(bad.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t col = col_of[b], c = col % g.C, tap = col / g.C, i = tap / g.kw, j = tap % g.kw;
      const int64_t o = rw[bad[b]];
      double s = 0;
      for (int64_t n = 0; n < g.N && !std::isnan(s); ++n) {
        const T* gyp = gy + (n * g.O + o) * g.OH * g.OW;
        const T* xp = x + (n * g.C + c) * g.H * g.W;
        for (int64_t r = 0; r < g.OH && !std::isnan(s); ++r) {
          const int64_t h = r * g.sh - g.ph + i * g.dh;
          for (int64_t q = 0; q < g.OW; ++q) {
            const int64_t w = q * g.sw - g.pw + j * g.dw;
            const bool in = h >= 0 && h < g.H && w >= 0 && w < g.W;  // else a padding zero
            s += static_cast<double>(gyp[r * g.OW + q]) * (in ? static_cast<double>(xp[h * g.W + w]) : 0.0);
          }
        }
      }
      out[pm[bad[b]]] = static_cast<T>(s);
    }
  });
}

Tensor sparse_conv2d_grad_weight_cpu(const Tensor& gy_, const Tensor& x_, const Tensor& ccol_, const Tensor& row_,
                                     const Tensor& perm_, const c10::optional<Tensor>& active_,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  check_float(gy_, "gy");
  check_dim(gy_, 4, "gy");
  check_cpu(gy_, "gy");
  check_float(x_, "x");
  check_dim(x_, 4, "x");
  check_cpu(x_, "x");
  check_same_dtype(x_, "x", gy_, "gy");
  check_index(ccol_, "ccol");
  check_index(row_, "row");
  check_index(perm_, "perm");
  TORCH_CHECK(perm_.numel() == row_.numel(), "sparseticket: perm has ", perm_.numel(), " entries but row has ",
              row_.numel());
  const int64_t O = gy_.size(1), nnz = row_.numel();
  const Geom g = make_geom(x_.size(0), x_.size(1), x_.size(2), x_.size(3), O, kernel_size, stride, padding, dilation);
  TORCH_CHECK(ccol_.numel() - 1 == g.kh * g.kw * g.C, "sparseticket: the ticket has ", ccol_.numel() - 1,
              " columns but kernel_size ", kernel_size, " and ", g.C, " input channels need kh*kw*C=",
              g.kh * g.kw * g.C);
  TORCH_CHECK(gy_.size(0) == g.N, "sparseticket: gy has batch ", gy_.size(0), " but x has batch ", g.N);
  TORCH_CHECK(gy_.size(2) == g.OH && gy_.size(3) == g.OW, "sparseticket: gy has spatial size (", gy_.size(2), ", ",
              gy_.size(3), ") but the conv of x gives (", g.OH, ", ", g.OW, ")");
  check_active(active_, O);
  const Tensor ccol = contiguous_1d(ccol_), row = contiguous_1d(row_), perm = contiguous_1d(perm_);
  check_ptr(ccol, nnz, "ccol");
  check_index_range(row, O, "row", "gy's channel dimension (gy.size(1))");
  check_index_range(perm, nnz, "perm", "values");
  Tensor out = at::zeros({nnz}, gy_.options());
  if (nnz == 0 || g.N == 0) return out;
  const Tensor x = x_.contiguous(), gy = gy_.contiguous();
  Tensor active;
  if (active_) active = contiguous_1d(*active_);
  const bool f64 = x.scalar_type() == at::kDouble;
  const ConvKernelTable& kt = conv_kernel_table();
  const int64_t lanes = kt.vector_bytes / static_cast<int64_t>(x.element_size());
  const bool shifted = use_gy_shifted(g, nnz, lanes);
  const auto layout = shifted ? banded_aligned_layout(g, lanes, x.element_size())
                              : banded_layout(g, choose_tile(g.OH, g.OW, f64), 1, nnz, x.element_size());
  const InputLayout& L = layout.first;
  const int64_t band = layout.second;
  const int64_t n_bands = cdiv(g.OH, band);
  const int64_t S = shifted ? g.kw : 1;  // sub-lists per output channel
  const PlanPtr plan = plan_cache().get(
      plan_key(shifted ? kPlanGradWeightShifted : kPlanGradWeight, g, f64, nnz),
      {index_array(ccol), index_array(row), index_array(perm)}, [&] {
        // sub-list boundaries: row pointers of the CSR (counts per output channel) from the
        // CSC's rows, or per (output channel, tap column) for dots_shifted
        const int32_t *cc = ccol.data_ptr<int32_t>(), *rw = row.data_ptr<int32_t>();
        Lists ls;
        std::vector<int32_t> crow;
        if (shifted) {
          crow = shifted_lists(g, L, cc, rw, perm.data_ptr<int32_t>(), ls);
        } else {
          crow = list_bounds(g, cc, rw, O, [](int64_t o, int64_t, int64_t, int64_t) { return o; });
          ls = output_channel_lists(g, L, crow.data(), cc, rw, perm.data_ptr<int32_t>());
        }
        // Runs (conv.h) in one block: splitting the lists by input channel made dots slower at
        // every density and block size tried (sub-lists of 24 / 64 / 160 entries: +3-75% /
        // +0-35% / +0-10% time against one block; fewer full groups of eight share a gy load).
        // Row groups only for long, dense lists: they saved 5-7% at density 0.8 and were even
        // to 10% slower at 0.1-0.5 (1 thread, Conv-4 shapes), where most groups are singles
        // anyway and the extra runs' remainder passes reread gy. Otherwise every entry is single.
        Plan p;
        const int64_t lists = O * S;
        p.runs.resize(kRunKinds * lists + 1);
        const double density =
            static_cast<double>(nnz) / std::max<double>(1.0, static_cast<double>(O) * g.kh * g.kw * g.C);
        if (density >= kDotGroupMinDensity && nnz >= 64 * O) {
          p.runs = group_rows(crow.data(), lists, L.in_row, ls.off, ls.vidx);
        } else {
          for (int64_t o = 0; o < lists; ++o)
            for (int k = 0; k < kRunKinds; ++k) p.runs[kRunKinds * o + k] = crow[o];
          p.runs[kRunKinds * lists] = crow[lists];
        }
        p.off = std::move(ls.off);
        p.vidx = std::move(ls.vidx);
        return p;
      });
  const int64_t threads = at::get_num_threads();
  // frozen-channel flags as bytes (nullptr: every channel trains), for the kernels and the re-summation
  const uint8_t* active_bytes = active_ ? reinterpret_cast<const uint8_t*>(active.data_ptr<bool>()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_grad_weight", [&] {
    std::vector<scalar_t> partial(threads * nnz, scalar_t(0));  // list order, one copy per thread
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    const int64_t pblocks = plane_blocks(g.N * n_bands, O), per = cdiv(O, pblocks);
    at::parallel_for(0, g.N * n_bands * pblocks, 1, [&](int64_t b0, int64_t b1) {
      auto xbuf = buffer<scalar_t>(L.total());
      auto gbuf = buffer<scalar_t>(shifted ? band * L.cols : 0);
      scalar_t* acc = partial.data() + at::get_thread_num() * nnz;
      int64_t packed = -1;
      for (int64_t item = b0; item < b1; ++item) {
        const int64_t nb = item / pblocks, n = nb / n_bands, r0 = (nb % n_bands) * band;
        const int64_t l0 = (item % pblocks) * per, l1 = std::min(O, l0 + per);
        if (l0 >= l1) continue;
        if (nb != packed) {
          L.pack(f64 ? kt.pack_f64 : kt.pack_f32, xp + n * g.C * g.H * g.W, g, r0, xbuf.get(), sizeof(scalar_t));
          packed = nb;
        }
        DotArgs a{};
        a.x = xbuf.get();
        a.x_row = L.in_row;
        a.g = gp + n * O * g.OH * g.OW + r0 * g.OW;
        a.g_plane = g.OH * g.OW;
        a.g_row = g.OW;
        a.rows = std::min(band, g.OH - r0);
        a.cols = g.OW;
        a.ptr = plan->runs.data();
        a.off = plan->off.data();
        a.active = active_bytes;
        a.out = acc;
        if (shifted) {
          a.cols = L.cols;
          a.shifts = S;
          a.shift_step = g.dw;
          a.gbuf = gbuf.get();
          (f64 ? kt.dot_shifted_f64 : kt.dot_shifted_f32)(a, l0, l1);
        } else {
          (f64 ? kt.dot_f64 : kt.dot_f32)(a, l0, l1);
        }
      }
    });
    scalar_t* o = out.data_ptr<scalar_t>();
    std::atomic<bool> nonfinite{false};
    at::parallel_for(0, nnz, 4096, [&](int64_t k0, int64_t k1) {
      bool bad = false;
      for (int64_t k = k0; k < k1; ++k) {
        scalar_t s = partial[k];
        for (int64_t t = 1; t < threads; ++t) s += partial[t * nnz + k];
        o[plan->vidx[k]] = s;
        bad = bad || !std::isfinite(s);
      }
      if (bad) nonfinite.store(true, std::memory_order_relaxed);
    });
    if (nonfinite.load()) recompute_nonfinite_grad_weight<scalar_t>(g, gp, xp, ccol, row, perm, active_bytes, o);
  });
  return out;
}

// ----------------------------------------------------------------------------- input gradient
//
// gx[n, c, h, w] = sum_{o,i,j} W[o, c, i, j] gy[n, o, (h + ph - i*dh)/sh, (w + pw - j*dw)/sw] over the
// taps whose divisions are exact. Output pixels of one phase (h mod sh, w mod sw) = (a, b)
// see only the taps with (a + ph - i*dh) mod sh == 0 (same for columns), at a shift of
// m = (a + ph - i*dh)/sh rows: a stride-1 correlation of the padded gy with those taps.

Tensor sparse_conv2d_grad_input_cpu(const Tensor& gy_, const Tensor& values_, const Tensor& crow_, const Tensor& col_,
                                    c10::SymIntArrayRef input_size_, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_float(gy_, "gy");
  check_dim(gy_, 4, "gy");
  check_cpu(gy_, "gy");
  check_dim(values_, 1, "values");
  check_same_dtype(values_, "values", gy_, "gy");
  check_cpu(values_, "values");
  check_index(crow_, "crow");
  check_index(col_, "col");
  TORCH_CHECK(col_.numel() == values_.numel(), "sparseticket: col has ", col_.numel(), " entries but values has ",
              values_.numel());
  TORCH_CHECK(input_size_.size() == 4, "sparseticket: input_size must be [N, C, H, W], got ", input_size_.size(),
              " entries");
  std::vector<int64_t> is;
  for (const auto& s : input_size_) is.push_back(s.expect_int());
  const int64_t O = crow_.numel() - 1;
  const Geom g = make_geom(is[0], is[1], is[2], is[3], O, kernel_size, stride, padding, dilation);
  TORCH_CHECK(gy_.size(0) == g.N && gy_.size(1) == O && gy_.size(2) == g.OH && gy_.size(3) == g.OW,
              "sparseticket: gy has shape ", gy_.sizes(), " but input_size ", at::IntArrayRef(is), " and the ticket's ",
              O, " output channels need [", g.N, ", ", O, ", ", g.OH, ", ", g.OW, "]");
  const Tensor crow = contiguous_1d(crow_), col = contiguous_1d(col_), values = contiguous_1d(values_);
  check_ptr(crow, values.numel(), "crow");
  const int64_t C = g.C, K = g.kh * g.kw;
  check_index_range(col, K * C, "col", "the ticket's kh*kw*C columns");
  Tensor gx = at::empty(is, gy_.options());
  if (gx.numel() == 0) return gx;
  if (O == 0 || values.numel() == 0) return gx.zero_();
  const Tensor gy = gy_.contiguous();
  const bool f64 = gy.scalar_type() == at::kDouble;
  const int64_t P = g.sh * g.sw;
  const int64_t Ha0 = cdiv(g.H, g.sh), Wb0 = cdiv(g.W, g.sw);
  const Tile tl = choose_tile(Ha0, Wb0, f64);
  const int64_t Tp = cdiv((g.kh - 1) * g.dh, g.sh), Lp = cdiv((g.kw - 1) * g.dw, g.sw);
  // Stride 1 along columns and a dense-ish ticket: kw copies of the padded gy, copy j
  // shifted by tap j's column offset, rows a whole number of vectors, so that every load
  // is aligned (as the forward's `shifts`, see InputLayout).
  const int64_t shifts = use_shifted_copies(g, values.numel(), tl) ? g.kw : 1;
  // bands of `band` phase rows: the padded gy rows they read, `halo` more than the band
  const int64_t Wg = tl.col_tiles * tl.nv * tl.lanes + (shifts > 1 ? 0 : (g.sw - 1 + g.pw) / g.sw + Lp);
  const int64_t halo = (g.sh - 1 + g.ph) / g.sh + Tp, row_bytes = shifts * O * Wg * gy_.element_size();
  const int64_t band = band_rows(Ha0, tl.r, row_bytes, halo * row_bytes), n_bands = cdiv(Ha0, band);
  const int64_t Hg = band + halo, copy = O * Hg * Wg;
  TORCH_CHECK(shifts * copy < (int64_t(1) << 31),
              "sparseticket: sparse_conv2d_grad_input: gy too large for int32 offsets");
  // lists per (phase, input channel), entries in (output channel, tap) order
  const int64_t nnz = values.numel();
  // Blocks of output channels (conv.h); sub-list (list, block) of
  // list l is sub-list l * blocks + block.
  const int64_t ob = block_planes(O, nnz, P * C, tile_plane_bytes(tl, tl.r + Tp, shifts, gy_.element_size()));
  const int64_t blocks = std::max<int64_t>(1, cdiv(O, ob));
  const PlanPtr plan = plan_cache().get(
      plan_key(kPlanGradInput, g, f64, nnz), {index_array(crow), index_array(col)}, [&] {
        const int32_t* cr = crow.data_ptr<int32_t>();
        const int32_t* cc = col.data_ptr<int32_t>();
        // Per ticket column (tap t, channel c): its list and the part of its offset that does not
        // depend on the output channel (tables: two divisions per entry cost ~4 ms per call at
        // 128x128x3x3).
        std::vector<int32_t> col_list(K * C), col_off(K * C);
        for (int64_t t = 0; t < K; ++t) {
          const int64_t i = t / g.kw, j = t % g.kw;
          const int64_t a = (((i * g.dh - g.ph) % g.sh) + g.sh) % g.sh, b = (((j * g.dw - g.pw) % g.sw) + g.sw) % g.sw;
          const int64_t m = (a + g.ph - i * g.dh) / g.sh, q = (b + g.pw - j * g.dw) / g.sw;
          for (int64_t c = 0; c < C; ++c) {
            col_list[t * C + c] = static_cast<int32_t>((a * g.sw + b) * C + c);
            col_off[t * C + c] =
                static_cast<int32_t>(shifts > 1 ? j * copy + (m + Tp) * Wg : (m + Tp) * Wg + (q + Lp));
          }
        }
        Plan p;
        std::vector<int32_t> ptr(P * C * blocks + 1, 0);
        p.off.resize(nnz);
        p.vidx.resize(nnz);
        for (int64_t o = 0; o < O; ++o)
          for (int64_t e = cr[o]; e < cr[o + 1]; ++e) ++ptr[col_list[cc[e]] * blocks + o / ob + 1];
        for (int64_t l = 0; l < P * C * blocks; ++l) ptr[l + 1] += ptr[l];
        std::vector<int32_t> cursor(ptr.begin(), ptr.end() - 1);
        for (int64_t o = 0; o < O; ++o)
          for (int64_t e = cr[o]; e < cr[o + 1]; ++e) {
            const int32_t dst = cursor[col_list[cc[e]] * blocks + o / ob]++;
            p.off[dst] = static_cast<int32_t>(o * Hg * Wg + col_off[cc[e]]);
            p.vidx[dst] = static_cast<int32_t>(e);
          }
        p.runs = group_rows(ptr.data(), P * C * blocks, Wg, p.off, p.vidx);
        return p;
      });
  const std::vector<int32_t>& runs = plan->runs;
  const ConvKernelTable& kt = conv_kernel_table();
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "sparse_conv2d_grad_input", [&] {
    std::vector<scalar_t> val(nnz);
    const scalar_t* v = values.data_ptr<scalar_t>();
    for (int64_t k = 0; k < nnz; ++k) val[k] = v[plan->vidx[k]];
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
    const int64_t pblocks = plane_blocks(g.N * n_bands, C), per = cdiv(C, pblocks);
    at::parallel_for(0, g.N * n_bands * pblocks, 1, [&](int64_t b0, int64_t b1) {
      auto buf = buffer<scalar_t>(shifts * copy);
      Buffer<scalar_t> tmp;
      if (P > 1) tmp = buffer<scalar_t>(per * band * Wb0);
      Buffer<scalar_t> scratch;
      if (blocks > 1) scratch = buffer<scalar_t>(per * tl.r * tl.nv * tl.lanes);
      int64_t packed = -1;
      for (int64_t item = b0; item < b1; ++item) {
        const int64_t nb = item / pblocks, n = nb / n_bands, I0 = (nb % n_bands) * band;
        const int64_t l0 = (item % pblocks) * per, l1 = std::min(C, l0 + per);
        if (l0 >= l1) continue;
        if (nb != packed) {  // buffer row rho holds gy row rho + I0 - Tp
          const PackPlanesFn pack = f64 ? kt.pack_f64 : kt.pack_f32;
          if (shifts == 1)
            pack(gp + n * O * g.OH * g.OW, O, g.OH, g.OW, Tp - I0, Lp, 1, Hg, Wg, buf.get());
          else  // copy j, column w: gy column w + pw - j*dw
            for (int64_t j = 0; j < shifts; ++j)
              pack(gp + n * O * g.OH * g.OW, O, g.OH, g.OW, Tp - I0, j * g.dw - g.pw, 1, Hg, Wg, buf.get() + j * copy);
          packed = nb;
        }
        scalar_t* gxn = xp + n * C * g.H * g.W;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t a = p / g.sw, b = p % g.sw;
          const int64_t Ha = a < g.H ? cdiv(g.H - a, g.sh) : 0, Wb = b < g.W ? cdiv(g.W - b, g.sw) : 0;
          const int64_t rows = std::min(band, Ha - I0);  // phase rows I0 .. I0 + rows
          if (rows <= 0 || Wb == 0) continue;
          CorrArgs ca{};
          ca.in = buf.get();
          ca.in_row = Wg;
          ca.ptr = runs.data() + kRunKinds * blocks * p * C;
          ca.blocks = blocks;
          ca.scratch = scratch.get();
          ca.off = plan->off.data();
          ca.val = val.data();
          ca.bias = nullptr;
          ca.rows = rows;
          ca.cols = Wb;
          ca.col_tiles = tl.col_tiles;
          const CorrFn fn = corr_fn(tl, f64, Wb);  // (phases may differ in width)
          if (P == 1) {
            ca.out = gxn + I0 * g.W;
            ca.out_plane = g.H * g.W;
            ca.ldo = g.W;
            fn(ca, l0, l1);
            continue;
          }
          // phase planes into tmp, then interleaved into gx
          ca.out = tmp.get() - l0 * rows * Wb;
          ca.out_plane = rows * Wb;
          ca.ldo = Wb;
          fn(ca, l0, l1);
          for (int64_t c = l0; c < l1; ++c) {
            const scalar_t* s = tmp.get() + (c - l0) * rows * Wb;
            scalar_t* d = gxn + c * g.H * g.W + (I0 * g.sh + a) * g.W + b;
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t q = 0; q < Wb; ++q) d[r * g.sh * g.W + q * g.sw] = s[r * Wb + q];
          }
        }
      }
    });
  });
  return gx;
}

}  // namespace

const char* conv_tuning() { return cpu_is_intel() ? "intel" : "zen4"; }

TORCH_LIBRARY_IMPL(sparseticket, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_relu", &sparse_conv2d_relu_cpu);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input_cpu);
  m.impl("sparse_conv2d_grad_weight", &sparse_conv2d_grad_weight_cpu);
}

}  // namespace cpu
}  // namespace sparseticket
