/*
 * The nixl:// data path without the GIL: a lane thread that makes every NIXL call of a batch
 * (descriptor lists, createXferReq, postXferReq, polling, release) and a checksum thread that
 * hashes each transfer's values either from the moment the lane takes the transfer up (a put:
 * the hash and the copy read the same bytes within microseconds, so the copy finds them in
 * cache) or as soon as it has landed (a get: the bytes are still in cache).
 *
 * Built on first use by lmcache.backends.nixl.native (cc -O2 -shared -fPIC -pthread); it links
 * nothing. Every NIXL function comes from NIXL's own C API (libnixl_capi.so, shipped in the NIXL
 * wheel) and the hash from the xxhash module Python uses, as function pointers handed over by
 * lmc_lane_create, so the checksums are bit for bit those of lmcache.serde.frame.
 *
 * Jobs run in the order they are submitted; their transfers are posted in order, up to
 * LMC_WINDOW in flight (a CPU copy such as UCX over CMA is done when posted), except that a
 * put's headers wait for its checksums while the next jobs go ahead (see run_job). A job ends when
 * its transfers are done and its values hashed; a failed or cancelled job posts nothing more and
 * still waits for what it has in flight, so no byte moves after lmc_job_wait reports it ended.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "frame headers are little-endian; this lane writes them in host order"
#endif

/* NIXL C API status codes (nixl_capi_status_t). */
#define CAPI_SUCCESS 0
#define CAPI_IN_PROG 1

#define LMC_WINDOW 8
#define LMC_SPIN_NS 5000L /* the checksum thread spins this long for a transfer (30 us: gets ~5% slower) */
/* Then it polls with sleeps this long. Waking it with a futex call cost the lane 3-20 us per
 * transfer (it posts one every ~170 us). Sleeps of 50-100 us left more CPU to the rest of the
 * process than 20 us (gets ~5% faster on 2 vCPUs); a hash that starts that late still finds a
 * get's bytes in cache, and still overtakes a put's copy (it hashes ~3x faster than CMA copies). */
#define LMC_POLL_NS 50000L

typedef int (*dl_create_fn)(int mem_type, void **dlist, bool sorted);
typedef int (*dl_destroy_fn)(void *dlist);
typedef int (*dl_add_fn)(void *dlist, uintptr_t addr, size_t len, uint64_t dev_id);
typedef int (*req_create_fn)(void *agent, int op, void *local, void *remote, const char *remote_agent,
                             void **req, void *opt_args);
typedef int (*req_post_fn)(void *agent, void *req, void *opt_args);
typedef int (*req_status_fn)(void *agent, void *req);
typedef int (*req_release_fn)(void *agent, void *req);
typedef int (*req_destroy_fn)(void *req);
typedef uint64_t (*hash_fn)(const void *data, size_t len);

/* The functions the lane calls, in this order (filled by the Python side). */
typedef struct {
    dl_create_fn dl_create;
    dl_destroy_fn dl_destroy;
    dl_add_fn dl_add;
    req_create_fn req_create;
    req_post_fn req_post;
    req_status_fn req_status;
    req_release_fn req_release;
    req_destroy_fn req_destroy;
    hash_fn hash;
} lmc_api;

/* Transfer states. */
enum { T_QUEUED = 0, T_STARTED = 1, T_LANDED = 2, T_FAILED = 3 };

