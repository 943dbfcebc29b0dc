// Winograd F(2x2,3x3) and F(4x4,3x3) convolution + bias for XLA:CPU, called
// through XLA's FFI (repvgg_jax/native.py builds, loads and registers it).
//
// One stride-1, padding-1 3x3 conv of an NHWC float32 batch, in three phases on the
// calling thread and XLA's intra-op pool:
//   1. every tile's B^T d B, for all (m+2)^2 positions      -> v[position][tile][channel]
//   2. one matmul per position: v[p] (tiles x in) x kernel[p] (in x out) -> prod[p]
//   3. every tile's A^T prod A + bias, into the output image.
// XLA's own graph of the same algorithm (repvgg_jax/winograd.py) runs the matmuls of
// phase 2 one after the other on one core, and re-reads the transformed maps between
// phases; at batch 1 that made it slower than XLA's convolution on RepVGG's 14x14 stage.
//
// The kernel comes transformed (G g G^T, computed in float64 by winograd.py) and packed
// by native.pack_kernel: for each position, the out channels (padded to a whole number
// of vectors) are cut into panels of kPanelVectors vectors, and each panel is stored as
// a contiguous [in, width] block, which the matmul streams from memory once.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// See Winograd() below.
constexpr int64_t kChunkBytes = 4 << 20;

// The vector width and the matmul's register block (rows of tiles x vectors of output
// channels): AVX-512 has 32 vector registers, AVX2 16.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kBlockRows = 6;
constexpr int kPanelVectors = 4;
#else
constexpr int kLanes = 8;
constexpr int kBlockRows = 4;
constexpr int kPanelVectors = 3;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(Vec)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
inline Vec LoadPart(const float* p, int n) {
  Vec v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}
inline void StorePart(float* p, Vec v, int n) { std::memcpy(p, &v, n * sizeof(float)); }

// B^T and A^T of F(m x m, 3x3), as in winograd.py's _TRANSFORMS.
template <int M> struct Transforms;
template <> struct Transforms<2> {
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <> struct Transforms<4> {
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0},
                                     {0, 4, -4, -1, 1, 0}, {0, -2, -1, 2, 1, 0},
                                     {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0},
                                     {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// out = coef x in over the tile's rows, skipping zero coefficients (and the products by 1
// and -1 compile to additions): the first half of B^T d B and A^T m A.
template <int ROWS, int A>
inline void MultiplyLeft(const float (&coef)[ROWS][A], const Vec (&in)[A][A],
                         Vec (&out)[ROWS][A]) {
  for (int i = 0; i < ROWS; ++i)
    for (int q = 0; q < A; ++q) {
      Vec sum = {};
      for (int r = 0; r < A; ++r)
        if (coef[i][r] != 0) sum += coef[i][r] * in[r][q];
      out[i][q] = sum;
    }
}

// start + sum_q coef[q] * row[q]: one entry of the second half, (.) B or (.) A.
template <int A>
inline Vec Dot(const float (&coef)[A], const Vec (&row)[A], Vec start = Vec{}) {
  for (int q = 0; q < A; ++q)
    if (coef[q] != 0) start += coef[q] * row[q];
  return start;
}

// Waits a moment for another thread; after ~1000 spins it yields its core instead, in
// case the thread waited for was preempted.
inline void Pause(int& spins) {
#if defined(__x86_64__) || defined(__i386__)
  if (++spins < 1000) {
    __builtin_ia32_pause();
    return;
  }
#endif
  std::this_thread::yield();
}

// Runs body(phase, i) for every i < sizes[phase], phase after phase, on the calling
// thread and the pool's other threads, woken once for all phases (waking them per phase
// cost ~20 us each, as much as a phase's work on a 14x14 map). Items are claimed from a
// counter, and a thread waits only for items another thread has claimed and is running:
// a helper that starts late finds them all claimed, calls nothing, and cannot deadlock a
// busy pool; the caller never waits for a helper to start.
template <int P, typename Body>
void RunPhases(ffi::ThreadPool& pool, const std::array<int64_t, P>& sizes, const Body& body) {
  const int64_t largest = *std::max_element(sizes.begin(), sizes.end());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), largest) - 1;
  if (helpers <= 0) {
    for (int p = 0; p < P; ++p)
      for (int64_t i = 0; i < sizes[p]; ++i) body(p, i);
    return;
  }
  struct Counters {
    std::array<std::atomic<int64_t>, P> next, done;
  };
  auto counters = std::make_shared<Counters>();
  for (int p = 0; p < P; ++p) {
    counters->next[p].store(0);
    counters->done[p].store(0);
  }
  const Body* shared_body = &body;
  auto run = [counters, sizes, shared_body] {
    for (int p = 0; p < P; ++p) {
      for (int64_t i; (i = counters->next[p].fetch_add(1, std::memory_order_relaxed)) < sizes[p];) {
        (*shared_body)(p, i);
        counters->done[p].fetch_add(1, std::memory_order_release);
      }
      for (int spins = 0; counters->done[p].load(std::memory_order_acquire) < sizes[p];)
        Pause(spins);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(run)(run));
  run();
}

struct Shape {
  int64_t n, h, w, in, out;    // NHWC input, out channels
  int64_t th, tw, tiles;       // tiles per column and row, in all
  int64_t in_pad, out_pad;     // channels rounded up to whole vectors
};

// A run of tiles transformed together, and where their positions lie in the buffers: one
// cache line more apart than the data, since a multiple of 4 KiB would put the (m+2)^2
// positions of a tile in one L1 set (RepVGG's 14x14 input transforms ran 1.6x slower).
struct Chunk {
  int64_t first, tiles, v_stride, prod_stride;
};

// v[p][t - first][c] = (B^T d B)[p] of tile t, p = i * (m+2) + j.
template <int M>
void InputTransform(const Shape& s, const float* x, const Chunk& chunk, float* v, int64_t t) {
  constexpr int A = M + 2;
  using T = Transforms<M>;
  const int64_t n = t / (s.th * s.tw), h0 = t / s.tw % s.th * M - 1, w0 = t % s.tw * M - 1;
  for (int64_t c0 = 0; c0 < s.in_pad; c0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, s.in - c0));
    Vec d[A][A];
    for (int r = 0; r < A; ++r)
      for (int q = 0; q < A; ++q) {
        const int64_t h = h0 + r, w = w0 + q;
        if (h < 0 || h >= s.h || w < 0 || w >= s.w) {
          d[r][q] = Vec{};
          continue;
        }
        const float* src = x + ((n * s.h + h) * s.w + w) * s.in + c0;
        d[r][q] = lanes == kLanes ? Load(src) : LoadPart(src, lanes);
      }
    Vec bd[A][A];
    MultiplyLeft(T::BT, d, bd);
    for (int i = 0; i < A; ++i)
      for (int j = 0; j < A; ++j)
        Store(v + (i * A + j) * chunk.v_stride + (t - chunk.first) * s.in_pad + c0,
              Dot(T::BT[j], bd[i]));
  }
}

