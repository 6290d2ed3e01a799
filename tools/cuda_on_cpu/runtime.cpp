// Runtime of the CPU execution of fastkd's CUDA kernels (see include/cuda_on_cpu.h and README.md):
// the configurable device, launches, the fiber scheduler, shared memory, and the checks that turn
// misuse (deadlock, disagreeing or exited lanes of a collective, out-of-range shared memory,
// misaligned vector accesses) into a failed launch with a description.
#include <cxxabi.h>
#include <dlfcn.h>
#include <signal.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread uint3 blockDim;
__thread uint3 gridDim;

namespace cuda_on_cpu {

__thread const ThreadContext* tls_context = nullptr;

namespace {

// ---------------------------------------------------------------------------------------------
// The device and the harness settings, set from Python (cuda_on_cpu_configure) between launches.

struct Setting {
  const char* name;
  long long value;
  const char* doc;
};

// Defaults: an H100 (sm_90): 227 KiB opt-in shared memory per CTA, 228 KiB per SM, 132 SMs.
Setting g_settings[] = {
    {"compute_major", 9, "compute capability, major"},
    {"compute_minor", 0, "compute capability, minor"},
    {"cluster_launch", 1, "cudaDevAttrClusterLaunch"},
    {"smem_optin", 232448, "opt-in shared memory per CTA, bytes"},
    {"smem_per_block", 49152, "shared memory per CTA without opt-in, bytes"},
    {"smem_per_sm", 233472, "shared memory per SM, bytes"},
    {"reserved_smem", 1024, "shared memory the system reserves per CTA, bytes"},
    {"sm_count", 132, "multiprocessors"},
    {"max_threads_per_sm", 2048, "resident threads per SM"},
    {"static_smem", 8192,
     "static shared memory reported per kernel by cudaFuncGetAttributes (a launch fails if a CTA "
     "uses more)"},
    {"workers", 2, "OS threads running clusters of CTAs in parallel"},
    {"stack_kb", 256, "stack per CUDA thread, KiB"},
    {"poison", 0xff, "byte that fresh shared memory and undelivered cp.async targets hold"},
    {"order", 0, "order in which ready threads run: 0 ascending, 1 descending, 2 shuffled"},
    {"seed", 1, "seed of the shuffled order"},
};

long long setting(const char* name) {
  for (const Setting& s : g_settings)
    if (std::strcmp(s.name, name) == 0) return s.value;
  std::abort();
}

struct KernelAttributes {
  int max_dynamic_smem = -1;  // -1: the device's default (smem_per_block - static)
  int non_portable_clusters = 0;
};
std::mutex g_attributes_mutex;
std::map<const void*, KernelAttributes> g_attributes;

KernelAttributes attributes_of(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  return g_attributes[kernel];
}

int max_dynamic_smem(const KernelAttributes& a) {
  return a.max_dynamic_smem >= 0 ? a.max_dynamic_smem
                                 : int(setting("smem_per_block") - setting("static_smem"));
}

thread_local cudaError_t tls_last_error = cudaSuccess;

std::mutex g_failure_mutex;
std::string g_failure;  // the first failure since the last cuda_on_cpu_take_failure
std::atomic<long long> g_launches{0};
std::mutex g_last_launch_mutex;
LaunchSpec g_last_launch{};
std::string g_last_kernel;

void record_failure(const std::string& message) {
  std::lock_guard<std::mutex> lock(g_failure_mutex);
  if (g_failure.empty()) g_failure = message;
}

std::string kernel_name(const void* kernel, const char* signature) {
  Dl_info info;
  if (!dladdr(kernel, &info) || info.dli_sname == nullptr || info.dli_saddr != kernel)
    return signature;  // a kernel of internal linkage: not in the dynamic symbol table
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

std::string format(const char* fmt, va_list args) {
  char buffer[2048];
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  return buffer;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::string s = format(fmt, args);
  va_end(args);
  return s;
}

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

// ---------------------------------------------------------------------------------------------
// Context switch: callee-saved registers, MXCSR and the x87 control word on the stack being left
// (x86-64 System V); ucontext elsewhere.

#if defined(__x86_64__)
extern "C" void cuda_on_cpu_switch(void** save_sp, void* load_sp);
extern "C" void cuda_on_cpu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl cuda_on_cpu_switch
  .hidden cuda_on_cpu_switch
  .type cuda_on_cpu_switch, @function
cuda_on_cpu_switch:
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
  .size cuda_on_cpu_switch, .-cuda_on_cpu_switch

  .p2align 4
  .globl cuda_on_cpu_fiber_start
  .hidden cuda_on_cpu_fiber_start
  .type cuda_on_cpu_fiber_start, @function
cuda_on_cpu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cuda_on_cpu_fiber_start, .-cuda_on_cpu_fiber_start
)");
#endif

// ---------------------------------------------------------------------------------------------
// State of a launch.

enum class State { kReady, kWaiting, kExited };
enum class Wait { kNone, kWarp, kBarrier, kCluster };

struct PendingCopy {
  void* dst;
  const void* src;
  long group;
};

struct Cta;

struct Fiber {
  ThreadContext ctx;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack_lo = nullptr;  // lowest usable byte; the page below is the guard
  size_t stack_bytes = 0;
  Cta* cta = nullptr;
  int linear = 0;
  State state = State::kReady;
  Wait wait = Wait::kNone;
  const char* file = "";
  int line = 0;
  WarpOp op = WarpOp::kSyncwarp;
  BarrierOp barrier = BarrierOp::kSync;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 32;
  uint64_t result = 0;
  long arrivals = 0;     // cluster barrier arrivals
  bool arrived = false;  // arrived, not yet waited
  long committed = 0;    // cp.async groups committed
  std::vector<PendingCopy> copies;
};

struct StaticVar {
  const char* site;
  size_t offset;
  size_t bytes;
};

// Dynamic shared memory of a CTA: its end is the start of a guard page (so is the page below).
struct Region {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* base = nullptr;
  size_t bytes = 0;
  char* low_guard = nullptr;
  char* high_guard = nullptr;
};

struct Cluster;

struct Cta {
  Cluster* cluster = nullptr;
  unsigned rank = 0;
  uint3 block_idx{};
  std::vector<Fiber*> fibers;
  int live = 0;
  char* static_base = nullptr;
  size_t static_used = 0;
  std::vector<StaticVar> vars;
  Region dynamic;
};

struct Launch {
  LaunchSpec spec;
  void (*body)(void*);
  void* ctx;
  std::string name;
  long long clusters;
  std::atomic<long long> next{0};
  std::atomic<bool> failed{false};
};

struct Cluster {
  const Launch* launch = nullptr;
  std::vector<Cta> ctas;
  std::vector<Fiber*> order;  // the order in which ready fibers run
};

struct Worker {
  const Launch* launch = nullptr;
  Cluster cluster;
  std::vector<Fiber> fibers;
  std::vector<char*> static_arenas;
  std::vector<Region> regions;
  std::vector<std::pair<char*, size_t>> stacks;  // mapping (guard page first), size
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_uc;
#endif
  Fiber* running = nullptr;
  sigjmp_buf fault;
  bool failed = false;
  char fault_message[1024];
  std::string error;
};

thread_local Worker* tls_worker = nullptr;

Fiber& current_fiber() {
  Worker* w = tls_worker;
  if (w == nullptr || w->running == nullptr) {
    std::fprintf(stderr, "cuda_on_cpu: a device function was called outside a kernel\n");
    std::abort();
  }
  return *w->running;
}

std::string where(const Fiber& f) {
  const ThreadContext& c = f.ctx;
  return format("block (%u,%u,%u) thread (%u,%u,%u)", c.block_idx.x, c.block_idx.y,
                c.block_idx.z, c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
}

// Back to the scheduler until the scheduler resumes this fiber.
void yield(Fiber& f) {
  Worker& w = *tls_worker;
#if defined(__x86_64__)
  cuda_on_cpu_switch(&f.sp, w.scheduler_sp);
#else
  swapcontext(&f.uc, &w.scheduler_uc);
#endif
}

void resume(Worker& w, Fiber& f) {
  w.running = &f;
  tls_context = &f.ctx;
  threadIdx = f.ctx.thread_idx;
  blockIdx = f.ctx.block_idx;
  blockDim = f.ctx.block_dim;
  gridDim = f.ctx.grid_dim;
#if defined(__x86_64__)
  cuda_on_cpu_switch(&w.scheduler_sp, f.sp);
#else
  swapcontext(&w.scheduler_uc, &f.uc);
#endif
  w.running = nullptr;
  tls_context = nullptr;
}

void fiber_main(Fiber* f) {
  Worker& w = *tls_worker;
  w.launch->body(w.launch->ctx);
  f->state = State::kExited;
  f->copies.clear();
  Cta& cta = *f->cta;
  // A CTA that has exited leaves poison behind for a CTA of its cluster still reading it.
  if (--cta.live == 0) {
    const int poison = int(setting("poison"));
    std::memset(cta.static_base, poison, cta.static_used);
    if (cta.dynamic.bytes) std::memset(cta.dynamic.base, poison, cta.dynamic.bytes);
  }
  yield(*f);
  __builtin_unreachable();
}

#if !defined(__x86_64__)
void fiber_entry(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

void start_fiber(Fiber& f) {
#if defined(__x86_64__)
  // The initial frame cuda_on_cpu_switch pops: MXCSR and x87 control word, r15 .. rbp, and the
  // return address cuda_on_cpu_fiber_start, which calls r13(r12) on a 16-byte aligned stack.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_lo) + f.stack_bytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  sp[1] = 0;                                        // r15
  sp[2] = 0;                                        // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);           // r12
  sp[5] = 0;                                        // rbx
  sp[6] = 0;                                        // rbp
  sp[7] = reinterpret_cast<uint64_t>(&cuda_on_cpu_fiber_start);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = f.stack_bytes;
  f.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry), 2, unsigned(p >> 32),
              unsigned(p & 0xffffffffu));
#endif
}

// Ends the running fiber's launch with `message`.
[[noreturn]] void fail_fiber(Fiber& f, const std::string& message) {
  Worker& w = *tls_worker;
  if (!w.failed) {
    w.failed = true;
    w.error = where(f) + ": " + message;
  }
  f.state = State::kExited;
  yield(f);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------------
// Synchronization points.

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    default: return "__syncwarp";
  }
}

const char* barrier_name(BarrierOp op) {
  switch (op) {
    case BarrierOp::kOr: return "__syncthreads_or";
    case BarrierOp::kAnd: return "__syncthreads_and";
    case BarrierOp::kCount: return "__syncthreads_count";
    default: return "__syncthreads";
  }
}

std::string site(const Fiber& f) { return format("%s:%d", base_name(f.file), f.line); }

std::string waiting_at(const Fiber& f) {
  switch (f.wait) {
    case Wait::kWarp:
      return format("%s (%s, mask 0x%08x)", warp_op_name(f.op), site(f).c_str(), f.mask);
    case Wait::kBarrier: return format("%s (%s)", barrier_name(f.barrier), site(f).c_str());
    case Wait::kCluster: return format("__cluster_barrier_wait (%s)", site(f).c_str());
    default: return "?";
  }
}

// Threads of a CTA grouped by what they wait at, as "threads 0-31 wait at X; ...".
std::string describe_cta(const Cta& cta) {
  std::vector<std::pair<std::string, std::vector<std::pair<int, int>>>> groups;
  for (const Fiber* f : cta.fibers) {
    const std::string what =
        f->state == State::kExited
            ? "have exited"
            : (f->state == State::kReady ? "are ready" : "wait at " + waiting_at(*f));
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.first == what; });
    if (it == groups.end()) it = groups.insert(groups.end(), {what, {}});
    auto& ranges = it->second;
    if (!ranges.empty() && ranges.back().second == f->linear - 1) ranges.back().second = f->linear;
    else ranges.push_back({f->linear, f->linear});
  }
  std::string out;
  for (const auto& g : groups) {
    if (!out.empty()) out += "; ";
    out += "threads ";
    const size_t shown = std::min<size_t>(g.second.size(), 4);
    for (size_t i = 0; i < shown; ++i) {
      const auto& r = g.second[i];
      out += (i ? "," : "") + (r.first == r.second ? format("%d", r.first)
                                                   : format("%d-%d", r.first, r.second));
    }
    if (shown < g.second.size()) out += format(",... (%zu ranges)", g.second.size());
    out += " " + g.first;
  }
  return out;
}

