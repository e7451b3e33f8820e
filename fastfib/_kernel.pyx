# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, binding=False
"""Compiled Fibonacci kernel: fast doubling on GMP integers through gmpy2's C-API.

Private module: use :func:`fastfib.fib` and :func:`fastfib.fib_encoded`.

The doubling step is the one GMP's own ``mpz_fib_ui`` uses, two squarings per
bit of n::

    F[2k-1] = F[k]^2 + F[k-1]^2
    F[2k+1] = 4 F[k]^2 - F[k-1]^2 + 2(-1)^k
    F[2k]   = F[2k+1] - F[2k-1]

and the last step computes F(n) alone with one multiplication::

    F[2k]   = F[k] (F[k] + 2 F[k-1])
    F[2k+1] = (2 F[k] + F[k-1]) (2 F[k] - F[k-1]) + 2(-1)^k
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.string cimport strlen

from gmpy2 cimport *

from fastfib.errors import FibRangeError

cdef extern from "gmp.h":
    const char *gmp_version
    void mpz_init2(mpz_ptr, mp_bitcnt_t) nogil
    void mpz_clear(mpz_ptr) nogil
    void mpz_set_ui(mpz_ptr, unsigned long) nogil
    void mpz_swap(mpz_ptr, mpz_ptr) nogil
    void mpz_mul(mpz_ptr, mpz_srcptr, mpz_srcptr) nogil
    void mpz_mul_2exp(mpz_ptr, mpz_srcptr, mp_bitcnt_t) nogil
    void mpz_add(mpz_ptr, mpz_srcptr, mpz_srcptr) nogil
    void mpz_sub(mpz_ptr, mpz_srcptr, mpz_srcptr) nogil
    void mpz_add_ui(mpz_ptr, mpz_srcptr, unsigned long) nogil
    void mpz_sub_ui(mpz_ptr, mpz_srcptr, unsigned long) nogil
    size_t mpz_sizeinbase(mpz_srcptr, int) nogil
    char *mpz_get_str(char *, int, mpz_srcptr) nogil
    void *mpz_export(void *, size_t *, int, size_t, int, size_t, mpz_srcptr) nogil

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject **, Py_ssize_t) except -1
    # The same C function as PyBytes_FromStringAndSize, declared to hand back a
    # raw owned reference that _PyBytes_Resize may replace.
    PyObject *_bytes_new "PyBytes_FromStringAndSize"(const char *, Py_ssize_t) except NULL

import_gmpy2()

#: The largest n the kernel computes. F(10^9) has 694,241,914 bits: 87 MB as
#: binary and 209 MB as decimal text, and fast doubling holds about four
#: numbers of that size at once. Past that, one result no longer fits in a
#: RabbitMQ message (128 MiB by default) and one call would tie up a worker for
#: minutes, so a larger n is an error rather than a memory blow-up.
MAX_N = 1_000_000_000

cdef enum:
    # F(93) is the largest Fibonacci number that fits in 64 bits.
    FIB_TABLE_MAX = 93

#: n up to this are answered from a table of 64-bit values.
TABLE_MAX_N = FIB_TABLE_MAX

cdef enum:
    # Below this n the GMP work takes less time than releasing and retaking the GIL.
    NOGIL_MIN_N = 20000

cdef unsigned long long FIB_TABLE[94]
FIB_TABLE[0] = 0
FIB_TABLE[1] = 1
for _i in range(2, 94):
    FIB_TABLE[_i] = FIB_TABLE[_i - 1] + FIB_TABLE[_i - 2]


cdef inline unsigned long _bit_length(unsigned long x) noexcept nogil:
    cdef unsigned long b = 0
    while x:
        b += 1
        x >>= 1
    return b


cdef int fib_into(mpz_ptr out, unsigned long n) except -1 nogil:
    """Set ``out`` to F(n). Bounds are the caller's job. Needs no GIL."""
    cdef mpz_t fk, fk1, a, b
    cdef mp_bitcnt_t bits
    if n <= FIB_TABLE_MAX:
        mpz_set_ui(out, FIB_TABLE[n])
        return 0
    # Sized up front for the largest intermediate (F[n/2] has about 0.347 n
    # bits, its square twice that), so GMP never reallocates mid-way.
    bits = (n >> 1) * 1389 // 1000 + 128
    mpz_init2(fk, bits)
    mpz_init2(fk1, bits)
    mpz_init2(a, bits)
    mpz_init2(b, bits)
    _doubling(out, n, fk, fk1, a, b)
    mpz_clear(fk)
    mpz_clear(fk1)
    mpz_clear(a)
    mpz_clear(b)
    return 0


