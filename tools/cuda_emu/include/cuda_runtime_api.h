// CPU emulator shim (python_tests/cuda_emu.py puts this folder first on the include path).
#pragma once
#include "../cuda_emu_api.h"