// c[r][:VECS * kLanes] = sum_k a[r][k] * b[k][:VECS * kLanes] for R rows: the
// accumulators stay in registers for the whole contraction.
template <int R, int VECS>
void MatmulBlock(const float* a, int64_t lda, const float* b, int64_t k_size, float* c,
                 int64_t ldc) {
  Vec acc[R][VECS] = {};
  for (int64_t k = 0; k < k_size; ++k) {
    Vec bk[VECS];
    for (int j = 0; j < VECS; ++j) bk[j] = Load(b + (k * VECS + j) * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec ar = Vec{} + a[r * lda + k];
      for (int j = 0; j < VECS; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < VECS; ++j) Store(c + r * ldc + j * kLanes, acc[r][j]);
}

using MatmulFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);

template <int R, int... V>
constexpr std::array<MatmulFn, sizeof...(V)> RowKernels(std::integer_sequence<int, V...>) {
  return {&MatmulBlock<R, V + 1>...};
}
template <int... R>
constexpr auto AllKernels(std::integer_sequence<int, R...>) {
  return std::array<std::array<MatmulFn, kPanelVectors>, sizeof...(R)>{
      RowKernels<R + 1>(std::make_integer_sequence<int, kPanelVectors>())...};
}
// kMatmul[rows - 1][vectors - 1]: the block for the last rows and the narrow last panel.
constexpr auto kMatmul = AllKernels(std::make_integer_sequence<int, kBlockRows>());

// prod[p][:, panel] = v[p] x kernel[p][:, panel] for the chunk's tiles.
void PositionMatmul(const Shape& s, const Chunk& chunk, const float* v, const float* kernel,
                    float* prod, int64_t p, int64_t panel) {
  const int64_t n0 = panel * kPanelVectors * kLanes;
  const int vectors = static_cast<int>(std::min<int64_t>(kPanelVectors, (s.out_pad - n0) / kLanes));
  const float* b = kernel + (p * s.out_pad + n0) * s.in;  // the panel: [in, vectors * kLanes]
  for (int64_t t0 = 0; t0 < chunk.tiles; t0 += kBlockRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, chunk.tiles - t0));
    kMatmul[rows - 1][vectors - 1](v + p * chunk.v_stride + t0 * s.in_pad, s.in_pad, b, s.in,
                                   prod + p * chunk.prod_stride + t0 * s.out_pad + n0, s.out_pad);
  }
}

// The output tile t: A^T prod A + bias, where it falls inside the image.
template <int M>
void OutputTransform(const Shape& s, const Chunk& chunk, const float* prod, const float* bias,
                     float* y, int64_t t) {
  constexpr int A = M + 2;
  using T = Transforms<M>;
  const int64_t n = t / (s.th * s.tw), h0 = t / s.tw % s.th * M, w0 = t % s.tw * M;
  for (int64_t c0 = 0; c0 < s.out; c0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, s.out - c0));
    Vec pm[A][A];
    for (int i = 0; i < A; ++i)
      for (int j = 0; j < A; ++j)
        pm[i][j] = Load(prod + (i * A + j) * chunk.prod_stride +
                        (t - chunk.first) * s.out_pad + c0);
    Vec ap[M][A];
    MultiplyLeft(T::AT, pm, ap);
    const Vec b = lanes == kLanes ? Load(bias + c0) : LoadPart(bias + c0, lanes);
    for (int i = 0; i < M && h0 + i < s.h; ++i)
      for (int j = 0; j < M && w0 + j < s.w; ++j) {
        const Vec sum = Dot(T::AT[j], ap[i], b);
        float* dst = y + ((n * s.h + h0 + i) * s.w + w0 + j) * s.out + c0;
        if (lanes == kLanes) Store(dst, sum); else StorePart(dst, sum, lanes);
      }
  }
}

