// The CUDA emulator's race checker (the race build): what compute-sanitizer's racecheck and
// initcheck find in shared memory, plus conflicting accesses to global memory within a launch.
//
// The kernels are compiled with ThreadSanitizer's instrumentation (g++ -fsanitize=thread), but
// linked without TSan's runtime: the __tsan_* callbacks below are this checker. Every access a
// kernel thread makes is classified by address: its fiber's stack (ignored), a shared buffer of
// the block (or the guard bytes around it: out of bounds), else global memory. The runtime
// reports the accesses it makes on the kernels' behalf (ldmatrix rows, cp.async) through
// emu_race_access.
//
// Ordering. Within a block, __syncthreads starts a new epoch; __syncwarp orders the accesses of
// the lanes of one warp (counted per warp, so it assumes the full masks the kernels use); the rows
// an ldmatrix reads are read by the whole warp at once, so any later access by a lane of that warp
// is ordered after them. Two accesses to the same byte by different threads, at least one a
// write, not ordered this way, are a race. Threads of different blocks are never ordered within
// a launch. Shared memory read before any write in the block is uninitialized; shared memory that
// a cp.async will fill is not to be touched before its wait_group.
#include <dlfcn.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu_state.h"

namespace {

using emu::view;

constexpr int16_t kNone = -1, kMany = -2;
constexpr size_t kGuard = 256;  // bytes on each side of a shared buffer (emu_runtime.cpp)

struct Access {
  uint32_t epoch = 0;
  int16_t thread = kNone;  // kMany: several threads (reads)
  int16_t warp = kNone;    // kMany: several warps
  uint16_t warp_sync = 0;
  int16_t last = kNone;    // the thread of the latest of them (for messages)
  const void* pc = nullptr;  // where (instrumented code), or
  const char* file = nullptr;  // ... the source position the emulator was given
  int line = 0;
};

struct SharedByte {
  Access write, read;
  bool pending = false;   // a cp.async will write it
  bool read_by_warp = false;  // every read since the last write was an ldmatrix
};

// Global memory: per byte, the last write and the reads since, by (block, thread); in pages of
// 4 KB created on first touch and dropped after each launch.
struct GlobalAccess {
  uint32_t epoch = 0;  // 0: none
  int32_t block = kNone;  // kMany: several blocks
  int16_t thread = kNone;  // kMany: several threads
  uint16_t warp_sync = 0;
};

struct GlobalByte {
  GlobalAccess write, read;
};

constexpr int kPageBits = 12;
struct GlobalPage {
  GlobalByte bytes[size_t(1) << kPageBits];
};

std::vector<std::vector<SharedByte>> shared_shadow;
std::unordered_map<uintptr_t, std::unique_ptr<GlobalPage>> global_pages;
uintptr_t last_page_key = ~uintptr_t(0);
GlobalPage* last_page = nullptr;

GlobalByte& global_byte(uintptr_t a) {
  const uintptr_t key = a >> kPageBits;
  if (key != last_page_key) {
    auto& p = global_pages[key];
    if (!p) p = std::make_unique<GlobalPage>();
    last_page_key = key;
    last_page = p.get();
  }
  return last_page->bytes[a & ((uintptr_t(1) << kPageBits) - 1)];
}

std::string pc_str(const void* pc) {
  if (pc == nullptr) return "(emulator)";
  Dl_info info;
  if (dladdr(pc, &info) && info.dli_fname) {
    std::ostringstream s;
    s << "pc " << info.dli_fname << "+0x" << std::hex
      << (reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1);
    return s.str();
  }
  std::ostringstream s;
  s << "pc " << pc;
  return s.str();
}

std::string one_thread(int t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", lane " +
         std::to_string(t % 32) + ")";
}

std::string who(const Access& a) {
  if (a.thread >= 0) return one_thread(a.thread);
  return std::string("several threads") + (a.warp >= 0 ? " of warp " + std::to_string(a.warp)
                                                        : std::string(" of several warps")) +
         ", the latest " + one_thread(a.last);
}

std::string place(const Access& a) {
  if (a.file != nullptr) return std::string(a.file) + ":" + std::to_string(a.line);
  return pc_str(a.pc);
}

Access now(const void* pc, const char* file = nullptr, int line = 0) {
  Access a;
  a.epoch = view.epoch;
  a.thread = static_cast<int16_t>(view.thread);
  a.warp = static_cast<int16_t>(view.warp);
  a.warp_sync = view.warp_sync[view.warp];
  a.last = a.thread;
  a.pc = pc;
  a.file = file;
  a.line = line;
  return a;
}

// Is `before` (same block, current epoch) ordered before the running thread's access?
bool ordered(const Access& before, const Access& cur) {
  if (before.epoch != cur.epoch) return true;  // a barrier between (or stale)
  if (before.thread == cur.thread) return true;
  return before.warp == cur.warp && before.warp_sync != cur.warp_sync;
}

std::string shared_at(size_t buffer, size_t offset) {
  const emu::SharedBuffer& b = (*view.shared)[buffer];
  std::ostringstream s;
  s << "shared address 0x" << std::hex << b.window + offset << std::dec << " ("
    << (b.tag ? "__shared__ variable" : "dynamic shared memory") << " + " << offset << " of "
    << b.bytes << " bytes)";
  return s.str();
}

[[noreturn]] void race(const std::string& what, const Access& other, const Access& cur,
                       const char*, int) {
  emu::fault(what + "\n    this access: " + who(cur) + " at " + place(cur) +
             "\n    the other:   " + who(other) + " at " + place(other));
}

void shared_access(size_t buffer, size_t offset, size_t n, bool write, int kind, const void* pc,
                   const char* file, int line) {
  auto& shadow = shared_shadow[buffer];
  const Access cur = now(pc, file, line);
  for (size_t i = offset; i < offset + n; ++i) {
    SharedByte& s = shadow[i];
    const bool fresh = s.write.epoch >= view.block_start;  // written in this block
    if (kind == 3) {  // a cp.async landing: the issuing thread writes its own pending bytes
      s.pending = false;
      s.write = cur;
      s.read = Access{};
      continue;
    }
    if (s.pending) {
      emu::fault(std::string(write ? "write to " : "read of ") + shared_at(buffer, i) +
                 " while a cp.async issued by " + who(s.write) + " at " + place(s.write) +
                 " has not landed (no cp.async.wait_group for it yet)\n    this access: " +
                 who(cur) + " at " + place(cur));
    }
    if (!write) {
      if (!fresh) {
        emu::fault("read of uninitialized " + shared_at(buffer, i) +
                   ": nothing in this block wrote it\n    at " + place(cur));
      }
      if (!ordered(s.write, cur)) {
        race("race on " + shared_at(buffer, i) + ": read of a byte another thread wrote "
             "with no __syncthreads / __syncwarp between", s.write, cur, file, line);
      }
      const bool coll = kind == 1;
      if (s.read.epoch != cur.epoch || s.read.thread == kNone) {
        s.read = cur;
        s.read_by_warp = coll;
      } else {
        if (s.read.thread != cur.thread) s.read.thread = kMany;
        if (s.read.warp != cur.warp) s.read.warp = kMany;
        if (cur.warp_sync > s.read.warp_sync || s.read.warp == kMany) {
          s.read.warp_sync = cur.warp_sync;
        }
        s.read_by_warp = s.read_by_warp && coll;
        s.read.last = cur.thread;
        s.read.pc = pc;
        s.read.file = file;
        s.read.line = line;
      }
      continue;
    }
    // a write (kind 0) or a cp.async issue (kind 2)
    if (fresh && !ordered(s.write, cur)) {
      race("race on " + shared_at(buffer, i) + ": two threads write the byte with no "
           "__syncthreads / __syncwarp between", s.write, cur, file, line);
    }
    if (s.read.thread != kNone && s.read.epoch == cur.epoch && s.read.thread != cur.thread) {
      const bool same_warp = s.read.warp == cur.warp;
      const bool ok = same_warp && (s.read_by_warp || s.read.warp_sync != cur.warp_sync);
      if (!ok) {
        race("race on " + shared_at(buffer, i) + ": write of a byte other threads read with no "
             "__syncthreads / __syncwarp between", s.read, cur, file, line);
      }
    }
    s.write = cur;
    s.read = Access{};
    s.read_by_warp = false;
    s.pending = kind == 2;
  }
}

Access as_access(const GlobalAccess& g, const void* pc) {
  Access a;
  a.epoch = g.epoch;
  a.thread = g.thread;
  a.warp = g.thread >= 0 ? static_cast<int16_t>(g.thread / 32) : kMany;
  a.warp_sync = g.warp_sync;
  a.pc = pc;
  return a;
}

// Is the earlier access `g` (of this launch) ordered before the running thread's?
bool global_ordered(const GlobalAccess& g, const Access& cur) {
  if (g.block != view.block) return false;  // blocks of a launch are never ordered
  if (g.epoch != cur.epoch) return true;
  if (g.thread == cur.thread) return true;
  return g.thread >= 0 && g.thread / 32 == cur.warp && g.warp_sync != cur.warp_sync;
}

void global_access(uintptr_t a, size_t n, bool write, const void* pc, const char* file,
                   int line) {
  const Access cur = now(pc, file, line);
  for (size_t i = 0; i < n; ++i) {
    GlobalByte& g = global_byte(a + i);
    if (g.write.epoch != 0 && !global_ordered(g.write, cur)) {
      std::ostringstream m;
      m << "race on global memory at " << reinterpret_cast<const void*>(a + i) << ": "
        << (write ? "write" : "read") << " of a byte that "
        << (g.write.block != view.block ? "block #" + std::to_string(g.write.block) +
                                              " (linear index in the grid)"
                                        : std::string("another thread of the block"))
        << " wrote in this launch, with nothing ordering the two";
      race(m.str(), as_access(g.write, nullptr), cur, file, line);
    }
    if (write && g.read.epoch != 0) {
      // Reads of several threads of this block count as ordered only across a barrier.
      const bool ordered_read =
          g.read.block == view.block &&
          (g.read.epoch != cur.epoch || g.read.thread == cur.thread ||
           (g.read.thread >= 0 && global_ordered(g.read, cur)));
      if (!ordered_read) {
        std::ostringstream m;
        m << "race on global memory at " << reinterpret_cast<const void*>(a + i)
          << ": write of a byte that "
          << (g.read.block != view.block ? "another block" : "another thread of the block")
          << " read in this launch, with nothing ordering the two";
        race(m.str(), as_access(g.read, nullptr), cur, file, line);
      }
    }
    const GlobalAccess now_g{cur.epoch, static_cast<int32_t>(view.block), cur.thread,
                             cur.warp_sync};
    if (write) {
      g.write = now_g;
      g.read = GlobalAccess{};
    } else if (g.read.epoch == 0) {
      g.read = now_g;
    } else {
      if (g.read.block != now_g.block) g.read.block = kMany;
      if (g.read.thread != now_g.thread) g.read.thread = kMany;
      g.read.epoch = std::max(g.read.epoch, now_g.epoch);
      g.read.warp_sync = now_g.warp_sync;
    }
  }
}

void access(const void* addr, size_t n, bool write, int kind, const void* pc, const char* file,
            int line) {
  if (!view.in_kernel || view.thread < 0 || view.shared == nullptr) return;
  if (kind == 0 && pc != nullptr && view.in_runtime) return;  // the emulator's own code
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (a >= view.stacks_lo && a < view.stacks_hi) return;  // a thread's own stack
  const auto& buffers = *view.shared;
  if (shared_shadow.size() < buffers.size()) shared_shadow.resize(buffers.size());
  for (size_t b = 0; b < buffers.size(); ++b) {
    const auto lo = reinterpret_cast<uintptr_t>(buffers[b].host);
    const size_t bytes = buffers[b].bytes;
    if (a + n <= lo - kGuard || a >= lo + bytes + kGuard) continue;
    if (a < lo || a + n > lo + bytes) {
      std::ostringstream m;
      m << (write ? "write" : "read") << " of " << n << " bytes at " << (a < lo ? "-" : "+")
        << (a < lo ? lo - a : a - lo) << " from the start of the block's "
        << (buffers[b].tag ? "__shared__ variable" : "dynamic shared memory") << " of " << bytes
        << " bytes: out of bounds\n    at "
        << (file ? std::string(file) + ":" + std::to_string(line) : pc_str(pc));
      emu::fault(m.str());
    }
    if (shared_shadow[b].size() != bytes) shared_shadow[b].assign(bytes, SharedByte{});
    shared_access(b, a - lo, n, write, kind, pc, file, line);
    return;
  }
  if (kind == 0) global_access(a, n, write, pc, file, line);
}

}  // namespace

