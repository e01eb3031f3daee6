/*
 * crash_on_load.c - a runtime library that kills whoever loads it.
 *
 * It looks like a 1.3.0 runtime (an ELF shared library of the host CPU with a
 * 1.3.0 version string), so it passes every check made before dlopen, and its
 * constructor raises SIGSEGV during dlopen. Only the probe's child process may
 * load it: dlopen in the test process would kill pytest.
 */
#include <signal.h>

__attribute__((used)) static const char sim_crash_version_banner[] =
    "rkllm-runtime version: 1.3.0 (rockchip_llm simulator)";

__attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }
