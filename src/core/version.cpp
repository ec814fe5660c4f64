// dmakit_version(): the version of the library itself (version.h, generated
// from the project version, gives the headers' version at compile time).
#include "dmakit/dmakit.h"
#include "dmakit/version.h"

extern "C" const char* dmakit_version(void) { return DMAKIT_VERSION_STRING; }
