# cython: language_level=3
"""C-level declarations of the kernel, for other Cython modules to cimport."""

from gmpy2 cimport mpz_ptr, mpz_srcptr

cdef extern from "gmp.h":
    ctypedef unsigned long mp_bitcnt_t

cdef int fib_into(mpz_ptr out, unsigned long n, int threads=*) except -1 nogil
cdef bytes encode_decimal(mpz_srcptr z)
cdef bytes encode_binary(mpz_srcptr z)
