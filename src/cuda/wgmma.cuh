#pragma once

// Hopper warpgroup MMA (wgmma, sm_90a): the instructions, their shared-memory operand
// descriptors and their fences. Only code compiled for sm_90a may call these.
//
// Shared operands use the 128-byte swizzle: an operand is stored as rows of 128 bytes (64 16-bit
// elements) from a 1024-byte aligned base, 16-byte chunk c of row r at r * 128 + (c ^ r % 8) * 16,
// so the 8 rows that the tensor cores read together fall in distinct banks. A head_dim of 128 is
// two such column blocks, one after the other.
//
// Accumulators (m64nN, float32) are held as in mma.sync's m16n8 C fragments: warp w of the
// warpgroup owns rows 16 w .. 16 w + 15, and for every 8 columns j lane l holds d[4 j + 0..1] =
// (row l / 4, columns 8 j + 2 (l % 4) + 0..1) and d[4 j + 2..3] = the same columns of row l / 4
// + 8. A register A operand (m64k16) is mma.sync's m16k16 A fragment of the warp's 16 rows.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tinyserve::kernels::cuda::wgmma {

// Byte offset of 16-bit element (row, col) in a 128-byte swizzled block of rows (col < 64).
__host__ __device__ constexpr std::uint32_t swizzled_offset(std::uint32_t row, std::uint32_t col) {
  return row * 128 + (((col / 8) ^ (row % 8)) * 16) + (col % 8) * 2;
}

// The descriptor of a 128-byte swizzled operand at shared address `addr`. K-major operands
// (rows along M or N, 128 bytes of K each) step 1024 bytes between 8-row groups (sbo); lbo is
// unused. N-major B operands (rows along K) take sbo = 1024 bytes between 8-row groups of K and
// lbo = the bytes between 64-column blocks of N.
__device__ __forceinline__ std::uint64_t descriptor(std::uint32_t addr, std::uint32_t lbo,
                                                    std::uint32_t sbo) {
  return (std::uint64_t((addr & 0x3FFFF) >> 4)) | (std::uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (std::uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (std::uint64_t(1) << 62);
}

// Orders this thread's earlier register writes before the next wgmma reads them.
__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most N committed groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async once complete)
// visible to the async proxy that wgmma reads operands through.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Shared-memory barriers (mbarrier) between a producer warpgroup and its consumers. A barrier
// completes a phase when `count` arrivals have happened; waiters name the phase by its parity.
__device__ __forceinline__ void barrier_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// An arrival with release semantics: this thread's earlier writes are seen by the waiters.
__device__ __forceinline__ void barrier_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// An arrival made by the hardware once every cp.async this thread issued before it has landed
// (noinc: it is one of the barrier's `count` arrivals). The thread goes on at once.
__device__ __forceinline__ void barrier_arrive_on_copies(std::uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Blocks until the phase of parity `parity` has completed (acquire). A fresh barrier reads as
// having completed the phase of parity 1.
__device__ __forceinline__ void barrier_wait(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT_AGAIN:\n"
      " mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_AGAIN;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// A barrier over `threads` threads (whole warps) of the CTA, by id (0 is __syncthreads').
template <int Id, int Threads>
__device__ __forceinline__ void named_barrier_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(Id), "n"(Threads) : "memory");
}

// Moves registers between warpgroups: the producer gives its spare ones to the consumers.
template <int N>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Keeps the compiler from moving reads or writes of accumulator registers across an
// asynchronous MMA's issue and wait.
template <int R>
__device__ __forceinline__ void hold(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A B, m64nNk16, A and B in shared memory (K-major both); accumulate = 0 overwrites d.
template <int N, class T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], std::uint64_t a, std::uint64_t b,
                                         int accumulate);

// d += A B, m64nNk16, A in registers, B in shared memory N-major.
template <int N, class T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const std::uint32_t (&a)[4],
                                         std::uint64_t b);

// The accumulator operands of an m64nN instruction, R = N / 2 float32 registers a thread:
// TS_WGMMA_OPS_R names operands %0 .. %(R - 1) in the instruction's text and TS_WGMMA_ACC_R
// binds them to d[0] .. d[R - 1].
#define TS_WGMMA_ACC_4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define TS_WGMMA_ACC_16(i) \
  TS_WGMMA_ACC_4(i), TS_WGMMA_ACC_4(i + 4), TS_WGMMA_ACC_4(i + 8), TS_WGMMA_ACC_4(i + 12)