void wait_here(Fiber& f, Wait kind, const char* file, int line) {
  f.state = State::kWaiting;
  f.wait = kind;
  f.file = file;
  f.line = line;
  yield(f);
  f.wait = Wait::kNone;
}

}  // namespace

void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  const std::string message = format(fmt, args);
  va_end(args);
  fail_fiber(current_fiber(), message);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line) {
  Fiber& f = current_fiber();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("%s at %s:%d with width %d (a power of two up to 32 is allowed)", warp_op_name(op),
         base_name(file), line, width);
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  wait_here(f, Wait::kWarp, file, line);
  return f.result;
}

int cta_barrier(BarrierOp op, int predicate, const char* file, int line) {
  Fiber& f = current_fiber();
  f.barrier = op;
  f.arg = predicate;
  wait_here(f, Wait::kBarrier, file, line);
  return int(f.result);
}

void cluster_arrive(const char* file, int line) {
  Fiber& f = current_fiber();
  if (f.arrived)
    fail("__cluster_barrier_arrive at %s:%d twice without __cluster_barrier_wait between",
         base_name(file), line);
  f.arrived = true;
  ++f.arrivals;
}

void cluster_wait(const char* file, int line) {
  Fiber& f = current_fiber();
  if (!f.arrived)
    fail("__cluster_barrier_wait at %s:%d without a __cluster_barrier_arrive before it",
         base_name(file), line);
  wait_here(f, Wait::kCluster, file, line);
  f.arrived = false;
}

