// The CUDA emulator's runtime: fibers and their scheduler, barriers and warp collectives, the emulated
// PTX instructions, shared- and global-memory checking, and the CUDA runtime calls the launchers make.
// Compiled without instrumentation; the kernel files are compiled with -fsanitize=thread, whose
// per-access hooks (__tsan_read4, ...) are defined here and feed the memory checks.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

#include <algorithm>
#include <deque>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "emu_control.h"

// The static __shared__ arrays of all kernels (cuda_emu.h puts them in this section).
extern "C" __attribute__((visibility("hidden"))) unsigned char __start_qaconv_emu_shared[];
extern "C" __attribute__((visibility("hidden"))) unsigned char __stop_qaconv_emu_shared[];

namespace qaconv_emu {

ThreadState* g_current = nullptr;

namespace {

// ---- configuration and errors -------------------------------------------------------------------
DeviceConfig g_device{8, 0, 108, 163 * 1024};
int g_policy = kScheduleForward;
uint64_t g_seed = 0;
std::mt19937_64 g_rng;
std::string g_error;           // the message of the last failed launch or check
cudaError_t g_last = cudaSuccess;
Stats g_stats{};
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncSetAttribute per kernel

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kRedZone = 4096;

std::string format(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

// ---- fibers --------------------------------------------------------------------------------------
enum class FiberState { kReady, kRunning, kBlocked, kDone };

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
};

struct Fiber {
  ucontext_t ctx;
  ThreadState ts;
  FiberState state;
  std::vector<unsigned char> stack;
  std::vector<std::vector<PendingCopy>> groups;  // committed cp.async groups, oldest first
  std::vector<PendingCopy> open_group;            // issued, not yet committed
  void* lane_data;                                // this lane's operands of the collective it waits at
};

// One pending warp collective: the first lane to arrive fixes kind, site and mask.
struct WarpCollective {
  unsigned arrived = 0, mask = 0;
  const char* kind = nullptr;
  const char* file = nullptr;
  int line = 0;
};

struct Cta {
  std::vector<Fiber> fibers;
  std::vector<WarpCollective> warps;
  int nthreads = 0, nwarps = 0;
  int at_barrier = 0;  // threads waiting at __syncthreads
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::deque<int> ready;
  ucontext_t scheduler;
  bool failed = false;
  const std::function<void()>* body = nullptr;
};

Cta g_cta;
bool g_in_kernel = false;
uint32_t g_epoch = 1;  // increases at every CTA start and every completed __syncthreads

Fiber& current_fiber() { return g_cta.fibers[g_current->tid]; }

void block_current() {
  Fiber& f = current_fiber();
  f.state = FiberState::kBlocked;
  swapcontext(&f.ctx, &g_cta.scheduler);
}

void fiber_main() {
  (*g_cta.body)();
  Fiber& f = current_fiber();
  f.state = FiberState::kDone;
  swapcontext(&f.ctx, &g_cta.scheduler);
}

// The order in which threads released together (CTA start, __syncthreads) run next.
void enqueue_all() {
  std::vector<int> warps(g_cta.nwarps);
  for (int w = 0; w < g_cta.nwarps; ++w) warps[w] = w;
  if (g_policy == kScheduleReverse) std::reverse(warps.begin(), warps.end());
  if (g_policy == kScheduleRandom) std::shuffle(warps.begin(), warps.end(), g_rng);
  for (int w : warps)
    for (int l = 0; l < kWarp; ++l) {
      const int t = w * kWarp + (g_policy == kScheduleReverse ? kWarp - 1 - l : l);
      if (t < g_cta.nthreads && g_cta.fibers[t].state != FiberState::kDone) {
        g_cta.fibers[t].state = FiberState::kReady;
        g_cta.ready.push_back(t);
      }
    }
}

}  // namespace

[[noreturn]] void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = format(fmt, ap);
  va_end(ap);
  if (g_error.empty()) g_error = msg;
  g_cta.failed = true;
  if (g_in_kernel && g_current != nullptr) {
    g_in_kernel = false;
    swapcontext(&current_fiber().ctx, &g_cta.scheduler);  // never resumed
  }
  fprintf(stderr, "cuda_emu: %s\n", msg.c_str());
  abort();
}

