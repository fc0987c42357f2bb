// CPU emulator shim: device-side emulation for kernel translation units only.
#pragma once
#include "../cuda_emu.h"