void* cluster_map_shared(const void* p, unsigned rank) {
  Fiber& f = current_fiber();
  Cta& me = *f.cta;
  Cluster& cluster = *me.cluster;
  if (rank >= cluster.ctas.size())
    fail("__cluster_map_shared_rank to rank %u of a cluster of %zu CTAs", rank,
         cluster.ctas.size());
  Cta& target = cluster.ctas[rank];
  if (target.live == 0)
    fail("__cluster_map_shared_rank to rank %u, whose threads have all exited", rank);
  const char* c = static_cast<const char*>(p);
  if (c >= me.dynamic.base && c < me.dynamic.base + me.dynamic.bytes)
    return target.dynamic.base + (c - me.dynamic.base);
  for (const StaticVar& v : me.vars) {
    const char* start = me.static_base + v.offset;
    if (c < start || c >= start + v.bytes) continue;
    for (const StaticVar& t : target.vars)
      if (t.site == v.site) return target.static_base + t.offset + (c - start);
    fail("__cluster_map_shared_rank: rank %u has not reached the declaration of %s yet", rank,
         v.site);
  }
  fail("__cluster_map_shared_rank(%p): not an address of this CTA's shared memory", p);
}

void* static_shared(const char* site_name, size_t bytes, size_t align) {
  Fiber& f = current_fiber();
  Cta& cta = *f.cta;
  for (const StaticVar& v : cta.vars)
    if (v.site == site_name) return cta.static_base + v.offset;
  const size_t offset = (cta.static_used + align - 1) & ~(align - 1);
  const long long reported = setting("static_smem");
  if (offset + bytes > size_t(reported))
    fail("static shared memory of %zu bytes (through %s) exceeds the %lld bytes that "
         "cudaFuncGetAttributes reports (raise the harness setting static_smem)",
         offset + bytes, site_name, reported);
  std::memset(cta.static_base + offset, int(setting("poison")), bytes);
  cta.vars.push_back({site_name, offset, bytes});
  cta.static_used = offset + bytes;
  return cta.static_base + offset;
}

void* dynamic_shared() { return current_fiber().cta->dynamic.base; }

void check_aligned(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    fail("%s of %zu bytes at the misaligned address %p", what, align, p);
}

void copy_async_16(void* dst, const void* src) {
  Fiber& f = current_fiber();
  check_aligned(dst, 16, "cp.async destination");
  check_aligned(src, 16, "cp.async source");
  Cta& cta = *f.cta;
  char* d = static_cast<char*>(dst);
  if (d < cta.dynamic.base || d + 16 > cta.dynamic.base + cta.dynamic.bytes) {
    bool in_static = false;
    for (const StaticVar& v : cta.vars) {
      const char* start = cta.static_base + v.offset;
      in_static = in_static || (d >= start && d + 16 <= start + v.bytes);
    }
    if (!in_static) fail("cp.async to %p, outside this CTA's shared memory", dst);
  }
  f.copies.push_back({dst, src, f.committed});
}

void copy_async_commit() { ++current_fiber().committed; }

void copy_async_wait(int pending) {
  Fiber& f = current_fiber();
  const long complete_below = f.committed - pending;
  size_t kept = 0;
  for (const PendingCopy& c : f.copies) {
    if (c.group < complete_below) std::memcpy(c.dst, c.src, 16);
    else f.copies[kept++] = c;
  }
  f.copies.resize(kept);
}

namespace {

// ---------------------------------------------------------------------------------------------
// The scheduler: run every ready fiber until it waits or exits, then complete what can complete.

[[noreturn]] void fail_scheduler(Worker& w, const std::string& message);

// Warp collectives whose lanes have all arrived; fails on misuse.
bool resolve_warps(Worker& w, Cta& cta) {
  bool progress = false;
  const int n = int(cta.fibers.size());
  for (int base = 0; base < n; base += 32) {
    const int lanes = std::min(32, n - base);
    Fiber** lane = cta.fibers.data() + base;
    unsigned checked = 0;  // lanes of collectives found incomplete this round
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = *lane[l];
      if (f.state != State::kWaiting || f.wait != Wait::kWarp || ((checked >> l) & 1u)) continue;
      const unsigned m = f.mask;
      if (!((m >> l) & 1u))
        fail_scheduler(w, where(f) + format(": %s with mask 0x%08x, which leaves out the calling "
                                            "lane %d",
                                            waiting_at(f).c_str(), m, l));
      bool ready = true;
      for (int j = 0; j < 32; ++j) {
        if (!((m >> j) & 1u)) continue;
        if (j >= lanes || lane[j]->state == State::kExited)
          fail_scheduler(w, where(f) + format(": %s names lane %d, which has exited (or does "
                                              "not exist)",
                                              waiting_at(f).c_str(), j));
        if (lane[j]->state != State::kWaiting || lane[j]->wait != Wait::kWarp) ready = false;
      }
      if (!ready) {
        checked |= m;
        continue;
      }
      for (int j = 0; j < 32; ++j) {
        if (!((m >> j) & 1u)) continue;
        const Fiber& g = *lane[j];
        const bool same_site = g.line == f.line && std::strcmp(g.file, f.file) == 0;
        if (g.op != f.op || g.mask != m || (!same_site && f.op != WarpOp::kSyncwarp))
          fail_scheduler(w, format("block (%u,%u,%u) warp %d: lanes of one collective disagree: "
                                   "lane %d is in %s, lane %d in %s",
                                   cta.block_idx.x, cta.block_idx.y, cta.block_idx.z, base / 32, l,
                                   waiting_at(f).c_str(), j, waiting_at(g).c_str()));
      }
      unsigned ballot = 0;
      for (int j = 0; j < 32; ++j)
        if (((m >> j) & 1u) && lane[j]->arg) ballot |= 1u << j;
      for (int j = 0; j < 32; ++j) {
        if (!((m >> j) & 1u)) continue;
        Fiber& g = *lane[j];
        const int width = g.width;
        const int segment = j & ~(width - 1);
        int src = j;
        switch (g.op) {
          case WarpOp::kShfl: src = segment + (g.arg & (width - 1)); break;
          case WarpOp::kShflUp: src = (j - segment) >= g.arg ? j - g.arg : j; break;
          case WarpOp::kShflDown: src = (j - segment) + g.arg < width ? j + g.arg : j; break;
          case WarpOp::kShflXor: {
            const int x = j ^ g.arg;
            src = x >= 0 && x < segment + width ? x : j;
            break;
          }
          default: break;
        }
        switch (g.op) {
          case WarpOp::kBallot: g.result = ballot; break;
          case WarpOp::kAny: g.result = ballot != 0; break;
          case WarpOp::kAll: g.result = ballot == m; break;
          case WarpOp::kSyncwarp: g.result = 0; break;
          default:
            if (src < 0 || src >= 32 || !((m >> src) & 1u))
              fail_scheduler(w, where(g) + format(": %s reads lane %d, which is not in its "
                                                  "mask 0x%08x",
                                                  waiting_at(g).c_str(), src, m));
            g.result = lane[src]->value;
        }
      }
      for (int j = 0; j < 32; ++j)
        if ((m >> j) & 1u) lane[j]->state = State::kReady;
      progress = true;
    }
  }
  return progress;
}