typedef struct lmc_job lmc_job;
struct lmc_job {
    lmc_job *next_lane;
    lmc_job *next_hash;
    lmc_job *next_parked; /* a put waiting for its checksums before its headers (lane-only) */
    int op;            /* 0 READ, 1 WRITE (NIXL's order) */
    int hash_at_start; /* hash a transfer's ranges once started (1) or once landed (0) */
    int nx;            /* transfers */
    int32_t *xd;       /* nx + 1 offsets into desc */
    uint64_t *desc;    /* 3 per descriptor: local address, remote address, length */
    int32_t *xh;       /* nx + 1 offsets into hr */
    uint64_t *hr;      /* 2 per hashed range: address, length */
    uint64_t *hout;    /* one checksum per hashed range */
    _Atomic int *st;   /* one state per transfer */
    atomic_int cancel;
    int lane_done;
    atomic_int hash_done;
    int npatch;        /* frame headers whose checksums the lane fills in before the last transfer */
    uint64_t *patch;   /* 3 per header: address, key + metadata length, index of its checksum */
    int complete;
    int status; /* 0, or the first failure: a NIXL C API status, or -100 when cancelled */
    int failed_at;
    char what[48];
    char remote[256]; /* the remote agent's name */
};

typedef struct {
    lmc_job *job;
    int t;
    void *req;
} lmc_flight;

typedef struct {
    lmc_api api;
    struct {
        void *inner;
    } agent; /* the layout of NIXL's nixl_capi_agent_s */
    pthread_mutex_t mu;
    pthread_cond_t lane_cv;
    pthread_cond_t hash_cv;
    pthread_cond_t done_cv;
    lmc_job *lane_head, *lane_tail;
    lmc_job *hash_head, *hash_tail;
    int hash_sleeping;
    int stop;
    pthread_t lane_thread, hash_thread;
    /* lane-only state */
    lmc_flight flight[LMC_WINDOW];
    int nflight;
    lmc_job *parked_head, *parked_tail;
    /* counters (read with lmc_lane_stats) */
    atomic_ullong transfers, bytes, hashed_bytes, lane_ns, hash_wait_ns, create_ns, finish_ns;
    atomic_ullong sums_wait_ns, idle_ns; /* the lane with only parked puts, with nothing at all */
} lmc_lane;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Caller holds mu. */
static void finish_if_complete(lmc_lane *lane, lmc_job *job) {
    if (job->lane_done && job->hash_done && !job->complete) {
        job->complete = 1;
        pthread_cond_broadcast(&lane->done_cv);
    }
}

static void fail(lmc_job *job, int t, int status, const char *what) {
    if (job->status == 0) {
        job->status = status;
        job->failed_at = t;
        snprintf(job->what, sizeof job->what, "%s", what);
    }
}

/* Make one transfer's request; NULL (and the job failed) on error. */
static void *make_request(lmc_lane *lane, lmc_job *job, int t) {
    lmc_api *api = &lane->api;
    void *local = NULL, *remote = NULL, *req = NULL;
    int rc = api->dl_create(0, &local, false);
    if (rc == CAPI_SUCCESS)
        rc = api->dl_create(0, &remote, false);
    for (int d = job->xd[t]; rc == CAPI_SUCCESS && d < job->xd[t + 1]; d++) {
        const uint64_t *e = &job->desc[3 * d];
        rc = api->dl_add(local, (uintptr_t)e[0], (size_t)e[2], 0);
        if (rc == CAPI_SUCCESS)
            rc = api->dl_add(remote, (uintptr_t)e[1], (size_t)e[2], 0);
    }
    if (rc == CAPI_SUCCESS)
        rc = api->req_create(&lane->agent, job->op, local, remote, job->remote, &req, NULL);
    if (local)
        api->dl_destroy(local);
    if (remote)
        api->dl_destroy(remote);
    if (rc != CAPI_SUCCESS) {
        fail(job, t, rc, "createXferReq");
        return NULL;
    }
    return req;
}

static void drop_request(lmc_lane *lane, void *req) {
    if (lane->api.req_release(&lane->agent, req) == CAPI_SUCCESS)
        lane->api.req_destroy(req);
    /* else: NIXL kept it (it could not be released); leaking the small handle is the safe choice */
}

/* The checksum thread polls these (see await_state): the lane never stops to wake it. */
static void set_state(lmc_job *job, int t, int state) {
    atomic_store_explicit(&job->st[t], state, memory_order_release);
}

