// dmakit-nvme: identify an NVMe controller, or write and read LBAs through
// the dmakit_nvme driver. Exit status: 0 done, 1 the operation failed, 2 bad usage.
//
//   dmakit-nvme identify BDF
//   dmakit-nvme write BDF --lba N --blocks N [--seed S] [--save FILE]
//   dmakit-nvme read BDF --lba N --blocks N [--seed S] [--out FILE]
//
// write fills the blocks with a pattern (see pattern_word) and with --save
// also writes the exact bytes to FILE; read --seed checks the pattern.
#include <CLI/CLI.hpp>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>

#include "nvme.hpp"

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

struct Args {
  std::string bdf;
  uint64_t lba = 0, blocks = 1;
  std::optional<uint32_t> seed;  // read: check the pattern only when given
  std::string file;
  uint16_t queues = 1;
  bool msix = false;
};

// Word k of LBA lba: the top byte 0xd3 never occurs in the pattern a fresh
// test disk holds (its LBA numbers), the rest names seed, LBA and word.
uint64_t pattern_word(uint32_t seed, uint64_t lba, uint64_t k) {
  return (uint64_t{0xd3} << 56) | ((uint64_t{seed} & 0xff) << 48) | ((lba & 0xffffffffffull) << 8) | (k & 0xff);
}

int failed(const char* what, const dmakit::Error& e) {
  std::fprintf(stderr, "dmakit-nvme: %s: %s\n", what, e.what().c_str());
  return kExitFailed;
}

// Calls fn(host pointer, byte offset, length) for each host run of the buffer.
template <class Fn>
void for_each_run(const std::vector<dmakit_segment>& segs, Fn&& fn) {
  uint64_t off = 0;
  for (const auto& s : segs) {
    fn(static_cast<std::byte*>(s.vaddr), off, s.len);
    off += s.len;
  }
}

int run(const std::string& cmd, const Args& a) {
  dmakit_settings settings;
  dmakit_settings_init(&settings);
  settings.backend = "vfio";
  settings.devices = a.bdf.c_str();
  auto ctx = dmakit::Context::create(settings);
  if (!ctx) return failed("context", ctx.error());
  nvme::Options opt;
  opt.io_queues = a.queues;
  opt.completions = a.msix ? nvme::Completions::msix : nvme::Completions::poll;
  auto ctrl = nvme::Controller::open(*ctx, a.bdf, opt);
  if (!ctrl) return failed("open", ctrl.error());
  const auto& ns = ctrl->ns();

  if (cmd == "identify") {
    const auto& i = ctrl->info();
    std::printf("%s: vid %#06x model '%s' serial '%s' firmware '%s' cntlid %u\n", ctrl->bdf().c_str(), i.vid,
                i.model.c_str(), i.serial.c_str(), i.firmware.c_str(), i.cntlid);
    std::printf("max transfer %" PRIu64 " bytes, %u namespaces; namespace %u: %" PRIu64 " blocks of %u bytes\n",
                i.max_transfer, i.namespaces, ns.nsid, ns.blocks, ns.block_size);
    std::printf("%s\n", ctrl->registers().str().c_str());
  } else {
    const uint64_t bytes = a.blocks * ns.block_size;
    auto buf = ctx->alloc_buffer(bytes, {.zeroed = true});
    if (!buf) return failed("data buffer", buf.error());
    auto segs = buf->segments();
    if (!segs) return failed("data buffer", segs.error());
    const uint64_t words_per_block = ns.block_size / 8;
    auto fill = [&](std::byte* host, uint64_t off, uint64_t len) {
      for (uint64_t i = 0; i < len; i += 8) {
        const uint64_t w = (off + i) / 8;
        const uint64_t v = pattern_word(a.seed.value_or(1), a.lba + w / words_per_block, w % words_per_block);
        std::memcpy(host + i, &v, sizeof v);
      }
    };
    if (cmd == "write") for_each_run(*segs, fill);
    // The range goes out in equal parts, one per queue.
    const uint64_t per = (a.blocks + a.queues - 1) / a.queues;
    for (uint64_t done = 0, q = 0; done < a.blocks; done += per, ++q) {
      const uint64_t n = std::min(per, a.blocks - done);
      const nvme::DataRef part{*segs, done * ns.block_size, n * ns.block_size};
      auto st = cmd == "write" ? ctrl->write(q, a.lba + done, n, part) : ctrl->read(q, a.lba + done, n, part);
      if (!st) return failed(cmd.c_str(), st.error());
    }
    if (cmd == "write") {
      if (auto st = ctrl->flush(0); !st) return failed("flush", st.error());
    } else if (a.seed) {
      std::vector<std::byte> want(bytes);
      fill(want.data(), 0, bytes);
      uint64_t bad = bytes;
      for_each_run(*segs, [&](std::byte* host, uint64_t off, uint64_t len) {
        for (uint64_t i = 0; i < len && bad == bytes; ++i)
          if (host[i] != want[off + i]) bad = off + i;
      });
      if (bad != bytes) {
        std::fprintf(stderr, "dmakit-nvme: read: byte %" PRIu64 " (LBA %" PRIu64 ") differs from the seed %u pattern\n",
                     bad, a.lba + bad / ns.block_size, *a.seed);
        return kExitFailed;
      }
    }
    if (!a.file.empty()) {
      std::FILE* f = std::fopen(a.file.c_str(), "wb");
      if (f == nullptr) {
        std::fprintf(stderr, "dmakit-nvme: cannot open %s: %s\n", a.file.c_str(), std::strerror(errno));
        return kExitFailed;
      }
      bool ok = true;
      for_each_run(*segs, [&](std::byte* host, uint64_t, uint64_t len) { ok = ok && std::fwrite(host, 1, len, f) == len; });
      ok = std::fclose(f) == 0 && ok;
      if (!ok) {
        std::fprintf(stderr, "dmakit-nvme: writing %s failed\n", a.file.c_str());
        return kExitFailed;
      }
    }
    std::printf("%s: %s LBAs [%" PRIu64 ", %" PRIu64 ") on %u queue(s): ok\n", ctrl->bdf().c_str(), cmd.c_str(),
                a.lba, a.lba + a.blocks, a.queues);
  }
  if (auto st = ctrl->close(); !st) return failed("shutdown", st.error());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dmakit-nvme - a user-space NVMe driver on dmakit", "dmakit-nvme"};
  app.require_subcommand(1);
  Args a;
  auto common = [&](CLI::App* sub) {
    sub->add_option("bdf", a.bdf, "PCI address of the controller (bound to vfio-pci)")->required();
    sub->add_option("--queues", a.queues, "I/O queue pairs")->check(CLI::Range(1, 64));
    sub->add_flag("--msix", a.msix, "wait for completions on MSI-X interrupts instead of polling");
  };
  auto io = [&](CLI::App* sub, const char* file_help) {
    common(sub);
    sub->add_option("--lba", a.lba, "first LBA")->required();
    sub->add_option("--blocks", a.blocks, "number of LBAs")->required()->check(CLI::Range(uint64_t{1}, uint64_t{1} << 32));
    sub->add_option("--seed", a.seed, "pattern seed (0-255; write: default 1)")->check(CLI::Range(0, 255));
    sub->add_option(sub->get_name() == "write" ? "--save" : "--out", a.file, file_help);
  };
  common(app.add_subcommand("identify", "print Identify Controller and Namespace"));
  io(app.add_subcommand("write", "write the pattern to LBAs, then Flush"), "also write the bytes written to FILE");
  io(app.add_subcommand("read", "read LBAs"), "write the bytes read to FILE");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }
  return run(app.get_subcommands().front()->get_name(), a);
}
