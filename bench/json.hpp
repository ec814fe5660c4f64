// The JSON the benchmarks and the dmakit command print: nlohmann's, with
// members kept in insertion order so the output reads as DESIGN.md lists it.
// Internal to the tool and the tests; no installed header includes it.
#pragma once

#include <nlohmann/json.hpp>

namespace dmakit {
using Json = nlohmann::ordered_json;
}  // namespace dmakit
