// Context: the top floor. Wires config, the EAL, the IOMMU domain, the IOVA
// arena, the buffer allocator and the DMA pools together.
#pragma once
