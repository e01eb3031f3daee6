/*
 * sim_internal.h - internal helpers of the rockchip_llm RKLLM simulator.
 * Nothing declared here is exported from the shared library
 * (the library is built with -fvisibility=hidden).
 */
#ifndef ROCKCHIP_LLM_SIM_INTERNAL_H
#define ROCKCHIP_LLM_SIM_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- memory (abort on exhaustion: this is a test double) ------------- */

void *sim_xmalloc(size_t size);
void *sim_xrealloc(void *ptr, size_t size);
char *sim_xstrdup(const char *s); /* NULL -> NULL */
char *sim_xstrndup(const char *s, size_t n);

/* ---- token vectors ----------------------------------------------------- */

typedef struct {
    int32_t *v;
    size_t n;
    size_t cap;
} tokvec;

void tv_init(tokvec *t);
void tv_free(tokvec *t);
void tv_clear(tokvec *t);
void tv_push(tokvec *t, int32_t id);
void tv_append(tokvec *t, const int32_t *ids, size_t n);
void tv_assign(tokvec *dst, const tokvec *src);
void tv_truncate(tokvec *t, size_t n);
void tv_erase(tokvec *t, size_t start, size_t end); /* removes [start,end) */
size_t tv_lcp(const tokvec *a, const tokvec *b);

/* ---- string buffers ---------------------------------------------------- */

typedef struct {
    char *s; /* always NUL-terminated once anything was written */
    size_t n;
    size_t cap;
} strbuf;

void sb_init(strbuf *b);
void sb_free(strbuf *b);
void sb_putn(strbuf *b, const char *s, size_t n);
void sb_puts(strbuf *b, const char *s);
void sb_printf(strbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void sb_json_str(strbuf *b, const char *s); /* quoted + escaped; NULL -> null */
const char *sb_cstr(strbuf *b);             /* "" when empty */
char *sb_take(strbuf *b);                   /* hand over the malloc'd string */

/* ---- tokenizer ----------------------------------------------------------- */

typedef struct {
    size_t off;
    size_t len;
    int32_t id;
} tok_piece;

typedef struct {
    tok_piece *v;
    size_t n;
    size_t cap;
} piecevec;

void pv_free(piecevec *p);
int32_t sim_token_id(const char *bytes, size_t len);
size_t sim_utf8_len(const unsigned char *s, size_t avail);
void sim_tokenize(const char *text, size_t len, piecevec *out);
void sim_tokenize_ids(const char *text, tokvec *out); /* appends */
size_t sim_count_tokens(const char *text);

/* ---- reading the conversation (sim_chat.c) ------------------------------ */

/* Remembers the text of a token id (process-wide; the first text seen wins). */
void sim_vocab_note(int32_t id, const char *bytes, size_t len);
/* Appends the text of tokens (U+FFFD for an id never tokenized here). */
void sim_detokenize(const tokvec *tokens, strbuf *out);
/* The latest request of a ChatML context that ends in the generation prompt:
   role "user" or "tool" (a tool response answering the call of the turn
   before) and its text, both malloc'd. -1: the context is not ChatML. */
int sim_read_request(const char *context, const char *tool_tag, char **role,
                     char **content);

/* ---- model files --------------------------------------------------------- */

typedef struct {
    char *role;     /* "user", "tool" or "*" */
    int any;        /* pattern "*" */
    char *literal;  /* pattern text before {var}, or the whole pattern */
    char *var;      /* placeholder name, or NULL */
    char *text;     /* reply with escapes already decoded */
} sim_rule;

typedef struct {
    int max_context_limit;
    double prefill_ms_per_token;
    double decode_ms_per_token;
    double init_ms;                /* real sleep in rkllm_init (a real load takes seconds) */
    int init_error;
    int crash_in_init;             /* 1: rkllm_init raises SIGSEGV */
    long error_at_token;
    long abort_at_token;           /* N >= 0: abort() after N generated tokens */
    long hang_at_token;            /* N >= 0: block forever after N generated tokens */
    int emit_null_text;
    int emit_null_result;          /* 1: a NORMAL, 2: the FINISH callback gets NULL */
    int abort_after_prefill;       /* 1: abort waits for the prefill (and the run) */
    int no_prompt_cache_save;      /* 1: saving a prompt cache writes nothing */
    int ignore_cache_with_history; /* 1: a loaded cache is not used when keep_history */
    int tools_keep_kv;             /* 1: set_function_tools leaves the KV as it was */
    long cache_bytes_per_token;    /* padding written per token to cache files */
    int kv_cache_size_error;       /* 1: rkllm_get_kv_cache_size returns -1 */
    int context_shift; /* 0: stop generating when full, 1: shift */
    double memory_usage_mb;
    sim_rule *rules;
    size_t nrules;
    char *default_reply; /* NULL if the file has no default line */
} sim_model;

/* Parses the model file; prints the reason to stderr and returns -1 on error. */
int sim_model_load(const char *path, sim_model *m);
void sim_model_free(sim_model *m);
/* The reply to one input (malloc'd). input may be "" (token input). */
char *sim_model_reply(const sim_model *m, const char *role, const char *input,
                      int enable_thinking);

/* ---- prompt cache files ------------------------------------------------- */

/* Both print the reason to stderr and return -1 on failure. */
int sim_cache_write(const char *path, const tokvec *tokens, long pad_per_token);
int sim_cache_read(const char *path, tokvec *out);

/* ---- trace file (RKLLM_SIM_TRACE) --------------------------------------- */

/* Appends "<kind> <pid> <printf text>\n" to the file named by RKLLM_SIM_TRACE
   with one write(), so lines of several processes never interleave. Does
   nothing when the variable is unset or empty. Keeps errno. */
void sim_trace(const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- time ------------------------------------------------------------------ */

double sim_now_ms(void); /* CLOCK_MONOTONIC in milliseconds */
void sim_sleep_ms(double ms);

#endif /* ROCKCHIP_LLM_SIM_INTERNAL_H */