namespace {

std::string pc_name(const void* pc) { return "pc=" + std::to_string(reinterpret_cast<uintptr_t>(pc)); }

// ---- memory checks -------------------------------------------------------------------------------
struct Shadow {
  uint32_t w_epoch, r_epoch;
  int16_t writer, reader;  // thread ids; reader -2: several threads
  uint8_t pending;         // a cp.async has not yet completed into this byte
  const void* w_pc;
  const void* r_pc;
};

struct Region {
  unsigned char* lo = nullptr;
  size_t size = 0, span = 0;  // span: size plus the red zone behind it
  std::vector<Shadow> shadow;
  const char* name = "";
};
Region g_static_smem, g_dynamic_smem;
std::vector<unsigned char> g_dynamic_storage;

struct Allocation {
  unsigned char* base;  // of the user's bytes
  size_t size;
  bool readonly;
  void* raw;
};
std::vector<Allocation> g_allocs;
uintptr_t g_glob_lo = 0, g_glob_hi = 0;

void shared_access(Region& r, uintptr_t a, size_t n, bool write, const void* pc) {
  const size_t off = a - reinterpret_cast<uintptr_t>(r.lo);
  if (off + n > r.size)
    fail("shared memory out of bounds: thread %d %s %zu bytes at offset %zu of the %s (%zu bytes), %s",
         g_current->tid, write ? "writes" : "reads", n, off, r.name, r.size, pc_name(pc).c_str());
  const int16_t me = static_cast<int16_t>(g_current->tid);
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = r.shadow[off + i];
    if (!write && s.pending)
      fail("shared-memory read before its cp.async completed: thread %d reads offset %zu of the %s, %s "
           "(missing cp.async.wait_group?)",
           me, off + i, r.name, pc_name(pc).c_str());
    if (s.w_epoch == g_epoch && s.writer != me)
      fail("shared-memory race: thread %d %s offset %zu of the %s, written by thread %d since the last "
           "__syncthreads; %s, writer %s",
           me, write ? "writes" : "reads", off + i, r.name, s.writer, pc_name(pc).c_str(), pc_name(s.w_pc).c_str());
    if (write) {
      if (s.r_epoch == g_epoch && s.reader != me)
        fail("shared-memory race: thread %d writes offset %zu of the %s, read by %s %d since the last "
             "__syncthreads; %s, reader %s",
             me, off + i, r.name, s.reader == -2 ? "several threads, e.g." : "thread",
             s.reader == -2 ? -1 : s.reader, pc_name(pc).c_str(), pc_name(s.r_pc).c_str());
      s.w_epoch = g_epoch;
      s.writer = me;
      s.w_pc = pc;
    } else {
      if (s.r_epoch != g_epoch) {
        s.r_epoch = g_epoch;
        s.reader = me;
      } else if (s.reader != me) {
        s.reader = -2;
      }
      s.r_pc = pc;
    }
  }
}

void global_access(uintptr_t a, size_t n, bool write, const void* pc) {
  for (const Allocation& al : g_allocs) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(al.base);
    if (a + n <= lo - kRedZone || a >= lo + al.size + kRedZone) continue;
    if (a < lo || a + n > lo + al.size)
      fail("global memory out of bounds: thread %d of block %u %s %zu bytes at %lld bytes from the start of a "
           "%zu-byte buffer, %s",
           g_current->tid, g_current->block_idx.x, write ? "writes" : "reads", n,
           static_cast<long long>(a - lo), al.size, pc_name(pc).c_str());
    if (write && al.readonly)
      fail("write to a read-only input buffer: thread %d of block %u, offset %lld, %s", g_current->tid,
           g_current->block_idx.x, static_cast<long long>(a - lo), pc_name(pc).c_str());
    return;
  }
}

inline void access(const void* p, size_t n, bool write, const void* pc) {
  if (!g_in_kernel) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - reinterpret_cast<uintptr_t>(g_dynamic_smem.lo) < g_dynamic_smem.span) {
    shared_access(g_dynamic_smem, a, n, write, pc);
  } else if (a - reinterpret_cast<uintptr_t>(g_static_smem.lo) < g_static_smem.span) {
    shared_access(g_static_smem, a, n, write, pc);
  } else if (a - g_glob_lo < g_glob_hi - g_glob_lo) {
    global_access(a, n, write, pc);
  }
}

