// PRPs ("Physical Region Page entry and list") for one command.
#pragma once

#include <vector>

#include "nvme.hpp"

namespace nvme {

struct Prp {
  uint64_t prp1 = 0, prp2 = 0;
};

// Describes data for a command: PRP1 is the IOVA of its first byte (dword
// aligned), every later entry a whole 4 KiB page. Up to two pages need no
// list; more take list pages from pool (chained when one page of 512
// entries is not enough), appended to lists, which the caller returns to
// the pool once the command completed.
Result<Prp> build_prp(const DataRef& data, dmakit::Pool& pool, std::vector<dmakit::Block>& lists);

}  // namespace nvme