// __syncthreads: completes once every thread of the CTA that has not exited is there.
bool resolve_barrier(Worker& w, Cta& cta) {
  if (cta.live == 0) return false;
  const Fiber* first = nullptr;
  int count = 0, votes = 0;
  for (const Fiber* f : cta.fibers) {
    if (f->state == State::kExited) continue;
    if (f->state != State::kWaiting || f->wait != Wait::kBarrier) return false;
    if (first == nullptr) first = f;
    if (f->barrier != first->barrier || f->line != first->line ||
        std::strcmp(f->file, first->file) != 0)
      fail_scheduler(w, format("block (%u,%u,%u): threads wait at different barriers: %s",
                               cta.block_idx.x, cta.block_idx.y, cta.block_idx.z,
                               describe_cta(cta).c_str()));
    ++count;
    votes += f->arg != 0;
  }
  int result = 0;
  switch (first->barrier) {
    case BarrierOp::kOr: result = votes > 0; break;
    case BarrierOp::kAnd: result = votes == count; break;
    case BarrierOp::kCount: result = votes; break;
    default: break;
  }
  for (Fiber* f : cta.fibers) {
    if (f->state == State::kExited) continue;
    f->result = uint64_t(result);
    f->state = State::kReady;
  }
  return true;
}

// __cluster_barrier_wait: completes once every thread of the cluster that has not exited has
// arrived as often as the waiting thread.
bool resolve_cluster(Cluster& cluster) {
  long least = -1;
  for (const Cta& cta : cluster.ctas)
    for (const Fiber* f : cta.fibers)
      if (f->state != State::kExited && (least < 0 || f->arrivals < least)) least = f->arrivals;
  bool progress = false;
  for (Cta& cta : cluster.ctas)
    for (Fiber* f : cta.fibers)
      if (f->state == State::kWaiting && f->wait == Wait::kCluster && f->arrivals <= least) {
        f->state = State::kReady;
        progress = true;
      }
  return progress;
}

void fail_scheduler(Worker& w, const std::string& message) {
  if (!w.failed) {
    w.failed = true;
    w.error = message;
  }
  siglongjmp(w.fault, 2);
}

// ---------------------------------------------------------------------------------------------
// Memory of a worker, reused from cluster to cluster.

size_t page_bytes() { return size_t(sysconf(_SC_PAGESIZE)); }

void map_region(Region& r, size_t bytes) {
  const size_t page = page_bytes();
  const size_t rounded = (bytes + 15) & ~size_t(15);
  const size_t body = std::max<size_t>(1, (rounded + page - 1) / page) * page;
  if (r.map == nullptr || r.map_bytes != body + 2 * page) {
    if (r.map) munmap(r.map, r.map_bytes);
    r.map_bytes = body + 2 * page;
    void* m = mmap(nullptr, r.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) {
      std::perror("cuda_on_cpu: mmap");
      std::abort();
    }
    r.map = static_cast<char*>(m);
    mprotect(r.map, page, PROT_NONE);
    mprotect(r.map + page + body, page, PROT_NONE);
  }
  r.low_guard = r.map;
  r.high_guard = r.map + page + body;
  r.base = r.high_guard - rounded;
  r.bytes = bytes;
}

void prepare_stacks(Worker& w, size_t count) {
  const size_t page = page_bytes();
  const size_t bytes = size_t(setting("stack_kb")) * 1024;
  if (!w.stacks.empty() && w.stacks[0].second != bytes + page) {
    for (auto& s : w.stacks) munmap(s.first, s.second);
    w.stacks.clear();
  }
  while (w.stacks.size() < count) {
    void* m = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::perror("cuda_on_cpu: mmap");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);
    w.stacks.push_back({static_cast<char*>(m), bytes + page});
  }
}

void release_worker_memory(Worker& w) {
  for (auto& s : w.stacks) munmap(s.first, s.second);
  for (Region& r : w.regions)
    if (r.map) munmap(r.map, r.map_bytes);
  for (char* a : w.static_arenas) std::free(a);
}

// The description of a fault at `address` in the running fiber (signal handler: no allocation).
void describe_fault(Worker& w, int sig, const void* address) {
  const char* a = static_cast<const char*>(address);
  const size_t page = page_bytes();
  const Fiber& f = *w.running;
  const ThreadContext& c = f.ctx;
  char head[160];
  std::snprintf(head, sizeof(head), "block (%u,%u,%u) thread (%u,%u,%u)", c.block_idx.x,
                c.block_idx.y, c.block_idx.z, c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
  if (sig == SIGFPE) {
    std::snprintf(w.fault_message, sizeof(w.fault_message),
                  "%s: arithmetic trap (integer division by zero?)", head);
    return;
  }
  for (const Cta& cta : w.cluster.ctas) {
    const Region& r = cta.dynamic;
    if (a >= r.high_guard && a < r.high_guard + page) {
      std::snprintf(w.fault_message, sizeof(w.fault_message),
                    "%s: shared memory access %zu bytes past the end of the %zu bytes of dynamic "
                    "shared memory of block (%u,%u,%u)",
                    head, size_t(a - (r.base + r.bytes)), r.bytes, cta.block_idx.x,
                    cta.block_idx.y, cta.block_idx.z);
      return;
    }
    if (a >= r.low_guard && a < r.low_guard + page) {
      std::snprintf(w.fault_message, sizeof(w.fault_message),
                    "%s: shared memory access before the start of the dynamic shared memory of "
                    "block (%u,%u,%u)",
                    head, cta.block_idx.x, cta.block_idx.y, cta.block_idx.z);
      return;
    }
  }
  if (a >= f.stack_lo - page && a < f.stack_lo) {
    std::snprintf(w.fault_message, sizeof(w.fault_message),
                  "%s: stack overflow (raise the harness setting stack_kb)", head);
    return;
  }
  std::snprintf(w.fault_message, sizeof(w.fault_message),
                "%s: invalid memory access at %p (out of range, or a misaligned vector access)",
                head, address);
}

struct sigaction g_previous[NSIG];

void on_fault(int sig, siginfo_t* info, void*) {
  Worker* w = tls_worker;
  if (w != nullptr && w->running != nullptr) {
    describe_fault(*w, sig, info->si_addr);
    siglongjmp(w->fault, 1);
  }
  sigaction(sig, &g_previous[sig], nullptr);  // not a kernel's fault: as if never installed
}

void install_fault_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE}) sigaction(sig, &sa, &g_previous[sig]);
  });
}

// ---------------------------------------------------------------------------------------------
// Running a launch.

unsigned cluster_size(const LaunchSpec& s) { return s.cluster.x * s.cluster.y * s.cluster.z; }

// Runs cluster `index` of the launch on this worker; false after a failure (w.error).
bool run_cluster(Worker& w, long long index) {
  const Launch& L = *w.launch;
  const LaunchSpec& s = L.spec;
  const unsigned ctas = cluster_size(s);
  const unsigned threads = s.block.x * s.block.y * s.block.z;
  // Clusters tile the grid: cluster (cx, cy, cz) holds the blocks cx * Cx + [0, Cx), ...
  const unsigned ncx = s.grid.x / s.cluster.x, ncy = s.grid.y / s.cluster.y;
  const unsigned cx = unsigned(index % ncx), cy = unsigned((index / ncx) % ncy),
                 cz = unsigned(index / (long long)(ncx * ncy));

  Cluster& cluster = w.cluster;
  cluster.launch = &L;
  cluster.ctas.resize(ctas);
  w.fibers.resize(size_t(ctas) * threads);
  prepare_stacks(w, size_t(ctas) * threads);
  while (w.static_arenas.size() < ctas)
    w.static_arenas.push_back(static_cast<char*>(std::aligned_alloc(
        128, (size_t(setting("static_smem")) + 127) & ~size_t(127))));
  w.regions.resize(std::max<size_t>(w.regions.size(), ctas));
  const size_t page = page_bytes();
  const int poison = int(setting("poison"));
  cluster.order.clear();
  for (unsigned r = 0; r < ctas; ++r) {
    Cta& cta = cluster.ctas[r];
    cta.cluster = &cluster;
    cta.rank = r;
    const unsigned rx = r % s.cluster.x, ry = (r / s.cluster.x) % s.cluster.y,
                   rz = r / (s.cluster.x * s.cluster.y);
    cta.block_idx = {cx * s.cluster.x + rx, cy * s.cluster.y + ry, cz * s.cluster.z + rz};
    cta.static_base = w.static_arenas[r];
    cta.static_used = 0;
    cta.vars.clear();
    map_region(w.regions[r], s.dynamic_smem);
    cta.dynamic = w.regions[r];
    std::memset(cta.dynamic.base, poison, cta.dynamic.bytes);
    cta.fibers.resize(threads);
    cta.live = int(threads);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = w.fibers[size_t(r) * threads + t];
      f.ctx.thread_idx = {t % s.block.x, (t / s.block.x) % s.block.y, t / (s.block.x * s.block.y)};
      f.ctx.block_idx = cta.block_idx;
      f.ctx.block_dim = {s.block.x, s.block.y, s.block.z};
      f.ctx.grid_dim = {s.grid.x, s.grid.y, s.grid.z};
      f.ctx.cluster_dim = {s.cluster.x, s.cluster.y, s.cluster.z};
      f.ctx.cluster_rank = r;
      const auto& stack = w.stacks[size_t(r) * threads + t];
      f.stack_lo = stack.first + page;
      f.stack_bytes = stack.second - page;
      f.cta = &cta;
      f.linear = int(t);
      f.state = State::kReady;
      f.wait = Wait::kNone;
      f.arrivals = 0;
      f.arrived = false;
      f.committed = 0;
      f.copies.clear();
      start_fiber(f);
      cta.fibers[t] = &f;
      cluster.order.push_back(&f);
    }
  }
  const long long order = setting("order");
  if (order == 1) std::reverse(cluster.order.begin(), cluster.order.end());
  if (order == 2) {
    uint64_t state = uint64_t(setting("seed")) * 0x9e3779b97f4a7c15ull + uint64_t(index) + 1;
    for (size_t i = cluster.order.size(); i > 1; --i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(cluster.order[i - 1], cluster.order[(state >> 33) % i]);
    }
  }

  if (sigsetjmp(w.fault, 1) != 0) {
    w.running = nullptr;
    tls_context = nullptr;
    if (!w.failed) {
      w.failed = true;
      w.error = w.fault_message;
    }
    return false;
  }
  for (;;) {
    for (Fiber* f : cluster.order) {
      if (f->state != State::kReady) continue;
      resume(w, *f);
      if (w.failed) return false;
    }
    bool all_exited = true;
    for (const Cta& cta : cluster.ctas) all_exited = all_exited && cta.live == 0;
    if (all_exited) return true;
    bool progress = false;
    for (Cta& cta : cluster.ctas) progress = resolve_warps(w, cta) || progress;
    for (Cta& cta : cluster.ctas) progress = resolve_barrier(w, cta) || progress;
    progress = resolve_cluster(cluster) || progress;
    if (!progress) {
      std::string message = "deadlock: no thread can proceed.";
      for (const Cta& cta : cluster.ctas)
        if (cta.live)
          message += format(" Block (%u,%u,%u): ", cta.block_idx.x, cta.block_idx.y,
                            cta.block_idx.z) +
                     describe_cta(cta) + ".";
      w.failed = true;
      w.error = message;
      return false;
    }
  }
}

