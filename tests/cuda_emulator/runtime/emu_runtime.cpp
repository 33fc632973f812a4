// The CUDA emulator's runtime: launches, blocks, fibers, barriers, warp collectives, shared
// memory, the PTX interpreter and the CUDA runtime calls the kernels' host code makes.
//
// Execution model. A launch runs its blocks one after another (z, y, x order). A block's threads
// are fibers on one OS thread; the scheduler runs each ready fiber until it waits: at a barrier
// (__syncthreads*, released when every live thread of the block has arrived at the same one), at
// a warp collective (__syncwarp, shuffles, ldmatrix, mma: released when every lane it names has
// arrived at the same one; the last lane to arrive computes everyone's result), or at its end.
// A block whose live threads all wait and none can be released is a deadlock, reported with
// where each thread waits.
//
// Memory. Global memory is host memory (CPU tensors). Each shared buffer of a block is its own
// allocation filled with 0xff bytes (NaN in float32, float16 and bfloat16) at the block's start,
// so a read of shared memory never written shows up as NaN. cp.async reads its source when
// issued, fills the destination with 0xff and writes the data when a cp.async.wait_group lets
// its group complete: a missing wait or barrier leaves NaN in the output. In the memcheck build
// (AddressSanitizer) every buffer is an exact-size allocation; in the race build
// (racecheck.cpp) the checker sees every access.
#include "emu_state.h"

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {

View view;

// ---------------------------------------------------------------------------- the device
// The emulated GPU's limits (emu_configure changes them). Default: sm_86, whose 99 KB of
// opt-in shared memory per block is the smallest of the GPUs the sm_80 build serves.
struct Device {
  int sm = 86;
  int sm_count = 84;
  size_t smem_default = 48 * 1024;  // per block without cudaFuncSetAttribute
  size_t smem_optin = 99 * 1024;    // per block with it (static + dynamic)
} device;

// ---------------------------------------------------------------------------- faults
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Instr;  // a parsed PTX instruction (below)

namespace {

cudaError_t last_error = cudaSuccess;
std::mutex launch_mutex;  // one launch at a time in the process

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxThreads = 1024;

enum class Wait { kReady, kBarrier, kWarp, kDone };

struct Copy {  // one pending cp.async
  uint32_t dst;
  int bytes;
  unsigned char data[16];
};

struct Collective;

struct Thread {
  uint3 idx;
  int linear = 0, warp = 0, lane = 0;
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // usable bottom
  Wait wait = Wait::kReady;
  const char* file = "";  // where it waits (or last waited)
  int line = 0;
  int bar_op = -1, bar_pred = 0, bar_result = 0;
  Collective* coll = nullptr;
  std::vector<Copy> open;                  // issued, not yet committed
  std::deque<std::vector<Copy>> committed; // oldest first
};

// A warp collective being assembled: one per waiting lane, on that lane's stack.
struct Collective {
  int kind;           // 0 syncwarp, 1 shuffle, 2 ldmatrix, 3 mma
  const void* instr;  // the instruction: the asm text, or the source file of an intrinsic
  int line;           // ... and its line
  unsigned mask;
  // shuffle
  int shfl_kind = 0, shfl_arg = 0, shfl_width = 32;
  uint32_t value = 0, result = 0;
  // ldmatrix / mma
  const Operand* ops = nullptr;
  size_t nops = 0;
  const Instr* ins = nullptr;
};

struct Block {
  uint3 idx;
  std::vector<Thread> threads;
  std::vector<SharedBuffer> shared;
  std::vector<unsigned char*> allocations;
  uint16_t warp_sync[kMaxThreads / kWarpSize] = {};
  uint8_t arrived[kMaxThreads / kWarpSize] = {};  // lanes waiting at a warp collective
  int at_barrier = 0;                              // threads waiting at a block barrier
  size_t static_bytes = 0;                         // of the __shared__ variables met so far
  std::string fault;
  bool faulted = false;
  int done = 0;
};

struct Launch {
  const char* text = "";
  const char* file = "";
  int line = 0;
  const char* kernel = nullptr;  // __PRETTY_FUNCTION__ of the instantiation, once entered
  LaunchConfig config{};
  BlockBody body = nullptr;
  void* state = nullptr;
  size_t dynamic_bytes = 0, smem_limit = 0;
};

Launch* launch_ = nullptr;
Block* block_ = nullptr;
Thread* current = nullptr;
void* scheduler_sp = nullptr;
dim3 block_dim_, grid_dim_;
uint3 block_idx_;

// Fiber stacks: one mapping, one slot per thread, a guard page below each.
unsigned char* stacks = nullptr;
size_t stack_slots = 0;
const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

#if EMU_ASAN
const void* main_stack_bottom = nullptr;
size_t main_stack_size = 0;
#endif

std::map<const void*, int> optin;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize

// Kernels run, by instantiation (for "X of Y instantiations run"): the kernel's offset in its
// library (its symbol's value) -> (__PRETTY_FUNCTION__, launches).
std::map<uintptr_t, std::pair<std::string, long long>>& executed() {
  static std::map<uintptr_t, std::pair<std::string, long long>> m;
  return m;
}

std::string dim_str(uint3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
         ")";
}

std::string kernel_name() {
  if (launch_ == nullptr) return "(no kernel)";
  if (launch_->kernel != nullptr) return launch_->kernel;
  return std::string(launch_->text) + " (launched at " + launch_->file + ":" +
         std::to_string(launch_->line) + ")";
}

}  // namespace

std::string where() {
  std::ostringstream s;
  s << "kernel " << kernel_name();
  if (block_ != nullptr) s << ", block " << dim_str(block_->idx);
  if (current != nullptr) {
    s << ", thread " << dim_str(current->idx) << " (warp " << current->warp << ", lane "
      << current->lane << ")";
  }
  return s.str();
}

#if EMU_ASAN
namespace {
// AddressSanitizer / UBSan report an error, then call this before the process ends: it says
// which kernel, block and thread of the emulator made the access.
void on_sanitizer_death() {
  if (launch_ != nullptr) std::fprintf(stderr, "emulator: the error above happened in %s\n",
                                       where().c_str());
}
const int death_callback_set = (__sanitizer_set_death_callback(on_sanitizer_death), 0);
}  // namespace
#endif

// ---------------------------------------------------------------------------- fibers
#if defined(__x86_64__)
// emu_switch(save, load): saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer in *save, switches to `load` and restores there.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#else
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

namespace {

[[noreturn]] void fiber_main();

void* initial_sp(unsigned char* bottom) {
  // The stack top, 16-byte aligned: fiber_main's "return address" slot, then the registers
  // emu_switch pops (all zero) and the saved MXCSR / x87 control word of the caller.
  auto top = reinterpret_cast<uintptr_t>(bottom + kStackBytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);
  slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
  slot[1] = 0;
  for (int i = 1; i <= 6; ++i) slot[-i] = 0;
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&slot[-7], csr, 8);
  return &slot[-7];
}

void switch_to(Thread* t) {
  current = t;
  view.thread = t->linear;
  view.warp = t->warp;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t->stack, kStackBytes);
  emu_switch(&scheduler_sp, t->sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  emu_switch(&scheduler_sp, t->sp);
#endif
  current = nullptr;
  view.thread = -1;
  view.warp = -1;
}

// From a fiber back to the scheduler; `dying`: this fiber never runs again.
void yield_to_scheduler(bool dying = false) {
  Thread* self = current;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, main_stack_bottom, main_stack_size);
  emu_switch(&self->sp, scheduler_sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)dying;
  emu_switch(&self->sp, scheduler_sp);
#endif
  current = self;
}

void ensure_stacks(size_t n) {
  if (n <= stack_slots) return;
  if (stacks != nullptr) {
#if EMU_ASAN
    // The fibers' frames left redzones in the shadow: clear them, or whatever is mapped here
    // next inherits them (a false stack-buffer-underflow in other code).
    for (size_t i = 0; i < stack_slots; ++i) {
      ASAN_UNPOISON_MEMORY_REGION(stacks + i * (kStackBytes + kPage) + kPage, kStackBytes);
    }
#endif
    munmap(stacks, stack_slots * (kStackBytes + kPage));
  }
  const size_t bytes = n * (kStackBytes + kPage);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("emulator: cannot map fiber stacks");
  stacks = static_cast<unsigned char*>(p);
  stack_slots = n;
  for (size_t i = 0; i < n; ++i) mprotect(stacks + i * (kStackBytes + kPage), kPage, PROT_NONE);
  view.stacks_lo = reinterpret_cast<uintptr_t>(stacks);
  view.stacks_hi = reinterpret_cast<uintptr_t>(stacks + bytes);
}

}  // namespace

void fault(const std::string& what) {
  if (block_ == nullptr || current == nullptr) throw KernelFault("emulator: " + what);
  if (!block_->faulted) {
    block_->faulted = true;
    block_->fault = what + "\n  in " + where();
  }
  yield_to_scheduler(true);
  std::abort();  // never resumed
}

// Marks the emulator's own code for the race checker while a kernel thread runs it (library
// code such as std::string may be shared with the instrumented kernels).
struct InRuntime {
  InRuntime() { view.in_runtime = true; }
  ~InRuntime() { view.in_runtime = false; }
};

// ---------------------------------------------------------------------------- indices
EMU_NO_CHECK const uint3& thread_idx() { return current->idx; }
EMU_NO_CHECK const uint3& block_idx() { return block_idx_; }
EMU_NO_CHECK const dim3& block_dim() { return block_dim_; }
EMU_NO_CHECK const dim3& grid_dim() { return grid_dim_; }

EMU_NO_CHECK void kernel_entry(const char* pretty) {
  if (launch_->kernel == nullptr) launch_->kernel = pretty;
}

