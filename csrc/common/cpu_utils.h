// CPU kernel helpers.
#pragma once

#define FASTLLM_ALWAYS_INLINE inline __attribute__((always_inline))

// Hot CPU loops are compiled for several x86 instruction sets and picked at load time (GCC/Clang
// function multiversioning), so one portable wheel still runs AVX2/AVX-512 code where available.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTLLM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLLM_CPU_CLONES
#endif
