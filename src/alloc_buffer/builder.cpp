// Building: buffers and slabs made from the memory sources by order
// fallback, placed in one IOVA range and mapped a run at a time, and their
// memory given back. The design is in buffer_allocator.hpp; the map of the
// allocator's files in allocator.hpp.
#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "alloc_buffer/allocator.hpp"
#include "alloc_buffer/host_memory.hpp"
#include "base/clock.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

namespace {

int64_t steady_ns() { return base::mono_now_ns(); }

// Room for one more chunk in b's lists, so the push that follows cannot
// throw; false out of host memory.
bool reserve_chunk(Buffer::Impl& b) noexcept {
  try {
    b.chunks.reserve(b.chunks.size() + 1);
    b.from.reserve(b.chunks.size() + 1);
    return true;
  } catch (const std::bad_alloc&) {
    return false;
  }
}

}  // namespace

// Slow path: chunks by order fallback, one IOVA range, one map per run.
// Whatever fails, everything taken so far is given back.
Result<ImplPtr> Allocator::build(const BufferRequest& req, uint64_t span_len) {
  ImplPtr b;
  try {
    b = std::make_unique<Impl>();
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "buffer of {} bytes: out of host memory for its record", req.len);
  }
  b->anchor = anchor_;
  b->size = req.len;
  b->prot = req.prot;
  // Mapping pins every byte (RLIMIT_MEMLOCK): refused before anything is taken.
  // (admit_pin reads /proc and names the buffer: it allocates, and counts only as its last step.)
  Status pin = ok();
  try {
    pin = HostMemoryGuard::process().admit_pin(span_len, fmt::format("buffer of {} bytes", req.len));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "buffer of {} bytes: out of host memory checking RLIMIT_MEMLOCK", req.len);
  }
  DMAKIT_TRY(std::move(pin));
  b->pinned = span_len;
  if (auto st = gather(*b, span_len); !st) return std::unexpected(st.error());

  // Largest chunk first: each chunk's offset is then a multiple of its size.
  const uint64_t align = std::max(b->chunks.front().order, req.align);
  auto span = arena_.alloc(iommu::IovaRequest{span_len, align, req.dma_limit});
  if (!span) {
    give_back(*b);
    return std::unexpected(with_context(std::move(span).error(),
                                        fmt::format("buffer of {} bytes: IOVA range of {} aligned to {}", req.len,
                                                    span_len, size_name(align))));
  }
  b->span = *span;
  uint64_t off = 0;
  for (BufferChunk& c : b->chunks) {
    c.iova = b->span.iova + off;
    off += c.len;
  }
  if (auto st = map_runs(b); !st) {
    return std::unexpected(with_context(st.error(), fmt::format("buffer of {} bytes", req.len)));
  }

  if (req.zeroed && !b->zero) {
    for (size_t i = 0; i < b->chunks.size(); ++i)
      if (!b->from[i]->fresh_zero()) std::memset(b->chunks[i].vaddr, 0, b->chunks[i].len);
    b->zero = true;
  }
  fresh_.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  ++live_;
  live_bytes_ += span_len;
  return b;
}

// Order fallback (see the header). On failure nothing stays taken.
Status Allocator::gather(Impl& b, uint64_t need) {
  uint64_t remaining = need;
  const int64_t now = steady_ns();
  std::string tried;
  bool all_fresh_zero = true;
  for (size_t i = 0; i < orders_.size() && remaining != 0; ++i) {
    Order& o = orders_[i];
    if (o.size > remaining) continue;
    const bool last = i + 1 == orders_.size();
    if (!last && o.retry_at.load(std::memory_order_relaxed) > now) {
      skips_.fetch_add(1, std::memory_order_relaxed);
      note(tried, [&] {
        return fmt::format("{}: skipped (failed within {} ms); ", size_name(o.size), backoff_ns_ / 1000000);
      });
      continue;
    }
    uint64_t got = 0;
    while (remaining >= o.size) {
      const uint64_t want = std::min(remaining & ~(o.size - 1), o.src->max_run());
      ++b.attempts;
      attempts_.fetch_add(1, std::memory_order_relaxed);
      auto p = o.src->take(want);
      if (!p) {
        // Drop to the next order for the rest of this request; later
        // requests skip this one until the back-off expires.
        o.retry_at.store(now + backoff_ns_, std::memory_order_relaxed);
        if (!last) fallbacks_.fetch_add(1, std::memory_order_relaxed);
        note(tried, [&] { return fmt::format("{}: failed after {} chunks ({}); ", size_name(o.size), got, p.error().what()); });
        break;
      }
      if (!reserve_chunk(b)) {
        o.src->give(*p, want);
        give_back(b);
        return fail(Errc::no_memory, "buffer of {} bytes: out of host memory for its chunk list", b.size);
      }
      b.chunks.push_back(BufferChunk{*p, 0, want, o.size, o.src->name()});  // reserved: no allocation
      b.from.push_back(o.src);
      all_fresh_zero = all_fresh_zero && o.src->fresh_zero();
      remaining -= want;
      ++got;
    }
    if (got != 0 && remaining == 0) break;
  }
  if (remaining != 0) {
    give_back(b);
    if (!tried.empty()) tried.resize(tried.size() - 2);
    return fail(Errc::no_memory, "buffer of {} bytes: out of memory with {} bytes still needed; {}", b.size,
                remaining, tried);
  }
  b.zero = all_fresh_zero;
  return ok();
}