# Temporaries for small n, reused from call to call so that a call allocates
# nothing. Only touched while the GIL is held, which serialises their users.
cdef mpz_t _small_fk, _small_fk1, _small_a, _small_b, _small_out
mpz_init2(_small_fk, 1 << 14)
mpz_init2(_small_fk1, 1 << 14)
mpz_init2(_small_a, 1 << 14)
mpz_init2(_small_b, 1 << 14)
mpz_init2(_small_out, 1 << 14)


cdef inline void _fib_small(mpz_ptr out, unsigned long n) noexcept:
    """F(n) for n < NOGIL_MIN_N into ``out``, with the GIL held."""
    if n <= FIB_TABLE_MAX:
        mpz_set_ui(out, FIB_TABLE[n])
    else:
        _doubling(out, n, _small_fk, _small_fk1, _small_a, _small_b)


cdef void _doubling(mpz_ptr out, unsigned long n, mpz_ptr fk, mpz_ptr fk1, mpz_ptr a, mpz_ptr b) noexcept nogil:
    """F(n), n > 93, into ``out`` by fast doubling, with four caller-owned temporaries."""
    cdef unsigned long k, m
    cdef int shift
    k = n >> 1
    # Start from F[m], F[m-1] out of the table, m = the top 6 bits of k (32..63).
    shift = <int>_bit_length(k) - 6
    m = k >> shift
    mpz_set_ui(fk, FIB_TABLE[m])
    mpz_set_ui(fk1, FIB_TABLE[m - 1])
    shift -= 1
    while shift >= 0:
        # The two squarings of the step, into their own buffers: squaring in
        # place would make GMP allocate a temporary every time.
        mpz_mul(a, fk, fk)          # F[m]^2
        mpz_mul(b, fk1, fk1)        # F[m-1]^2
        # fk = F[2m+1] = 4 F[m]^2 - F[m-1]^2 + 2(-1)^m
        mpz_mul_2exp(fk, a, 2)
        mpz_sub(fk, fk, b)
        if m & 1:
            mpz_sub_ui(fk, fk, 2)
        else:
            mpz_add_ui(fk, fk, 2)
        # fk1 = F[2m-1] = F[m]^2 + F[m-1]^2, then a = F[2m] = F[2m+1] - F[2m-1]
        mpz_add(fk1, a, b)
        mpz_sub(a, fk, fk1)
        if (k >> shift) & 1:
            mpz_swap(fk1, a)        # (F[2m+1], F[2m])
            m = 2 * m + 1
        else:
            mpz_swap(fk, a)         # (F[2m], F[2m-1])
            m = 2 * m
        shift -= 1

    # Last step: F(n) alone from F[k], F[k-1], one multiplication.
    if n & 1:
        # F[2k+1] = (2F[k] + F[k-1]) (2F[k] - F[k-1]) + 2(-1)^k
        mpz_mul_2exp(a, fk, 1)
        mpz_add(b, a, fk1)
        mpz_sub(a, a, fk1)
        mpz_mul(out, a, b)
        if k & 1:
            mpz_sub_ui(out, out, 2)
        else:
            mpz_add_ui(out, out, 2)
    else:
        # F[2k] = F[k] (F[k] + 2F[k-1])
        mpz_mul_2exp(a, fk1, 1)
        mpz_add(a, a, fk)
        mpz_mul(out, fk, a)


cdef unsigned long _check_n(object n) except? 0:
    """n as a C integer, or TypeError / FibRangeError with a sentence naming the bound."""
    cdef object v
    if type(n) is int:
        v = n
    elif isinstance(n, bool):
        raise TypeError("n must be an integer, not bool (True/False are refused as likely mistakes)")
    else:
        try:
            v = n.__index__()
        except AttributeError:
            raise TypeError(f"n must be an integer, not {type(n).__name__}") from None
    if v < 0:
        raise FibRangeError(f"n must not be negative, got {v}")
    if v > MAX_N:
        raise FibRangeError(f"n must be at most {MAX_N} (the kernel's limit, set by the size of F(n)), got {v}")
    return <unsigned long>v


