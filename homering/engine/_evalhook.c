/*
 * The layer window's graph hook in C: llama.cpp's scheduler calls cb_eval for every node of the graph
 * (ggml-backend.cpp, ggml_backend_sched_compute_splits), about 30 per layer and token. A Python callback
 * costs ~1.2 us per call there (ctypes, the GIL), ~0.4 ms per token for a 10-layer window of SmolLM2;
 * this one costs nanoseconds. It is a plain shared library (no Python API), loaded with ctypes by
 * homering/engine/evalhook.py, which documents the structs; the ggml functions come in as pointers, so
 * it links against nothing but libc.
 *
 * Two jobs:
 * - the target node (l_out of the window's last layer): copy it out and stop the graph there;
 * - restoring the input (``restore``): llama.cpp's gemma2 graph scales its input by sqrt(n_embd) even when
 *   the input is hidden states, not token embeddings (models/gemma2.cpp, node "inp_scaled"; gemma3 scales
 *   only tokens); once that node is computed, the hook writes the batch's rows back over it, so the layers
 *   see the hidden states exactly as the previous window produced them;
 * - streaming the window's tail (a device in overflow mode): once layer il's output l_out-il is computed,
 *   drop layer il's weight pages (madvise DONTNEED on llama.cpp's mapping, then fadvise DONTNEED on the
 *   file) if il is in the tail; the kernel's fault read-around reads the next one. The page cache then
 *   holds the kept layers plus the streamed one in flight, so the kernel never evicts a kept layer to make
 *   room, and the disk reads exactly the tail per token;
 * - prefetching a mixture of experts' routed experts (homering/engine/prefetch.py): once layer il's
 *   router has chosen (node ffn_moe_topk-<il>, int32 [n_expert_used, n_tokens]), advise WILLNEED on each
 *   chosen expert's slice of the layer's expert tensors that is not in the page cache (mincore on its
 *   middle page: a WILLNEED that finds the pages cached still costs ~13 us, 15 ms per token over the 48
 *   layers of Qwen3-30B-A3B), so the disk reads exactly those experts, in large requests, before the
 *   expert products fault on them (their mapping is MADV_RANDOM: no fault read-around).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef const char *(*hr_get_name_fn)(const void *tensor);
typedef size_t (*hr_nbytes_fn)(const void *tensor);
typedef void (*hr_tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);
typedef void (*hr_tensor_set_fn)(void *tensor, const void *data, size_t offset, size_t size);
typedef long long (*hr_count_fn)(const void *tensor);

struct hr_layer_pages {
    size_t addr;           /* page-aligned start of the pages to drop in llama.cpp's mapping (0: unknown) */
    size_t length;         /* bytes to drop, a whole number of pages (0: nothing) */
    long long offset;      /* the same start as a file offset */
};

struct hr_expert_slices {
    size_t addr;   /* expert 0's first byte in llama.cpp's mapping (0: unknown, skipped) */
    size_t stride; /* bytes per expert: expert e lies at addr + e * stride */
};

struct hr_eval_hook {
    hr_get_name_fn get_name;     /* ggml_get_name */
    hr_nbytes_fn nbytes;         /* ggml_nbytes */
    hr_tensor_get_fn tensor_get; /* ggml_backend_tensor_get */
    void *dst;                   /* where the target node's data goes */
    size_t capacity;             /* bytes at dst; the node must be exactly this size */
    int filled;                  /* set to 1 once dst holds the node's data */
    char target[64];             /* the node's name, e.g. "l_out-9" (GGML_MAX_NAME is 64); "" for none */
    int fd;                      /* the window file (read-only) while its tail streams, else -1 */
    int stream_first;            /* the first streamed layer; n_layers or more: none */
    int n_layers;                /* entries of layers */
    struct hr_layer_pages *layers;
    long long dropped;           /* layers dropped so far (a counter for tests and metrics) */
    hr_tensor_set_fn tensor_set; /* ggml_backend_tensor_set */
    const void *src;             /* the batch's input rows (hidden states) */
    size_t src_bytes;            /* bytes at src; the restored node must be exactly this size */
    int restored;                /* set to 1 once the node `restore` holds src */
    char restore[64];            /* a node whose value is replaced by the input rows ("" for none): see below */
    int moe_layers;              /* layers in experts (0: no prefetch) */
    int moe_tensors;             /* expert tensors per layer (gate, up, down) */
    int n_expert;                /* experts per layer (at most MAX_EXPERTS) */
    struct hr_expert_slices *experts; /* moe_layers x moe_tensors, by layer */
    int *ids;                    /* scratch for the router's choices */
    size_t ids_bytes;            /* bytes at ids */
    long long prefetched;        /* expert slices advised so far (a counter for tests) */
    hr_count_fn nelements;       /* ggml_nelements */
    hr_count_fn nrows;           /* ggml_nrows */
};

