// Recycling: a freed buffer keeps its IOVA and mapping on the free list of
// its size until it is reused or retired (watermark, trim, pressure); a
// retired buffer's memory waits for the arena's flush. The design is in
// buffer_allocator.hpp; the map of the allocator's files in allocator.hpp.
#include <iterator>
#include <mutex>
#include <new>

#include "alloc_buffer/allocator.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

// ---------------------------------------------------------------------------
// Free: into the recycler (mapping kept), or retired when the recycler is
// off or the buffer alone exceeds the watermark.

void Allocator::release(ImplPtr b) {
  if (b->block != nullptr) {
    slab_->free(std::move(b));
    return;
  }
  Chain victims;
  bool keep = false;
  {
    std::lock_guard lock(mu_);
    const uint64_t len = b->span.len;
    --live_;
    live_bytes_ -= len;
    keep = !stopping_ && !isolation_ && len <= high_;
    auto it = keep ? classes_.find(len) : classes_.end();
    if (keep && it == classes_.end()) {
      try {
        it = classes_.try_emplace(len).first;
      } catch (const std::bad_alloc&) {
        keep = false;  // no memory for a new size class: retired instead of recycled
      }
    }
    if (keep) {
      b->zero = false;  // the owner may have written it
      it->second.dirty.push(std::move(b));
      recycled_bytes_ += len;
      dirty_bytes_ += len;
      if (recycled_bytes_ > high_) victims = collect_victims(high_);
    }
  }
  if (!keep) {
    retire(std::move(b));
    return;
  }
  if (prezero_) work_cv_.notify_one();
  while (ImplPtr v = victims.pop()) retire(std::move(v));
}

ImplPtr Allocator::pop_recycled(uint64_t span_len, const BufferRequest& req) {
  std::lock_guard lock(mu_);
  auto it = classes_.find(span_len);
  if (it == classes_.end()) return nullptr;
  auto fits = [&](const Impl& b) {
    return b.prot == req.prot && b.span.end() - 1 <= req.dma_limit && (b.span.iova & (req.align - 1)) == 0;
  };
  auto take = [&](Chain& list, uint64_t& bytes) -> ImplPtr {
    ImplPtr b = list.take_if(fits);
    if (b != nullptr) bytes -= b->span.len;
    return b;
  };
  // Zeroed requests want clean buffers; others leave those for them.
  ImplPtr b = req.zeroed ? take(it->second.clean, clean_bytes_) : take(it->second.dirty, dirty_bytes_);
  if (b == nullptr) b = req.zeroed ? take(it->second.dirty, dirty_bytes_) : take(it->second.clean, clean_bytes_);
  if (b == nullptr) return nullptr;
  if (idle(it)) classes_.erase(it);
  recycled_bytes_ -= b->span.len;
  ++live_;
  live_bytes_ += b->span.len;
  b->recycled = true;
  b->attempts = 0;
  b->size = req.len;
  return b;
}

// Under mu_: takes recycled buffers out until recycled_bytes_ <= target,
// largest sizes first (fewest retirements), dirty before clean.
Chain Allocator::collect_victims(uint64_t target) {
  Chain out;
  uint64_t n = 0;
  for (auto it = classes_.rbegin(); it != classes_.rend() && recycled_bytes_ > target;) {
    SizeClass& sc = it->second;
    while (recycled_bytes_ > target && (!sc.dirty.empty() || !sc.clean.empty())) {
      bool dirty = !sc.dirty.empty();
      ImplPtr b = (dirty ? sc.dirty : sc.clean).pop();
      (dirty ? dirty_bytes_ : clean_bytes_) -= b->span.len;
      recycled_bytes_ -= b->span.len;
      out.push(std::move(b));
      ++n;
    }
    if (auto fwd = std::next(it).base(); idle(fwd))
      it = std::make_reverse_iterator(classes_.erase(fwd));
    else
      ++it;
  }
  shrinks_.fetch_add(n, std::memory_order_relaxed);
  return out;
}

bool Allocator::idle(const std::map<uint64_t, SizeClass>::iterator& it) const {
  return it->second.clean.empty() && it->second.dirty.empty() &&
         (zeroing_ == nullptr || zeroing_->span.len != it->first);
}

void Allocator::trim(bool all) {
  Chain victims;
  {
    std::unique_lock lock(mu_);
    // Let a buffer being zeroed come back so it can be counted and taken.
    ++hold_zeroing_;
    idle_cv_.wait(lock, [&] { return zeroing_ == nullptr; });
    victims = collect_victims(all ? 0 : high_);
    --hold_zeroing_;
  }
  work_cv_.notify_one();
  while (ImplPtr v = victims.pop()) retire(std::move(v));
  if (all && slab_ != nullptr) slab_->retire_free();
  if (auto st = arena_.flush(); !st) base::log().warn("buffer trim: arena flush: {}", st.error().what());
}

// ---------------------------------------------------------------------------
// Retirement: the IOVA freed at once, the memory back to its sources after
// the arena's flush.

// Frees the IOVA range (stale in the arena, still mapped); the memory waits
// in pending_ until on_flushed. Registered before the free, because a strict
// arena flushes (and calls the listener) inside free(). The span is copied
// first: once in pending_, on_flushed may free the record at any time.
void Allocator::retire(ImplPtr b) {
  const iommu::IovaSpan span = b->span;
  {
    std::lock_guard lock(mu_);
    try {
      pending_.try_emplace(span.iova, std::move(b));  // moves b only once the node exists
    } catch (const std::bad_alloc&) {
      pending_spill_.push(std::move(b));
    }
    pending_bytes_ += span.len;
  }
  if (auto st = arena_.free(span); !st) {
    base::log().error("buffer IOVA {:#x}+{:#x}: arena refused the free ({}); its memory is kept", span.iova,
                      span.len, st.error().what());
    std::lock_guard lock(mu_);
    ImplPtr rec;
    if (auto it = pending_.find(span.iova); it != pending_.end()) {
      rec = std::move(it->second);
      pending_.erase(it);
    } else {
      rec = pending_spill_.take_if([&](const Impl& r) { return r.span.iova == span.iova; });
    }
    if (rec != nullptr) {
      pending_bytes_ -= span.len;
      lost_.push(std::move(rec));
    }
  }
}

void Allocator::retire_slab(ImplPtr mem) { retire(std::move(mem)); }

// The arena reports a flushed range after its unmap returned and before its
// IOVAs can be handed out again, so every pending buffer inside the range is
// unreachable by the device and its memory can go back to the sources.
void Allocator::on_flushed(std::span<const iommu::IovaSpan> ranges) {
  Chain done;  // owned by pending_ until the flush, then by done
  {
    std::lock_guard lock(mu_);
    for (const auto& r : ranges) {
      auto inside = [&](const Impl& b) { return b.span.iova >= r.iova && b.span.end() <= r.end(); };
      for (auto it = pending_.lower_bound(r.iova); it != pending_.end() && it->first < r.end();) {
        if (it->second->span.end() <= r.end()) {
          pending_bytes_ -= it->second->span.len;
          done.push(std::move(it->second));
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
      while (ImplPtr b = pending_spill_.take_if(inside)) {
        pending_bytes_ -= b->span.len;
        done.push(std::move(b));
      }
    }
  }
  while (ImplPtr b = done.pop()) give_back(*b);
}

}  // namespace dmakit::alloc_buffer
