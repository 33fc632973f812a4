// State of the CUDA emulator shared by its runtime (emu_runtime.cpp) and its race checker
// (racecheck.cpp). Not seen by the kernels, which only include emu.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace emu {

// One shared-memory buffer of the running block: the dynamic buffer (`extern __shared__`) or one
// `__shared__` variable. Shared addresses (what cvta.to.shared gives) are window offsets.
struct SharedBuffer {
  const void* tag;     // nullptr: the dynamic buffer
  uint32_t window;     // shared address of its first byte
  size_t bytes;
  unsigned char* host; // where it lives in host memory
};

// What the race checker reads of the running thread. Updated by the scheduler at every switch.
struct View {
  bool in_kernel = false;   // a kernel's thread is running
  bool in_runtime = false;  // ... inside the emulator (its accesses are not the kernel's)
  int thread = -1;          // linear thread index in the block
  int warp = -1;
  long long block = -1;     // linear block index in the grid
  uint32_t epoch = 0;       // block barrier epoch: every __syncthreads starts a new one
  uint32_t block_start = 0; // the epoch the running block started in
  const uint16_t* warp_sync = nullptr;  // per warp: completed __syncwarp count
  const std::vector<SharedBuffer>* shared = nullptr;
  uintptr_t stacks_lo = 0, stacks_hi = 0;  // every fiber stack lies in [lo, hi)
};

extern View view;

// The source position and description of the running thread, for messages:
// "kernel K, block (x, y, z), thread (x, y, z) (warp w, lane l)".
std::string where();

// Raises a fault in the running kernel: the launch stops and throws KernelFault with `what`
// and where() (from the scheduler's stack, so the exception never crosses a fiber).
[[noreturn]] void fault(const std::string& what);

// Shared memory lookup: the buffer holding window address [addr, addr + bytes), or a fault.
unsigned char* shared_host(uint32_t addr, size_t bytes, const char* what);

}  // namespace emu

// Race checker entry points, defined by racecheck.cpp in the race build only (weak: null else).
// kind: 0 plain, 1 read by a warp collective (ldmatrix), 2 cp.async destination poisoned at
// issue (pending), 3 cp.async landing.
extern "C" {
__attribute__((weak)) void emu_race_block_start();
__attribute__((weak)) void emu_race_launch(bool begin);
__attribute__((weak)) void emu_race_access(const void* addr, size_t bytes, bool write, int kind,
                                           const char* file, int line);
}
