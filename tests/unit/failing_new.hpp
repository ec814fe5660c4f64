// For out-of-memory tests: replaces the global operator new of the test
// binary that includes it (exactly one file per binary may), so that a test
// can make the k-th allocation of its thread from now throw std::bad_alloc.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace dmakit::oomtest {
// Allocations left before one fails; negative: none fails. Per thread, so
// that only the thread under test sees the failure.
inline thread_local long t_fail_in = -1;

// Arms the failure: the k-th allocation of this thread from now throws.
inline void fail_allocation(long k) { t_fail_in = k; }
// Disarms it; true if the armed allocation was reached (and failed).
inline bool disarm() {
  const bool fired = t_fail_in < 0;
  t_fail_in = -1;
  return fired;
}

inline void* checked_alloc(size_t n, size_t align) {
  if (t_fail_in >= 0 && t_fail_in-- == 0) throw std::bad_alloc();
  void* p = nullptr;
  if (align <= alignof(std::max_align_t)) {
    p = std::malloc(n == 0 ? 1 : n);
  } else if (posix_memalign(&p, align, n == 0 ? align : n) != 0) {
    p = nullptr;
  }
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace dmakit::oomtest

// The replacements below pair malloc with free by design; gcc's inliner
// cannot see that the operator new it pairs a delete with is this one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(size_t n) { return dmakit::oomtest::checked_alloc(n, 0); }
void* operator new[](size_t n) { return dmakit::oomtest::checked_alloc(n, 0); }
void* operator new(size_t n, std::align_val_t a) { return dmakit::oomtest::checked_alloc(n, static_cast<size_t>(a)); }
void* operator new[](size_t n, std::align_val_t a) { return dmakit::oomtest::checked_alloc(n, static_cast<size_t>(a)); }
// The nothrow forms too (the arena's bitmaps use them): left to the
// runtime, they would pair its allocator with the free() below.
inline void* nothrow_alloc(size_t n, size_t align) noexcept {
  try {
    return dmakit::oomtest::checked_alloc(n, align);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new(size_t n, const std::nothrow_t&) noexcept { return nothrow_alloc(n, 0); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return nothrow_alloc(n, 0); }
void* operator new(size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return nothrow_alloc(n, static_cast<size_t>(a));
}
void* operator new[](size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return nothrow_alloc(n, static_cast<size_t>(a));
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }
