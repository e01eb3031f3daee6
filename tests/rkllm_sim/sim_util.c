/*
 * sim_util.c - memory, vectors, string buffers, the deterministic tokenizer
 * and the clock of the rockchip_llm RKLLM simulator.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sim_internal.h"

/* ---- memory ---------------------------------------------------------------- */

static void out_of_memory(void)
{
    fputs("rkllm-sim: out of memory\n", stderr);
    abort();
}

void *sim_xmalloc(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (!p)
        out_of_memory();
    return p;
}

void *sim_xrealloc(void *ptr, size_t size)
{
    void *p = realloc(ptr, size ? size : 1);
    if (!p)
        out_of_memory();
    return p;
}

char *sim_xstrndup(const char *s, size_t n)
{
    char *p = sim_xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *sim_xstrdup(const char *s)
{
    return s ? sim_xstrndup(s, strlen(s)) : NULL;
}

/* ---- token vectors --------------------------------------------------------- */

void tv_init(tokvec *t)
{
    t->v = NULL;
    t->n = 0;
    t->cap = 0;
}

void tv_free(tokvec *t)
{
    free(t->v);
    tv_init(t);
}

void tv_clear(tokvec *t)
{
    t->n = 0;
}

static void tv_reserve(tokvec *t, size_t need)
{
    if (need <= t->cap)
        return;
    size_t cap = t->cap ? t->cap : 64;
    while (cap < need)
        cap *= 2;
    t->v = sim_xrealloc(t->v, cap * sizeof(int32_t));
    t->cap = cap;
}

void tv_push(tokvec *t, int32_t id)
{
    tv_reserve(t, t->n + 1);
    t->v[t->n++] = id;
}

void tv_append(tokvec *t, const int32_t *ids, size_t n)
{
    if (!n)
        return;
    tv_reserve(t, t->n + n);
    memcpy(t->v + t->n, ids, n * sizeof(int32_t));
    t->n += n;
}

void tv_assign(tokvec *dst, const tokvec *src)
{
    tv_clear(dst);
    tv_append(dst, src->v, src->n);
}

void tv_truncate(tokvec *t, size_t n)
{
    if (n < t->n)
        t->n = n;
}

void tv_erase(tokvec *t, size_t start, size_t end)
{
    if (end > t->n)
        end = t->n;
    if (start >= end)
        return;
    memmove(t->v + start, t->v + end, (t->n - end) * sizeof(int32_t));
    t->n -= end - start;
}

size_t tv_lcp(const tokvec *a, const tokvec *b)
{
    size_t n = a->n < b->n ? a->n : b->n;
    size_t i = 0;
    while (i < n && a->v[i] == b->v[i])
        i++;
    return i;
}

/* ---- string buffers -------------------------------------------------------- */

void sb_init(strbuf *b)
{
    b->s = NULL;
    b->n = 0;
    b->cap = 0;
}

void sb_free(strbuf *b)
{
    free(b->s);
    sb_init(b);
}

static void sb_reserve(strbuf *b, size_t extra)
{
    size_t need = b->n + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 128;
    while (cap < need)
        cap *= 2;
    b->s = sim_xrealloc(b->s, cap);
    b->cap = cap;
}

void sb_putn(strbuf *b, const char *s, size_t n)
{
    sb_reserve(b, n);
    if (n)
        memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

void sb_puts(strbuf *b, const char *s)
{
    sb_putn(b, s, strlen(s));
}

void sb_printf(strbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (need < 0)
        return;
    sb_reserve(b, (size_t)need);
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, (size_t)need + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)need;
}

void sb_json_str(strbuf *b, const char *s)
{
    if (!s) {
        sb_puts(b, "null");
        return;
    }
    sb_putn(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':
            sb_puts(b, "\\\"");
            break;
        case '\\':
            sb_puts(b, "\\\\");
            break;
        case '\n':
            sb_puts(b, "\\n");
            break;
        case '\r':
            sb_puts(b, "\\r");
            break;
        case '\t':
            sb_puts(b, "\\t");
            break;
        default:
            if (*p < 0x20)
                sb_printf(b, "\\u%04x", *p);
            else
                sb_putn(b, (const char *)p, 1);
        }
    }
    sb_putn(b, "\"", 1);
}

const char *sb_cstr(strbuf *b)
{
    return b->s ? b->s : "";
}

char *sb_take(strbuf *b)
{
    char *s = b->s ? b->s : sim_xstrdup("");
    sb_init(b);
    return s;
}