bool in_shared(const void* p, size_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto inside = [&](const Region& r) {
    return a >= reinterpret_cast<uintptr_t>(r.lo) && a + n <= reinterpret_cast<uintptr_t>(r.lo) + r.size;
  };
  return inside(g_dynamic_smem) || inside(g_static_smem);
}

void set_pending(unsigned char* dst, size_t n, uint8_t v) {
  Region& r = g_dynamic_smem;
  const size_t off = dst - r.lo;
  for (size_t i = 0; i < n; ++i) r.shadow[off + i].pending = v;
}

// ---- warp collectives ----------------------------------------------------------------------------
enum class Op { kShfl, kBallot, kLdmatrix, kMma };

struct ShflLane {
  uint32_t value;
  int src;  // >= 0: source lane; < 0: -1 - xor mask
  int width;
  uint32_t result;
};
struct BallotLane {
  bool pred;
  uint32_t result;
};
struct LdmatrixLane {
  const unsigned char* addr;
  uint32_t* r;
};
struct MmaLane {
  float* d;
  const uint32_t* a;
  uint32_t b0, b1;
};

uint16_t half_of(uint32_t reg, int h) { return static_cast<uint16_t>(reg >> (16 * h)); }  // h = 0: low half

float b16_to_float(uint16_t bits, bool bf16) {
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

void execute(Op op, Fiber* lanes, unsigned mask, bool bf16, const void* pc) {
  switch (op) {
    case Op::kShfl:
      for (int l = 0; l < kWarp; ++l) {
        if (!(mask >> l & 1u)) continue;
        auto* me = static_cast<ShflLane*>(lanes[l].lane_data);
        const int w = me->width, base = l / w * w;
        int src = me->src >= 0 ? base + me->src % w : l ^ (-1 - me->src);
        if (src >= base + w) src = l;  // __shfl_xor_sync beyond the segment: own value
        if (!(mask >> src & 1u))
          fail("shuffle reads lane %d, which is not in the mask 0x%08x (lane %d, %s)", src, mask, l,
               pc_name(pc).c_str());
        me->result = static_cast<ShflLane*>(lanes[src].lane_data)->value;
      }
      break;
    case Op::kBallot: {
      uint32_t bits = 0;
      for (int l = 0; l < kWarp; ++l)
        if ((mask >> l & 1u) && static_cast<BallotLane*>(lanes[l].lane_data)->pred) bits |= 1u << l;
      for (int l = 0; l < kWarp; ++l)
        if (mask >> l & 1u) static_cast<BallotLane*>(lanes[l].lane_data)->result = bits;
      break;
    }
    case Op::kLdmatrix: {
      // ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 address the 8 rows (16 bytes each) of
      // matrix j; lane l receives in register j the 32 bits at byte 4 (l % 4) of row l / 4 of matrix j.
      uint32_t out[kWarp][4];
      for (int l = 0; l < kWarp; ++l) {
        const unsigned char* row = static_cast<LdmatrixLane*>(lanes[l].lane_data)->addr;
        if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
          fail("ldmatrix: lane %d's row address is not 16-byte aligned (offset %lld in shared memory), %s", l,
               static_cast<long long>(row - g_dynamic_smem.lo), pc_name(pc).c_str());
        if (!in_shared(row, 16))
          fail("ldmatrix: lane %d's row address is outside shared memory, %s", l, pc_name(pc).c_str());
        const int saved = g_current->tid;
        g_current->tid = lanes[l].ts.tid;  // the bytes are read on behalf of the lane that addressed them
        access(row, 16, false, pc);
        g_current->tid = saved;
      }
      for (int l = 0; l < kWarp; ++l)
        for (int j = 0; j < 4; ++j) {
          const unsigned char* row = static_cast<LdmatrixLane*>(lanes[8 * j + l / 4].lane_data)->addr;
          memcpy(&out[l][j], row + 4 * (l % 4), 4);
        }
      for (int l = 0; l < kWarp; ++l) memcpy(static_cast<LdmatrixLane*>(lanes[l].lane_data)->r, out[l], 16);
      break;
    }
    case Op::kMma: {
      // mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = lane / 4, t = lane % 4,
      //   A (16 x 16): a[i] holds A[g + 8 (i % 2)][2t + 8 (i / 2) + {0, 1}] (low half first);
      //   B (16 x 8):  b[i] holds B[2t + 8 i + {0, 1}][g];
      //   C, D (16 x 8): d[i] is at row g + 8 (i / 2), column 2t + i % 2.
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < kWarp; ++l) {
        const auto* m = static_cast<MmaLane*>(lanes[l].lane_data);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i)
          for (int h = 0; h < 2; ++h)
            A[g + 8 * (i % 2)][2 * t + 8 * (i / 2) + h] = b16_to_float(half_of(m->a[i], h), bf16);
        const uint32_t b[2] = {m->b0, m->b1};
        for (int i = 0; i < 2; ++i)
          for (int h = 0; h < 2; ++h) B[2 * t + 8 * i + h][g] = b16_to_float(half_of(b[i], h), bf16);
        for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = m->d[i];
      }
      // Products of 16-bit floats are exact in double; the sum is rounded to float32 once (hardware
      // rounding of inexact sums is not modelled: tests use inputs whose sums are exact).
      for (int l = 0; l < kWarp; ++l) {
        auto* m = static_cast<MmaLane*>(lanes[l].lane_data);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
          double s = C[row][col];
          for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
          m->d[i] = static_cast<float>(s);
        }
      }
      break;
    }
  }
}