extern "C" {

void emu_race_block_start() { shared_shadow.clear(); }

void emu_race_launch(bool begin) {
  global_pages.clear();
  last_page_key = ~uintptr_t(0);
  last_page = nullptr;
}

void emu_race_access(const void* addr, size_t bytes, bool write, int kind, const char* file,
                     int line) {
  access(addr, bytes, write, kind, nullptr, file, line);
}

// ---- ThreadSanitizer's instrumentation callbacks
#define EMU_TSAN_RW(n)                                                                     \
  void __tsan_read##n(void* p) { access(p, n, false, 0, __builtin_return_address(0), nullptr, 0); } \
  void __tsan_write##n(void* p) { access(p, n, true, 0, __builtin_return_address(0), nullptr, 0); } \
  void __tsan_unaligned_read##n(void* p) {                                                 \
    access(p, n, false, 0, __builtin_return_address(0), nullptr, 0);                       \
  }                                                                                        \
  void __tsan_unaligned_write##n(void* p) {                                                \
    access(p, n, true, 0, __builtin_return_address(0), nullptr, 0);                        \
  }                                                                                        \
  void __tsan_volatile_read##n(void* p) {                                                  \
    access(p, n, false, 0, __builtin_return_address(0), nullptr, 0);                       \
  }                                                                                        \
  void __tsan_volatile_write##n(void* p) {                                                 \
    access(p, n, true, 0, __builtin_return_address(0), nullptr, 0);                        \
  }