// ---------------------------------------------------------------------------- barriers
namespace {

std::string site(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

std::string thread_list(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    s << (i ? ", " : "") << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

// Releases the block barrier when every live thread waits at it. Called after any thread arrives
// at a barrier or finishes.
void try_release_barrier() {
  Block& b = *block_;
  if (b.at_barrier == 0 || b.at_barrier + b.done != static_cast<int>(b.threads.size())) return;
  int waiting = 0;
  Thread* first = nullptr;
  for (Thread& t : b.threads) {
    if (t.wait == Wait::kBarrier) {
      ++waiting;
      if (first == nullptr) first = &t;
    }
  }
  if (waiting == 0 || waiting + b.done != static_cast<int>(b.threads.size())) return;
  // Every live thread is at a barrier: one and the same, or the block has diverged.
  bool same = true;
  for (Thread& t : b.threads) {
    if (t.wait == Wait::kBarrier && (t.line != first->line ||
                                     std::strcmp(t.file, first->file) != 0)) {
      same = false;
    }
  }
  if (!same) {
    std::map<std::string, std::vector<int>> sites;
    for (Thread& t : b.threads) {
      if (t.wait == Wait::kBarrier) sites[site(t.file, t.line)].push_back(t.linear);
    }
    std::string msg = "divergent __syncthreads: the block's threads wait at different barriers:";
    for (auto& [s, ids] : sites) msg += "\n    threads " + thread_list(ids) + " at " + s;
    fault(msg);
  }
  int result = first->bar_op == 0 ? 1 : 0;
  for (Thread& t : b.threads) {
    if (t.wait != Wait::kBarrier) continue;
    if (t.bar_op != first->bar_op) {
      fault("__syncthreads variants differ between threads at " + site(t.file, t.line));
    }
    if (first->bar_op == 0) result &= t.bar_pred != 0;
    if (first->bar_op == 1) result |= t.bar_pred != 0;
    if (first->bar_op == 2) result += t.bar_pred != 0;
  }
  ++view.epoch;
  for (Thread& t : b.threads) {
    if (t.wait != Wait::kBarrier) continue;
    t.wait = Wait::kReady;
    t.bar_result = result;
  }
  b.at_barrier = 0;
}

int barrier(int op, int pred, const char* file, int line) {
  Thread* self = current;
  self->wait = Wait::kBarrier;
  self->file = file;
  self->line = line;
  self->bar_op = op;
  self->bar_pred = pred;
  ++block_->at_barrier;
  try_release_barrier();
  while (self->wait != Wait::kReady) yield_to_scheduler();
  return self->bar_result;
}

}  // namespace

void syncthreads(const char* file, int line) {
  InRuntime guard;
  barrier(-1, 0, file, line);
}

int syncthreads_reduce(int op, int pred, const char* file, int line) {
  InRuntime guard;
  return barrier(op, pred, file, line);
}

// ---------------------------------------------------------------------------- warp collectives
namespace {
void run_collective(Collective& first, Thread* const* lanes, unsigned mask);

// The lanes warp `warp` has (all 32 but in a last, partial warp).
unsigned live_lanes(int warp) {
  const size_t first = static_cast<size_t>(warp) * kWarpSize, n = block_->threads.size();
  return n - first >= kWarpSize ? 0xffffffffu : (1u << (n - first)) - 1u;
}

const char* coll_name(int kind) {
  static const char* names[] = {"__syncwarp", "a warp shuffle", "ldmatrix", "mma"};
  return names[kind];
}

// Completes the collective of `warp` when every lane of its mask waits at the same one; faults
// when a lane of the mask has exited or the mask names lanes the block does not have.
void try_release_warp(int warp) {
  Thread* lanes[kWarpSize] = {};
  Thread* first_lane = nullptr;
  for (int l = 0; l < kWarpSize; ++l) {
    const size_t i = static_cast<size_t>(warp) * kWarpSize + l;
    if (i < block_->threads.size()) {
      lanes[l] = &block_->threads[i];
      if (lanes[l]->wait == Wait::kWarp && first_lane == nullptr) first_lane = lanes[l];
    }
  }
  if (first_lane == nullptr) return;
  Collective* first = first_lane->coll;
  const unsigned mask = first->mask;
  if (mask & ~live_lanes(warp)) {
    fault(std::string(coll_name(first->kind)) + " names lanes the block does not have (mask 0x" +
          [&] { char b[16]; std::snprintf(b, sizeof b, "%08x", mask); return std::string(b); }() +
          ", block of " + std::to_string(block_->threads.size()) + " threads)");
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Thread* t = lanes[l];
    if (t->wait == Wait::kDone) {
      fault("lane " + std::to_string(l) + " of warp " + std::to_string(warp) +
            " exited before joining " + coll_name(first->kind) + " at " +
            site(first_lane->file, first_lane->line));
    }
    if (t->wait != Wait::kWarp) return;  // not there yet
    Collective* c = t->coll;
    if (c->kind != first->kind || c->instr != first->instr || c->line != first->line ||
        c->mask != mask) {
      return;  // elsewhere: a deadlock unless it arrives (reported by the scheduler)
    }
  }
  run_collective(*first, lanes, mask);
  if (first->kind == 0) ++block_->warp_sync[warp];
  for (int l = 0; l < kWarpSize; ++l) {
    if (mask >> l & 1u) {
      lanes[l]->wait = Wait::kReady;
      --block_->arrived[warp];
    }
  }
}

void warp_wait(Collective& c, const char* file, int line) {
  Thread* self = current;
  self->coll = &c;
  self->file = file;
  self->line = line;
  self->wait = Wait::kWarp;
  // Only once as many lanes wait as the mask names can the collective be complete.
  const int arrived = ++block_->arrived[self->warp];
  if (arrived >= __builtin_popcount(c.mask & live_lanes(self->warp))) {
    try_release_warp(self->warp);
  }
  while (self->wait != Wait::kReady) yield_to_scheduler();
  self->coll = nullptr;
}

}  // namespace

void syncwarp(const char* file, int line, unsigned mask) {
  InRuntime guard;
  if (!(mask >> current->lane & 1u)) fault("__syncwarp with a mask that excludes the caller");
  Collective c{0, file, line, mask};
  warp_wait(c, file, line);
}

uint32_t shfl32(const char* file, int line, int kind, unsigned mask, uint32_t value, int arg,
                int width) {
  InRuntime guard;
  if (!(mask >> current->lane & 1u)) fault("a warp shuffle with a mask that excludes the caller");
  if (width < 1 || width > 32 || (width & (width - 1))) {
    fault("warp shuffle width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  }
  Collective c{1, file, line, mask};
  c.shfl_kind = kind;
  c.shfl_arg = arg;
  c.shfl_width = width;
  c.value = value;
  warp_wait(c, file, line);
  return c.result;
}

// ---------------------------------------------------------------------------- shared memory
namespace {

uint32_t next_window() {
  uint32_t end = 0;
  for (const SharedBuffer& s : block_->shared) {
    end = std::max<uint32_t>(end, s.window + static_cast<uint32_t>(s.bytes));
  }
  return (end + 127u) & ~127u;
}

// A buffer of the block: an exact-size allocation (the memcheck build catches a byte past it);
// the race build adds guard bytes on both sides, which its checker reports when touched.
SharedBuffer& add_buffer(const void* tag, size_t bytes, size_t align) {
  const size_t guard = emu_race_access != nullptr ? 256 : 0;
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, 16), bytes + 2 * guard + (bytes == 0)) != 0) {
    throw std::bad_alloc();
  }
  auto* host = static_cast<unsigned char*>(p);
  std::memset(host, 0xff, bytes + 2 * guard);
  block_->allocations.push_back(host);
  const uint32_t window = next_window();
  block_->shared.push_back(SharedBuffer{tag, window, bytes, host + guard});
  return block_->shared.back();
}

}  // namespace

EMU_NO_CHECK void* dynamic_smem() {
  for (SharedBuffer& s : block_->shared) {
    if (s.tag == nullptr) return s.host;
  }
  return nullptr;  // added at the block's start: unreachable
}

EMU_NO_CHECK void* static_smem(const void* tag, size_t bytes, size_t align) {
  InRuntime guard;
  for (SharedBuffer& s : block_->shared) {
    if (s.tag == tag) return s.host;
  }
  block_->static_bytes += bytes;
  if (block_->static_bytes > 48 * 1024) {
    fault("static shared memory above 48 KB (" + std::to_string(block_->static_bytes) +
          " bytes)");
  }
  if (block_->static_bytes + launch_->dynamic_bytes > launch_->smem_limit) {
    fault("static + dynamic shared memory of " +
          std::to_string(block_->static_bytes + launch_->dynamic_bytes) +
          " bytes exceeds the block's limit of " + std::to_string(launch_->smem_limit) +
          " bytes (cudaFuncAttributeMaxDynamicSharedMemorySize / the device)");
  }
  return add_buffer(tag, bytes, align).host;
}

EMU_NO_CHECK size_t cvta_generic_to_shared(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (const SharedBuffer& s : block_->shared) {
    const auto lo = reinterpret_cast<uintptr_t>(s.host);
    if (a >= lo && a <= lo + s.bytes) return s.window + (a - lo);
  }
  std::ostringstream m;
  m << "__cvta_generic_to_shared of " << p << ", which is not in the block's shared memory";
  fault(m.str());
}

unsigned char* shared_host(uint32_t addr, size_t bytes, const char* what) {
  for (const SharedBuffer& s : block_->shared) {
    if (addr >= s.window && addr - s.window + bytes <= s.bytes) return s.host + (addr - s.window);
  }
  std::ostringstream m;
  m << what << ": shared address 0x" << std::hex << addr << std::dec << " (+" << bytes
    << " bytes) is outside the block's shared memory:";
  for (const SharedBuffer& s : block_->shared) {
    m << "\n    " << (s.tag ? "__shared__ variable" : "dynamic shared memory") << " at 0x"
      << std::hex << s.window << std::dec << ", " << s.bytes << " bytes";
  }
  fault(m.str());
}

// ---------------------------------------------------------------------------- PTX
// Exactly the instructions the kernels' inline asm uses (csrc/attention.cuh):
//   cp.async.{ca,cg}.shared.global [dst], [src], size{, src_size};
//   cp.async.commit_group;  cp.async.wait_group N;  cp.async.wait_all;
//   ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared{::cta}.b16 {regs}, [addr];
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 {d}, {a}, {b}, {c};
// Anything else is a fault naming the instruction.
struct Arg {
  int operand;    // %N, or -1 for a literal
  int64_t value;  // the literal
};

struct Instr {
  enum Op { kCpAsync, kCommit, kWaitGroup, kWaitAll, kLdmatrix, kMma } op;
  std::string text;
  int count = 0;       // ldmatrix: matrices; cp.async: bytes
  bool trans = false;  // ldmatrix
  bool bf16 = false;   // mma
  std::vector<Arg> args;
};

namespace {

std::unordered_map<const char*, Instr>& instr_cache() {
  static std::unordered_map<const char*, Instr> m;
  return m;
}

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

const Instr& parse(const char* text) {
  auto& cache = instr_cache();
  auto it = cache.find(text);
  if (it != cache.end()) return it->second;
  std::string s(text);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  const size_t semi = s.find(';');
  if (semi == std::string::npos || s.find_first_not_of(" \t\n", semi + 1) != std::string::npos) {
    fault("inline PTX with other than one instruction is not emulated: \"" + s + "\"");
  }
  s.resize(semi);
  Instr in;
  in.text = s;
  const size_t sp = s.find_first_of(" \t");
  const std::string opcode = s.substr(0, sp);
  std::string rest = sp == std::string::npos ? "" : s.substr(sp + 1);
  for (char& c : rest) {
    if (c == '{' || c == '}' || c == '[' || c == ']') c = ' ';
  }
  std::stringstream ss(rest);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    tok.erase(0, tok.find_first_not_of(" \t\n"));
    tok.erase(tok.find_last_not_of(" \t\n") + 1);
    if (tok.empty()) continue;
    if (tok[0] == '%') {
      in.args.push_back(Arg{std::stoi(tok.substr(1)), 0});
    } else {
      in.args.push_back(Arg{-1, std::stoll(tok, nullptr, 0)});
    }
  }
  auto need = [&](size_t n) {
    if (in.args.size() != n) {
      fault("PTX \"" + s + "\": expected " + std::to_string(n) + " operands, got " +
            std::to_string(in.args.size()));
    }
  };
  if (opcode == "cp.async.cg.shared.global" || opcode == "cp.async.ca.shared.global") {
    in.op = Instr::kCpAsync;
    if (in.args.size() != 3 && in.args.size() != 4) need(4);
    if (in.args[2].operand >= 0) fault("PTX \"" + s + "\": the copy size must be a literal");
    in.count = static_cast<int>(in.args[2].value);
    if (in.count != 4 && in.count != 8 && in.count != 16) {
      fault("PTX \"" + s + "\": cp.async copies 4, 8 or 16 bytes");
    }
    if (opcode == "cp.async.cg.shared.global" && in.count != 16) {
      fault("PTX \"" + s + "\": cp.async.cg copies 16 bytes only");
    }
  } else if (opcode == "cp.async.commit_group") {
    in.op = Instr::kCommit;
    need(0);
  } else if (opcode == "cp.async.wait_group") {
    in.op = Instr::kWaitGroup;
    need(1);
  } else if (opcode == "cp.async.wait_all") {
    in.op = Instr::kWaitAll;
    need(0);
  } else if (starts_with(opcode, "ldmatrix.sync.aligned.m8n8.")) {
    in.op = Instr::kLdmatrix;
    const std::string q = opcode.substr(std::strlen("ldmatrix.sync.aligned.m8n8."));
    if (starts_with(q, "x1")) in.count = 1;
    else if (starts_with(q, "x2")) in.count = 2;
    else if (starts_with(q, "x4")) in.count = 4;
    else fault("PTX \"" + s + "\": ldmatrix .num must be .x1, .x2 or .x4");
    const std::string tail = q.substr(2);
    in.trans = starts_with(tail, ".trans");
    const std::string mem = in.trans ? tail.substr(6) : tail;
    if (mem != ".shared.b16" && mem != ".shared::cta.b16") {
      fault("PTX \"" + s + "\": only ldmatrix from .shared with .b16 elements is emulated");
    }
    need(static_cast<size_t>(in.count) + 1);
  } else if (opcode == "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" ||
             opcode == "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") {
    in.op = Instr::kMma;
    in.bf16 = opcode.find("bf16") != std::string::npos;
    need(14);
  } else {
    fault("PTX instruction not emulated: \"" + s + "\" (tests/cuda_emulator/runtime/" +
          "emu_runtime.cpp lists the ones that are)");
  }
  return cache.emplace(text, std::move(in)).first->second;
}

uint64_t arg_value(const Instr& in, const Arg& a, const Operand* ops, size_t n) {
  if (a.operand < 0) return static_cast<uint64_t>(a.value);
  if (static_cast<size_t>(a.operand) >= n) {
    fault("PTX \"" + in.text + "\": operand %" + std::to_string(a.operand) + " does not exist");
  }
  const Operand& o = ops[a.operand];
  if (o.ref != nullptr) {  // an in/out operand read as an input ("+f")
    uint64_t v = 0;
    std::memcpy(&v, o.ref, static_cast<size_t>(o.bytes));
    return v;
  }
  return o.value;
}

void* arg_ref(const Instr& in, const Arg& a, const Operand* ops, size_t n, int bytes) {
  if (a.operand < 0 || static_cast<size_t>(a.operand) >= n || ops[a.operand].ref == nullptr) {
    fault("PTX \"" + in.text + "\": a destination must be an output operand");
  }
  if (ops[a.operand].bytes != bytes) {
    fault("PTX \"" + in.text + "\": operand %" + std::to_string(a.operand) + " is " +
          std::to_string(ops[a.operand].bytes) + " bytes, the instruction writes " +
          std::to_string(bytes));
  }
  return ops[a.operand].ref;
}

void land(Thread* t, const Copy& c) {
  unsigned char* dst = shared_host(c.dst, 16, "cp.async");
  if (emu_race_access) emu_race_access(dst, 16, true, 3, t->file, t->line);
  std::memcpy(dst, c.data, 16);
}

void land_groups(Thread* t, size_t keep) {
  while (t->committed.size() > keep) {
    for (const Copy& c : t->committed.front()) land(t, c);
    t->committed.pop_front();
  }
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

}  // namespace

void ptx(const char* text, const char* file, int line, std::initializer_list<Operand> list) {
  InRuntime guard;
  Thread* self = current;
  const Instr& in = parse(text);
  const Operand* ops = list.begin();
  const size_t n = list.size();
  switch (in.op) {
    case Instr::kCpAsync: {
      const auto dst = static_cast<uint32_t>(arg_value(in, in.args[0], ops, n));
      const auto src = reinterpret_cast<const unsigned char*>(arg_value(in, in.args[1], ops, n));
      const int64_t src_size =
          in.args.size() == 4 ? static_cast<int64_t>(arg_value(in, in.args[3], ops, n))
                              : in.count;
      if (src_size < 0 || src_size > in.count) {
        fault("cp.async source size " + std::to_string(src_size) + " outside [0, " +
              std::to_string(in.count) + "]");
      }
      if (dst % in.count != 0) {
        fault("cp.async destination 0x" + [&] { std::ostringstream o; o << std::hex << dst;
              return o.str(); }() + " is not aligned to its " + std::to_string(in.count) +
              " bytes");
      }
      if (src_size > 0 && reinterpret_cast<uintptr_t>(src) % in.count != 0) {
        std::ostringstream m;
        m << "cp.async source " << static_cast<const void*>(src) << " is not aligned to its "
          << in.count << " bytes";
        fault(m.str());
      }
      Copy c{dst, in.count, {}};
      if (src_size > 0) {
        if (emu_race_access) emu_race_access(src, static_cast<size_t>(src_size), false, 0, file,
                                             line);
        std::memcpy(c.data, src, static_cast<size_t>(src_size));  // checked by ASan
      }
      unsigned char* d = shared_host(dst, static_cast<size_t>(in.count), "cp.async");
      if (emu_race_access) emu_race_access(d, static_cast<size_t>(in.count), true, 2, file, line);
      std::memset(d, 0xff, static_cast<size_t>(in.count));  // NaN until it lands
      self->open.push_back(c);
      return;
    }
    case Instr::kCommit:
      self->committed.push_back(std::move(self->open));
      self->open.clear();
      return;
    case Instr::kWaitGroup: {
      const int64_t keep = static_cast<int64_t>(arg_value(in, in.args[0], ops, n));
      if (keep < 0) fault("cp.async.wait_group with a negative count");
      self->file = file;
      self->line = line;
      land_groups(self, static_cast<size_t>(keep));
      return;
    }
    case Instr::kWaitAll:
      self->committed.push_back(std::move(self->open));
      self->open.clear();
      land_groups(self, 0);
      return;
    case Instr::kLdmatrix:
    case Instr::kMma: {
      Collective c{in.op == Instr::kLdmatrix ? 2 : 3, text, 0, 0xffffffffu};
      c.ops = ops;
      c.nops = n;
      c.ins = &in;
      warp_wait(c, file, line);
      return;
    }
  }
}

namespace {

// The last lane of a collective to arrive computes every lane's result.
void run_collective(Collective& first, Thread* const* lanes, unsigned mask) {
  switch (first.kind) {
    case 0:
      return;  // __syncwarp: the rendezvous is all (warp_sync counts it for the race checker)
    case 1: {
      const int w = first.shfl_width;
      uint32_t values[kWarpSize] = {};
      for (int l = 0; l < kWarpSize; ++l) {
        if (mask >> l & 1u) values[l] = lanes[l]->coll->value;
      }
      for (int l = 0; l < kWarpSize; ++l) {
        if (!(mask >> l & 1u)) continue;
        Collective* c = lanes[l]->coll;
        const int base = l & ~(w - 1);
        int src = l;
        switch (c->shfl_kind) {
          case 0: src = l ^ c->shfl_arg; break;
          case 1: src = base + (c->shfl_arg & (w - 1)); break;
          case 2: src = (l - base) + c->shfl_arg < w ? l + c->shfl_arg : l; break;
          case 3: src = (l - base) - c->shfl_arg >= 0 ? l - c->shfl_arg : l; break;
        }
        if (c->shfl_kind == 0 && (src & ~(w - 1)) != base) src = l;  // outside the segment
        if (src < 0 || src >= kWarpSize || !(mask >> src & 1u)) {
          fault("a warp shuffle reads lane " + std::to_string(src) +
                ", which is not in its mask (the value is undefined on a GPU)");
        }
        c->result = values[src];
      }
      return;
    }
    case 2: {  // ldmatrix: matrix i's row j comes from lane 8i + j's address (16 bytes)
      const Instr& in = *first.ins;
      uint16_t m[4][8][8];
      for (int i = 0; i < in.count; ++i) {
        for (int j = 0; j < 8; ++j) {
          Thread* t = lanes[8 * i + j];
          const Collective& c = *t->coll;
          const auto addr = static_cast<uint32_t>(
              arg_value(in, in.args[static_cast<size_t>(in.count)], c.ops, c.nops));
          if (addr % 16 != 0) {
            fault("ldmatrix row address 0x" + [&] { std::ostringstream o; o << std::hex << addr;
                  return o.str(); }() + " (lane " + std::to_string(8 * i + j) +
                  ") is not 16-byte aligned");
          }
          unsigned char* row = shared_host(addr, 16, "ldmatrix");
          if (emu_race_access) emu_race_access(row, 16, false, 1, t->file, t->line);
          std::memcpy(m[i][j], row, 16);
        }
      }
      for (int l = 0; l < kWarpSize; ++l) {
        const Collective& c = *lanes[l]->coll;
        const int g = l / 4, t2 = 2 * (l % 4);
        for (int i = 0; i < in.count; ++i) {
          uint16_t lo, hi;
          if (in.trans) {
            lo = m[i][t2][g];
            hi = m[i][t2 + 1][g];
          } else {
            lo = m[i][g][t2];
            hi = m[i][g][t2 + 1];
          }
          const uint32_t v = lo | static_cast<uint32_t>(hi) << 16;
          std::memcpy(arg_ref(in, in.args[static_cast<size_t>(i)], c.ops, c.nops, 4), &v, 4);
        }
      }
      return;
    }
    case 3: {  // mma.m16n8k16: D = A B + C, exact products summed in double, rounded once
      const Instr& in = *first.ins;
      float a[16][16], b[16][8], acc[16][8];
      for (int l = 0; l < kWarpSize; ++l) {
        const Collective& c = *lanes[l]->coll;
        const int g = l / 4, t = l % 4;
        uint32_t ar[4], br[2];
        for (int r = 0; r < 4; ++r) ar[r] = static_cast<uint32_t>(arg_value(in, in.args[4 + r], c.ops, c.nops));
        for (int r = 0; r < 2; ++r) br[r] = static_cast<uint32_t>(arg_value(in, in.args[8 + r], c.ops, c.nops));
        for (int r = 0; r < 4; ++r) {
          const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
          a[row][col] = half_bits_to_float(static_cast<uint16_t>(ar[r]), in.bf16);
          a[row][col + 1] = half_bits_to_float(static_cast<uint16_t>(ar[r] >> 16), in.bf16);
        }
        for (int r = 0; r < 2; ++r) {
          const int k = 2 * t + 8 * r;
          b[k][g] = half_bits_to_float(static_cast<uint16_t>(br[r]), in.bf16);
          b[k + 1][g] = half_bits_to_float(static_cast<uint16_t>(br[r] >> 16), in.bf16);
        }
        for (int r = 0; r < 4; ++r) {
          uint64_t bits = arg_value(in, in.args[10 + r], c.ops, c.nops);
          float f;
          const auto u = static_cast<uint32_t>(bits);
          std::memcpy(&f, &u, 4);
          acc[g + 8 * (r / 2)][2 * t + r % 2] = f;
        }
      }
      float d[16][8];
      for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 8; ++j) {
          double s = acc[i][j];
          for (int k = 0; k < 16; ++k) s += static_cast<double>(a[i][k]) * b[k][j];
          d[i][j] = static_cast<float>(s);
        }
      }
      for (int l = 0; l < kWarpSize; ++l) {
        const Collective& c = *lanes[l]->coll;
        const int g = l / 4, t = l % 4;
        for (int r = 0; r < 4; ++r) {
          std::memcpy(arg_ref(in, in.args[static_cast<size_t>(r)], c.ops, c.nops, 4),
                      &d[g + 8 * (r / 2)][2 * t + r % 2], 4);
        }
      }
      return;
    }
  }
}

