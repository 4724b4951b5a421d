#pragma once

// Symbols of the shared library are hidden by default; the public API is marked TINYSERVE_API.
// Exception classes are marked too, so that a C++ consumer can catch them by type across the
// library boundary.
#if defined(_WIN32)
#if defined(TINYSERVE_BUILDING_LIBRARY)
#define TINYSERVE_API __declspec(dllexport)
#else
#define TINYSERVE_API __declspec(dllimport)
#endif
#else
#define TINYSERVE_API __attribute__((visibility("default")))
#endif