/* Poll the transfers in flight once; retire the done ones (in any order). */
static void poll_flights(lmc_lane *lane) {
    int keep = 0;
    for (int i = 0; i < lane->nflight; i++) {
        lmc_flight f = lane->flight[i];
        int rc = lane->api.req_status(&lane->agent, f.req);
        if (rc == CAPI_IN_PROG && atomic_load(&f.job->cancel)) {
            /* A cancelled job: NIXL aborts a transfer it can still release. */
            if (lane->api.req_release(&lane->agent, f.req) == CAPI_SUCCESS) {
                lane->api.req_destroy(f.req);
                fail(f.job, f.t, -100, "cancelled");
                set_state(f.job, f.t, T_FAILED);
                continue;
            }
        }
        if (rc == CAPI_IN_PROG) {
            lane->flight[keep++] = f;
            continue;
        }
        drop_request(lane, f.req);
        if (rc != CAPI_SUCCESS)
            fail(f.job, f.t, rc, "transfer");
        set_state(f.job, f.t, rc == CAPI_SUCCESS ? T_LANDED : T_FAILED);
    }
    lane->nflight = keep;
}

static int job_in_flight(lmc_lane *lane, lmc_job *job) {
    for (int i = 0; i < lane->nflight; i++)
        if (lane->flight[i].job == job)
            return 1;
    return 0;
}

static void pause_briefly(int *spins) {
    if (++*spins < 64) {
        sched_yield();
    } else {
        struct timespec ts = {0, 20000}; /* 20 us: a transfer over a network transport */
        nanosleep(&ts, NULL);
    }
}

/*
 * Fill in each patched frame header's payload checksum (bytes 24..32) and its own check (bytes
 * 32..40: xxh3 of bytes 0..32, then the key and metadata from byte 48), as
 * lmcache.serde.frame.encode_header lays them out.
 */
static int patch_headers(lmc_lane *lane, lmc_job *job) {
    uint8_t stack[1024];
    for (int p = 0; p < job->npatch; p++) {
        uint8_t *hdr = (uint8_t *)(uintptr_t)job->patch[3 * p];
        size_t tail = (size_t)job->patch[3 * p + 1];
        uint64_t sum = job->hout[job->patch[3 * p + 2]];
        memcpy(hdr + 24, &sum, 8);
        size_t n = 32 + tail;
        uint8_t *tmp = n <= sizeof stack ? stack : malloc(n);
        if (tmp == NULL)
            return 0;
        memcpy(tmp, hdr, 32);
        memcpy(tmp + 32, hdr + 48, tail);
        uint64_t check = lane->api.hash(tmp, n);
        memcpy(hdr + 32, &check, 8);
        if (tmp != stack)
            free(tmp);
    }
    return 1;
}

/* Post transfer t of a job (after room in the window): 1 posted, 0 not (its request could not be
 * made), -1 refused by postXferReq; the job is failed in both last cases. */
static int post_one(lmc_lane *lane, lmc_job *job, int t) {
    int spins = 0;
    while (lane->nflight >= LMC_WINDOW) {
        poll_flights(lane);
        if (lane->nflight >= LMC_WINDOW)
            pause_briefly(&spins);
    }
    int64_t t0 = now_ns();
    void *req = make_request(lane, job, t);
    if (req == NULL)
        return 0;
    set_state(job, t, T_STARTED);
    int64_t t1 = now_ns();
    atomic_fetch_add(&lane->create_ns, (unsigned long long)(t1 - t0));
    int rc = lane->api.req_post(&lane->agent, req, NULL);
    t0 = now_ns();
    atomic_fetch_add(&lane->lane_ns, (unsigned long long)(t0 - t1));
    atomic_fetch_add(&lane->transfers, 1);
    for (int d = job->xd[t]; d < job->xd[t + 1]; d++)
        atomic_fetch_add(&lane->bytes, job->desc[3 * d + 2]);
    if (rc == CAPI_IN_PROG) {
        lane->flight[lane->nflight++] = (lmc_flight){job, t, req};
        return 1;
    }
    if (rc != CAPI_SUCCESS) {
        drop_request(lane, req);
        fail(job, t, rc, "postXferReq");
        set_state(job, t, T_FAILED);
        return -1;
    }
    set_state(job, t, T_LANDED); /* the checksum thread starts before the release */
    drop_request(lane, req);
    atomic_fetch_add(&lane->finish_ns, (unsigned long long)(now_ns() - t0));
    return 1;
}