// ---------------------------------------------------------------------------- scheduler
[[noreturn]] void fiber_main() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &main_stack_bottom, &main_stack_size);
#endif
  view.in_runtime = false;
  launch_->body(launch_->state);
  view.in_runtime = true;
  Thread* self = current;
  // Copies never waited for still land (a GPU completes them); the data is the same.
  if (!self->open.empty()) self->committed.push_back(std::move(self->open));
  land_groups(self, 0);
  self->wait = Wait::kDone;
  self->file = "(exited)";
  ++block_->done;
  try_release_warp(self->warp);  // faults if a lane of a collective left
  try_release_barrier();
  yield_to_scheduler(true);
  std::abort();
}

std::string deadlock_report() {
  std::map<std::string, std::vector<int>> where_;
  for (Thread& t : block_->threads) {
    std::string w;
    switch (t.wait) {
      case Wait::kBarrier: w = "__syncthreads at " + site(t.file, t.line); break;
      case Wait::kWarp: w = std::string(coll_name(t.coll->kind)) + " at " +
                            site(t.file, t.line); break;
      case Wait::kDone: w = "exited"; break;
      case Wait::kReady: w = "ready"; break;
    }
    where_[w].push_back(t.linear);
  }
  std::string msg = "deadlock: no thread of the block can go on:";
  for (auto& [w, ids] : where_) msg += "\n    threads " + thread_list(ids) + ": " + w;
  return msg;
}