// One Domain::map per virtually contiguous run. On failure the runs mapped
// so far are unmapped and the memory and the IOVA range are given back; if
// that unmap fails, the buffer is retired instead and `owned` left empty.
Status Allocator::map_runs(ImplPtr& owned) {
  Impl& b = *owned;
  uint64_t mapped = 0;  // bytes from span.iova that are mapped
  size_t i = 0;
  uint32_t runs = 0;
  while (i < b.chunks.size()) {
    char* va = static_cast<char*>(b.chunks[i].vaddr);
    uint64_t len = b.chunks[i].len;
    size_t j = i + 1;
    while (j < b.chunks.size() && va + len == b.chunks[j].vaddr) len += b.chunks[j++].len;
    auto st = domain_.map(va, b.chunks[i].iova, len, b.prot);
    if (!st) {
      Error err = with_context(st.error(), fmt::format("map of run {} ({} bytes at IOVA {:#x})", runs, len,
                                                       b.chunks[i].iova));
      bool unmapped = mapped == 0 || static_cast<bool>(domain_.unmap(b.span.iova, mapped));
      if (unmapped) {
        if (auto fr = arena_.free(b.span); !fr)
          base::log().error("buffer IOVA {:#x}+{:#x}: free after failed map: {}", b.span.iova, b.span.len,
                            fr.error().what());
        give_back(b);
      } else {
        // Still mapped: hold the memory until the arena's flush unmaps it.
        base::log().error("buffer IOVA {:#x}: unmap after failed map failed; memory held until flush", b.span.iova);
        retire(std::move(owned));
      }
      return std::unexpected(std::move(err));
    }
    map_calls_.fetch_add(1, std::memory_order_relaxed);
    mapped += len;
    ++runs;
    i = j;
  }
  b.mappings = runs;
  b.contiguous = runs == 1;
  if (!b.contiguous) {
    // Runs can also break where the IOMMU maps no differently; check VA only.
    b.contiguous = true;
    for (size_t k = 1; k < b.chunks.size() && b.contiguous; ++k)
      b.contiguous = static_cast<char*>(b.chunks[k - 1].vaddr) + b.chunks[k - 1].len == b.chunks[k].vaddr;
  }
  return ok();
}

void Allocator::give_back(Impl& b) {
  for (size_t i = 0; i < b.chunks.size(); ++i) b.from[i]->give(b.chunks[i].vaddr, b.chunks[i].len);
  b.chunks.clear();
  b.from.clear();
  HostMemoryGuard::process().unpin(b.pinned);
  b.pinned = 0;
}

void Allocator::zero_memory(Impl& b) {
  for (const BufferChunk& c : b.chunks) std::memset(c.vaddr, 0, c.len);
  b.zero = true;
}

// ---------------------------------------------------------------------------
// Slabs: memory the slab tier carves small buffers from.

void Allocator::enable_slabs(uint64_t slab_max, std::unique_ptr<MemorySource> run_source) {
  const uint64_t unit = orders_.back().size;
  if (isolation_ || slab_max < unit) return;
  if (run_source != nullptr) {
    slab_runs_ = run_source.get();
    sources_.push_back(std::move(run_source));
  }
  const bool huge = slab_runs_ != nullptr || orders_.front().size >= kSlabBlock;
  const bool runs = orders_.back().src->max_run() >= kSlabBlock;
  if (!huge && !runs) {
    base::log().debug("buffer slabs: off (no source gives 2 MiB pages or runs)");
    return;
  }
  slab_ = std::make_unique<SlabTier>(*this, anchor_, unit, std::min(slab_max, kSlabBlock));
}

