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

With ``threads=2`` the two squarings of a step run on two threads, and the
last step squares F[k] and F[k-1] side by side instead of multiplying
(docs/kernel.md).
"""

# The kernel needs a 64-bit unsigned long: the n <= 93 table goes through
# mpz_set_ui and size estimates are unsigned long. Elsewhere results would be
# silently wrong, so the build stops (tests/test_build_guard.py).
cdef extern from *:
    """
    #include <limits.h>
    #if !defined(ULONG_MAX) || ULONG_MAX != 0xFFFFFFFFFFFFFFFFUL
    #error "fastfib needs a 64-bit unsigned long (an LP64 platform such as x86_64 or aarch64 Linux): the kernel would compute wrong results with this compiler's 32-bit unsigned long"
    #endif
    """

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongAndOverflow
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.stdlib cimport free, malloc
from libc.string cimport strlen

from gmpy2 cimport *

from posix.signal cimport SIG_SETMASK, sigfillset
from posix.time cimport nanosleep, timespec
from posix.types cimport sigset_t

import time

from fastfib.errors import FibRangeError

cdef extern from "gmp.h":
    const char *gmp_version
    size_t mpz_size(mpz_srcptr) nogil
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
    void mpz_mul_ui(mpz_ptr, mpz_srcptr, unsigned long) nogil
    void mpz_submul_ui(mpz_ptr, mpz_srcptr, unsigned long) nogil
    size_t mpz_sizeinbase(mpz_srcptr, int) nogil
    char *mpz_get_str(char *, int, mpz_srcptr) nogil
    void *mpz_export(void *, size_t *, int, size_t, int, size_t, mpz_srcptr) nogil
    ctypedef long mp_size_t
    mp_limb_t *mpz_limbs_modify(mpz_ptr, mp_size_t) nogil
    size_t mpn_get_str(unsigned char *, int, mp_limb_t *, mp_size_t) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t *, const pthread_attr_t *, void *(*)(void *) noexcept nogil, void *)
    int pthread_attr_init(pthread_attr_t *)
    int pthread_attr_destroy(pthread_attr_t *)
    int pthread_attr_setdetachstate(pthread_attr_t *, int)
    enum: PTHREAD_CREATE_DETACHED
    int pthread_sigmask(int, const sigset_t *, sigset_t *)

cdef extern from *:
    """
    #include <gmp.h>
    #include <string.h>

    /* z >= 0 as `count` big-endian bytes, count = ceil(bits/8) >= 1. mpz_export
       with 1-byte words goes byte by byte through a generic loop (about 34
       instructions a byte); whole 64-bit limbs byte-swapped cost about one. */
    static void fastfib_write_be(unsigned char *dst, size_t count, mpz_srcptr z) {
    #if GMP_LIMB_BITS == 64 && GMP_NAIL_BITS == 0 && defined(__GNUC__)
        size_t nlimbs = mpz_size(z), i;
        const mp_limb_t *limbs = mpz_limbs_read(z);
        unsigned char *p = dst + count;
        mp_limb_t top;
        if (nlimbs == 0) {
            dst[0] = 0;
            return;
        }
        for (i = 0; i + 1 < nlimbs; i++) {
            unsigned long long v = __builtin_bswap64((unsigned long long)limbs[i]);
            p -= 8;
            memcpy(p, &v, 8);
        }
        for (top = limbs[nlimbs - 1]; p > dst; top >>= 8)
            *--p = (unsigned char)top;
    #else
        dst[0] = 0;  /* mpz_export writes nothing for zero */
        mpz_export(dst, &count, 1, 1, 1, 0, z);
    #endif
    }

    /* Digits 0..9 (as mpn_get_str writes them) to ASCII, in place. */
    static void fastfib_to_ascii(unsigned char *p, size_t len) {
        size_t i;
        for (i = 0; i < len; i++)
            p[i] += '0';
    }

    /* A flag that one thread at a time holds: 1 if this call took it. */
    static inline int fastfib_take(int *busy) { return __atomic_exchange_n(busy, 1, __ATOMIC_ACQUIRE) == 0; }
    static inline void fastfib_give(int *busy) { __atomic_store_n(busy, 0, __ATOMIC_RELEASE); }
    static inline size_t fastfib_alloc_bits(mpz_srcptr z) { return (size_t)z->_mp_alloc * GMP_NUMB_BITS; }
    """
    void fastfib_write_be(unsigned char *, size_t, mpz_srcptr) nogil
    void fastfib_to_ascii(unsigned char *, size_t) nogil
    bint fastfib_take(int *) nogil
    void fastfib_give(int *) nogil
    size_t fastfib_alloc_bits(mpz_srcptr) nogil

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

# ---------------------------------------------------------------------------
# Two threads: the calling thread and one helper thread per call.
#
# Each doubling step squares two independent numbers, F[m] and F[m-1]: the
# helper squares one while the calling thread squares the other. The last
# step, one product on one thread, becomes the two squares of F[k] and F[k-1],
# one on each thread (a square costs less than either half of the product split
# in two: docs/kernel.md).
#
# The helper is created per call and exits at its end (no thread outlives a
# call, so fork() and interpreter shutdown have nothing to deal with). Products
# are handed over one at a time:
#
# - the caller *offers* a product, computes its own, then tries to *claim* the
#   offered one back: if the helper has not started it (not scheduled yet, the
#   other core busy), the caller computes it too, so a late helper costs no
#   waiting;
# - each side waits for the other by spinning for a while (waking a sleeping
#   thread takes tens of microseconds in this VM) and then sleeping on a
#   semaphore;
# - the last step uses the two squares only if the helper is spinning at that
#   moment: both on one thread would cost about 1.3 products.
#
# GMP allocates through malloc here (gmpy2 keeps GMP's default memory
# functions; a test checks), which is thread-safe. The two threads never write
# the same mpz_t; reading one from two threads at once is safe in GMP.
# ---------------------------------------------------------------------------

cdef extern from *:
    """
    #include <sched.h>
    #include <semaphore.h>
    #include <time.h>

    /* A one-waiter, one-setter event: spin a little, then sleep on a semaphore. */
    typedef struct {
        int flag;       /* 1 once set, until the waiter consumes it */
        int sleeping;   /* 1 while the waiter is (about to be) blocked on sem */
        sem_t sem;
    } fastfib_event;

    static int fastfib_event_init(fastfib_event *e) {
        e->flag = 0;
        e->sleeping = 0;
        return sem_init(&e->sem, 0, 0);
    }

    static void fastfib_event_destroy(fastfib_event *e) { sem_destroy(&e->sem); }

    static void fastfib_event_set(fastfib_event *e) {
        /* Dekker-style with the waiter's sleeping/flag pair (both seq_cst): at
           least one side sees the other's store, so no wake-up is lost. A post
           that is not needed only makes the waiter look at the flag again. */
        __atomic_store_n(&e->flag, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&e->sleeping, __ATOMIC_SEQ_CST))
            sem_post(&e->sem);
    }

    static inline long long fastfib_load_ll(long long *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

    static inline void fastfib_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }

    static inline long long fastfib_now_ns(void) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
    }

    /* Wait for e to be set: spin up to spin_ns, then sleep. After the first
       20 us the spin yields the CPU at each look, so that a thread that shares
       this core (the other thread of the call, or another process) runs.
       While spinning, *beat (if not NULL) is kept at the current time, so
       that the other thread can tell that this one is on a CPU right now. */
    static void fastfib_event_wait(fastfib_event *e, long long spin_ns, long long *beat) {
        if (!__atomic_load_n(&e->flag, __ATOMIC_ACQUIRE)) {
            long long now = fastfib_now_ns(), deadline = now + spin_ns, polite = now + 20000;
            unsigned int i = 0;
            while (!__atomic_load_n(&e->flag, __ATOMIC_ACQUIRE)) {
                fastfib_cpu_relax();
                if ((++i & 63) != 0)
                    continue;
                now = fastfib_now_ns();
                if (beat)
                    __atomic_store_n(beat, now, __ATOMIC_RELAXED);
                if (now > polite)
                    sched_yield();
                if (now > deadline) {
                    __atomic_store_n(&e->sleeping, 1, __ATOMIC_SEQ_CST);
                    /* A signal (EINTR) or an unneeded post: look at the flag again. */
                    while (!__atomic_load_n(&e->flag, __ATOMIC_SEQ_CST))
                        sem_wait(&e->sem);
                    __atomic_store_n(&e->sleeping, 0, __ATOMIC_SEQ_CST);
                    break;
                }
            }
        }
        __atomic_store_n(&e->flag, 0, __ATOMIC_SEQ_CST);
    }

    /* The offered product goes to whichever thread swaps 1 in first. */
    static inline void fastfib_offer(int *p) { __atomic_store_n(p, 0, __ATOMIC_SEQ_CST); }
    static inline int fastfib_claim(int *p) { return __atomic_exchange_n(p, 1, __ATOMIC_SEQ_CST) == 0; }
    static inline int fastfib_is_set(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void fastfib_set(int *p) { __atomic_store_n(p, 1, __ATOMIC_SEQ_CST); }
    /* The caller and the helper each drop one reference; the last frees. */
    static inline int fastfib_release(int *refs) { return __atomic_sub_fetch(refs, 1, __ATOMIC_ACQ_REL) == 0; }
    static inline void fastfib_count(int *p) { __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    """
    ctypedef struct fastfib_event:
        pass
    int fastfib_event_init(fastfib_event *) nogil
    void fastfib_event_destroy(fastfib_event *) nogil
    void fastfib_event_set(fastfib_event *) nogil
    void fastfib_event_wait(fastfib_event *, long long, long long *) nogil
    long long fastfib_load_ll(long long *) nogil
    void fastfib_offer(int *) nogil
    bint fastfib_claim(int *) nogil
    bint fastfib_is_set(int *) nogil
    void fastfib_set(int *) nogil
    bint fastfib_release(int *) nogil
    void fastfib_count(int *) nogil
    long long fastfib_now_ns() nogil


cdef struct Helper:
    pthread_t tid
    fastfib_event go        # set by the caller: a product is offered, or quit is set
    fastfib_event done      # set by the helper: the product it claimed is written
    int claimed             # 0 while the offered product is not taken
    int quit
    int refs                # the caller's and the helper's: the last one out frees
    long long beat          # CLOCK_MONOTONIC ns, kept current while the helper spins
    mpz_ptr dst
    mpz_srcptr x
    mpz_srcptr y

cdef enum:
    # Doubling steps on F[m] with m below this run on one thread even when two
    # are asked for: handing a product over costs more than sharing a product
    # of numbers this small saves. Measured: docs/kernel.md.
    PAR_MIN_M = 20000
    # threads >= 2 never starts a helper thread below this n (the first rung of
    # the calibration ladder); from it on, only at or above the threshold that
    # the calibration found on this machine (_threads_threshold).
    THREADS_MIN = 1 << 17
    # The ladder's top rung.
    CAL_TOP_N = 1 << 21
    # The calibration stops measuring after this long (the rungs double in cost).
    CAL_BUDGET_NS = 60000000
    # Two threads win a rung when they take at most this percentage of one
    # thread's time: a clear margin, so that noise alone does not make a win.
    CAL_WIN_PCT = 90
    CAL_MAX_RUNGS = 8
    # A waiting thread spins this long (plus SPIN_NS_PER_LIMB per limb of the
    # last product, as the caller's linear work between two steps grows with
    # it), then sleeps: waking a sleeping thread costs tens of microseconds.
    SPIN_NS = 200000
    SPIN_NS_PER_LIMB = 20
    # The helper's heartbeat is at most this old while it spins (it beats every 64 pauses).
    BEAT_FRESH_NS = 20000

cdef long long RECAL_FIRST_NS = 5000000000LL   # a "never" is measured again 5 s later,
cdef long long RECAL_MAX_NS = 600000000000LL   # then 10 s, 20 s, ... at most 10 min apart

# The threshold when two threads won on no rung: above every n, so that threads >= 2 then
# costs what one thread does at every size (ULONG_MAX itself means "being calibrated").
cdef unsigned long CAL_NEVER_N = <unsigned long>-2
#: What :func:`threads_min_n` returns when two threads won on no rung: they are never used.
THREADS_NEVER = CAL_NEVER_N

#: ``threads`` >= 2 is never used below this n; at or above it, only from the
#: threshold calibrated on this machine (:func:`threads_min_n`).
THREADS_MIN_N = THREADS_MIN
# For the tests: the step threshold and the GIL threshold.
_PAR_MIN_M = PAR_MIN_M
_NOGIL_MIN_N = NOGIL_MIN_N

# Helper threads started by this process (for the tests: _helpers_started).
cdef int _helper_count = 0
# Last steps computed as two squares on two threads, odd n and even n (for the tests: _squared_last_steps).
cdef int _squared_odd = 0
cdef int _squared_even = 0

# Tests only (_set_helper_delay): the helper sleeps this long before it claims
# a product, so that the caller takes products back and stale wake-ups happen.
cdef long long _helper_delay_ns = 0


def _set_helper_delay(long long ns):
    """Tests only: delay the helper by ``ns`` before each claim (0 turns it off)."""
    global _helper_delay_ns
    _helper_delay_ns = ns


# Tests only (_set_helper_stall): the helper sleeps this long after it claims a
# product, as if the system had taken its core away, so that the caller waits.
cdef long long _helper_stall_ns = 0


def _set_helper_stall(long long ns):
    """Tests only: stall the helper by ``ns`` after each claim (0 turns it off)."""
    global _helper_stall_ns
    _helper_stall_ns = ns


cdef void _sleep_ns(long long ns) noexcept nogil:
    cdef timespec t
    t.tv_sec = ns // 1000000000
    t.tv_nsec = ns % 1000000000
    nanosleep(&t, NULL)


cdef void _helper_free(Helper *h) noexcept nogil:
    fastfib_event_destroy(&h.go)
    fastfib_event_destroy(&h.done)
    free(h)


cdef void *_helper_main(void *arg) noexcept nogil:
    cdef Helper *h = <Helper *>arg
    cdef long long spin = SPIN_NS
    while True:
        fastfib_event_wait(&h.go, spin, &h.beat)
        if fastfib_is_set(&h.quit):
            break
        if _helper_delay_ns:
            _sleep_ns(_helper_delay_ns)
        # A wake-up may find nothing (the caller took that product itself, or
        # only nudged this thread to keep spinning): only a successful claim
        # makes the product ours, and then done is set.
        if fastfib_claim(&h.claimed):
            # The caller's linear work until the next offer grows with the size.
            spin = SPIN_NS + SPIN_NS_PER_LIMB * <long long>mpz_size(h.x)
            if _helper_stall_ns:
                _sleep_ns(_helper_stall_ns)
            mpz_mul(h.dst, h.x, h.y)
            fastfib_event_set(&h.done)
    if fastfib_release(&h.refs):
        _helper_free(h)
    return NULL


cdef Helper *_helper_start() noexcept nogil:
    """A new helper thread, or NULL if none could be made (the caller then works alone)."""
    cdef sigset_t every, old
    cdef pthread_attr_t attr
    cdef int rc
    cdef Helper *h = <Helper *>malloc(sizeof(Helper))
    if h == NULL:
        return NULL
    h.quit = 0
    h.claimed = 1
    h.refs = 2
    h.beat = 0
    if fastfib_event_init(&h.go) != 0:
        free(h)
        return NULL
    if fastfib_event_init(&h.done) != 0:
        fastfib_event_destroy(&h.go)
        free(h)
        return NULL
    # Detached: stopping it never waits for it to be scheduled (a join could
    # cost a time slice when the other core is busy).
    pthread_attr_init(&attr)
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED)
    # The helper blocks every signal, so that signals (SIGINT, SIGTERM for the
    # server) keep going to the threads Python knows about.
    sigfillset(&every)
    pthread_sigmask(SIG_SETMASK, &every, &old)
    rc = pthread_create(&h.tid, &attr, _helper_main, h)
    if rc == 0:
        fastfib_count(&_helper_count)
    pthread_sigmask(SIG_SETMASK, &old, NULL)
    pthread_attr_destroy(&attr)
    if rc != 0:
        _helper_free(h)
        return NULL
    return h


cdef void _helper_stop(Helper *h) noexcept nogil:
    """Tell the helper to exit, and drop the caller's reference to ``h``."""
    fastfib_set(&h.quit)
    fastfib_event_set(&h.go)
    if fastfib_release(&h.refs):
        _helper_free(h)


cdef inline void _mul2(Helper *h, mpz_ptr d1, mpz_srcptr x1, mpz_srcptr y1,
                       mpz_ptr d2, mpz_srcptr x2, mpz_srcptr y2) noexcept nogil:
    """d1 = x1 y1 and d2 = x2 y2; the second on the helper thread if ``h`` is not NULL."""
    if h == NULL:
        mpz_mul(d1, x1, y1)
        mpz_mul(d2, x2, y2)
        return
    h.dst = d2
    h.x = x2
    h.y = y2
    fastfib_offer(&h.claimed)
    fastfib_event_set(&h.go)
    mpz_mul(d1, x1, y1)
    # If the helper has not started on its product, take it back rather than wait.
    if fastfib_claim(&h.claimed):
        mpz_mul(d2, x2, y2)
    else:
        fastfib_event_wait(&h.done, SPIN_NS + SPIN_NS_PER_LIMB * <long long>mpz_size(x1), NULL)


cdef inline bint _helper_ready(Helper *h) noexcept nogil:
    """Whether the helper is spinning on a CPU right now (its heartbeat is fresh), ready to take a product."""
    return h != NULL and fastfib_now_ns() - fastfib_load_ll(&h.beat) <= BEAT_FRESH_NS


cdef int fib_into(mpz_ptr out, unsigned long n, int threads=1) except -1 nogil:
    """Set ``out`` to F(n), on up to two threads. Bounds are the caller's job. Needs no GIL."""
    cdef mpz_t fk, fk1, a, b
    cdef mp_bitcnt_t bits
    cdef Helper *h = NULL
    if n <= FIB_TABLE_MAX:
        mpz_set_ui(out, FIB_TABLE[n])
        return 0
    # Sized up front for the largest intermediate (F[n/2] has about 0.347 n
    # bits, its square twice that), so GMP never reallocates mid-way.
    bits = _work_bits(n)
    cdef long long start = 0
    cdef bint two = False
    if n >= THREADS_MIN:
        if threads >= 2:  # the calibration, when this call makes it, is not part of its timing
            two = _adapt_two(n, _prior_two(n))
        start = fastfib_now_ns()
        if two:  # if the system refuses a thread, the same result is computed on this one
            h = _helper_start()
    if n <= SCRATCH_MAX_N and fastfib_take(&_scratch_busy):
        _reserve(_scratch_fk, bits)
        _reserve(_scratch_fk1, bits)
        _reserve(_scratch_a, bits)
        _reserve(_scratch_b, bits)
        _doubling(out, n, _scratch_fk, _scratch_fk1, _scratch_a, _scratch_b, h)
        fastfib_give(&_scratch_busy)
    else:
        mpz_init2(fk, bits)
        mpz_init2(fk1, bits)
        mpz_init2(a, bits)
        mpz_init2(b, bits)
        _doubling(out, n, fk, fk1, a, b, h)
        mpz_clear(fk)
        mpz_clear(fk1)
        mpz_clear(a)
        mpz_clear(b)
    if h != NULL:
        _helper_stop(h)
    if start:
        _adapt_record(n, h != NULL, fastfib_now_ns() - start)
    return 0


# ---------------------------------------------------------------------------
# Two threads where they are measured faster, size by size, as the process runs.
#
# What two threads save can change within minutes on the same machine
# (docs/kernel.md), so every call with n >= THREADS_MIN_N is timed (wall
# clock, helper start included) and kept, per power of two of n, as a moving
# average of its cost per unit of n, for one thread and for two; threads=1
# calls feed the one-thread side. A threads >= 2 call uses two threads when
# their average is at most ADAPT_WIN_PCT % of one thread's; until both sides
# have ADAPT_MIN_SAMPLES, the calibrated threshold decides. To keep both
# averages current, the first calls of a size alternate (unless the side not
# preferred has its samples already); after that a call takes the other side
# ADAPT_EXPLORE calls after the preference was set, then twice, four times ...
# that gap later, up to ADAPT_EXPLORE_MAX calls apart, for as long as the
# preference holds: a side that loses by a lot costs little. A call on the
# other side that beats the preferred average brings the next ones closer
# (_adapt_record); a change of preference starts over.
# ---------------------------------------------------------------------------

cdef enum:
    ADAPT_FIRST_BUCKET = 17        # log2(THREADS_MIN)
    ADAPT_BUCKETS = 14             # 2^17 .. 2^30 (MAX_N is below 2^30)
    ADAPT_MIN_SAMPLES = 2
    ADAPT_EXPLORE = 8
    ADAPT_EXPLORE_MAX = 256
    ADAPT_WIN_PCT = 97
    ADAPT_WEIGHT_SHIFT = 2         # the newest call weighs 1/4

cdef extern from *:
    """
    static inline long long fastfib_relaxed_load(long long *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void fastfib_relaxed_store(long long *p, long long v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline long long fastfib_relaxed_add(long long *p, long long v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline int fastfib_log2(unsigned long n) { return 63 - __builtin_clzl(n); }
    """
    int fastfib_log2(unsigned long) nogil
    long long fastfib_relaxed_load(long long *) nogil
    void fastfib_relaxed_store(long long *, long long) nogil
    long long fastfib_relaxed_add(long long *, long long) nogil

# Per bucket: [one thread, two threads] cost (ns * 4096 / n, a moving average) and sample counts,
# and the threads >= 2 calls seen. Updates from concurrent calls may be lost: each is a hint.
cdef long long _adapt_cost[ADAPT_BUCKETS][2]
cdef long long _adapt_samples[ADAPT_BUCKETS][2]
cdef long long _adapt_calls[ADAPT_BUCKETS]
cdef long long _adapt_pref[ADAPT_BUCKETS]      # the last preference + 1 (0: none yet)
cdef long long _adapt_gap[ADAPT_BUCKETS]       # calls between explorations
cdef long long _adapt_next[ADAPT_BUCKETS]      # the call count of the next exploration
cdef int _adapt_on = 1


cdef inline int _adapt_bucket(unsigned long n) noexcept nogil:
    cdef int b = fastfib_log2(n) - ADAPT_FIRST_BUCKET
    return min(max(b, 0), ADAPT_BUCKETS - 1)


cdef bint _adapt_two(unsigned long n, bint prior) noexcept nogil:
    """Whether a threads >= 2 call of this n runs on two threads (``prior``: the calibration's answer)."""
    cdef int b
    cdef long long calls, one, two, gap
    cdef bint prefer, explore = False
    if not fastfib_load_int(&_adapt_on):
        return prior
    b = _adapt_bucket(n)
    calls = fastfib_relaxed_add(&_adapt_calls[b], 1)
    if (fastfib_relaxed_load(&_adapt_samples[b][0]) >= ADAPT_MIN_SAMPLES
            and fastfib_relaxed_load(&_adapt_samples[b][1]) >= ADAPT_MIN_SAMPLES):
        one = fastfib_relaxed_load(&_adapt_cost[b][0])
        two = fastfib_relaxed_load(&_adapt_cost[b][1])
        prefer = two * 100 <= one * ADAPT_WIN_PCT
    else:
        prefer = prior
    if calls < 2 * ADAPT_MIN_SAMPLES:
        # threads=1 calls may already have measured one thread: then it need not be tried
        explore = calls % 2 == 1 and fastfib_relaxed_load(&_adapt_samples[b][not prefer]) < ADAPT_MIN_SAMPLES
    elif fastfib_relaxed_load(&_adapt_pref[b]) != prefer + 1:
        fastfib_relaxed_store(&_adapt_pref[b], prefer + 1)
        fastfib_relaxed_store(&_adapt_gap[b], ADAPT_EXPLORE)
        fastfib_relaxed_store(&_adapt_next[b], calls + ADAPT_EXPLORE)
    elif calls >= fastfib_relaxed_load(&_adapt_next[b]):
        gap = min(2 * fastfib_relaxed_load(&_adapt_gap[b]), ADAPT_EXPLORE_MAX)
        fastfib_relaxed_store(&_adapt_gap[b], gap)
        fastfib_relaxed_store(&_adapt_next[b], calls + gap)
        explore = True
    return prefer != explore


cdef bint _prior_two(unsigned long n) noexcept nogil:
    """The calibration's answer for n, before calls of its size have measured both sides.

    Above the ladder's top the calibration measured nothing; there a "never" does not
    hold, as two threads gain with the size, and the first calls of the size decide.
    """
    cdef unsigned long t = _threads_threshold()
    return n >= t or (t == CAL_NEVER_N and n > 2 * CAL_TOP_N)


cdef void _adapt_record(unsigned long n, bint two, long long wall_ns) noexcept nogil:
    cdef int b = _adapt_bucket(n)
    cdef long long cost = wall_ns * 4096 // <long long>n, old, pref
    if fastfib_relaxed_add(&_adapt_samples[b][two], 1) == 0:
        fastfib_relaxed_store(&_adapt_cost[b][two], cost)
    else:
        old = fastfib_relaxed_load(&_adapt_cost[b][two])
        fastfib_relaxed_store(&_adapt_cost[b][two], old + ((cost - old) >> ADAPT_WEIGHT_SHIFT))
    # A call on the side not preferred that beat the preferred side's average: look again at once,
    # then 2, 4 ... calls later, so that a change of the machine is followed within a few calls
    # (each sample moves the average a quarter of the way) rather than a few long gaps.
    pref = fastfib_relaxed_load(&_adapt_pref[b]) - 1
    if pref >= 0 and two != pref and cost * 100 <= fastfib_relaxed_load(&_adapt_cost[b][pref]) * ADAPT_WIN_PCT:
        fastfib_relaxed_store(&_adapt_gap[b], 1)
        fastfib_relaxed_store(&_adapt_next[b], fastfib_relaxed_load(&_adapt_calls[b]))


def threads_adaptation():
    """Per power of two of n (from THREADS_MIN_N): what the kernel measured of one and two threads.

    A list of dicts: ``n_from``, ``one_cost`` and ``two_cost`` (moving averages of ns * 4096 / n;
    None before a sample), ``one_samples``, ``two_samples`` and ``calls`` (threads >= 2 calls).
    """
    out = []
    for b in range(ADAPT_BUCKETS):
        k1, k2 = _adapt_samples[b][0], _adapt_samples[b][1]
        if k1 or k2 or _adapt_calls[b]:
            out.append({"n_from": 1 << (b + ADAPT_FIRST_BUCKET),
                        "one_cost": _adapt_cost[b][0] if k1 else None, "two_cost": _adapt_cost[b][1] if k2 else None,
                        "one_samples": k1, "two_samples": k2, "calls": _adapt_calls[b]})
    return out


def _set_adaptation(bint on, bint forget=True):
    """Tests only: turn the size-by-size choice off (the calibrated threshold alone decides) or on;
    ``forget`` drops what was measured."""
    cdef int b
    fastfib_store_int(&_adapt_on, on)
    if forget:
        for b in range(ADAPT_BUCKETS):
            for k in range(2):
                fastfib_relaxed_store(&_adapt_cost[b][k], 0)
                fastfib_relaxed_store(&_adapt_samples[b][k], 0)
            fastfib_relaxed_store(&_adapt_calls[b], 0)
            fastfib_relaxed_store(&_adapt_pref[b], 0)


def _adapt_feed(unsigned long n, bint two, long long wall_ns):
    """Tests only: record a call of this n on one or two threads that took ``wall_ns``."""
    _adapt_record(n, two, wall_ns)


def _adapt_choice(unsigned long n, bint prior):
    """Tests only: whether the next threads >= 2 call of this n runs on two threads (and count it as one)."""
    return _adapt_two(n, prior)


cdef inline mp_bitcnt_t _work_bits(unsigned long n) noexcept nogil:
    """Bits for each temporary of F(n) (and for F(n) itself): F[n/2]^2 has about 0.694 n."""
    return (n >> 1) * 1389 // 1000 + 128


cdef inline void _reserve(mpz_ptr z, mp_bitcnt_t bits) noexcept nogil:
    """Make room for ``bits`` in ``z``, dropping its value (no copy of the old limbs)."""
    if fastfib_alloc_bits(z) < bits:
        mpz_clear(z)
        mpz_init2(z, bits)


# Scratch numbers reused from call to call for n <= SCRATCH_MAX_N (about 0.9 MB
# at most, kept for the life of the process). Fresh temporaries of this size
# come from the top of the heap, which free() gives back to the system, so each
# call paid page faults for them (15 a call over n in [10^5, 10^6], 2% of the
# time; gmpy2.fib's temporaries live on the stack). One caller at a time holds
# a set (the flag); a concurrent call allocates its own.
cdef enum:
    SCRATCH_MAX_N = 1 << 21
cdef int _scratch_busy = 0
cdef int _out_busy = 0
cdef mpz_t _scratch_fk, _scratch_fk1, _scratch_a, _scratch_b, _scratch_out
mpz_init2(_scratch_fk, 64)
mpz_init2(_scratch_fk1, 64)
mpz_init2(_scratch_a, 64)
mpz_init2(_scratch_b, 64)
mpz_init2(_scratch_out, 64)


# ---------------------------------------------------------------------------
# Where two threads start to pay, calibrated once per process.
#
# The crossover depends on the machine (core speed, caches, how fast a thread
# starts and wakes up) and moved between days on the same VM, so a constant
# tuned on one machine made threads=2 slower than threads=1 on another. At the
# first call with threads >= 2 and n >= THREADS_MIN_N, the calling thread times
# F(n) on one and on two threads at n = 2^17, 2^18, ... 2^21 (interleaved,
# the best of three each, so that a burst of load from elsewhere does not
# decide), and stops at the first two rungs in a row where two threads win by
# 10%, or after CAL_BUDGET_NS. Other callers use one thread meanwhile: never a
# wait. The threshold reflects the machine at that moment: a second core that
# other processes take later makes threads=2 cost a few percent more (the
# caller takes back the products the helper has not started), and the
# size-by-size averages above take over. A calibration that found no win is not final: a
# moment when the other core was taken would otherwise cost two threads for
# the life of the process. The first eligible call RECAL_FIRST_NS later
# measures again, and so on with the delay doubling up to RECAL_MAX_NS.
# ---------------------------------------------------------------------------

cdef extern from *:
    """
    #include <unistd.h>
    static inline int fastfib_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fastfib_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int fastfib_cas_int(int *p, int expected, int desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline unsigned long fastfib_load_ulong(unsigned long *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fastfib_store_ulong(unsigned long *p, unsigned long v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline long long fastfib_load_when(long long *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fastfib_store_when(long long *p, long long v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int fastfib_load_int(int *) nogil
    void fastfib_store_int(int *, int) nogil
    bint fastfib_cas_int(int *, int, int) nogil
    unsigned long fastfib_load_ulong(unsigned long *) nogil
    void fastfib_store_ulong(unsigned long *, unsigned long) nogil
    long long fastfib_load_when(long long *) nogil
    void fastfib_store_when(long long *, long long) nogil
    int getpid() nogil

# _cal_done is set (release) after _threads_min is written. _cal_owner is the
# pid of the process calibrating: a child forked mid-calibration sees its
# parent's pid there and calibrates for itself.
cdef int _cal_done = 0
cdef int _cal_owner = 0
cdef unsigned long _threads_min = CAL_NEVER_N
cdef int _cal_count = 0
cdef unsigned long _cal_n[CAL_MAX_RUNGS]
cdef long long _cal_t1[CAL_MAX_RUNGS]
cdef long long _cal_t2[CAL_MAX_RUNGS]
cdef long long _cal_ns = 0
cdef int _cal_runs = 0

cdef long long LLONG_MAX_ = 0x7fffffffffffffffLL

# A "never" decision is measured again at this CLOCK_MONOTONIC time (LLONG_MAX:
# not at all), by the one thread (pid, as for _cal_owner) that claims _recal_owner.
cdef long long _recal_at_ns = LLONG_MAX_
cdef long long _recal_delay_ns = RECAL_FIRST_NS
cdef int _recal_owner = 0


cdef unsigned long _pick_threshold(int count, unsigned long *ns, long long *t1, long long *t2,
                                   bint ended) noexcept nogil:
    """The threshold from the rungs measured so far, or 0 to measure the next rung.

    Two threads must win on the rung and on every rung above it that was
    measured; two wins in a row decide, one win on the ladder's top rung too.
    """
    cdef int i = count, streak
    while i > 0 and t2[i - 1] * 100 <= t1[i - 1] * CAL_WIN_PCT:
        i -= 1
    streak = count - i
    if streak >= 2 or (streak == 1 and ended):
        return ns[i]
    return CAL_NEVER_N if ended else 0


cdef long long _time_fib(unsigned long n, bint two, mpz_ptr out, mpz_ptr fk, mpz_ptr fk1,
                         mpz_ptr a, mpz_ptr b) noexcept nogil:
    cdef long long t0 = fastfib_now_ns()
    cdef Helper *h = _helper_start() if two else NULL
    _doubling(out, n, fk, fk1, a, b, h)
    if h != NULL:
        _helper_stop(h)
    return fastfib_now_ns() - t0


cdef unsigned long _calibrate() noexcept nogil:
    """Time one thread against two on the ladder (see above); returns the threshold."""
    global _cal_count, _cal_ns, _cal_runs
    cdef unsigned long rung_n[CAL_MAX_RUNGS]
    cdef long long rung_t1[CAL_MAX_RUNGS]
    cdef long long rung_t2[CAL_MAX_RUNGS]
    cdef mpz_t out, fk, fk1, a, b
    cdef mp_bitcnt_t bits = _work_bits(CAL_TOP_N)
    cdef unsigned long n = THREADS_MIN, found = 0
    cdef long long start = fastfib_now_ns(), x, y
    cdef int i = 0, r
    cdef bint ended
    mpz_init2(out, bits)
    mpz_init2(fk, bits)
    mpz_init2(fk1, bits)
    mpz_init2(a, bits)
    mpz_init2(b, bits)
    while found == 0:
        x = y = 1LL << 62
        for r in range(6):  # one, two, two, one, one, two
            if r == 0 or r == 3 or r == 4:
                x = min(x, _time_fib(n, False, out, fk, fk1, a, b))
            else:
                y = min(y, _time_fib(n, True, out, fk, fk1, a, b))
        rung_n[i] = n
        rung_t1[i] = x
        rung_t2[i] = y
        i += 1
        n <<= 1
        ended = n > CAL_TOP_N or i == CAL_MAX_RUNGS
        found = _pick_threshold(i, rung_n, rung_t1, rung_t2, ended)
        # The next rung costs about twice this one's six runs: out of time, an
        # undecided calibration keeps one thread below the ladder's top.
        if found == 0 and fastfib_now_ns() - start + 2 * 3 * (x + y) > CAL_BUDGET_NS:
            found = CAL_NEVER_N
    mpz_clear(out)
    mpz_clear(fk)
    mpz_clear(fk1)
    mpz_clear(a)
    mpz_clear(b)
    for r in range(i):
        _cal_n[r] = rung_n[r]
        _cal_t1[r] = rung_t1[r]
        _cal_t2[r] = rung_t2[r]
    _cal_count = i
    _cal_ns = fastfib_now_ns() - start
    _cal_runs += 1
    return found


cdef void _decide(unsigned long found) noexcept nogil:
    """Publish a calibration's threshold; after a "never", schedule the next measurement."""
    global _recal_delay_ns
    fastfib_store_ulong(&_threads_min, found)
    if found == CAL_NEVER_N:
        fastfib_store_when(&_recal_at_ns, fastfib_now_ns() + _recal_delay_ns)
        _recal_delay_ns = min(2 * _recal_delay_ns, RECAL_MAX_NS)
    else:
        fastfib_store_when(&_recal_at_ns, LLONG_MAX_)


cdef unsigned long _recalibrate() noexcept nogil:
    """Measure a "never" again once it is due; one thread does, the others go on with one thread."""
    cdef unsigned long t = fastfib_load_ulong(&_threads_min)
    cdef int owner, me
    if t != CAL_NEVER_N or fastfib_now_ns() < fastfib_load_when(&_recal_at_ns):
        return t
    owner = fastfib_load_int(&_recal_owner)
    me = getpid()
    if owner == me or not fastfib_cas_int(&_recal_owner, owner, me):
        return t
    # Claimed; check again: the previous owner may have just measured and rescheduled.
    if fastfib_load_ulong(&_threads_min) == CAL_NEVER_N and fastfib_now_ns() >= fastfib_load_when(&_recal_at_ns):
        _decide(_calibrate())
    fastfib_store_int(&_recal_owner, 0)
    return fastfib_load_ulong(&_threads_min)


cdef unsigned long _threads_threshold() noexcept nogil:
    """The calibrated threshold; calibrates on first use; -1 (never) while another thread calibrates."""
    cdef int owner, me
    if fastfib_load_int(&_cal_done):
        return _recalibrate()
    owner = fastfib_load_int(&_cal_owner)
    me = getpid()
    if owner == me or not fastfib_cas_int(&_cal_owner, owner, me):
        return <unsigned long>-1
    _decide(_calibrate())
    fastfib_store_int(&_cal_done, 1)
    return fastfib_load_ulong(&_threads_min)


def threads_min_n():
    """The calibrated threshold: from this n on, ``threads`` >= 2 starts out with a second thread.

    Calibrated on first use (by this call, or by the first ``fib``/``fib_encoded``
    call with ``threads`` >= 2 and n >= THREADS_MIN_N): F(n) is timed on one and
    on two threads at a few sizes, for at most about 60 ms, and two threads are
    used only from the size where they were measured at least 10% faster (on
    two sizes in a row). If they won nowhere, it is :data:`THREADS_NEVER`, above
    every n, and the first such call 5 s later measures again (then 10 s,
    20 s, ... at most 10 minutes apart). The threshold is where the choice
    starts: once calls of a size have measured both, they decide
    (:func:`threads_adaptation`).
    """
    cdef unsigned long t
    _choose_gmp_code()  # the calibration measures the routines the calls will run
    while True:
        with nogil:
            t = _threads_threshold()
        if t != <unsigned long>-1:
            return t
        time.sleep(0.001)  # another thread is calibrating


def threads_calibration():
    """What the calibration measured: ``None`` before it ran, else a dict with
    ``threads_min_n``, ``ms`` and ``rungs`` of the latest calibration (``n``,
    ``one_ns``, ``two_ns`` each: the best of three timings of F(n) on one and on
    two threads), ``runs`` (how many calibrations this process made) and
    ``retry_in_s`` (when a "never" is measured again; ``None``: not at all)."""
    if not fastfib_load_int(&_cal_done):
        return None
    at = fastfib_load_when(&_recal_at_ns)
    return {
        "threads_min_n": fastfib_load_ulong(&_threads_min),
        "ms": _cal_ns / 1e6,
        "rungs": [{"n": _cal_n[i], "one_ns": _cal_t1[i], "two_ns": _cal_t2[i]} for i in range(_cal_count)],
        "runs": _cal_runs,
        "retry_in_s": None if at == LLONG_MAX_ else max(0.0, (at - fastfib_now_ns()) / 1e9),
    }


def _set_threads_min_n(unsigned long n, double retry_in_s=-1.0):
    """Tests only: use ``n`` as the threshold (0: forget it, so that the next use calibrates).

    With ``retry_in_s`` >= 0, a "never" (:data:`THREADS_NEVER`) is measured again that many seconds later.
    """
    global _cal_count, _recal_delay_ns
    _recal_delay_ns = RECAL_FIRST_NS
    fastfib_store_when(&_recal_at_ns, LLONG_MAX_ if retry_in_s < 0 else fastfib_now_ns() + <long long>(retry_in_s * 1e9))
    if n == 0:
        fastfib_store_int(&_cal_done, 0)
        fastfib_store_int(&_cal_owner, 0)
        return
    fastfib_store_ulong(&_threads_min, n)
    _cal_count = 0
    fastfib_store_int(&_cal_done, 1)


def _pick_threshold_for(rungs, bint ended):
    """Tests only: the decision of the calibration on ``rungs`` [(n, one_ns, two_ns), ...]."""
    cdef unsigned long ns[CAL_MAX_RUNGS]
    cdef long long t1[CAL_MAX_RUNGS]
    cdef long long t2[CAL_MAX_RUNGS]
    cdef int i
    if len(rungs) > CAL_MAX_RUNGS:
        raise ValueError("too many rungs")
    for i, (n, one, two) in enumerate(rungs):
        ns[i], t1[i], t2[i] = n, one, two
    return _pick_threshold(len(rungs), ns, t1, t2, ended)


def _helpers_started():
    """Tests only: how many helper threads this process has started."""
    return fastfib_load_int(&_helper_count)


def _squared_last_steps():
    """Tests only: how many last steps were two squares on two threads, as (odd n, even n)."""
    return fastfib_load_int(&_squared_odd), fastfib_load_int(&_squared_even)


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
        _doubling(out, n, _small_fk, _small_fk1, _small_a, _small_b, NULL)


cdef void _doubling(mpz_ptr out, unsigned long n, mpz_ptr fk, mpz_ptr fk1, mpz_ptr a, mpz_ptr b,
                    Helper *h) noexcept nogil:
    """F(n), n > 93, into ``out`` by fast doubling, with four caller-owned temporaries.

    With a helper ``h``, the steps on operands of at least PAR_MIN_M run their
    two products on two threads.
    """
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
        if h != NULL and m >= PAR_MIN_M:
            _mul2(h, a, fk, fk, b, fk1, fk1)   # F[m]^2, F[m-1]^2
            # Wake the helper (if its spin ran out while this thread finished
            # its own square) and restart its spin, so that it is still on a
            # CPU when the next product is offered, after the linear work below.
            fastfib_event_set(&h.go)
        else:
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

    # Last step: F(n) alone from F[k], F[k-1]. On one thread, one multiplication.
    # With a helper ready (spinning on a CPU), the squares of F[k] and F[k-1]
    # instead, one on each thread: a square costs 0.60-0.72 of that product
    # (docs/kernel.md). Only then: both squares on this thread would cost more
    # than the one product.
    if k >= PAR_MIN_M and _helper_ready(h):
        _mul2(h, a, fk, fk, b, fk1, fk1)
        if n & 1:
            # F[2k+1] = 4F[k]^2 - F[k-1]^2 + 2(-1)^k
            mpz_mul_2exp(out, a, 2)
            mpz_sub(out, out, b)
            fastfib_count(&_squared_odd)
        else:
            # F[2k] = F[2k+1] - F[2k-1] = 3F[k]^2 - 2F[k-1]^2 + 2(-1)^k
            mpz_mul_ui(out, a, 3)
            mpz_submul_ui(out, b, 2)
            fastfib_count(&_squared_even)
        if k & 1:
            mpz_sub_ui(out, out, 2)
        else:
            mpz_add_ui(out, out, 2)
    elif n & 1:
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


cdef int _check_threads(object threads) except -1:
    """threads as 1 or 2 (the most the kernel uses), or TypeError / ValueError."""
    cdef long v
    cdef int overflow = 0
    cdef object o = threads
    if type(threads) is not int:
        if isinstance(threads, bool):
            raise TypeError("threads must be an integer, not bool")
        try:
            o = threads.__index__()
        except AttributeError:
            raise TypeError(f"threads must be an integer, not {type(threads).__name__}") from None
    # Exact C conversion: cheap, so that threads=2 costs no more than threads=1 at small n.
    v = PyLong_AsLongAndOverflow(o, &overflow)
    if overflow > 0:
        return 2
    if overflow < 0 or v < 1:
        raise ValueError(f"threads must be at least 1, got {o}")
    return 1 if v == 1 else 2


cdef inline int _threads_of(object threads) except -1:
    # 1 and 2 are cached int objects: the common values cost one compare each.
    if threads is 1:
        return 1
    if threads is 2:
        return 2
    return _check_threads(threads)


# GMP's routines for this CPU (fastfib.gmp_dispatch): chosen once, with the GIL, before the first
# F(n) with n >= NOGIL_MIN_N and before the first calibration, so that both run on them.
cdef bint _gmp_code_chosen = False


cdef inline int _choose_gmp_code() except -1:
    global _gmp_code_chosen
    if not _gmp_code_chosen:
        _gmp_code_chosen = True
        from fastfib import gmp_dispatch
        gmp_dispatch.apply()
    return 0


def fib(n, threads=1):
    """F(n) as a ``gmpy2.mpz``, for 0 <= n <= MAX_N.

    ``threads`` >= 2 computes a large F(n) on two threads, the calling one and
    a helper, at the sizes where two threads were measured faster in this
    process: first from the threshold calibrated at the first such call
    (:func:`threads_min_n`), then from what the calls of each size took
    (:func:`threads_adaptation`). More than two are accepted and mean two.
    Elsewhere it is the one-thread computation. TypeError if ``threads`` is
    not an integer, ValueError if it is below 1.
    """
    cdef unsigned long un = _check_n(n)
    cdef int t = _threads_of(threads)
    cdef mpz result = GMPy_MPZ_New(NULL)
    cdef mpz_ptr z = MPZ(result)
    if un < NOGIL_MIN_N:
        _fib_small(z, un)
    else:
        _choose_gmp_code()
        with nogil:
            fib_into(z, un, t)
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
    return _bytes_final(raw, size, used)


cdef bytes _bytes_final(PyObject *raw, Py_ssize_t size, Py_ssize_t used):
    """The bytes object ``raw`` (an owned reference) cut down to ``used`` bytes."""
    if used != size:
        _PyBytes_Resize(&raw, used)  # frees the object and raises on failure
    cdef object out = <object>raw  # takes a second reference...
    Py_DECREF(out)                 # ...so give back the one _bytes_new made
    return out


cdef bytes _encode_decimal_consuming(mpz_ptr z):
    """z > 0 as ASCII decimal, like encode_decimal, but z's value is destroyed.

    mpn_get_str works on z's own limbs, where mpz_get_str first copies them
    into a fresh temporary (more page faults), and it returns the exact length.
    """
    cdef Py_ssize_t size = <Py_ssize_t>mpz_sizeinbase(z, 10)
    cdef mp_size_t nlimbs = <mp_size_t>mpz_size(z)
    cdef PyObject *raw = _bytes_new(NULL, size)
    cdef unsigned char *buf = <unsigned char *>PyBytes_AS_STRING(<object>raw)
    cdef size_t used
    with nogil:
        used = mpn_get_str(buf, 10, mpz_limbs_modify(z, nlimbs), nlimbs)
        fastfib_to_ascii(buf, used)
    mpz_set_ui(z, 0)  # its limbs hold garbage now
    buf[used] = 0
    return _bytes_final(raw, size, <Py_ssize_t>used)


cdef bytes encode_binary(mpz_srcptr z):
    """z >= 0 as unsigned big-endian bytes of minimal length; zero is one 0x00 byte."""
    cdef size_t count = (mpz_sizeinbase(z, 2) + 7) // 8
    cdef object out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>count)
    fastfib_write_be(<unsigned char *>PyBytes_AS_STRING(out), count, z)
    return out


def fib_encoded(n, fmt="decimal", threads=1):
    """F(n) encoded for a protocol v1 reply: ``fmt`` is "decimal" or "binary".

    The bytes are written straight from the GMP integer's limbs (by
    ``mpn_get_str`` or a byte-swapping copy), with no Python int in between.
    ``threads`` is as for :func:`fib`.
    """
    cdef bint binary
    if fmt == "binary":
        binary = True
    elif fmt == "decimal":
        binary = False
    else:
        raise ValueError(f"fmt must be 'decimal' or 'binary', not {fmt!r}")
    cdef unsigned long un = _check_n(n)
    cdef int t = _threads_of(threads)
    cdef mpz_t own
    cdef mpz_ptr z
    if un < NOGIL_MIN_N:
        _fib_small(_small_out, un)
        return encode_binary(_small_out) if binary else encode_decimal(_small_out)
    _choose_gmp_code()
    # F(n) is a temporary here: reuse the scratch one when it is free.
    cdef bint scratch = un <= SCRATCH_MAX_N and fastfib_take(&_out_busy)
    if scratch:
        z = _scratch_out
        _reserve(z, _work_bits(un))
    else:
        mpz_init2(own, 64)
        z = own
    try:
        with nogil:
            fib_into(z, un, t)
        return encode_binary(z) if binary else _encode_decimal_consuming(z)
    finally:
        if scratch:
            fastfib_give(&_out_busy)
        else:
            mpz_clear(own)


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
