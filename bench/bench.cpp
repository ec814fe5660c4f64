#include "bench.hpp"
