// Driver of tests/lars/test_cuda_emu.py: runs the CUDA entry points of csrc/cuda/kernels.cu,
// compiled for the CPU by cuda-emu (../shared/tools/cuda-emu), on a memory image written by the
// test, and reports what the emulator recorded.
//
//   driver IMAGE OPS SCHED SEED DEVICE STREAM
//
// IMAGE: raw bytes, mapped MAP_SHARED and updated in place ("device" memory is host memory). Every
// address in it (the w/g/u columns of the tensor tables, the pointer fields of OPS) is an offset
// from the start of the image; 0 means absent.
// OPS: int64 records of kOpFields fields (see Op), executed in order. Ops of one case (same case
// id, consecutive) are enqueued back to back on the stream, as one optimizer step would be; the
// device is synchronized at the end of each case, and then the emulator's records are read.
// SCHED: emu::g_sched (0 round-robin, 1 random, 2 warp priority); SEED: emu::g_seed.
// DEVICE: the device of the calls, made current first (as torch's device guard does in ops.py;
// the emulator has emu::g_device_count = 2 devices). STREAM: 0 = the default stream, 1 = a stream
// created on DEVICE. The LarsGroup arrays are copied per call and their *_at fields (image
// offsets of device-held values) turned into addresses too.
//
// Output (stdout, one line each, tab-separated), parsed by the test:
//   LAUNCH <case> <op> <kernel> <device> <grid.x> <block.x> <param bytes> <on expected stream 0/1>
//   RECORD <case> <kind name> <kernel> <block> <thread> <line a> <line b>
//   NRECORDS <case> <count>
//   DEVICE <case> <op> <current device after the call>
//   ERROR <case> <op> <message>
//   GUARD <threw 0/1> <launches>: a call for DEVICE while the other device is current (once, first)
//   DONE <blocks emulated> <fiber switches>
#include "emu_cuda.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <vector>

#include "cuda/lars_cuda.h"

namespace {

constexpr int kOpFields = 20;
enum Field {
  kKind,       // 1 norms, 2 update
  kCase,       // case id (for the report)
  kTable,      // offset of the tensor table
  kN,          // tensor rows
  kNch,        // chunk rows
  kMode,       // norms: NormMode bits
  kWPart,      // norms: per-chunk w^2 partials
  kGPart,      // norms: per-chunk g^2, w g partials
  kWSq,        // sums (norms: outputs; update: inputs)
  kGSq,
  kWg,
  kFlag,       // int32 non-finite flag
  kGroups,     // update: LarsGroup array
  kNGroups,
  kRatios,     // update: trust ratios (output)
  kCheckSums,  // update
  kSkip,       // update: skip_nonfinite
  kCarry,      // update: w_part to receive the new weights' per-chunk sums (0: none)
  kFtz,        // emu::g_ftz for the case's kernels (1: flush fp32 denormals like --use_fast_math)
  kReserved
};
static_assert(kReserved + 1 == kOpFields, "op layout");

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: driver IMAGE OPS SCHED SEED DEVICE STREAM\n");
    return 2;
  }
  const int fd = open(argv[1], O_RDWR);
  if (fd < 0) die("open image");
  struct stat st {};
  if (fstat(fd, &st) != 0) die("stat image");
  char* base = static_cast<char*>(
      mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  if (base == MAP_FAILED) die("mmap image");

  std::vector<int64_t> ops;
  {
    FILE* f = std::fopen(argv[2], "rb");
    if (!f) die("open ops");
    int64_t v;
    while (std::fread(&v, sizeof v, 1, f) == 1) ops.push_back(v);
    std::fclose(f);
  }
  if (ops.size() % kOpFields != 0) {
    std::fprintf(stderr, "ops file: %zu values, not a multiple of %d\n", ops.size(), kOpFields);
    return 2;
  }
  emu::g_sched = std::atoi(argv[3]);
  emu::g_seed = std::strtoull(argv[4], nullptr, 10);
  emu::g_device_count = 2;
  const int device = std::atoi(argv[5]);
  const bool own_stream = std::atoi(argv[6]) != 0;

  cudaStream_t stream = nullptr;
  if (own_stream) {
    cudaSetDevice(device);
    if (cudaStreamCreate(&stream) != cudaSuccess) {
      std::fprintf(stderr, "cudaStreamCreate failed\n");
      return 2;
    }
  }
  // A call for `device` while the other device is current must refuse (lars_cuda.h) and launch
  // nothing.
  {
    static float w[1] = {1.0f}, w_part[1], g_part[2], w_sq[1];
    static int32_t flag[1];
    const int64_t guard_table[11] = {reinterpret_cast<int64_t>(w), 0, 0, 1, 0, 0, 0, 0, 0, 0, 1};
    cudaSetDevice(1 - device);
    emu::reset_stats();
    int threw = 0;
    try {
      hvdlb::lars_norms_cuda(device, 0, guard_table, 1, 1, 1, w_part, g_part, w_sq, nullptr,
                             nullptr, flag);
    } catch (const std::exception&) {
      threw = 1;
    }
    cudaDeviceSynchronize();
    std::printf("GUARD\t%d\t%zu\n", threw, emu::g_launches.size());
  }
  cudaSetDevice(device);  // the caller makes the tensors' device current

  auto addr = [base](int64_t off) -> char* { return off ? base + off : nullptr; };
  const size_t nops = ops.size() / kOpFields;
  size_t i = 0;
  while (i < nops) {
    const int64_t case_id = ops[i * kOpFields + kCase];
    emu::reset_stats();
    emu::g_ftz = ops[i * kOpFields + kFtz] != 0;  // read by the kernel threads: fixed per case
    size_t logged = 0;
    std::deque<std::vector<int64_t>> tables;  // must outlive the case's kernels
    for (; i < nops && ops[i * kOpFields + kCase] == case_id; ++i) {
      const int64_t* op = &ops[i * kOpFields];
      // the table holds image offsets: give the kernels a copy with addresses
      const int64_t n = op[kN], nch = op[kNch];
      const int64_t* image_table = reinterpret_cast<const int64_t*>(addr(op[kTable]));
      std::vector<int64_t>& table = tables.emplace_back(image_table, image_table + 8 * n + 3 * nch);
      for (int64_t t = 0; t < n; ++t)
        for (int col = 0; col < 3; ++col)  // w, g, u
          if (table[8 * t + col]) table[8 * t + col] += reinterpret_cast<int64_t>(base);
      if ((op[kFtz] != 0) != emu::g_ftz)
        std::printf("ERROR\t%lld\t%zu\tthe ops of one case must agree on ftz\n",
                    static_cast<long long>(case_id), i);
      // groups: 64-byte LarsGroup records whose last five 8-byte fields are addresses (0 = absent)
      std::vector<int64_t>& groups = tables.emplace_back(
          reinterpret_cast<const int64_t*>(addr(op[kGroups])),
          reinterpret_cast<const int64_t*>(addr(op[kGroups])) + (op[kGroups] ? 8 * op[kNGroups] : 0));
      for (int64_t gi = 0; gi < (op[kGroups] ? op[kNGroups] : 0); ++gi)
        for (int col = 3; col < 8; ++col)
          if (groups[8 * gi + col]) groups[8 * gi + col] += reinterpret_cast<int64_t>(base);
      try {
        if (op[kKind] == 1) {
          hvdlb::lars_norms_cuda(device, reinterpret_cast<int64_t>(stream), table.data(), n, nch,
                                 static_cast<int32_t>(op[kMode]),
                                 reinterpret_cast<float*>(addr(op[kWPart])),
                                 reinterpret_cast<float*>(addr(op[kGPart])),
                                 reinterpret_cast<float*>(addr(op[kWSq])),
                                 reinterpret_cast<float*>(addr(op[kGSq])),
                                 reinterpret_cast<float*>(addr(op[kWg])),
                                 reinterpret_cast<int32_t*>(addr(op[kFlag])));
        } else if (op[kKind] == 2) {
          hvdlb::lars_update_cuda(device, reinterpret_cast<int64_t>(stream), table.data(), n, nch,
                                  op[kGroups] ? groups.data() : nullptr, op[kNGroups],
                                  reinterpret_cast<const float*>(addr(op[kWSq])),
                                  reinterpret_cast<const float*>(addr(op[kGSq])),
                                  reinterpret_cast<const float*>(addr(op[kWg])),
                                  reinterpret_cast<float*>(addr(op[kRatios])),
                                  reinterpret_cast<int32_t*>(addr(op[kFlag])), op[kCheckSums] != 0,
                                  op[kSkip] != 0, reinterpret_cast<float*>(addr(op[kCarry])));
        } else {
          std::printf("ERROR\t%lld\t%zu\tunknown op kind %lld\n", static_cast<long long>(case_id),
                      i, static_cast<long long>(op[kKind]));
        }
      } catch (const std::exception& e) {
        std::printf("ERROR\t%lld\t%zu\t%s\n", static_cast<long long>(case_id), i, e.what());
      }
      int current = -1;
      cudaGetDevice(&current);
      std::printf("DEVICE\t%lld\t%zu\t%d\n", static_cast<long long>(case_id), i, current);
      {
        std::lock_guard<std::mutex> lock(emu::g_log_mutex);
        for (; logged < emu::g_launches.size(); ++logged) {
          const emu::LaunchLog& l = emu::g_launches[logged];
          std::printf("LAUNCH\t%lld\t%zu\t%s\t%d\t%u\t%u\t%zu\t%d\n",
                      static_cast<long long>(case_id), i, l.kernel, l.device, l.grid.x,
                      l.block.x, l.param_bytes, l.stream == stream ? 1 : 0);
        }
      }
    }
    cudaDeviceSynchronize();
    const int nrec = emu::g_nrecords.load();
    std::printf("NRECORDS\t%lld\t%d\n", static_cast<long long>(case_id), nrec);
    for (int r = 0; r < std::min(nrec, emu::kMaxRecords); ++r) {
      const emu::Record& rec = emu::g_records[r];
      std::printf("RECORD\t%lld\t%s\t%s\t%u\t%u\t%d\t%d\n", static_cast<long long>(case_id),
                  emu::kind_name(rec.kind), rec.kernel ? rec.kernel : "?", rec.block, rec.thread,
                  rec.line_a, rec.line_b);
    }
    std::fflush(stdout);
  }
  if (stream) cudaStreamDestroy(stream);
  std::printf("DONE\t%llu\t%llu\n", static_cast<unsigned long long>(emu::g_blocks.load()),
              static_cast<unsigned long long>(emu::g_switches.load()));
  std::fflush(stdout);
  if (msync(base, static_cast<size_t>(st.st_size), MS_SYNC) != 0) die("msync");
  munmap(base, static_cast<size_t>(st.st_size));
  close(fd);
  return 0;
}