@cython.always_allow_keywords(False)  # METH_O: the cheapest call CPython has
def fib(n):
    """F(n) as a ``gmpy2.mpz``, for 0 <= n <= MAX_N."""
    cdef unsigned long un = _check_n(n)
    cdef mpz result = GMPy_MPZ_New(NULL)
    cdef mpz_ptr z = MPZ(result)
    if un < NOGIL_MIN_N:
        _fib_small(z, un)
    else:
        with nogil:
            fib_into(z, un)
    return result


cdef bytes encode_decimal(mpz_srcptr z):
    """z >= 0 as ASCII decimal, written by mpz_get_str straight into the bytes object."""
    # sizeinbase(10) is exact or one too large; a bytes object keeps one spare
    # byte past its size for the NUL that mpz_get_str writes.
    cdef Py_ssize_t size = <Py_ssize_t>mpz_sizeinbase(z, 10)
    # A raw, owned reference: _PyBytes_Resize may move the object, so no Cython
    # variable may hold it until the size is final.
    cdef PyObject *raw = _bytes_new(NULL, size)
    cdef char *buf = PyBytes_AS_STRING(<object>raw)
    # As in encode_binary: small values keep the GIL (F(n) for n < NOGIL_MIN_N has < 4200 digits).
    if size < 20000:
        mpz_get_str(buf, 10, z)
    else:
        with nogil:
            mpz_get_str(buf, 10, z)
    cdef Py_ssize_t used = <Py_ssize_t>strlen(buf)
    if used != size:
        _PyBytes_Resize(&raw, used)  # frees the object and raises on failure
    cdef object out = <object>raw  # takes a second reference...
    Py_DECREF(out)                 # ...so give back the one _bytes_new made
    return out


cdef bytes encode_binary(mpz_srcptr z):
    """z >= 0 as unsigned big-endian bytes of minimal length; zero is one 0x00 byte."""
    cdef size_t count = (mpz_sizeinbase(z, 2) + 7) // 8
    cdef object out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>count)
    cdef char *buf = PyBytes_AS_STRING(out)
    buf[0] = 0  # mpz_export writes nothing for zero
    # Small values (all that _fib_small makes) keep the GIL, which also guards
    # the shared small-n temporaries.
    if count < 8192:
        mpz_export(buf, &count, 1, 1, 1, 0, z)
    else:
        with nogil:
            mpz_export(buf, &count, 1, 1, 1, 0, z)
    return out


def fib_encoded(n, fmt="decimal"):
    """F(n) encoded for a protocol v1 reply: ``fmt`` is "decimal" or "binary".

    The bytes are written straight from the GMP integer (``mpz_get_str`` or
    ``mpz_export``), with no Python int in between.
    """
    cdef bint binary
    if fmt == "binary":
        binary = True
    elif fmt == "decimal":
        binary = False
    else:
        raise ValueError(f"fmt must be 'decimal' or 'binary', not {fmt!r}")
    cdef unsigned long un = _check_n(n)
    cdef mpz_t z
    if un < NOGIL_MIN_N:
        _fib_small(_small_out, un)
        return encode_binary(_small_out) if binary else encode_decimal(_small_out)
    mpz_init2(z, 64)
    try:
        with nogil:
            fib_into(z, un)
        return encode_binary(z) if binary else encode_decimal(z)
    finally:
        mpz_clear(z)


def encode(z, fmt="decimal"):
    """Encode a non-negative integer (int or ``gmpy2.mpz``) the way :func:`fib_encoded` does."""
    cdef mpz v = z if MPZ_Check(z) else mpz(z)
    if v < 0:
        raise ValueError("only non-negative integers can be encoded")
    if fmt == "binary":
        return encode_binary(MPZ(v))
    if fmt == "decimal":
        return encode_decimal(MPZ(v))
    raise ValueError(f"fmt must be 'decimal' or 'binary', not {fmt!r}")


def gmp_library_version():
    """The version of the GMP library this extension is linked to (GMP's ``gmp_version``)."""
    return gmp_version.decode("ascii")
