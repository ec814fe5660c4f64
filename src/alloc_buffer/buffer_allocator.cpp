#include "alloc_buffer/buffer_allocator.hpp"