template <int M>
void Winograd(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* kernel,
              const float* bias, float* y) {
  constexpr int A = M + 2;
  // The tiles go in chunks of kChunkBytes of transformed inputs and products, which stay
  // in cache between the phases; or of the kernel's size where that is larger, since the
  // kernel is read once per chunk. (RepVGG-A0 at batch 8 on 2 cores: 78 ms in one chunk,
  // 68-75 ms in chunks of 0.5-4 MiB.)
  const int64_t tile_bytes = A * A * (s.in_pad + s.out_pad) * sizeof(float);
  const int64_t kernel_bytes = A * A * s.in * s.out_pad * sizeof(float);
  const int64_t budget = std::max<int64_t>(kChunkBytes, kernel_bytes);
  const int64_t chunk_tiles =
      std::max<int64_t>(kBlockRows, std::min<int64_t>(s.tiles, budget / tile_bytes));
  // Per calling thread: XLA may run two executables at once, each on its own thread.
  thread_local std::vector<float> v_buffer, prod_buffer;
  const int64_t v_stride = chunk_tiles * s.in_pad + kLanes;
  const int64_t prod_stride = chunk_tiles * s.out_pad + kLanes;
  v_buffer.resize(A * A * v_stride);
  prod_buffer.resize(A * A * prod_stride);
  float* v = v_buffer.data();
  float* prod = prod_buffer.data();
  const int64_t panels = (s.out_pad / kLanes + kPanelVectors - 1) / kPanelVectors;
  for (int64_t first = 0; first < s.tiles; first += chunk_tiles) {
    const Chunk chunk{first, std::min(chunk_tiles, s.tiles - first), v_stride, prod_stride};
    RunPhases<3>(pool, {chunk.tiles, A * A * panels, chunk.tiles}, [&](int phase, int64_t i) {
      if (phase == 0) InputTransform<M>(s, x, chunk, v, first + i);
      else if (phase == 1) PositionMatmul(s, chunk, v, kernel, prod, i / panels, i % panels);
      else OutputTransform<M>(s, chunk, prod, bias, y, first + i);
    });
  }
}

template <typename Dims>
std::string Format(const Dims& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

ffi::Error WinogradConv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), bd = bias.dimensions();
  const auto yd = y->dimensions();
  const std::string got = "got x " + Format(xd) + ", kernel " + Format(kd) + ", bias " +
                          Format(bd) + ", y " + Format(yd);
  if (xd.size() != 4 || kd.size() != 2 || bd.size() != 1 || yd.size() != 4 ||
      (kd[0] != 16 && kd[0] != 36))
    return ffi::Error::InvalidArgument(
        "repvgg_winograd_conv3x3: expected x [N, H, W, in], kernel [16 or 36, in * out_pad], "
        "bias [out], y [N, H, W, out]; " + got);
  const int m = kd[0] == 16 ? 2 : 4;
  Shape s;
  s.n = xd[0], s.h = xd[1], s.w = xd[2], s.in = xd[3], s.out = bd[0];
  s.th = (s.h + m - 1) / m, s.tw = (s.w + m - 1) / m, s.tiles = s.n * s.th * s.tw;
  s.in_pad = (s.in + kLanes - 1) / kLanes * kLanes;
  s.out_pad = (s.out + kLanes - 1) / kLanes * kLanes;
  if (kd[1] != s.in * s.out_pad || yd[0] != s.n || yd[1] != s.h || yd[2] != s.w ||
      yd[3] != s.out)
    return ffi::Error::InvalidArgument(
        "repvgg_winograd_conv3x3: the kernel must be [16 or 36, in * out_pad] (out_pad: out "
        "rounded up to a multiple of " + std::to_string(kLanes) + ") and y [N, H, W, out]; " +
        got);
  if (s.tiles == 0 || s.out == 0) return ffi::Error::Success();
  try {
    if (m == 2)
      Winograd<2>(pool, s, x.typed_data(), kernel.typed_data(), bias.typed_data(),
                  y->typed_data());
    else
      Winograd<4>(pool, s, x.typed_data(), kernel.typed_data(), bias.typed_data(),
                  y->typed_data());
  } catch (const std::exception& e) {  // std::bad_alloc of the buffers, for one
    return ffi::Error::Internal(std::string("repvgg_winograd_conv3x3: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RepvggWinogradConv3x3, WinogradConv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y

// The layout native.pack_kernel must produce for this build.
extern "C" int RepvggWinogradLanes() { return kLanes; }
extern "C" int RepvggWinogradPanelVectors() { return kPanelVectors; }