#define TS_WGMMA_ACC_32(i) TS_WGMMA_ACC_16(i), TS_WGMMA_ACC_16(i + 16)
#define TS_WGMMA_ACC_48(i) TS_WGMMA_ACC_32(i), TS_WGMMA_ACC_16(i + 32)
#define TS_WGMMA_ACC_64(i) TS_WGMMA_ACC_48(i), TS_WGMMA_ACC_16(i + 48)
#define TS_WGMMA_ACC_128(i) TS_WGMMA_ACC_64(i), TS_WGMMA_ACC_64(i + 64)
#define TS_WGMMA_OPS_16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define TS_WGMMA_OPS_32 \
  TS_WGMMA_OPS_16       \
  ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define TS_WGMMA_OPS_48 \
  TS_WGMMA_OPS_32       \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define TS_WGMMA_OPS_64 \
  TS_WGMMA_OPS_48       \
  ", %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define TS_WGMMA_OPS_128                                                              \
  TS_WGMMA_OPS_64                                                                     \
  ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79," \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"   \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109,"   \
  "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122,"     \
  "%123, %124, %125, %126, %127"

// wgmma_ss<N, T>: the accumulators, then A's and B's descriptors and `accumulate` as operands R,
// R + 1 and R + 2 (R = N / 2).
#define TS_WGMMA_SS(N, R, T, PTX_TYPE, A, B, ACCUMULATE)                                         \
  template <>                                                                                    \
  __device__ __forceinline__ void wgmma_ss<N, T>(float(&d)[R], std::uint64_t a, std::uint64_t b, \
                                                 int accumulate) {                               \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, " ACCUMULATE                                \
                 ", 0;\n"                                                                        \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE         \
                 " {" TS_WGMMA_OPS_##R "}, " A ", " B ", p, 1, 1, 0, 0;\n}\n"                    \
                 : TS_WGMMA_ACC_##R(0)                                                           \
                 : "l"(a), "l"(b), "r"(accumulate));                                             \
  }
// wgmma_rs<N, T>: the accumulators, then A's four registers (operands A) and B's descriptor.
#define TS_WGMMA_RS(N, R, T, PTX_TYPE, A, B)                                               \
  template <>                                                                              \
  __device__ __forceinline__ void wgmma_rs<N, T>(float(&d)[R], const std::uint32_t(&a)[4], \
                                                 std::uint64_t b) {                        \
    asm volatile(                                                                          \
        "{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"                                       \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE            \
        " {" TS_WGMMA_OPS_##R "}, {" A "}, " B ", p, 1, 1, 1;\n}\n"                        \
        : TS_WGMMA_ACC_##R(0)                                                              \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                             \
  }

TS_WGMMA_SS(32, 16, __half, "f16", "%16", "%17", "%18")
TS_WGMMA_SS(32, 16, __nv_bfloat16, "bf16", "%16", "%17", "%18")
TS_WGMMA_SS(64, 32, __half, "f16", "%32", "%33", "%34")
TS_WGMMA_SS(64, 32, __nv_bfloat16, "bf16", "%32", "%33", "%34")
TS_WGMMA_SS(96, 48, __half, "f16", "%48", "%49", "%50")
TS_WGMMA_SS(96, 48, __nv_bfloat16, "bf16", "%48", "%49", "%50")
TS_WGMMA_SS(128, 64, __half, "f16", "%64", "%65", "%66")
TS_WGMMA_SS(128, 64, __nv_bfloat16, "bf16", "%64", "%65", "%66")
TS_WGMMA_RS(64, 32, __half, "f16", "%32, %33, %34, %35", "%36")
TS_WGMMA_RS(64, 32, __nv_bfloat16, "bf16", "%32, %33, %34, %35", "%36")
TS_WGMMA_RS(128, 64, __half, "f16", "%64, %65, %66, %67", "%68")
TS_WGMMA_RS(128, 64, __nv_bfloat16, "bf16", "%64, %65, %66, %67", "%68")
TS_WGMMA_RS(256, 128, __half, "f16", "%128, %129, %130, %131", "%132")
TS_WGMMA_RS(256, 128, __nv_bfloat16, "bf16", "%128, %129, %130, %131", "%132")

#undef TS_WGMMA_SS
#undef TS_WGMMA_RS
#undef TS_WGMMA_OPS_128
#undef TS_WGMMA_OPS_64
#undef TS_WGMMA_OPS_48
#undef TS_WGMMA_OPS_32
#undef TS_WGMMA_OPS_16
#undef TS_WGMMA_ACC_128
#undef TS_WGMMA_ACC_64
#undef TS_WGMMA_ACC_48
#undef TS_WGMMA_ACC_32
#undef TS_WGMMA_ACC_16
#undef TS_WGMMA_ACC_4

}  // namespace tinyserve::kernels::cuda::wgmma