/* End a job whose transfers from t on will not be posted: once what it has in flight is done. */
static void end_job(lmc_lane *lane, lmc_job *job, int t) {
    for (; t < job->nx; t++)
        if (atomic_load(&job->st[t]) == T_QUEUED)
            set_state(job, t, T_FAILED);
    /* Every transfer of a job is done before the job ends (its buffers are the caller's). */
    int spins = 0;
    while (job_in_flight(lane, job)) {
        poll_flights(lane);
        if (job_in_flight(lane, job))
            pause_briefly(&spins);
    }
    pthread_mutex_lock(&lane->mu);
    job->lane_done = 1;
    finish_if_complete(lane, job);
    pthread_mutex_unlock(&lane->mu);
}

static int parked_ready(lmc_lane *lane, lmc_job *job) {
    return atomic_load_explicit(&job->hash_done, memory_order_acquire) || atomic_load(&job->cancel) || lane->stop;
}

/*
 * With nothing else to post: wait (spinning, then polling) until the oldest parked put has its
 * checksums or a job comes in. Transfers in flight are retired meanwhile: a put hashed once its
 * transfers land needs that.
 */
static void await_parked(lmc_lane *lane) {
    int64_t t0 = now_ns();
    while (!parked_ready(lane, lane->parked_head)) {
        pthread_mutex_lock(&lane->mu);
        int queued = lane->lane_head != NULL;
        pthread_mutex_unlock(&lane->mu);
        if (queued)
            break;
        if (lane->nflight > 0)
            poll_flights(lane);
        if (now_ns() - t0 < LMC_SPIN_NS) {
            cpu_relax();
        } else {
            struct timespec nap = {0, 5000L};
            nanosleep(&nap, NULL);
        }
    }
    atomic_fetch_add(&lane->sums_wait_ns, (unsigned long long)(now_ns() - t0));
}

/* A put's last step: once every value is hashed, fill in its headers, write them, end the job. */
static void write_headers(lmc_lane *lane, lmc_job *job) {
    int t = job->nx - 1;
    if (job->status == 0 && atomic_load(&job->cancel))
        fail(job, t, -100, "cancelled");
    if (job->status == 0 && !atomic_load_explicit(&job->hash_done, memory_order_acquire))
        fail(job, t, -100, "cancelled"); /* the lane is stopping */
    if (job->status == 0 && !patch_headers(lane, job))
        fail(job, t, -101, "out of memory");
    if (job->status == 0 && post_one(lane, job, t) != 0)
        t++;
    end_job(lane, job, t);
}

/* Write the headers of the parked puts whose values are all hashed (the checksum thread hashes
 * jobs in order, so only the oldest can be next). */
static void service_parked(lmc_lane *lane) {
    while (lane->parked_head != NULL && parked_ready(lane, lane->parked_head)) {
        lmc_job *job = lane->parked_head;
        lane->parked_head = job->next_parked;
        if (lane->parked_head == NULL)
            lane->parked_tail = NULL;
        write_headers(lane, job);
    }
}

/*
 * Post a job's transfers. A put whose last values are still being hashed when its payloads are
 * posted is parked: the lane goes on with the next jobs and writes its headers once its
 * checksums are in, instead of waiting for them (1-7% of a put phase on 2 vCPUs, when the
 * checksum thread shares its core with the event loop and the peer).
 */
static void run_job(lmc_lane *lane, lmc_job *job) {
    int last = job->npatch > 0 ? job->nx - 1 : job->nx; /* the headers go last: they carry the checksums */
    int t = 0;
    for (; t < last; t++) {
        if (lane->parked_head != NULL)
            service_parked(lane);
        if (job->status != 0 || atomic_load(&job->cancel)) {
            if (job->status == 0)
                fail(job, t, -100, "cancelled");
            break;
        }
        int rc = post_one(lane, job, t);
        if (rc <= 0) {
            t += rc < 0;
            break;
        }
    }
    if (t == last && last < job->nx && job->status == 0) {
        if (!parked_ready(lane, job)) {
            if (lane->parked_tail)
                lane->parked_tail->next_parked = job;
            else
                lane->parked_head = job;
            lane->parked_tail = job;
            return;
        }
        write_headers(lane, job);
        return;
    }
    end_job(lane, job, t);
}

static void *lane_main(void *arg) {
    lmc_lane *lane = arg;
    for (;;) {
        if (lane->parked_head != NULL)
            service_parked(lane);
        pthread_mutex_lock(&lane->mu);
        if (lane->lane_head == NULL && lane->parked_head != NULL) {
            pthread_mutex_unlock(&lane->mu);
            await_parked(lane);
            continue;
        }
        int64_t t0 = now_ns();
        while (lane->lane_head == NULL && !lane->stop)
            pthread_cond_wait(&lane->lane_cv, &lane->mu);
        atomic_fetch_add(&lane->idle_ns, (unsigned long long)(now_ns() - t0));
        lmc_job *job = lane->lane_head;
        if (job == NULL) { /* stopping, nothing queued or parked */
            pthread_mutex_unlock(&lane->mu);
            break;
        }
        lane->lane_head = job->next_lane;
        if (lane->lane_head == NULL)
            lane->lane_tail = NULL;
        pthread_mutex_unlock(&lane->mu);
        run_job(lane, job);
    }
    return NULL;
}

/* Wait until transfer t of job reaches at least `want` (or fails); returns its state. */
static int await_state(lmc_lane *lane, lmc_job *job, int t, int want) {
    int s = atomic_load_explicit(&job->st[t], memory_order_acquire);
    if (s >= want)
        return s;
    int64_t t0 = now_ns();
    while (now_ns() - t0 < LMC_SPIN_NS) {
        s = atomic_load_explicit(&job->st[t], memory_order_acquire);
        if (s >= want)
            return s;
        cpu_relax();
    }
    struct timespec nap = {0, LMC_POLL_NS};
    while ((s = atomic_load_explicit(&job->st[t], memory_order_acquire)) < want && !lane->stop) {
        if (now_ns() - t0 > 2000000L)
            nap.tv_nsec = 200000L; /* a slow transfer (a network transport): back off */
        nanosleep(&nap, NULL);
    }
    atomic_fetch_add(&lane->hash_wait_ns, (unsigned long long)(now_ns() - t0));
    return s;
}

static void hash_job(lmc_lane *lane, lmc_job *job) {
    int want = job->hash_at_start ? T_STARTED : T_LANDED;
    for (int t = 0; t < job->nx; t++) {
        if (job->xh[t] == job->xh[t + 1])
            continue;
        int s = await_state(lane, job, t, want);
        if (s == T_FAILED || (s < want && lane->stop))
            break; /* the job failed: its checksums are not used */
        for (int h = job->xh[t]; h < job->xh[t + 1]; h++) {
            const uint64_t *r = &job->hr[2 * h];
            job->hout[h] = lane->api.hash((const void *)(uintptr_t)r[0], (size_t)r[1]);
            atomic_fetch_add(&lane->hashed_bytes, r[1]);
        }
    }
    pthread_mutex_lock(&lane->mu);
    job->hash_done = 1;
    finish_if_complete(lane, job);
    pthread_mutex_unlock(&lane->mu);
}

