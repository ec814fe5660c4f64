#include "timing.hpp"

namespace dmakit::bench {

uint64_t median_ns(int repeats, const std::function<void()>& fn) {
  std::vector<double> samples;
  for (int i = 0; i < repeats; ++i) {
    uint64_t t0 = now_ns();
    fn();
    samples.push_back(static_cast<double>(now_ns() - t0));
  }
  return static_cast<uint64_t>(median(std::move(samples)));
}

double median(std::vector<double> samples) {
  if (samples.empty()) return 0.0;
  std::sort(samples.begin(), samples.end());
  size_t n = samples.size();
  return n % 2 == 1 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2.0;
}

}  // namespace dmakit::bench
