/* clock.c: whether the system clock may put a time on data. A device without a real-time
 * clock starts at whatever time it last saved (fake-hwclock) or at 1970 until NTP has set it;
 * a timestamp from that clock files the data at the wrong time in ThingsBoard. The kernel
 * knows: adjtimex() reports TIME_ERROR (and STA_UNSYNC in its status) until a time daemon
 * (ntpd, chrony, systemd-timesyncd) has synchronised the clock, and again when it loses it.
 *
 * TB_CLOCK_SYNCED=1 or 0 overrides the kernel's answer: for tests, and for devices whose time
 * comes from a source the kernel is not told about (a GPS receiver, an RTC set at the factory). */
#include <stdlib.h>
#include <string.h>
#include <sys/timex.h>
#include "core.h"

/* 1 synchronised, 0 not, -1 the variable says nothing (unset or another value) */
static int synced_by_env(void) {
  const char *v = getenv("TB_CLOCK_SYNCED");
  if (!v) return -1;
  if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes")) return 1;
  if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no")) return 0;
  return -1;
}

int tb_clock_synced(void) {
  int env = synced_by_env();
  if (env >= 0) return env;
  struct timex tx;
  memset(&tx, 0, sizeof tx);   /* modes 0: only read, allowed to any user */
  int state = adjtimex(&tx);
  /* a kernel that refuses to say (a seccomp filter) is treated as not synchronised: data
   * then goes without a device time, and ThingsBoard stamps it on arrival */
  return state != -1 && state != TIME_ERROR && !(tx.status & STA_UNSYNC);
}

/* core.clock_synced() -> true when the system clock is synchronised (see above) */
static int l_clock_synced(lua_State *L) {
  lua_pushboolean(L, tb_clock_synced());
  return 1;
}

int tb_clock_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"clock_synced", l_clock_synced}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