void run_block(uint3 bidx, long long linear) {
  Block b;
  b.idx = bidx;
  block_ = &b;
  block_idx_ = bidx;
  view.block = linear;
  view.block_start = ++view.epoch;
  view.warp_sync = b.warp_sync;
  view.shared = &b.shared;
  const size_t n = static_cast<size_t>(block_dim_.x) * block_dim_.y * block_dim_.z;
  b.threads.resize(n);
  for (size_t i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.idx = make_uint3(static_cast<unsigned>(i % block_dim_.x),
                       static_cast<unsigned>(i / block_dim_.x % block_dim_.y),
                       static_cast<unsigned>(i / (static_cast<size_t>(block_dim_.x) * block_dim_.y)));
    t.linear = static_cast<int>(i);
    t.warp = static_cast<int>(i / kWarpSize);
    t.lane = static_cast<int>(i % kWarpSize);
    t.stack = stacks + i * (kStackBytes + kPage) + kPage;
#if EMU_ASAN
    // Frames of fibers abandoned by a fault (and fiber_main's own) left their redzones behind.
    ASAN_UNPOISON_MEMORY_REGION(t.stack, kStackBytes);
#endif
    t.sp = initial_sp(t.stack);
  }
  add_buffer(nullptr, launch_->dynamic_bytes, 16);
  if (emu_race_block_start) emu_race_block_start();
  auto cleanup = [&] {
    for (unsigned char* p : b.allocations) std::free(p);
    b.allocations.clear();
    b.shared.clear();
    view.shared = nullptr;
    view.warp_sync = nullptr;
    block_ = nullptr;
  };
  for (;;) {
    bool ran = false;
    for (Thread& t : b.threads) {
      if (t.wait != Wait::kReady) continue;
      switch_to(&t);
      ran = true;
      if (b.faulted) {
        const std::string msg = b.fault;
        cleanup();
        throw KernelFault("emulator: " + msg);
      }
    }
    if (b.done == static_cast<int>(n)) break;
    if (!ran) {
      const std::string msg = deadlock_report() + "\n  in kernel " + kernel_name() +
                              ", block " + dim_str(bidx);
      cleanup();
      throw KernelFault("emulator: " + msg);
    }
  }
  cleanup();
}

