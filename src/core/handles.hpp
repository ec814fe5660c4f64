// Handles of the C API: checked, never dangling.
//
// A C caller holds an opaque pointer-sized value. It is not the address of
// an object but a slot index and that slot's generation:
//
//   bits 63..32  generation (odd while the slot is live, even once freed)
//   bits 31..0   slot index + 1 (so no handle is NULL)
//
// Slots live in blocks that are never freed (the tables live as long as the
// process, so late calls from exit hooks stay safe), and are reused under a new
// generation, so any value a caller passes - a live handle, one freed
// before, one of a destroyed context, garbage - is looked up without
// touching freed memory: index in range, block present, generation equal.
// Releasing a slot is one compare-exchange of its generation, so of two
// racing frees of one handle exactly one wins.
//
// find() is the hot path of every C call: a shift, a bounds test, two loads
// and a compare. acquire() and release() take the table's mutex for the
// free list.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

namespace dmakit::core {

template <class T, uint32_t kBlockBits, uint32_t kBlocks>
class HandleTable {
 public:
  static constexpr uint64_t kCapacity = uint64_t{kBlocks} << kBlockBits;

  struct Slot {
    std::atomic<uint32_t> gen{0};
    uint32_t index = 0;      // its place in the table, set when first handed out
    uint32_t next_free = 0;  // while free: the next free slot's index + 1 (0: none)
    T value{};
  };

  // A free slot for a new object: value is default-constructed and the
  // caller fills it before publish(). nullptr when the table is full or out
  // of memory.
  Slot* acquire() noexcept {
    std::lock_guard lock(mu_);
    uint32_t idx;
    if (free_head_ != 0) {
      idx = free_head_ - 1;
      free_head_ = slot_at(idx).next_free;
    } else {
      if (next_ == kCapacity) return nullptr;
      idx = static_cast<uint32_t>(next_);
      auto& block = blocks_[idx >> kBlockBits];
      if (block.load(std::memory_order_relaxed) == nullptr) {
        auto fresh = std::unique_ptr<Slot[]>(new (std::nothrow) Slot[size_t{1} << kBlockBits]);
        if (fresh == nullptr) return nullptr;
        for (uint32_t i = 0; i <= kMask; ++i) fresh[i].index = idx + i;
        // Published before it is owned: a block is never freed while the table lives.
        block.store(fresh.release(), std::memory_order_release);
      }
      ++next_;
    }
    return &slot_at(idx);
  }

  // Why acquire() returned nullptr: every slot is in use (else host memory
  // for a new block of slots ran out).
  bool full() const noexcept {
    std::lock_guard lock(mu_);
    return free_head_ == 0 && next_ == kCapacity;
  }

  // Makes a slot from acquire() live and returns its handle.
  void* publish(Slot* s) noexcept {
    const uint32_t gen = s->gen.load(std::memory_order_relaxed) + 1;  // even -> odd
    s->gen.store(gen, std::memory_order_release);
    return encode(s->index, gen);
  }

  // The live slot a handle names, or nullptr.
  Slot* find(const void* handle) const noexcept {
    const auto v = reinterpret_cast<uintptr_t>(handle);
    const uint32_t idx = static_cast<uint32_t>(v) - 1;  // NULL wraps out of range
    const auto gen = static_cast<uint32_t>(v >> 32);
    if (idx >= kCapacity || (gen & 1) == 0) [[unlikely]]
      return nullptr;
    Slot* block = blocks_[idx >> kBlockBits].load(std::memory_order_acquire);
    if (block == nullptr) [[unlikely]]
      return nullptr;
    Slot* s = &block[idx & kMask];
    return s->gen.load(std::memory_order_acquire) == gen ? s : nullptr;
  }

  // Ends a handle: exactly one of racing calls with one handle gets the
  // slot back (to reset its value, then recycle()); the others nullptr.
  Slot* retire(const void* handle) noexcept {
    Slot* s = find(handle);
    if (s == nullptr) return nullptr;
    uint32_t gen = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(handle) >> 32);
    return s->gen.compare_exchange_strong(gen, gen + 1, std::memory_order_acq_rel) ? s : nullptr;
  }

  // Returns a retired slot (its value reset by the caller) to the free list.
  // A slot acquired but never published goes back the same way.
  // The free list runs through the slots: recycling never allocates.
  void recycle(Slot* s) noexcept {
    std::lock_guard lock(mu_);
    s->next_free = free_head_;
    free_head_ = s->index + 1;
  }

  // Calls fn(slot) for every live slot (under the table's mutex; fn must not
  // call acquire or recycle).
  template <class Fn>
  void for_each_live(Fn&& fn) {
    std::lock_guard lock(mu_);
    for (uint64_t i = 0; i < next_; ++i) {
      Slot& s = blocks_[i >> kBlockBits].load(std::memory_order_relaxed)[i & kMask];
      if (s.gen.load(std::memory_order_acquire) & 1) fn(s);
    }
  }

 private:
  static constexpr uint32_t kMask = (uint32_t{1} << kBlockBits) - 1;

  static void* encode(uint32_t idx, uint32_t gen) {
    return reinterpret_cast<void*>((uintptr_t{gen} << 32) | (uintptr_t{idx} + 1));
  }

  Slot& slot_at(uint32_t idx) const noexcept {
    return blocks_[idx >> kBlockBits].load(std::memory_order_relaxed)[idx & kMask];
  }

  std::array<std::atomic<Slot*>, kBlocks> blocks_{};
  mutable std::mutex mu_;
  uint32_t free_head_ = 0;  // first free slot's index + 1 (0: none)
  uint64_t next_ = 0;  // slots ever handed out (the high-water mark)
};

}  // namespace dmakit::core