static void *hash_main(void *arg) {
    lmc_lane *lane = arg;
    prctl(PR_SET_TIMERSLACK, 1000UL); /* its short sleeps end when asked, not up to 50 us later */
    for (;;) {
        pthread_mutex_lock(&lane->mu);
        lane->hash_sleeping = 1;
        while (lane->hash_head == NULL && !lane->stop)
            pthread_cond_wait(&lane->hash_cv, &lane->mu);
        lane->hash_sleeping = 0;
        lmc_job *job = lane->hash_head;
        if (job == NULL) {
            pthread_mutex_unlock(&lane->mu);
            break;
        }
        lane->hash_head = job->next_hash;
        if (lane->hash_head == NULL)
            lane->hash_tail = NULL;
        pthread_mutex_unlock(&lane->mu);
        hash_job(lane, job);
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* The API used through ctypes. */

lmc_lane *lmc_lane_create(const lmc_api *api, void *agent) {
    lmc_lane *lane = calloc(1, sizeof *lane);
    if (lane == NULL)
        return NULL;
    lane->api = *api;
    lane->agent.inner = agent;
    pthread_mutex_init(&lane->mu, NULL);
    pthread_cond_init(&lane->lane_cv, NULL);
    pthread_cond_init(&lane->hash_cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&lane->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&lane->lane_thread, NULL, lane_main, lane) != 0) {
        free(lane);
        return NULL;
    }
    if (pthread_create(&lane->hash_thread, NULL, hash_main, lane) != 0) {
        pthread_mutex_lock(&lane->mu);
        lane->stop = 1;
        pthread_cond_broadcast(&lane->lane_cv);
        pthread_mutex_unlock(&lane->mu);
        pthread_join(lane->lane_thread, NULL);
        free(lane);
        return NULL;
    }
    pthread_setname_np(lane->lane_thread, "lmcache-nixl");
    pthread_setname_np(lane->hash_thread, "lmcache-xxh3");
    return lane;
}

/* Stop the threads once every submitted job has run (the caller waits for its jobs first). */
void lmc_lane_destroy(lmc_lane *lane) {
    pthread_mutex_lock(&lane->mu);
    lane->stop = 1;
    pthread_cond_broadcast(&lane->lane_cv);
    pthread_cond_broadcast(&lane->hash_cv);
    pthread_mutex_unlock(&lane->mu);
    pthread_join(lane->lane_thread, NULL);
    pthread_join(lane->hash_thread, NULL);
    free(lane);
}

void lmc_lane_stats(lmc_lane *lane, uint64_t out[9]) {
    out[0] = atomic_load(&lane->transfers);
    out[1] = atomic_load(&lane->bytes);
    out[2] = atomic_load(&lane->hashed_bytes);
    out[3] = atomic_load(&lane->lane_ns);
    out[4] = atomic_load(&lane->hash_wait_ns);
    out[5] = atomic_load(&lane->create_ns);
    out[6] = atomic_load(&lane->finish_ns);
    out[7] = atomic_load(&lane->sums_wait_ns);
    out[8] = atomic_load(&lane->idle_ns);
}

static void *dup_array(const void *src, size_t n) {
    void *p = malloc(n ? n : 1);
    if (p && n)
        memcpy(p, src, n);
    return p;
}

void lmc_job_free(lmc_job *job) {
    if (job == NULL)
        return;
    free(job->xd);
    free(job->desc);
    free(job->xh);
    free(job->hr);
    free(job->hout);
    free(job->patch);
    free((void *)job->st);
    free(job);
}

/*
 * Queue a job of nx transfers to or from the remote agent `remote`: transfer t moves
 * descriptors xd[t]..xd[t+1] of desc (3 words each) and, once started or landed, hashes ranges
 * xh[t]..xh[t+1] of hr (2 words each). With npatch > 0 the last transfer writes frame headers:
 * before it, once every range is hashed, the lane fills in each header's checksums (patch: 3
 * words each, the header's address, its key + metadata length, the index of its payload's
 * range). The arrays are copied. NULL when memory runs out, the arguments disagree, or the lane
 * is stopping.
 */
lmc_job *lmc_job_submit(lmc_lane *lane, const char *remote, int op, int hash_at_start, int nx,
                        const int32_t *xd, const uint64_t *desc, const int32_t *xh, const uint64_t *hr,
                        int npatch, const uint64_t *patch) {
    int nd = xd[nx], nh = xh[nx];
    if (strlen(remote) >= sizeof(((lmc_job *)0)->remote))
        return NULL;
    if (npatch > 0 && (nx < 1 || xh[nx - 1] != xh[nx]))
        return NULL; /* patched headers go in a last transfer that hashes nothing */
    for (int p = 0; p < npatch; p++)
        if (patch[3 * p + 2] >= (uint64_t)nh)
            return NULL;
    lmc_job *job = calloc(1, sizeof *job);
    if (job == NULL)
        return NULL;
    memcpy(job->remote, remote, strlen(remote) + 1);
    job->op = op;
    job->hash_at_start = hash_at_start;
    job->nx = nx;
    job->xd = dup_array(xd, sizeof(int32_t) * (size_t)(nx + 1));
    job->desc = dup_array(desc, sizeof(uint64_t) * 3 * (size_t)nd);
    job->xh = dup_array(xh, sizeof(int32_t) * (size_t)(nx + 1));
    job->hr = dup_array(hr, sizeof(uint64_t) * 2 * (size_t)nh);
    job->hout = calloc((size_t)nh + 1, sizeof(uint64_t));
    job->st = calloc((size_t)nx + 1, sizeof(int));
    job->npatch = npatch;
    job->patch = dup_array(patch, sizeof(uint64_t) * 3 * (size_t)npatch);
    if (!job->xd || !job->desc || !job->xh || !job->hr || !job->hout || !job->st || !job->patch) {
        lmc_job_free(job);
        return NULL;
    }
    pthread_mutex_lock(&lane->mu);
    if (lane->stop) {
        pthread_mutex_unlock(&lane->mu);
        lmc_job_free(job);
        return NULL;
    }
    if (lane->lane_tail)
        lane->lane_tail->next_lane = job;
    else
        lane->lane_head = job;
    lane->lane_tail = job;
    if (nh == 0) {
        job->hash_done = 1; /* nothing to hash: not queued behind other jobs' hashing */
    } else {
        if (lane->hash_tail)
            lane->hash_tail->next_hash = job;
        else
            lane->hash_head = job;
        lane->hash_tail = job;
    }
    pthread_cond_signal(&lane->lane_cv);
    if (lane->hash_sleeping)
        pthread_cond_signal(&lane->hash_cv);
    pthread_mutex_unlock(&lane->mu);
    return job;
}

/* Block until the job ends or timeout_ms passes (< 0: no limit); 1 when it ended. */
int lmc_job_wait(lmc_lane *lane, lmc_job *job, long timeout_ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms >= 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&lane->mu);
    int rc = 0;
    while (!job->complete && rc != ETIMEDOUT) {
        if (timeout_ms < 0)
            pthread_cond_wait(&lane->done_cv, &lane->mu);
        else
            rc = pthread_cond_timedwait(&lane->done_cv, &lane->mu, &deadline);
    }
    int done = job->complete;
    pthread_mutex_unlock(&lane->mu);
    return done;
}

/* Post nothing more of the job; the lane aborts what NIXL can release of its transfers. */
void lmc_job_cancel(lmc_job *job) { atomic_store(&job->cancel, 1); }

/* After the job ended: its status (0 or the first failure), where it failed, and the checksums. */
int lmc_job_result(lmc_job *job, int *failed_at, char *what, size_t what_len, uint64_t *hout) {
    *failed_at = job->failed_at;
    snprintf(what, what_len, "%s", job->what);
    memcpy(hout, job->hout, sizeof(uint64_t) * (size_t)job->xh[job->nx]);
    return job->status;
}
