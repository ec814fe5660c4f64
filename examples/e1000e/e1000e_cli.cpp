// dmakit-e1000e: brings an 82574L up on dmakit, sends frames to itself
// through loopback and checks that each comes back byte for byte.
//
//   dmakit-e1000e [--bdf 0000:00:04.0] [--loopback phy|mac] [--size 60 --size 1514 ...]
//
// Exit status 0 when every frame came back identical, 1 otherwise.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "e1000e.hpp"

namespace {

using dmakit::e1000e::MacAddress;

// An Ethernet frame to our own address: a local experimental EtherType
// (0x88b5) and a payload that differs per frame and per byte, so a frame
// that came back shifted, truncated or from an earlier send does not match.
std::vector<std::byte> make_frame(const MacAddress& mac, size_t size, unsigned seq) {
  std::vector<std::byte> f(size);
  for (size_t i = 0; i < 6; ++i) {
    f[i] = std::byte{mac[i]};
    f[6 + i] = std::byte{mac[i]};
  }
  f[12] = std::byte{0x88};
  f[13] = std::byte{0xb5};
  for (size_t i = 14; i < size; ++i) f[i] = static_cast<std::byte>((i * 7 + seq * 31) & 0xff);
  return f;
}

int fail(const dmakit::Error& e) {
  std::fprintf(stderr, "dmakit-e1000e: %s\n", e.what().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Sends frames through an 82574L's loopback on dmakit and compares them"};
  std::string bdf = "0000:00:04.0";
  std::string loopback = "phy";
  std::vector<size_t> sizes;
  std::string log_level = "warn";
  app.add_option("--bdf", bdf, "PCI address of the NIC (bound to vfio-pci)");
  app.add_option("--loopback", loopback, "where frames turn around: phy (MII control bit 14) or mac (RCTL.LBM)")
      ->check(CLI::IsMember({"phy", "mac"}));
  app.add_option("--size", sizes, "frame sizes in bytes, without FCS (default 60 590 1514)")
      ->check(CLI::Range(dmakit::e1000e::kMinFrame, dmakit::e1000e::kMaxFrame));
  app.add_option("--log-level", log_level, "dmakit's log level")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  CLI11_PARSE(app, argc, argv);
  if (sizes.empty()) sizes = {60, 590, 1514};

  dmakit_settings s;
  dmakit_settings_init(&s);
  s.backend = "vfio";  // a real device needs the real IOMMU
  s.devices = bdf.c_str();
  s.log_level = log_level.c_str();
  auto ctx = dmakit::Context::create(s);
  if (!ctx) return fail(ctx.error());

  dmakit::e1000e::Config cfg;
  cfg.loopback = loopback == "mac" ? dmakit::e1000e::Loopback::mac : dmakit::e1000e::Loopback::phy;
  auto nic = dmakit::e1000e::Nic::open(*ctx, bdf, cfg);
  if (!nic) return fail(nic.error());
  std::printf("e1000e %s: MAC %s, link up, %s loopback\n", nic->bdf().c_str(),
              dmakit::e1000e::to_string(nic->mac()).c_str(), loopback.c_str());

  int bad = 0;
  std::vector<std::byte> got(dmakit::e1000e::kBufferSize);
  for (unsigned seq = 0; seq < sizes.size(); ++seq) {
    const auto frame = make_frame(nic->mac(), sizes[seq], seq);
    auto tx = nic->transmit(frame);
    if (!tx) return fail(tx.error());
    auto rx = nic->receive(got);
    if (!rx) return fail(rx.error());
    const bool same = rx->length == frame.size() && std::memcmp(got.data(), frame.data(), frame.size()) == 0;
    std::printf("frame %u: %zu bytes sent (tx descriptor %u, status %#x), %u received (rx descriptor %u, status "
                "%#x, errors %#x): %s\n",
                seq + 1, frame.size(), tx->index, tx->status, rx->length, rx->index, rx->status, rx->errors,
                same ? "identical" : "DIFFERENT");
    if (!same || rx->errors != 0) ++bad;
  }
  std::printf("e1000e %s: %zu of %zu frames came back identical\n", nic->bdf().c_str(),
              sizes.size() - static_cast<size_t>(bad), sizes.size());
  return bad == 0 ? 0 : 1;
}
