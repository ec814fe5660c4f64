/* DMAKIT_API marks the symbols the shared library exports; everything else
 * in libdmakit.so is hidden. */
#ifndef DMAKIT_EXPORT_H
#define DMAKIT_EXPORT_H

#if defined(__GNUC__) || defined(__clang__)
#define DMAKIT_API __attribute__((visibility("default")))
#else
#define DMAKIT_API
#endif

#endif /* DMAKIT_EXPORT_H */