// Every lane of `mask` must arrive here (same kind, same call); the last one to arrive executes the
// collective for all and the warp goes on first (its lanes are run next, in lane order).
void collective(Op op, const char* kind, const char* file, int line, unsigned mask, void* lane_data, bool bf16,
                const void* pc) {
  const int tid = g_current->tid, warp = tid / kWarp, lane = tid % kWarp;
  if (g_cta.nthreads % kWarp != 0 && mask == 0xffffffffu && (warp + 1) * kWarp > g_cta.nthreads)
    fail("%s with a full mask in a partial warp (block of %d threads) at %s:%d", kind, g_cta.nthreads, file, line);
  if (!(mask >> lane & 1u))
    fail("%s at %s:%d: lane %d calls with mask 0x%08x, which excludes it", kind, file, line, lane, mask);
  WarpCollective& wc = g_cta.warps[warp];
  if (wc.arrived == 0) {
    wc.mask = mask;
    wc.kind = kind;
    wc.file = file;
    wc.line = line;
  } else if (wc.file != file || wc.line != line || wc.kind != kind || wc.mask != mask) {
    fail("divergent warp collective in warp %d of block %u: lanes 0x%08x wait at %s (%s:%d), lane %d arrives at "
         "%s (%s:%d)",
         warp, g_current->block_idx.x, wc.arrived, wc.kind, wc.file, wc.line, lane, kind, file, line);
  }
  Fiber& me = g_cta.fibers[tid];
  me.lane_data = lane_data;
  wc.arrived |= 1u << lane;
  ++g_stats.collectives;
  if (wc.arrived != wc.mask) {
    block_current();
    return;
  }
  execute(op, &g_cta.fibers[warp * kWarp], mask, bf16, pc);
  wc.arrived = 0;
  for (int l = kWarp - 1; l >= 0; --l) {
    const int t = warp * kWarp + l;
    if ((mask >> l & 1u) && t != tid) {
      g_cta.fibers[t].state = FiberState::kReady;
      g_cta.ready.push_front(t);
    }
  }
}

// ---- the CTA scheduler ---------------------------------------------------------------------------
std::string blocked_report() {
  std::string s;
  for (int w = 0; w < g_cta.nwarps; ++w) {
    const WarpCollective& wc = g_cta.warps[w];
    if (wc.arrived != 0)
      s += " warp " + std::to_string(w) + ": lanes " + std::to_string(wc.arrived) + " wait at " + wc.kind + " (" +
           wc.file + ":" + std::to_string(wc.line) + ");";
  }
  int done = 0;
  for (const Fiber& f : g_cta.fibers) done += f.state == FiberState::kDone;
  if (g_cta.at_barrier > 0)
    s += " " + std::to_string(g_cta.at_barrier) + " threads wait at __syncthreads (" + g_cta.barrier_file + ":" +
         std::to_string(g_cta.barrier_line) + ");";
  s += " " + std::to_string(done) + " threads have exited";
  return s;
}

