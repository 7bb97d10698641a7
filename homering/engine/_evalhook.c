/*
 * The layer window's graph hook in C: llama.cpp's scheduler calls cb_eval for every node of the graph
 * (ggml-backend.cpp, ggml_backend_sched_compute_splits), about 30 per layer and token. A Python callback
 * costs ~1.2 us per call there (ctypes, the GIL), ~0.4 ms per token for a 10-layer window of SmolLM2;
 * this one costs nanoseconds. It is a plain shared library (no Python API), loaded with ctypes by
 * homering/engine/evalhook.py, which documents the struct; the ggml functions come in as pointers, so
 * it links against nothing.
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef const char *(*hr_get_name_fn)(const void *tensor);
typedef size_t (*hr_nbytes_fn)(const void *tensor);
typedef void (*hr_tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

struct hr_eval_hook {
    hr_get_name_fn get_name;     /* ggml_get_name */
    hr_nbytes_fn nbytes;         /* ggml_nbytes */
    hr_tensor_get_fn tensor_get; /* ggml_backend_tensor_get */
    void *dst;                   /* where the target node's data goes */
    size_t capacity;             /* bytes at dst; the node must be exactly this size */
    int filled;                  /* set to 1 once dst holds the node's data */
    char target[64];             /* the node's name, e.g. "l_out-9" (GGML_MAX_NAME is 64) */
};

/* ggml_backend_sched_eval_callback: ask == true: "do you want this node?" (only the target);
 * ask == false: the node is computed; copy it out and return false, which stops the graph there. */
bool hr_eval_hook(void *tensor, bool ask, void *user_data) {
    struct hr_eval_hook *h = (struct hr_eval_hook *)user_data;
    bool hit = strncmp(h->get_name(tensor), h->target, sizeof h->target) == 0;
    if (ask) {
        return hit;
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
