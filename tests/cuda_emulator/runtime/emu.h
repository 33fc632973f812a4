// The CUDA device built-ins, for running the kernels of csrc/ on the CPU (see docs/testing.md).
//
// Force-included (g++ -include emu.h) into the host-compilable copy of csrc/ that
// tests/cuda_emulator/rewrite.py makes. CUDA's own headers give the types (dim3, uint4, __half,
// __nv_bfloat16 and their host conversions); this header adds what only a GPU has: thread and
// block indices, barriers, warp shuffles, shared memory, the launch, and the entry into the PTX
// interpreter that replaces each inline `asm volatile` block. The definitions live in
// emu_runtime.cpp: one OS thread runs the blocks of a launch one after another, each CUDA
// thread of a block as a fiber that runs until it reaches a barrier or a warp collective.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

#define __launch_bounds__(...)

// Accessors of the emulator's own state: kept out of the race checker's instrumentation.
#define EMU_NO_CHECK __attribute__((no_sanitize_thread, no_sanitize_address, noinline))

namespace emu {

// ---------------------------------------------------------------------------- indices
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// ---------------------------------------------------------------------------- sync
void syncthreads(const char* file, int line);
int syncthreads_reduce(int op, int pred, const char* file, int line);  // 0 and, 1 or, 2 count
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);
// One 32-bit shuffle: kind 0 = xor, 1 = idx, 2 = down, 3 = up.
uint32_t shfl32(const char* file, int line, int kind, unsigned mask, uint32_t value, int arg,
                int width);

template <typename T>
T shfl(const char* file, int line, int kind, unsigned mask, T value, int arg, int width = 32) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  uint32_t words[sizeof(T) / 4];
  std::memcpy(words, &value, sizeof(T));
  for (auto& w : words) w = shfl32(file, line, kind, mask, w, arg, width);
  T out;
  std::memcpy(&out, words, sizeof(T));
  return out;
}

// ---------------------------------------------------------------------------- shared memory
size_t cvta_generic_to_shared(const void* p);
void* dynamic_smem();
void* static_smem(const void* tag, size_t bytes, size_t align);

template <typename T>
T& static_smem_ref(const void* tag) {
  return *static_cast<T*>(static_smem(tag, sizeof(T), alignof(T)));
}

// ---------------------------------------------------------------------------- inline PTX
// An operand of an asm statement, numbered as GCC numbers them (outputs first, then inputs).
struct Operand {
  void* ref;       // outputs ("=r", "+f"): the variable; inputs: nullptr
  uint64_t value;  // inputs ("r", "l", "f", "n"): the value's bits
  int bytes;
};

template <typename T>
Operand out(T& x) {
  return Operand{static_cast<void*>(&x), 0, static_cast<int>(sizeof(T))};
}

template <typename T>
Operand in(const T& x) {
  static_assert(sizeof(T) <= 8, "an asm input operand wider than 64 bits");
  Operand o{nullptr, 0, static_cast<int>(sizeof(T))};
  std::memcpy(&o.value, &x, sizeof(T));
  return o;
}

void ptx(const char* text, const char* file, int line, std::initializer_list<Operand> ops);

// ---------------------------------------------------------------------------- launch
// Called first thing by every kernel (the rewriter inserts it): names the running instantiation.
void kernel_entry(const char* pretty_function);

using BlockBody = void (*)(void* launch_state);

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};

// Runs body(state) for every thread of every block of the launch; false (and cudaGetLastError
// set) when the configuration is invalid, as cudaLaunchKernel reports it.
bool launch(const void* kernel, const char* text, const char* file, int line,
            const LaunchConfig& config, BlockBody body, void* state);

template <typename... Params>
class Launcher {
 public:
  Launcher(void (*kernel)(Params...), const char* text, const char* file, int line)
      : kernel_(kernel), text_(text), file_(file), line_(line) {}

  Launcher& config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
    config_ = LaunchConfig{grid, block, smem, stream};
    return *this;
  }

  template <typename... Args>
  void operator()(Args&&... args) {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel argument count");
    State state{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    launch(reinterpret_cast<const void*>(kernel_), text_, file_, line_, config_, &run, &state);
  }

 private:
  struct State {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
  };
  static void run(void* s) {
    auto* state = static_cast<State*>(s);
    std::apply(state->kernel, state->args);  // each CUDA thread gets its own parameter copies
  }

  void (*kernel_)(Params...);
  const char* text_;
  const char* file_;
  int line_;
  LaunchConfig config_{};
};

template <typename... Params>
Launcher<Params...> launcher(void (*kernel)(Params...), const char* text, const char* file,
                             int line) {
  return Launcher<Params...>(kernel, text, file, line);
}

}  // namespace emu

// cuda_runtime.h's typed overload, declared there for nvcc only: the attribute of a kernel.
template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_and(p) ::emu::syncthreads_reduce(0, (p), __FILE__, __LINE__)
#define __syncthreads_or(p) ::emu::syncthreads_reduce(1, (p), __FILE__, __LINE__)
#define __syncthreads_count(p) ::emu::syncthreads_reduce(2, (p), __FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl(__FILE__, __LINE__, 0, __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl(__FILE__, __LINE__, 1, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl(__FILE__, __LINE__, 2, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl(__FILE__, __LINE__, 3, __VA_ARGS__)
#define __cvta_generic_to_shared(p) ::emu::cvta_generic_to_shared(p)
#define EMU_KERNEL_ENTRY() ::emu::kernel_entry(__PRETTY_FUNCTION__)