bool run_cta(dim3 block_idx, dim3 grid, dim3 block) {
  Cta& c = g_cta;
  c.nthreads = static_cast<int>(block.x * block.y * block.z);
  c.nwarps = (c.nthreads + kWarp - 1) / kWarp;
  if (c.fibers.size() < static_cast<size_t>(c.nthreads)) c.fibers.resize(c.nthreads);
  c.warps.assign(c.nwarps, WarpCollective{});
  c.at_barrier = 0;
  c.ready.clear();
  ++g_epoch;
  ++g_stats.ctas;
  if (g_static_smem.size > 0) memset(g_static_smem.lo, 0xFF, g_static_smem.size);
  if (g_dynamic_smem.size > 0) memset(g_dynamic_smem.lo, 0xFF, g_dynamic_smem.size);
  for (int t = 0; t < c.nthreads; ++t) {
    Fiber& f = c.fibers[t];
    if (f.stack.empty()) f.stack.resize(kStackBytes);
    f.ts.tid = t;
    f.ts.thread_idx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
    f.ts.block_idx = block_idx;
    f.ts.block_dim = block;
    f.ts.grid_dim = grid;
    f.groups.clear();
    f.open_group.clear();
    f.state = FiberState::kReady;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  enqueue_all();
  g_in_kernel = true;
  while (!c.ready.empty() && !c.failed) {
    const int t = c.ready.front();
    c.ready.pop_front();
    Fiber& f = c.fibers[t];
    if (f.state != FiberState::kReady) continue;
    f.state = FiberState::kRunning;
    g_current = &f.ts;
    ++g_stats.switches;
    g_in_kernel = true;
    swapcontext(&c.scheduler, &f.ctx);
  }
  g_in_kernel = false;
  g_current = nullptr;
  if (c.failed) return false;
  for (const Fiber& f : c.fibers) {
    if (&f - c.fibers.data() >= c.nthreads) break;
    if (f.state != FiberState::kDone) {
      g_error = "deadlock in block " + std::to_string(block_idx.x) + ": no thread can run;" + blocked_report();
      return false;
    }
  }
  // Copies never waited for still land (the kernel has ended).
  for (int t = 0; t < c.nthreads; ++t) {
    Fiber& f = c.fibers[t];
    f.groups.push_back(f.open_group);
    for (auto& grp : f.groups)
      for (const PendingCopy& pc : grp) {
        memcpy(pc.dst, pc.src, 16);
        set_pending(pc.dst, 16, 0);
      }
  }
  return true;
}

}  // namespace

// ---- barriers and collectives (cuda_emu.h) ------------------------------------------------------
void syncthreads(const char* file, int line) {
  Cta& c = g_cta;
  if (c.at_barrier == 0) {
    c.barrier_file = file;
    c.barrier_line = line;
  } else if (c.barrier_file != file || c.barrier_line != line) {
    fail("divergent __syncthreads in block %u: %d threads wait at %s:%d, thread %d arrives at %s:%d",
         g_current->block_idx.x, c.at_barrier, c.barrier_file, c.barrier_line, g_current->tid, file, line);
  }
  ++g_stats.barriers;
  if (++c.at_barrier < c.nthreads) {
    block_current();
    return;
  }
  c.at_barrier = 0;
  ++g_epoch;
  current_fiber().state = FiberState::kBlocked;
  enqueue_all();  // this thread included: it resumes in its turn
  swapcontext(&current_fiber().ctx, &g_cta.scheduler);
}

uint32_t shfl(const char* kind, const char* file, int line, unsigned mask, uint32_t value, int src_lane, int width) {
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0)
    fail("%s at %s:%d: width %d is not a power of two up to 32", kind, file, line, width);
  ShflLane me{value, src_lane, width, 0};
  collective(Op::kShfl, kind, file, line, mask, &me, false, __builtin_return_address(0));
  return me.result;
}