// Slab memory: every chunk a multiple of kSlabBlock, so no 2 MiB block
// straddles two chunks. Orders of 2 MiB and up (hugepages) first, then the
// smallest order's source when it serves runs (anonymous memory) - one
// take for the rest. On failure nothing stays taken.
Status Allocator::gather_slab(Impl& b, uint64_t need) {
  if (slab_runs_ != nullptr && need <= slab_runs_->max_run()) {
    ++b.attempts;
    attempts_.fetch_add(1, std::memory_order_relaxed);
    if (auto p = slab_runs_->take(need)) {
      if (!reserve_chunk(b)) {
        slab_runs_->give(*p, need);
        give_back(b);  // the pin admitted for the slab
        return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its chunk list", need);
      }
      b.chunks.push_back(BufferChunk{*p, 0, need, kSlabBlock, slab_runs_->name()});
      b.from.push_back(slab_runs_);
      return ok();
    }
  }
  uint64_t remaining = need;
  const int64_t now = steady_ns();
  std::string tried;
  for (size_t i = 0; i < orders_.size() && remaining != 0; ++i) {
    Order& o = orders_[i];
    const bool last = i + 1 == orders_.size();
    const bool huge = o.size >= kSlabBlock && o.size <= remaining;
    const bool runs = last && o.src->max_run() >= kSlabBlock;
    if (!huge && !runs) continue;
    if (!last && o.retry_at.load(std::memory_order_relaxed) > now) {
      skips_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    while (remaining != 0) {
      const uint64_t want = std::min(remaining & ~(std::max(o.size, kSlabBlock) - 1),
                                     o.src->max_run() & ~(kSlabBlock - 1));
      if (want == 0) break;
      ++b.attempts;
      attempts_.fetch_add(1, std::memory_order_relaxed);
      auto p = o.src->take(want);
      if (!p) {
        if (!last) {
          o.retry_at.store(now + backoff_ns_, std::memory_order_relaxed);
          fallbacks_.fetch_add(1, std::memory_order_relaxed);
        }
        note(tried, [&] { return fmt::format("{}: {}; ", size_name(o.size), p.error().what()); });
        break;
      }
      if (!reserve_chunk(b)) {
        o.src->give(*p, want);
        give_back(b);
        return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its chunk list", need);
      }
      b.chunks.push_back(BufferChunk{*p, 0, want, o.size, o.src->name()});  // reserved: no allocation
      b.from.push_back(o.src);
      remaining -= want;
    }
  }
  if (remaining != 0) {
    give_back(b);
    if (!tried.empty()) tried.resize(tried.size() - 2);
    return fail(Errc::no_memory, "slab of {} bytes: out of memory with {} bytes still needed{}{}", need, remaining,
                tried.empty() ? "" : "; ", tried);
  }
  return ok();
}

// A slab: built like a buffer, but from gather_slab, read-write, on an IOVA
// aligned to at least a block, and not counted as a live buffer.
Result<ImplPtr> Allocator::build_slab(uint64_t len, uint64_t dma_limit) {
  ImplPtr b;
  Status pin = ok();
  try {
    b = std::make_unique<Impl>();
    // Mapping pins every byte of the slab (RLIMIT_MEMLOCK), as for a buffer.
    pin = HostMemoryGuard::process().admit_pin(len, fmt::format("slab of {} bytes", len));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its record", len);
  }
  DMAKIT_TRY(std::move(pin));
  b->anchor = anchor_;
  b->size = len;
  b->prot = iommu::kReadWrite;
  b->pinned = len;
  DMAKIT_TRY(gather_slab(*b, len));
  const uint64_t align = std::max(b->chunks.front().order, kSlabBlock);
  auto span = arena_.alloc(iommu::IovaRequest{len, align, dma_limit});
  if (!span) {
    give_back(*b);
    Error e = std::move(span).error();
    std::string msg;
    note(msg, [&] { return fmt::format("slab: IOVA range of {} bytes aligned to {}: {}", len, size_name(align), e.message); });
    if (!msg.empty()) e.message = std::move(msg);
    return std::unexpected(std::move(e));
  }
  b->span = *span;
  uint64_t off = 0;
  for (BufferChunk& c : b->chunks) {
    c.iova = b->span.iova + off;
    off += c.len;
  }
  DMAKIT_TRY(map_runs(b));
  base::log().debug("buffer slabs: slab of {} at IOVA {:#x}, {} mapping entries", size_name(len), b->span.iova,
                    b->mappings);
  return b;
}

}  // namespace dmakit::alloc_buffer