EMU_TSAN_RW(1)
EMU_TSAN_RW(2)
EMU_TSAN_RW(4)
EMU_TSAN_RW(8)
EMU_TSAN_RW(16)
#undef EMU_TSAN_RW

void __tsan_read_range(void* p, unsigned long n) {
  access(p, n, false, 0, __builtin_return_address(0), nullptr, 0);
}
void __tsan_write_range(void* p, unsigned long n) {
  access(p, n, true, 0, __builtin_return_address(0), nullptr, 0);
}
// Atomics (the guards of function-local statics in the host code): performed, not checked.
#define EMU_TSAN_ATOMIC(bits, type)                                                          \
  type __tsan_atomic##bits##_load(const volatile type* a, int) {                           \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                           \
  }                                                                                        \
  void __tsan_atomic##bits##_store(volatile type* a, type v, int) {                        \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                              \
  }                                                                                        \
  type __tsan_atomic##bits##_exchange(volatile type* a, type v, int) {                     \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                    \
  }                                                                                        \
  type __tsan_atomic##bits##_fetch_add(volatile type* a, type v, int) {                    \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                     \
  }                                                                                        \
  type __tsan_atomic##bits##_fetch_sub(volatile type* a, type v, int) {                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                     \
  }                                                                                        \
  int __tsan_atomic##bits##_compare_exchange_strong(volatile type* a, type* c, type v, int, \
                                                    int) {                                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                        \
  int __tsan_atomic##bits##_compare_exchange_weak(volatile type* a, type* c, type v, int,   \
                                                  int) {                                   \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }
EMU_TSAN_ATOMIC(8, uint8_t)
EMU_TSAN_ATOMIC(16, uint16_t)
EMU_TSAN_ATOMIC(32, uint32_t)
EMU_TSAN_ATOMIC(64, uint64_t)
#undef EMU_TSAN_ATOMIC
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

}  // extern "C"
