/*
 * sim_chat.c - how the simulated model reads its context: the text behind
 * token ids (a process-wide vocabulary of every token tokenized so far) and
 * the latest request of a ChatML conversation (README.md, "Reading the
 * conversation").
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "sim_internal.h"

/* ---- vocabulary: token id -> bytes ------------------------------------------ */

typedef struct {
    int32_t id; /* 0: empty slot (ids are never 0) */
    char *bytes;
    size_t len;
} vocab_slot;

static pthread_mutex_t g_vocab_mu = PTHREAD_MUTEX_INITIALIZER;
static vocab_slot *g_vocab;
static size_t g_vocab_cap; /* a power of two */
static size_t g_vocab_used;

static vocab_slot *vocab_find(vocab_slot *table, size_t cap, int32_t id)
{
    size_t i = ((uint32_t)id * 2654435761u) & (cap - 1);
    while (table[i].id != 0 && table[i].id != id)
        i = (i + 1) & (cap - 1);
    return &table[i];
}

static void vocab_grow(void)
{
    size_t cap = g_vocab_cap ? g_vocab_cap * 2 : 4096;
    vocab_slot *table = sim_xmalloc(cap * sizeof(vocab_slot));
    memset(table, 0, cap * sizeof(vocab_slot));
    for (size_t i = 0; i < g_vocab_cap; i++)
        if (g_vocab[i].id != 0)
            *vocab_find(table, cap, g_vocab[i].id) = g_vocab[i];
    free(g_vocab);
    g_vocab = table;
    g_vocab_cap = cap;
}

void sim_vocab_note(int32_t id, const char *bytes, size_t len)
{
    pthread_mutex_lock(&g_vocab_mu);
    if ((g_vocab_used + 1) * 2 > g_vocab_cap)
        vocab_grow();
    vocab_slot *slot = vocab_find(g_vocab, g_vocab_cap, id);
    if (slot->id == 0) { /* the first text seen for an id stays (FNV collisions) */
        slot->id = id;
        slot->bytes = sim_xstrndup(bytes, len);
        slot->len = len;
        g_vocab_used++;
    }
    pthread_mutex_unlock(&g_vocab_mu);
}

void sim_detokenize(const tokvec *tokens, strbuf *out)
{
    pthread_mutex_lock(&g_vocab_mu);
    for (size_t i = 0; i < tokens->n; i++) {
        const vocab_slot *slot =
            g_vocab_cap ? vocab_find(g_vocab, g_vocab_cap, tokens->v[i]) : NULL;
        if (slot && slot->id != 0)
            sb_putn(out, slot->bytes, slot->len);
        else
            sb_puts(out, "\xef\xbf\xbd"); /* a token of a file, never read as text */
    }
    pthread_mutex_unlock(&g_vocab_mu);
}

/* ---- the latest request of a ChatML conversation ------------------------------ */

#define IM_START "<|im_start|>"
#define IM_END "<|im_end|>"

/* The start of the last "<|im_start|>" before end, or NULL. */
static const char *last_turn_before(const char *text, const char *end)
{
    const char *found = NULL;
    for (const char *p = strstr(text, IM_START); p && p < end;
         p = strstr(p + 1, IM_START))
        found = p;
    return found;
}

static int role_is(const char *turn, const char *role)
{
    size_t n = strlen(role);
    const char *p = turn + strlen(IM_START);
    return strncmp(p, role, n) == 0 && p[n] == '\n';
}

static const char *turn_body(const char *turn)
{
    return strchr(turn, '\n') + 1;
}

static char *trimmed(const char *s, size_t n)
{
    while (n && strchr(" \t\r\n", *s)) {
        s++;
        n--;
    }
    while (n && strchr(" \t\r\n", s[n - 1]))
        n--;
    return sim_xstrndup(s, n);
}

int sim_read_request(const char *context, const char *tool_tag, char **role,
                     char **content)
{
    /* The context must end in the generation prompt: an open assistant turn
       (an empty think block may follow it). */
    const char *open = last_turn_before(context, context + strlen(context));
    if (!open || !role_is(open, "assistant") || strstr(open, IM_END))
        return -1;
    const char *body = turn_body(open);
    if (*body && strcmp(body, "<think>\n\n</think>\n\n") != 0)
        return -1;
    const char *input = last_turn_before(context, open);
    if (!input || !role_is(input, "user"))
        return -1;
    const char *start = turn_body(input);
    const char *end = strstr(start, IM_END);
    if (!end || end > open)
        return -1;
    char *text = trimmed(start, (size_t)(end - start));

    /* A user turn made only of one tool response block is a tool result; the
       model takes it as one only when it answers a call of the turn before. */
    strbuf opening, closing;
    sb_init(&opening);
    sb_init(&closing);
    sb_printf(&opening, "<%s>", tool_tag);
    sb_printf(&closing, "</%s>", tool_tag);
    size_t no = opening.n, nc = closing.n, nt = strlen(text);
    int tool_block = nt >= no + nc && strncmp(text, sb_cstr(&opening), no) == 0 &&
                     strcmp(text + nt - nc, sb_cstr(&closing)) == 0 &&
                     !strstr(text + no, sb_cstr(&opening));
    sb_free(&opening);
    sb_free(&closing);
    const char *call = tool_block ? last_turn_before(context, input) : NULL;
    if (call && role_is(call, "assistant")) {
        const char *call_end = strstr(call, IM_END);
        const char *tag = strstr(call, "<tool_call>");
        if (tag && (!call_end || tag < call_end)) {
            *role = sim_xstrdup("tool");
            *content = trimmed(text + no, nt - no - nc);
            free(text);
            return 0;
        }
    }
    *role = sim_xstrdup("user");
    *content = text;
    return 0;
}
