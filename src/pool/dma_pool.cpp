#include "pool/dma_pool.hpp"