void work(Launch& L) {
  Worker w;
  w.launch = &L;
  tls_worker = &w;
  std::vector<char> alt(1 << 16);
  stack_t ss, old_ss;
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  ss.ss_flags = 0;
  sigaltstack(&ss, &old_ss);
  for (;;) {
    if (L.failed.load()) break;
    const long long index = L.next.fetch_add(1);
    if (index >= L.clusters) break;
    if (!run_cluster(w, index)) {
      L.failed.store(true);
      record_failure("kernel " + L.name + ": " + w.error);
      break;
    }
  }
  sigaltstack(&old_ss, nullptr);
  tls_worker = nullptr;
  release_worker_memory(w);
}

cudaError_t fail_launch(cudaError_t error, const std::string& name, const std::string& why) {
  record_failure("launch of " + name + " refused: " + why);
  tls_last_error = error;
  return error;
}

}  // namespace

cudaError_t launch(const LaunchSpec& spec, void (*body)(void*), void* ctx) {
  ++g_launches;
  const std::string name = kernel_name(spec.kernel, spec.signature);
  {
    std::lock_guard<std::mutex> lock(g_last_launch_mutex);
    g_last_launch = spec;
    g_last_kernel = name;
  }
  const LaunchSpec& s = spec;
  const unsigned long long threads = 1ull * s.block.x * s.block.y * s.block.z;
  if (threads == 0 || threads > 1024 || s.block.z > 64)
    return fail_launch(cudaErrorInvalidConfiguration, name,
                       format("block (%u,%u,%u)", s.block.x, s.block.y, s.block.z));
  if (s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0 || s.grid.y > 65535 || s.grid.z > 65535)
    return fail_launch(cudaErrorInvalidConfiguration, name,
                       format("grid (%u,%u,%u)", s.grid.x, s.grid.y, s.grid.z));
  const KernelAttributes attr = attributes_of(spec.kernel);
  const unsigned ctas = cluster_size(s);
  if (ctas > 1) {
    if (setting("compute_major") < 9 || !setting("cluster_launch"))
      return fail_launch(cudaErrorNotSupported, name, "the device has no thread-block clusters");
    if (s.grid.x % s.cluster.x || s.grid.y % s.cluster.y || s.grid.z % s.cluster.z ||
        ctas > (attr.non_portable_clusters ? 16u : 8u))
      return fail_launch(cudaErrorInvalidClusterSize, name,
                         format("cluster (%u,%u,%u) for grid (%u,%u,%u)", s.cluster.x,
                                s.cluster.y, s.cluster.z, s.grid.x, s.grid.y, s.grid.z));
  }
  if (s.dynamic_smem > size_t(max_dynamic_smem(attr)))
    return fail_launch(cudaErrorInvalidValue, name,
                       format("%zu bytes of dynamic shared memory, above the kernel's limit of "
                              "%d (cudaFuncAttributeMaxDynamicSharedMemorySize)",
                              s.dynamic_smem, max_dynamic_smem(attr)));
  if ((long long)s.dynamic_smem + setting("static_smem") > setting("smem_optin"))
    return fail_launch(cudaErrorInvalidValue, name,
                       format("%zu bytes of dynamic shared memory with %lld static exceed the "
                              "device's %lld per CTA",
                              s.dynamic_smem, setting("static_smem"), setting("smem_optin")));
  install_fault_handlers();
  Launch L;
  L.spec = spec;
  L.body = body;
  L.ctx = ctx;
  L.name = name;
  L.clusters = 1ll * s.grid.x * s.grid.y * s.grid.z / ctas;
  const long long workers =
      std::max(1ll, std::min<long long>(setting("workers"), L.clusters));
  std::vector<std::thread> pool;
  for (long long i = 1; i < workers; ++i) pool.emplace_back([&L] { work(L); });
  work(L);
  for (std::thread& t : pool) t.join();
  if (L.failed.load()) {
    tls_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  const KernelAttributes a = attributes_of(kernel);
  std::memset(attr, 0, sizeof(*attr));
  attr->sharedSizeBytes = size_t(setting("static_smem"));
  attr->maxThreadsPerBlock = 1024;
  attr->numRegs = 64;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->maxDynamicSharedSizeBytes = max_dynamic_smem(a);
  attr->nonPortableClusterSizeAllowed = a.non_portable_clusters;
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  KernelAttributes& a = g_attributes[kernel];
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || value > setting("smem_optin") - setting("static_smem")) {
        tls_last_error = cudaErrorInvalidValue;
        return cudaErrorInvalidValue;
      }
      a.max_dynamic_smem = value;
      return cudaSuccess;
    case cudaFuncAttributeNonPortableClusterSizeAllowed:
      a.non_portable_clusters = value != 0;
      return cudaSuccess;
    default: return cudaSuccess;
  }
}