cudaError_t check_config(const LaunchConfig& c, const void* kernel, std::string& why) {
  const unsigned long long threads =
      static_cast<unsigned long long>(c.block.x) * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || threads == 0) {
    why = "an empty grid or block";
    return cudaErrorInvalidConfiguration;
  }
  if (threads > kMaxThreads || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) {
    why = "more than 1024 threads per block";
    return cudaErrorInvalidConfiguration;
  }
  if (c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535) {
    why = "a grid dimension above its limit";
    return cudaErrorInvalidConfiguration;
  }
  // Attributes stay set (csrc/ sets each once per kernel and device); a device with less shared
  // memory than one was set for caps it.
  auto it = optin.find(kernel);
  const size_t limit = it == optin.end()
                           ? device.smem_default
                           : std::min(static_cast<size_t>(it->second), device.smem_optin);
  if (c.smem > limit) {
    why = std::to_string(c.smem) + " bytes of dynamic shared memory above the kernel's " +
          std::to_string(limit) +
          (it == optin.end() ? " (no cudaFuncSetAttribute opt-in)" : "");
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

bool launch(const void* kernel, const char* text, const char* file, int line,
            const LaunchConfig& config, BlockBody body, void* state) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  std::string why;
  const cudaError_t err = check_config(config, kernel, why);
  if (err != cudaSuccess) {
    if (std::getenv("DTOP_EMU_VERBOSE")) {
      std::fprintf(stderr, "emulator: launch of %s at %s:%d refused: %s\n", text, file, line,
                   why.c_str());
    }
    last_error = err;
    return false;
  }
  Launch l;
  l.text = text;
  l.file = file;
  l.line = line;
  l.config = config;
  l.body = body;
  l.state = state;
  l.dynamic_bytes = config.smem;
  auto it = optin.find(kernel);
  l.smem_limit = std::max(device.smem_default,
                          it == optin.end() ? size_t(0)
                                            : std::min(static_cast<size_t>(it->second),
                                                       device.smem_optin));
  launch_ = &l;
  block_dim_ = config.block;
  grid_dim_ = config.grid;
  ensure_stacks(static_cast<size_t>(config.block.x) * config.block.y * config.block.z);
  view.in_kernel = true;
  if (emu_race_launch) emu_race_launch(true);
  try {
    long long linear = 0;
    for (unsigned z = 0; z < config.grid.z; ++z) {
      for (unsigned y = 0; y < config.grid.y; ++y) {
        for (unsigned x = 0; x < config.grid.x; ++x) {
          run_block(make_uint3(x, y, z), linear++);
        }
      }
    }
  } catch (...) {
    view.in_kernel = false;
    if (emu_race_launch) emu_race_launch(false);
    launch_ = nullptr;
    throw;
  }
  view.in_kernel = false;
  if (emu_race_launch) emu_race_launch(false);
  Dl_info info;
  if (l.kernel != nullptr && dladdr(kernel, &info) && info.dli_fbase != nullptr) {
    auto& e = executed()[reinterpret_cast<uintptr_t>(kernel) -
                         reinterpret_cast<uintptr_t>(info.dli_fbase)];
    e.first = l.kernel;
    ++e.second;
  }
  launch_ = nullptr;
  return true;
}

}  // namespace emu