uint32_t ballot(const char* file, int line, unsigned mask, bool predicate) {
  BallotLane me{predicate, 0};
  collective(Op::kBallot, "__ballot_sync", file, line, mask, &me, false, __builtin_return_address(0));
  return me.result;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, const char* file, int line) {
  LdmatrixLane me{static_cast<const unsigned char*>(smem), r};
  collective(Op::kLdmatrix, "ldmatrix.x4", file, line, 0xffffffffu, &me, false, __builtin_return_address(0));
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16, const char* file,
               int line) {
  MmaLane me{d, a, b0, b1};
  collective(Op::kMma, bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", file, line, 0xffffffffu, &me, bf16,
             __builtin_return_address(0));
}

// cp.async.cg.shared.global 16 bytes: the source is checked now; the destination is poisoned (0xFF, and
// marked pending: a read fails) until the cp.async.wait_group that completes its group.
void cp_async_16(void* smem, const void* gmem) {
  const void* pc = __builtin_return_address(0);
  auto* dst = static_cast<unsigned char*>(smem);
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    fail("cp.async 16: unaligned address (shared %p, global %p), thread %d, %s", smem, gmem, g_current->tid,
         pc_name(pc).c_str());
  if (!(dst >= g_dynamic_smem.lo && dst + 16 <= g_dynamic_smem.lo + g_dynamic_smem.size))
    fail("cp.async 16: destination outside the dynamic shared memory, thread %d, %s", g_current->tid,
         pc_name(pc).c_str());
  access(gmem, 16, false, pc);
  access(smem, 16, true, pc);
  memset(dst, 0xFF, 16);
  set_pending(dst, 16, 1);
  current_fiber().open_group.push_back({dst, static_cast<const unsigned char*>(gmem)});
}

void cp_async_commit() {
  Fiber& f = current_fiber();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int pending) {
  const void* pc = __builtin_return_address(0);
  Fiber& f = current_fiber();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const PendingCopy& c : f.groups.front()) {
      set_pending(c.dst, 16, 0);
      access(c.dst, 16, true, pc);  // the data lands now, as this thread's write
      memcpy(c.dst, c.src, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

unsigned char* dynamic_smem() { return g_dynamic_smem.lo; }

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > g_device.smem_optin) {
    g_error = "cudaFuncSetAttribute: " + std::to_string(value) +
              " bytes of dynamic shared memory exceed the device's " + std::to_string(g_device.smem_optin);
    return g_last = cudaErrorInvalidValue;
  }
  g_max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  ++g_stats.launches;
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  auto refuse = [](cudaError_t e, const std::string& msg) {
    g_error = msg;
    return g_last = e;
  };
  if (threads <= 0 || threads > 1024 || block.z > 64)
    return refuse(cudaErrorInvalidConfiguration, "launch: block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    return refuse(cudaErrorInvalidConfiguration, "launch: grid " + std::to_string(grid.x) + " x " +
                                                     std::to_string(grid.y) + " x " + std::to_string(grid.z));
  constexpr size_t kDefaultDynamic = 48 * 1024;
  auto it = g_max_dynamic_smem.find(kernel);
  const size_t allowed = it != g_max_dynamic_smem.end() ? static_cast<size_t>(it->second) : kDefaultDynamic;
  if (smem > allowed)
    return refuse(cudaErrorInvalidValue, "launch: " + std::to_string(smem) +
                                             " bytes of dynamic shared memory, above the kernel's limit of " +
                                             std::to_string(allowed) + " (cudaFuncSetAttribute)");
  // Shared memory of this launch.
  g_dynamic_storage.assign(smem + kRedZone + 16, 0);
  auto* lo = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(g_dynamic_storage.data()) + 15) / 16 * 16);
  g_dynamic_smem.lo = smem > 0 ? lo : nullptr;
  g_dynamic_smem.size = smem;
  g_dynamic_smem.span = smem > 0 ? smem + kRedZone : 0;
  g_dynamic_smem.name = "dynamic shared memory";
  g_dynamic_smem.shadow.assign(g_dynamic_smem.span, Shadow{});
  g_static_smem.lo = __start_qaconv_emu_shared;
  g_static_smem.size = static_cast<size_t>(__stop_qaconv_emu_shared - __start_qaconv_emu_shared);
  g_static_smem.span = g_static_smem.size;
  g_static_smem.name = "static shared memory";
  if (g_static_smem.shadow.size() != g_static_smem.size) g_static_smem.shadow.assign(g_static_smem.size, Shadow{});
  g_rng.seed(g_seed);

  g_cta.body = &body;
  g_cta.failed = false;
  g_error.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        if (!run_cta(dim3(x, y, z), grid, block)) {
          g_cta.body = nullptr;
          return g_last = cudaErrorLaunchFailure;
        }
  g_cta.body = nullptr;
  return cudaSuccess;
}

