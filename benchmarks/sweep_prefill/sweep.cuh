#pragma once

// The sweep's registry of prefill kernel configurations: every generated configuration unit
// (build/cfg_*.cu, from configs.txt) adds its instantiation of prefill_mma_kernel here. The
// baseline of each head dim is its shipped configuration, PrefillMmaConfig<D>.

#include <cuda_fp16.h>

#include <string>
#include <vector>

#include "cuda/attention/prefill_mma.cuh"

namespace sweep {

namespace k = tinyserve::kernels::cuda;

struct Config {
  std::string name;
  std::string shape;  // the tile parameters, for the table
  const void* kernel;
  int smem_bytes, rows, threads;
  int head_dim;
  bool baseline;  // the shipped configuration of its head dim
};

inline std::vector<Config>& registry() {
  static std::vector<Config> configs;
  return configs;
}

inline const char* pipeline_name(k::PrefillPipeline p) {
  return p == k::PrefillPipeline::kTwoBarriers ? "2bar" : "1bar";
}

template <class C>
struct Register {
  explicit Register(const char* name, bool baseline = false) {
    std::string shape = "w" + std::to_string(C::kWarps) + " m" + std::to_string(C::kWarpTiles) +
                        " k" + std::to_string(C::kKeys) + "/" + std::to_string(C::kChunkKeys) +
                        " s" + std::to_string(C::kStages) + " " + pipeline_name(C::kPipeline) +
                        (C::kPrefetchTable ? " pf" : "") + (C::kQInRegisters ? " qreg" : "") +
                        (C::kFusedScale ? " fs" : "") + (C::kUniformMma ? " u" : "") +
                        (C::kMinBlocks > 1 ? " b" + std::to_string(C::kMinBlocks) : "") +
                        (C::kSharedRowAddresses ? " sa" : "") + (C::kZeroRowSource ? " zr" : "") +
                        (C::kAddressBatch > 1 ? " ab" + std::to_string(C::kAddressBatch) : "") +
                        (C::kMmaRowSums ? " rs" : "") + (C::kTreeRowMax ? " tm" : "") +
                        (C::kCopyInScores ? " ci" : "");
    registry().push_back({name, shape,
                          reinterpret_cast<const void*>(k::prefill_mma_kernel<__half, C>),
                          C::kSmemBytes, C::kRows, C::kThreads, C::kHeadDim, baseline});
  }
};

}  // namespace sweep
