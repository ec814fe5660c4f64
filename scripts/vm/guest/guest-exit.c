/* guest-exit N: ends the test guest with result N.
 *
 * QEMU's isa-debug-exit device (iobase 0xf4) terminates QEMU when the guest
 * writes to its port; QEMU's exit status becomes (N << 1) | 1. So a clean
 * pass (N = 0) makes QEMU exit 1, which no panic or poweroff can produce
 * (those exit 0). Static, so it runs before any library is in place. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

#define DEBUG_EXIT_PORT 0xf4

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: guest-exit N   (N = 0 for pass)\n");
    return 2;
  }
  char *end = NULL;
  unsigned long code = strtoul(argv[1], &end, 0);
  if (*argv[1] == '\0' || *end != '\0' || code > 0x7fffffffUL) {
    fprintf(stderr, "guest-exit: '%s' is not a number in 0..2^31-1\n", argv[1]);
    return 2;
  }
  /* User space may touch an I/O port only after the kernel opened it in the
   * task's I/O permission bitmap (needs CAP_SYS_RAWIO: the init runs as root). */
  if (ioperm(DEBUG_EXIT_PORT, 4, 1) != 0) {
    fprintf(stderr, "guest-exit: ioperm(0x%x): %s\n", DEBUG_EXIT_PORT, strerror(errno));
    return 1;
  }
  /* 32-bit write of the result: the device exits QEMU on any write width. */
  outl((unsigned int)code, DEBUG_EXIT_PORT);
  /* Only reached when no isa-debug-exit device sits at 0xf4. */
  fprintf(stderr, "guest-exit: QEMU did not exit; is -device isa-debug-exit,iobase=0xf4 set?\n");
  return 1;
}