cudaError_t occupancy_blocks(int* blocks, const void*, int block_size, size_t dynamic_smem) {
  if (block_size <= 0 || block_size > 1024) {
    tls_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  const long long per_block =
      setting("static_smem") + (long long)dynamic_smem + setting("reserved_smem");
  long long n = std::min<long long>(32, setting("max_threads_per_sm") / block_size);
  if ((long long)dynamic_smem + setting("static_smem") > setting("smem_optin")) n = 0;
  else n = std::min(n, setting("smem_per_sm") / per_block);
  *blocks = int(n);
  return cudaSuccess;
}

cudaError_t occupancy_clusters(int* clusters, const void* kernel,
                               const cudaLaunchConfig_t* config) {
  unsigned size = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension)
      size = config->attrs[i].val.clusterDim.x * config->attrs[i].val.clusterDim.y *
             config->attrs[i].val.clusterDim.z;
  int blocks = 0;
  const cudaError_t e = occupancy_blocks(
      &blocks, kernel, int(config->blockDim.x * config->blockDim.y * config->blockDim.z),
      config->dynamicSmemBytes);
  if (e != cudaSuccess) return e;
  const bool allowed = setting("compute_major") >= 9 && setting("cluster_launch") &&
                       size <= (attributes_of(kernel).non_portable_clusters ? 16u : 8u);
  *clusters = allowed ? int(setting("sm_count") * blocks / size) : 0;
  return cudaSuccess;
}

}  // namespace cuda_on_cpu

using cuda_on_cpu::g_settings;

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
    default: return cudaGetErrorName(error);
  }
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_on_cpu::tls_last_error;
  cuda_on_cpu::tls_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_on_cpu::tls_last_error; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using cuda_on_cpu::setting;
  if (device != 0) {
    cuda_on_cpu::tls_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(setting("smem_per_block")); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = int(setting("sm_count")); break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = int(setting("max_threads_per_sm")); break;
    case cudaDevAttrComputeCapabilityMajor: *value = int(setting("compute_major")); break;
    case cudaDevAttrComputeCapabilityMinor: *value = int(setting("compute_minor")); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(setting("smem_per_sm")); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(setting("smem_optin")); break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = int(setting("reserved_smem")); break;
    case cudaDevAttrClusterLaunch: *value = int(setting("cluster_launch")); break;
    default: cuda_on_cpu::tls_last_error = cudaErrorInvalidValue; return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------
// Control from Python (ctypes).

extern "C" {

// Sets a device or harness setting (see g_settings); -1 for an unknown name.
int cuda_on_cpu_configure(const char* name, long long value) {
  for (auto& s : g_settings)
    if (std::strcmp(s.name, name) == 0) {
      s.value = value;
      return 0;
    }
  return -1;
}

// The value of a setting through *value; -1 for an unknown name.
int cuda_on_cpu_setting(const char* name, long long* value) {
  for (const auto& s : g_settings)
    if (std::strcmp(s.name, name) == 0) {
      *value = s.value;
      return 0;
    }
  return -1;
}

// Forgets the attributes set by cudaFuncSetAttribute (a fresh process, as far as kernels go).
void cuda_on_cpu_reset_attributes() {
  std::lock_guard<std::mutex> lock(cuda_on_cpu::g_attributes_mutex);
  cuda_on_cpu::g_attributes.clear();
}

// Copies the first failure since the last call into buf (NUL-terminated) and forgets it;
// returns its length, 0 when there was none.
size_t cuda_on_cpu_take_failure(char* buf, size_t size) {
  std::lock_guard<std::mutex> lock(cuda_on_cpu::g_failure_mutex);
  const size_t n = cuda_on_cpu::g_failure.size();
  if (size) {
    const size_t k = std::min(n, size - 1);
    std::memcpy(buf, cuda_on_cpu::g_failure.data(), k);
    buf[k] = '\0';
  }
  cuda_on_cpu::g_failure.clear();
  return n;
}

long long cuda_on_cpu_launch_count() { return cuda_on_cpu::g_launches.load(); }

// The latest launch: grid x y z, block x y z, cluster x y z, dynamic shared memory bytes in
// out[0..10); its kernel's name in name (NUL-terminated).
void cuda_on_cpu_last_launch(long long* out, char* name, size_t size) {
  std::lock_guard<std::mutex> lock(cuda_on_cpu::g_last_launch_mutex);
  const cuda_on_cpu::LaunchSpec& s = cuda_on_cpu::g_last_launch;
  const long long v[10] = {s.grid.x,    s.grid.y,    s.grid.z,    s.block.x,
                           s.block.y,   s.block.z,   s.cluster.x, s.cluster.y,
                           s.cluster.z, (long long)s.dynamic_smem};
  std::memcpy(out, v, sizeof(v));
  if (size) {
    const size_t k = std::min(cuda_on_cpu::g_last_kernel.size(), size - 1);
    std::memcpy(name, cuda_on_cpu::g_last_kernel.data(), k);
    name[k] = '\0';
  }
}

}  // extern "C"
