// Benchmarks behind `dmakit bench NAME --json`. Each returns the JSON object
// {"bench": NAME, "results": [...]} described in docs/PERFORMANCE.md.
#pragma once