// ---------------------------------------------------------------------------- CUDA runtime
// The runtime calls of csrc/'s host code, on host memory. Streams are synchronous: a launch or a
// memset is complete when the call returns.
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    default: return "cudaError (emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "emulated CUDA error";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > emu::device.smem_optin) {
    return emu::last_error = cudaErrorInvalidValue;
  }
  emu::optin[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  std::memset(dst, value, count);  // checked by ASan in the memcheck build
  return cudaSuccess;
}

// ---- the emulator's own controls (ctypes, from tests/cuda_emulator)
void emu_configure(int sm, int sm_count, long long smem_default, long long smem_optin) {
  emu::device.sm = sm;
  emu::device.sm_count = sm_count;
  emu::device.smem_default = static_cast<size_t>(smem_default);
  emu::device.smem_optin = static_cast<size_t>(smem_optin);
}

// The instantiations run since the library was loaded, one "offset\tlaunches\tname" line each (offset:
// the kernel's symbol value in its library); the caller frees with emu_free.
char* emu_executed() {
  std::string s;
  for (auto& [offset, e] : emu::executed()) {
    s += std::to_string(offset) + "\t" + std::to_string(e.second) + "\t" + e.first + "\n";
  }
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

void emu_free(char* p) { std::free(p); }

}  // extern "C"
