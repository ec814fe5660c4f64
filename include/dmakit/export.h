/* DMAKIT_API marks what libdmakit.so exports.
 *
 * The library is compiled with -fvisibility=hidden; every declaration of the
 * public API (the C functions in dmakit.h, the C++ classes and functions in
 * namespace dmakit) carries DMAKIT_API, and nothing else leaves the shared
 * library. Harmless for the static library and for consumers.
 */
#ifndef DMAKIT_EXPORT_H
#define DMAKIT_EXPORT_H

#ifndef DMAKIT_API
#if defined(__GNUC__) || defined(__clang__)
#define DMAKIT_API __attribute__((visibility("default")))
#else
#define DMAKIT_API
#endif
#endif

#endif /* DMAKIT_EXPORT_H */