/* ---- tokenizer ------------------------------------------------------------- */
/*
 * One token is, at each position, the first that applies of:
 *   - a special token "<|name|>" (name: 1..64 of [A-Za-z0-9_]);
 *   - an optional single space followed by 1..8 ASCII letters/digits
 *     (longer runs are split every 8 letters/digits);
 *   - a run of 1..4 other printable ASCII characters or whitespace (like the
 *     merges a BPE tokenizer makes of "}, {" or "\": \""), ending before a
 *     space that starts a word and before "<|";
 *   - one UTF-8 character (an invalid byte is a token of its own).
 * The id is FNV-1a (32 bit) of the token bytes, masked to 31 bits, never 0.
 */

static int is_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
           (c >= 'A' && c <= 'Z');
}

static int is_symbol(unsigned char c)
{
    return c < 0x80 && !is_alnum(c) && (c >= 0x20 || c == '\n' || c == '\t');
}

int32_t sim_token_id(const char *bytes, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)bytes[i];
        h *= 16777619u;
    }
    h &= 0x7fffffffu;
    return h ? (int32_t)h : 1;
}

size_t sim_utf8_len(const unsigned char *s, size_t avail)
{
    size_t len;
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    if ((c & 0xe0) == 0xc0)
        len = 2;
    else if ((c & 0xf0) == 0xe0)
        len = 3;
    else if ((c & 0xf8) == 0xf0)
        len = 4;
    else
        return 1;
    if (len > avail)
        return 1;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 1;
    return len;
}

static int is_letter(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static size_t token_len(const unsigned char *s, size_t n)
{
    if (s[0] == '<' && n >= 5 && s[1] == '|') {
        size_t j = 2;
        while (j < n && j - 2 < 64 && (is_alnum(s[j]) || s[j] == '_'))
            j++;
        if (j > 2 && j + 1 < n && s[j] == '|' && s[j + 1] == '>')
            return j + 2;
    }
    /* A digit is a token of its own, as in Qwen's pre-tokenizer. */
    if (s[0] >= '0' && s[0] <= '9')
        return 1;
    size_t start = 0;
    if (s[0] == ' ' && n > 1 && is_letter(s[1]))
        start = 1;
    if (is_letter(s[start])) {
        size_t j = start;
        while (j < n && j - start < (start ? 7u : 6u) && is_letter(s[j]))
            j++;
        return j;
    }
    if (is_symbol(s[0])) {
        size_t j = 1;
        while (j < n && j < 3 && is_symbol(s[j]) &&
               !(s[j] == ' ' && j + 1 < n && is_letter(s[j + 1])) &&
               !(s[j] == '<' && j + 1 < n && s[j + 1] == '|'))
            j++;
        return j;
    }
    return sim_utf8_len(s, n);
}

void pv_free(piecevec *p)
{
    free(p->v);
    p->v = NULL;
    p->n = p->cap = 0;
}

void sim_tokenize(const char *text, size_t len, piecevec *out)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < len) {
        size_t l = token_len(s + i, len - i);
        if (out->n == out->cap) {
            out->cap = out->cap ? out->cap * 2 : 64;
            out->v = sim_xrealloc(out->v, out->cap * sizeof(tok_piece));
        }
        out->v[out->n].off = i;
        out->v[out->n].len = l;
        out->v[out->n].id = sim_token_id(text + i, l);
        sim_vocab_note(out->v[out->n].id, text + i, l);
        out->n++;
        i += l;
    }
}

void sim_tokenize_ids(const char *text, tokvec *out)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t len = strlen(text);
    size_t i = 0;
    while (i < len) {
        size_t l = token_len(s + i, len - i);
        int32_t id = sim_token_id(text + i, l);
        sim_vocab_note(id, text + i, l);
        tv_push(out, id);
        i += l;
    }
}

size_t sim_count_tokens(const char *text)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t len = strlen(text);
    size_t i = 0, count = 0;
    while (i < len) {
        i += token_len(s + i, len - i);
        count++;
    }
    return count;
}

/* ---- time ------------------------------------------------------------------ */

double sim_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

void sim_sleep_ms(double ms)
{
    double deadline = sim_now_ms() + ms;
    double left;
    while ((left = deadline - sim_now_ms()) > 0) {
        struct timespec ts = {(time_t)(left / 1000.0),
                              (long)((left - (double)(time_t)(left / 1000.0) * 1000.0) * 1e6)};
        nanosleep(&ts, NULL);
    }
}
