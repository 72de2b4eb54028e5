/*
 * bcryptprimitives.dll for Wine 8.0, which lacks it: Rust's standard
 * library (1.78 and later) takes its random bytes from ProcessPrng in this
 * DLL, so a Rust .exe does not start under Wine 8.0 without it. Placed
 * beside the .exe (or on WINEDLLPATH) by .ci/win.sh. Built with
 *   x86_64-w64-mingw32-gcc -shared -O2 -o bcryptprimitives.dll processprng.c -ladvapi32
 * Only CI uses it; real Windows has its own bcryptprimitives.dll.
 */
#include <windows.h>

/* RtlGenRandom, exported by advapi32 under this name. */
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
