// Reserves 2 MiB hugepages on demand for a test (nr_overcommit_hugepages is
// enough for an --in-memory EAL) and puts the old value back when it ends.
// Needs root; ok() says whether the kernel took the new value.
#pragma once

#include <cstdint>
#include <fstream>

namespace dmakit::test {

class HugepageReservation {
 public:
  static constexpr const char* kOvercommit = "/proc/sys/vm/nr_overcommit_hugepages";

  explicit HugepageReservation(uint64_t pages) : old_(read()) {
    write(old_ + pages);
    ok_ = read() == old_ + pages;
  }
  ~HugepageReservation() { write(old_); }
  HugepageReservation(const HugepageReservation&) = delete;
  HugepageReservation& operator=(const HugepageReservation&) = delete;

  bool ok() const { return ok_; }

 private:
  static uint64_t read() {
    std::ifstream in(kOvercommit);
    uint64_t v = 0;
    in >> v;
    return v;
  }
  static void write(uint64_t v) {
    std::ofstream out(kOvercommit);
    out << v;
  }

  uint64_t old_;
  bool ok_ = false;
};

}  // namespace dmakit::test
