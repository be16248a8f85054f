// What a test driver controls of the CUDA emulator: the device it pretends to be, the scheduling order,
// device buffers (with red zones; read-only ones fail on a write), and the last error's message.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace qaconv_emu {

struct DeviceConfig {
  int major, minor, sms, smem_optin;
};

// Which threads run first when a CTA starts and after each __syncthreads: warps in increasing or
// decreasing order (lanes likewise), or warps in a random order drawn from the seed. After a warp
// collective the warp's lanes always run next: every warp runs alone from one __syncthreads to the next.
enum SchedulePolicy { kScheduleForward = 0, kScheduleReverse = 1, kScheduleRandom = 2 };

struct Stats {
  uint64_t launches, ctas, switches, barriers, collectives;
};

void configure(const DeviceConfig& device, int policy, uint64_t seed);
const char* last_error();
Stats stats();
void* device_alloc(size_t bytes, bool readonly);
void device_free(void* p);

}  // namespace qaconv_emu