#define MAX_EXPERTS 1024

/* il for a node named "<prefix><il>", else -1 */
static int node_layer(const char *name, const char *prefix) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) {
        return -1;
    }
    char *end = NULL;
    long il = strtol(name + n, &end, 10);
    return (end != name + n && *end == '\0' && il >= 0 && il < 1 << 20) ? (int)il : -1;
}

/* the page at addr is in the page cache (mincore: far cheaper than a WILLNEED that finds it there) */
static bool resident(size_t addr, size_t page) {
    unsigned char vec = 0;
    return mincore((void *)addr, page, &vec) == 0 && (vec & 1);
}

/* the router of layer il has chosen: advise WILLNEED on every chosen expert's slices. The node is a view
 * [k, n_tokens] of the argsort [n_expert, n_tokens] (ggml_argsort_top_k), so its rows are a stride apart. */
static void prefetch(struct hr_eval_hook *h, const void *tensor, int il) {
    size_t n = h->nbytes(tensor);
    long long rows = h->nrows(tensor), k = rows > 0 ? h->nelements(tensor) / rows : 0;
    size_t stride = rows > 1 ? (n - (size_t)k * sizeof(int)) / (size_t)(rows - 1) : 0;
    if (n > h->ids_bytes || h->n_expert > MAX_EXPERTS || h->n_expert <= 0 || k <= 0 || stride % sizeof(int)) {
        return;
    }
    h->tensor_get(tensor, h->ids, 0, n);
    unsigned char seen[MAX_EXPERTS] = {0};
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (long long r = 0; r < rows; r++) {
        for (long long j = 0; j < k; j++) {
            int e = h->ids[(size_t)r * (stride / sizeof(int)) + (size_t)j];
            if (e < 0 || e >= h->n_expert || seen[e]) {
                continue;
            }
            seen[e] = 1;
            for (int t = 0; t < h->moe_tensors; t++) {
                const struct hr_expert_slices *x = &h->experts[il * h->moe_tensors + t];
                if (!x->addr || !x->stride) {
                    continue;
                }
                size_t start = x->addr + (size_t)e * x->stride, lo = start & ~(page - 1);
                /* its middle page stands for it (its first and last may be its neighbours' too): an expert's
                 * pages are touched, and age, together */
                if (resident((start + x->stride / 2) & ~(page - 1), page)) {
                    continue;
                }
                madvise((void *)lo, start + x->stride - lo, MADV_WILLNEED);
                h->prefetched++;
            }
        }
    }
}

static bool streamed(const struct hr_eval_hook *h, int il) {
    return h->fd >= 0 && il >= h->stream_first && il < h->n_layers;
}

static void drop(struct hr_eval_hook *h, int il) {
    if (!streamed(h, il) || !h->layers[il].length) {
        return;
    }
    if (h->layers[il].addr) {
        madvise((void *)h->layers[il].addr, h->layers[il].length, MADV_DONTNEED);
    }
#ifdef POSIX_FADV_DONTNEED /* Linux; macOS has no posix_fadvise (streaming.SUPPORTED is false there) */
    posix_fadvise(h->fd, h->layers[il].offset, (off_t)h->layers[il].length, POSIX_FADV_DONTNEED);
#endif
    h->dropped++;
}

/* ggml_backend_sched_eval_callback: ask == true: "do you want this node?" (the target, and the layer
 * outputs where streaming acts); ask == false: the node is computed. The target is copied out and the
 * graph stops there (return false); every other node lets it go on. */
bool hr_eval_hook(void *tensor, bool ask, void *user_data) {
    struct hr_eval_hook *h = (struct hr_eval_hook *)user_data;
    const char *name = h->get_name(tensor);
    bool hit = h->target[0] != '\0' && strncmp(name, h->target, sizeof h->target) == 0;
    int il = h->fd >= 0 ? node_layer(name, "l_out-") : -1;
    bool acts = il >= 0 && streamed(h, il);
    bool restore = h->restore[0] != '\0' && strncmp(name, h->restore, sizeof h->restore) == 0;
    int routed = h->moe_layers > 0 ? node_layer(name, "ffn_moe_topk-") : -1;
    bool routes = routed >= 0 && routed < h->moe_layers;
    if (ask) {
        return hit || acts || restore || routes;
    }
    if (routes) {
        prefetch(h, tensor, routed);
        return true;
    }
    if (restore) {
        size_t n = h->nbytes(tensor);
        if (h->src != NULL && n == h->src_bytes) {
            h->tensor_set(tensor, h->src, 0, n);
            h->restored = 1;
        }
        return true;
    }
    if (acts) {
        drop(h, il);
    }
    if (!hit) {
        return true;
    }
    size_t n = h->nbytes(tensor);
    if (h->dst != NULL && n == h->capacity) {
        h->tensor_get(tensor, h->dst, 0, n);
        h->filled = 1;
    }
    return false;
}
