// One row of float32 activations times a weight-only quantized matrix (model.quant.QuantWeight), the
// decode step's projection on CPU; built and registered by kernels/quant_gemv_cpu.py (its reference:
// kernels/quantized_matmul.py quant_matmul_reference).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

#ifndef __AVX512F__
#error "AVX-512 only: elsewhere the compiled step keeps inductor's loop (kernels/quant_gemv_cpu.py)"
#endif

inline __m512 int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline float half_to_float(const at::Half h) { return _cvtsh_ss(h.x); }

// Rows are read in order, each thread its own range: every row asks for the lines PREFETCH_BYTES
// further on (the hardware prefetchers stop at 4 KiB page boundaries and start cold at every call; on
// SmolLM2 with int8 weights a decode step takes about 0.75x the time with it), and for the float16
// scales (and offsets) as many rows ahead.
constexpr int64_t PREFETCH_BYTES = 2048;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline void prefetch_row(const void* row, int64_t row_bytes) {
  for (int64_t i = 0; i < row_bytes; i += 64) prefetch(static_cast<const char*>(row) + PREFETCH_BYTES + i);
}

// int8: x_g . w_g for group g of one row as 16 partial sums (no horizontal add per group: groups of 32
// would spend more on it than on their multiply-adds), with up to four independent accumulators (one
// would wait on the adder's latency). Inputs past the last full vector (GS % 16) go into ``tail``.
template <int64_t FIXED_GS>
inline __m512 int8_group_dot(const int8_t* r, const float* x, int64_t group_size, float& tail) {
  const int64_t GS = FIXED_GS ? FIXED_GS : group_size;
  int64_t k = 0;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; k + 64 <= GS; k += 64) {
    a0 = _mm512_fmadd_ps(int8x16(r + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(int8x16(r + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(int8x16(r + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(int8x16(r + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= GS; k += 16) a0 = _mm512_fmadd_ps(int8x16(r + k), _mm512_loadu_ps(x + k), a0);
  for (; k < GS; ++k) tail += x[k] * r[k];
  return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

// int8: y[n] = sum_g scale[n, g] * (x_g . data[n, g]), rows split over the threads. FIXED_GS: the group
// size when known at compile time (32: GGUF's Q8_0 blocks, unrolled), else 0.
template <int64_t FIXED_GS>
void int8_rows(const float* x, const int8_t* data, const at::Half* scale, float* y, int64_t N, int64_t K,
               int64_t GS) {
  const int64_t G = K / GS, rows_ahead = PREFETCH_BYTES / K + 1;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* row = data + n * K;
    const at::Half* s = scale + n * G;
    prefetch_row(row, K);
    prefetch(s + rows_ahead * G);
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();  // even and odd groups: two chains
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float tail = 0.f;
      const __m512 p = int8_group_dot<FIXED_GS>(row + g * GS, x + g * GS, GS, tail);
      const float sg = half_to_float(s[g]);
      if (g & 1)
        t1 = _mm512_fmadd_ps(p, _mm512_set1_ps(sg), t1);
      else
        t0 = _mm512_fmadd_ps(p, _mm512_set1_ps(sg), t0);
      acc += tail * sg;
    }
    y[n] = acc + _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
  }
}

// One 32-input 4-bit block (16 bytes: input j in the low nibble of byte j, input j + 16 in its high
// nibble) against x, its weights looked up in ``lut`` (the group's 16 possible weights; vpermps reads
// only the low 4 bits of each index, so the low nibble needs no mask): a += low half, b += high half.
inline void int4_block(const uint8_t* p, const float* x, __m512 lut, __m512& a, __m512& b) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  a = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, lut), _mm512_loadu_ps(x), a);
  b = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), _mm512_loadu_ps(x + 16), b);
}

// 4-bit: y[n] = sum_k x[k] * (nibble[n, k] * scale[n, g] + offset[n, g]). Each group's weights come
// from a 16-entry table (one FMA per group), so the loop neither converts nibbles to float nor
// reduces or scales per group. GS: a multiple of 32 (FIXED_GS as for int8).
template <int64_t FIXED_GS>
void int4_rows(const float* x, const uint8_t* data, const at::Half* scale, const at::Half* offset, float* y,
               int64_t N, int64_t K, int64_t group_size) {
  const int64_t GS = FIXED_GS ? FIXED_GS : group_size, G = K / GS, rows_ahead = PREFETCH_BYTES / (K / 2) + 1;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = data + n * (K / 2);
    prefetch_row(row, K / 2);
    prefetch(scale + (n + rows_ahead) * G);
    if (offset) prefetch(offset + (n + rows_ahead) * G);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const float m = offset ? half_to_float(offset[n * G + g]) : 0.f;
      const __m512 lut = _mm512_fmadd_ps(iota, _mm512_set1_ps(half_to_float(scale[n * G + g])), _mm512_set1_ps(m));
      const uint8_t* r = row + g * GS / 2;
      const float* xg = x + g * GS;
      if (GS == 32) {  // one block per group: alternate the accumulator pairs between groups
        if (g & 1)
          int4_block(r, xg, lut, a2, a3);
        else
          int4_block(r, xg, lut, a0, a1);
        continue;
      }
      int64_t k = 0;
      for (; k + 64 <= GS; k += 64) {
        int4_block(r + k / 2, xg + k, lut, a0, a1);
        int4_block(r + k / 2 + 16, xg + k + 32, lut, a2, a3);
      }
      for (; k < GS; k += 32) int4_block(r + k / 2, xg + k, lut, a0, a1);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                      const std::optional<at::Tensor>& offset, int64_t group_size) {
  const bool int4 = data.scalar_type() == at::kByte;
  const int64_t N = data.size(0), K = x.size(0), GS = group_size;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(), "quant_gemv: x must be float32 [K]");
  TORCH_CHECK(int4 || data.scalar_type() == at::kChar, "quant_gemv: data must be int8 or uint8 (4-bit)");
  TORCH_CHECK(data.dim() == 2 && data.is_contiguous() && data.size(1) == (int4 ? K / 2 : K), "quant_gemv: data must be [N, K] (int8) or [N, K / 2] (4-bit), contiguous");
  TORCH_CHECK(GS > 0 && K % GS == 0 && (!int4 || GS % 32 == 0), "quant_gemv: bad group size");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * (K / GS), "quant_gemv: scale must be float16 [N, K / group_size]");
  const at::Half* off = nullptr;
  if (offset.has_value()) {
    TORCH_CHECK(int4, "quant_gemv: int8 weights have no offset");
    TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->is_contiguous() && offset->numel() == N * (K / GS), "quant_gemv: offset must be float16 [N, K / group_size]");
    off = offset->data_ptr<at::Half>();
  }
  at::Tensor y = at::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  if (int4) {
    const uint8_t* d = data.data_ptr<uint8_t>();
    GS == 32 ? int4_rows<32>(xp, d, sp, off, yp, N, K, GS) : int4_rows<0>(xp, d, sp, off, yp, N, K, GS);
  } else {
    const int8_t* d = data.data_ptr<int8_t>();
    GS == 32 ? int8_rows<32>(xp, d, sp, yp, N, K, GS) : int8_rows<0>(xp, d, sp, yp, N, K, GS);
  }
  return y;
}

}  // namespace

// The schema is defined in kernels/quant_gemv_cpu.py (with its shape function for compilers).
TORCH_LIBRARY_IMPL(sublayer, CPU, m) { m.impl("quant_gemv", &quant_gemv); }
