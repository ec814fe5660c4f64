// Numbering for the objects that keep per-thread caches (DMA pools, slab
// tiers). A thread keeps an array of cache pointers indexed by its owner's
// slot, so a fast path finds its cache in two loads without a TLS call.
// Slots run 1..count-1 (0: no cache; an owner created when all are taken
// works without) and are reused; uids are never reused, so a cache left
// behind by a destroyed owner is told from its successor's. Whoever uses a
// registry also orders thread exit against owner teardown with its mutex.
#pragma once

#include <cstdint>
#include <mutex>
#include <new>
#include <vector>

namespace dmakit::base {

class CacheSlots {
 public:
  struct Ticket {
    uint32_t slot = 0;  // 0: no cache
    uint64_t uid = 0;
  };

  explicit CacheSlots(uint32_t count) : count_(count) {
    try {
      free_.reserve(count);  // so give_back_locked never allocates
    } catch (const std::bad_alloc&) {
    }
  }

  std::mutex& mutex() { return mu_; }

  // mutex() held. A uid, and a slot when want_slot and one is left.
  Ticket take_locked(bool want_slot) noexcept {
    Ticket t{0, next_uid_++};
    if (!want_slot) return t;
    if (!free_.empty()) {
      t.slot = free_.back();
      free_.pop_back();
    } else if (next_slot_ < count_) {
      t.slot = next_slot_++;
    }
    return t;
  }

  // mutex() held. The slot of an owner that is gone.
  void give_back_locked(uint32_t slot) noexcept {
    if (slot == 0) return;
    try {
      free_.push_back(slot);
    } catch (const std::bad_alloc&) {  // not reserved after all: the slot stays taken
    }
  }

 private:
  std::mutex mu_;
  std::vector<uint32_t> free_;
  const uint32_t count_;
  uint32_t next_slot_ = 1;
  uint64_t next_uid_ = 1;
};

}  // namespace dmakit::base