// ---- 16-bit floats -------------------------------------------------------------------------------
float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    return bit_cast<float>(sign | 0x7f800000u | (man << 13));
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), exp - 25);
  }
  return sign ? -v : v;
}

uint16_t float_to_half_bits(float f) {
  const uint16_t sign = static_cast<uint16_t>((bit_cast<uint32_t>(f) >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (a != a) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 65520.f) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  // nearbyint rounds to nearest even (the default mode); the scalings by powers of two are exact.
  if (a < 0x1p-14f) return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24f)));
  int e;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e): the half's exponent is e - 1, its last bit 2^(e - 11)
  uint32_t m = static_cast<uint32_t>(std::nearbyint(std::ldexp(a, 11 - e)));  // in [1024, 2048]
  int exp = e - 1 + 15;
  if (m == 2048u) {
    m = 1024u;
    ++exp;
  }
  return static_cast<uint16_t>(sign | (exp << 10) | (m - 1024u));
}

float bf16_bits_to_float(uint16_t h) { return bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  if (f != f) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- control (emu_control.h) ---------------------------------------------------------------------
void configure(const DeviceConfig& device, int policy, uint64_t seed) {
  g_device = device;
  g_policy = policy;
  g_seed = seed;
  g_max_dynamic_smem.clear();
}
const char* last_error() { return g_error.c_str(); }
Stats stats() { return g_stats; }

void* device_alloc(size_t bytes, bool readonly) {
  const size_t total = bytes + 2 * kRedZone + 64;
  void* raw = malloc(total);
  if (raw == nullptr) return nullptr;
  memset(raw, 0xA5, total);
  auto* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + kRedZone + 63) / 64 * 64);
  g_allocs.push_back({base, bytes, readonly, raw});
  g_glob_lo = g_glob_hi = 0;
  for (const Allocation& a : g_allocs) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(a.base);
    const uintptr_t lo = base - kRedZone, hi = base + a.size + kRedZone;
    if (g_glob_lo == 0 || lo < g_glob_lo) g_glob_lo = lo;
    if (hi > g_glob_hi) g_glob_hi = hi;
  }
  return base;
}

void device_free(void* p) {
  for (size_t i = 0; i < g_allocs.size(); ++i)
    if (g_allocs[i].base == p) {
      free(g_allocs[i].raw);
      g_allocs.erase(g_allocs.begin() + i);
      return;
    }
}

}  // namespace qaconv_emu

// ---- the CUDA runtime calls of the launchers -----------------------------------------------------
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  using qaconv_emu::g_device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_device.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = g_device.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = g_device.minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = g_device.smem_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = qaconv_emu::g_last;
  qaconv_emu::g_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

// ---- ThreadSanitizer's per-access hooks: the instrumented kernel files report every load and store.
#define QACONV_EMU_HOOK(size)                                                                             \
  extern "C" void __tsan_read##size(void* p) { qaconv_emu::access(p, size, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_write##size(void* p) { qaconv_emu::access(p, size, true, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_read##size(void* p) {                                                    \
    qaconv_emu::access(p, size, false, __builtin_return_address(0));                                      \
  }                                                                                                       \
  extern "C" void __tsan_unaligned_write##size(void* p) {                                                   \
    qaconv_emu::access(p, size, true, __builtin_return_address(0));                                       \
  }
QACONV_EMU_HOOK(1)
QACONV_EMU_HOOK(2)
QACONV_EMU_HOOK(4)
QACONV_EMU_HOOK(8)
QACONV_EMU_HOOK(16)
#undef QACONV_EMU_HOOK
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  qaconv_emu::access(p, n, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  qaconv_emu::access(p, n, true, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
