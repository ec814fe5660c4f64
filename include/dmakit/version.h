/* The dmakit version these headers belong to (dmakit_version() tells the
 * library's). */
#ifndef DMAKIT_VERSION_H
#define DMAKIT_VERSION_H

#define DMAKIT_VERSION_MAJOR 0
#define DMAKIT_VERSION_MINOR 1
#define DMAKIT_VERSION_PATCH 0
#define DMAKIT_VERSION_STRING "0.1.0"

#endif /* DMAKIT_VERSION_H */
