/*
 * sim_model.c - the simulator's "model file": a small text file holding
 * settings and scripted replies (format described in README.md).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim_internal.h"

#define MODEL_MAGIC "RKLLM-SIM 1"
#define MODEL_MAX_BYTES (16u * 1024u * 1024u)

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' ||
           c == '\f';
}

static char *trim(char *s)
{
    while (is_space(*s))
        s++;
    size_t n = strlen(s);
    while (n && is_space(s[n - 1]))
        s[--n] = '\0';
    return s;
}

static int starts_word(const char *s, const char *word)
{
    size_t n = strlen(word);
    return strncmp(s, word, n) == 0 && (s[n] == '\0' || is_space(s[n]));
}

static void model_error(const char *path, int line, const char *msg,
                        const char *detail)
{
    fprintf(stderr, "E RKLLM: %s:%d: %s%s%s\n", path, line, msg,
            detail ? ": " : "", detail ? detail : "");
}

/* Decodes \n, \t and \\ in a reply text (other backslashes stay as they are). */
static char *decode_escapes(const char *s)
{
    strbuf b;
    sb_init(&b);
    for (; *s; s++) {
        if (s[0] == '\\' && s[1] == 'n') {
            sb_putn(&b, "\n", 1);
            s++;
        } else if (s[0] == '\\' && s[1] == 't') {
            sb_putn(&b, "\t", 1);
            s++;
        } else if (s[0] == '\\' && s[1] == '\\') {
            sb_putn(&b, "\\", 1);
            s++;
        } else {
            sb_putn(&b, s, 1);
        }
    }
    return sb_take(&b);
}

static int parse_long(const char *s, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

static int parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v != v)
        return -1;
    *out = v;
    return 0;
}

static int parse_setting(sim_model *m, char *line, const char *path, int lineno)
{
    char *key = line;
    char *p = key;
    while (*p && !is_space(*p))
        p++;
    if (!*p) {
        model_error(path, lineno, "setting without a value", key);
        return -1;
    }
    *p++ = '\0';
    while (is_space(*p))
        p++;
    char *value = p;
    while (*p && !is_space(*p))
        p++;
    if (*p) {
        *p++ = '\0';
        while (is_space(*p))
            p++;
        if (*p && *p != '#') {
            model_error(path, lineno, "unexpected text after the value", p);
            return -1;
        }
    }
    if (!*value || *value == '#') {
        model_error(path, lineno, "setting without a value", key);
        return -1;
    }

    long l;
    double d;
    if (strcmp(key, "max_context_limit") == 0) {
        if (parse_long(value, &l) || l <= 0 || l > 1000000)
            goto bad;
        m->max_context_limit = (int)l;
    } else if (strcmp(key, "prefill_ms_per_token") == 0) {
        if (parse_double(value, &d) || d < 0)
            goto bad;
        m->prefill_ms_per_token = d;
    } else if (strcmp(key, "decode_ms_per_token") == 0) {
        if (parse_double(value, &d) || d < 0)
            goto bad;
        m->decode_ms_per_token = d;
    } else if (strcmp(key, "init_ms") == 0) {
        if (parse_double(value, &d) || d < 0 || d > 600000)
            goto bad;
        m->init_ms = d;
    } else if (strcmp(key, "init_error") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->init_error = (int)l;
    } else if (strcmp(key, "crash_in_init") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->crash_in_init = (int)l;
    } else if (strcmp(key, "error_at_token") == 0) {
        if (parse_long(value, &l) || l < -1)
            goto bad;
        m->error_at_token = l;
    } else if (strcmp(key, "abort_at_token") == 0) {
        if (parse_long(value, &l) || l < -1)
            goto bad;
        m->abort_at_token = l;
    } else if (strcmp(key, "hang_at_token") == 0) {
        if (parse_long(value, &l) || l < -1)
            goto bad;
        m->hang_at_token = l;
    } else if (strcmp(key, "emit_null_text") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->emit_null_text = (int)l;
    } else if (strcmp(key, "emit_null_result") == 0) {
        if (parse_long(value, &l) || l < 0 || l > 2)
            goto bad;
        m->emit_null_result = (int)l;
    } else if (strcmp(key, "abort_after_prefill") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->abort_after_prefill = (int)l;
    } else if (strcmp(key, "no_prompt_cache_save") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->no_prompt_cache_save = (int)l;
    } else if (strcmp(key, "ignore_cache_with_history") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->ignore_cache_with_history = (int)l;
    } else if (strcmp(key, "tools_keep_kv") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->tools_keep_kv = (int)l;
    } else if (strcmp(key, "kv_cache_size_error") == 0) {
        if (parse_long(value, &l) || (l != 0 && l != 1))
            goto bad;
        m->kv_cache_size_error = (int)l;
    } else if (strcmp(key, "cache_bytes_per_token") == 0) {
        if (parse_long(value, &l) || l < 0 || l > 1048576)
            goto bad;
        m->cache_bytes_per_token = l;
    } else if (strcmp(key, "memory_usage_mb") == 0) {
        if (parse_double(value, &d) || d <= 0)
            goto bad;
        m->memory_usage_mb = d;
    } else if (strcmp(key, "context_full") == 0) {
        if (strcmp(value, "stop") == 0)
            m->context_shift = 0;
        else if (strcmp(value, "shift") == 0)
            m->context_shift = 1;
        else
            goto bad;
    } else {
        model_error(path, lineno, "unknown setting", key);
        return -1;
    }
    return 0;
bad:
    model_error(path, lineno, "bad value for setting", key);
    return -1;
}

static int valid_var_name(const char *s, size_t n)
{
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_'))
            return 0;
    return 1;
}

/* "reply <role> <pattern> => <text>" (line starts after "reply"). */
static int parse_reply(sim_model *m, char *rest, const char *path, int lineno)
{
    rest = trim(rest);
    char *role = rest;
    char *p = role;
    while (*p && !is_space(*p))
        p++;
    if (!*p) {
        model_error(path, lineno, "expected: reply <role> <pattern> => <text>",
                    NULL);
        return -1;
    }
    *p++ = '\0';
    if (strcmp(role, "user") && strcmp(role, "tool") && strcmp(role, "*")) {
        model_error(path, lineno, "reply role must be user, tool or *", role);
        return -1;
    }
    char *arrow = strstr(p, "=>");
    if (!arrow) {
        model_error(path, lineno, "reply line without =>", NULL);
        return -1;
    }
    *arrow = '\0';
    char *pattern = trim(p);
    char *text = arrow + 2;
    while (*text == ' ' || *text == '\t')
        text++;
    if (!*pattern) {
        model_error(path, lineno, "empty reply pattern (use * to match anything)",
                    NULL);
        return -1;
    }

    sim_rule r = {0};
    r.role = sim_xstrdup(role);
    if (strcmp(pattern, "*") == 0) {
        r.any = 1;
        r.literal = sim_xstrdup("");
    } else {
        char *brace = strchr(pattern, '{');
        if (brace) {
            char *close = strchr(brace, '}');
            if (!close || close[1] != '\0' ||
                !valid_var_name(brace + 1, (size_t)(close - brace - 1))) {
                free(r.role);
                model_error(path, lineno,
                            "a pattern may hold one {name} placeholder, at its end",
                            pattern);
                return -1;
            }
            r.literal = sim_xstrndup(pattern, (size_t)(brace - pattern));
            r.var = sim_xstrndup(brace + 1, (size_t)(close - brace - 1));
        } else {
            r.literal = sim_xstrdup(pattern);
        }
    }
    r.text = decode_escapes(text);
    m->rules = sim_xrealloc(m->rules, (m->nrules + 1) * sizeof(sim_rule));
    m->rules[m->nrules++] = r;
    return 0;
}

int sim_model_load(const char *path, sim_model *m)
{
    memset(m, 0, sizeof(*m));
    m->max_context_limit = 4096;
    m->error_at_token = -1;
    m->abort_at_token = -1;
    m->hang_at_token = -1;
    m->memory_usage_mb = 790.0;

    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "E RKLLM: failed to open model file %s: %s\n", path,
                strerror(errno));
        return -1;
    }
    strbuf data;
    sb_init(&data);
    char chunk[8192];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        sb_putn(&data, chunk, got);
        if (data.n > MODEL_MAX_BYTES)
            break;
    }
    int read_error = ferror(f);
    fclose(f);
    if (read_error || data.n > MODEL_MAX_BYTES) {
        fprintf(stderr, "E RKLLM: failed to read model file %s\n", path);
        sb_free(&data);
        return -1;
    }

    char *text = data.s ? data.s : (char *)"";
    int lineno = 0;
    int rc = 0;
    /* Split on '\n' by hand: strtok would merge empty lines. */
    char *line = text;
    while (line && rc == 0) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        lineno++;
        size_t len = strlen(line);
        if (len && line[len - 1] == '\r')
            line[--len] = '\0';
        if (lineno == 1) {
            if (strcmp(line, MODEL_MAGIC) != 0) {
                fprintf(stderr, "E RKLLM: invalid rknn llm model magic (%s)\n",
                        path);
                rc = -1;
            }
        } else {
            char *t = trim(line);
            if (!*t || *t == '#') {
                /* blank or comment */
            } else if (starts_word(t, "reply")) {
                rc = parse_reply(m, t + 5, path, lineno);
            } else if (strncmp(t, "default", 7) == 0 &&
                       (is_space(t[7]) || strncmp(t + 7, "=>", 2) == 0)) {
                char *arrow = strstr(t, "=>");
                char *rest = arrow ? trim(t + 7) : NULL;
                if (!arrow || rest != arrow) {
                    model_error(path, lineno, "expected: default => <text>", NULL);
                    rc = -1;
                } else if (!m->default_reply) {
                    char *r = arrow + 2;
                    while (*r == ' ' || *r == '\t')
                        r++;
                    m->default_reply = decode_escapes(r);
                }
            } else {
                rc = parse_setting(m, t, path, lineno);
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    if (rc == 0 && lineno == 0) {
        fprintf(stderr, "E RKLLM: invalid rknn llm model magic (%s)\n", path);
        rc = -1;
    }
    sb_free(&data);
    if (rc != 0)
        sim_model_free(m);
    return rc;
}

void sim_model_free(sim_model *m)
{
    for (size_t i = 0; i < m->nrules; i++) {
        free(m->rules[i].role);
        free(m->rules[i].literal);
        free(m->rules[i].var);
        free(m->rules[i].text);
    }
    free(m->rules);
    free(m->default_reply);
    m->rules = NULL;
    m->nrules = 0;
    m->default_reply = NULL;
}

/* Case-insensitive (ASCII) search; returns the match or NULL. */
static const char *find_ci(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    if (!n)
        return hay;
    for (const char *h = hay; *h; h++) {
        size_t i = 0;
        while (i < n && h[i] &&
               tolower((unsigned char)h[i]) == tolower((unsigned char)needle[i]))
            i++;
        if (i == n)
            return h;
    }
    return NULL;
}

static char *capture_rest(const char *s)
{
    while (is_space(*s))
        s++;
    size_t n = strlen(s);
    for (;;) {
        while (n && is_space(s[n - 1]))
            n--;
        if (n && (s[n - 1] == '.' || s[n - 1] == '!' || s[n - 1] == '?'))
            n--;
        else
            break;
    }
    return sim_xstrndup(s, n);
}

/* Replaces every "{name}" in text with value. */
static void substitute(strbuf *out, const char *text, const char *name,
                       const char *value)
{
    size_t nl = strlen(name);
    for (const char *p = text; *p;) {
        if (p[0] == '{' && strncmp(p + 1, name, nl) == 0 && p[1 + nl] == '}') {
            sb_puts(out, value);
            p += nl + 2;
        } else {
            sb_putn(out, p, 1);
            p++;
        }
    }
}

/* Removes every <think>...</think> block and the whitespace after it. */
static char *strip_thinking(const char *text)
{
    strbuf b;
    sb_init(&b);
    const char *p = text;
    for (;;) {
        const char *open = strstr(p, "<think>");
        if (!open) {
            sb_puts(&b, p);
            break;
        }
        sb_putn(&b, p, (size_t)(open - p));
        const char *close = strstr(open, "</think>");
        if (!close)
            break;
        p = close + strlen("</think>");
        while (is_space(*p))
            p++;
    }
    return sb_take(&b);
}

/* The request a user turn asks: after the last "Now the user says: ", which ends
 * the notes of what Home Assistant handled itself in front of it, else the
 * whole turn. */
static const char *latest_request(const char *role, const char *input)
{
    static const char marker[] = "Now the user says: ";
    const char *request = input;
    if (strcmp(role, "user") != 0)
        return input;
    for (const char *at = strstr(input, marker); at; at = strstr(at + 1, marker))
        request = at + strlen(marker);
    return request;
}

char *sim_model_reply(const sim_model *m, const char *role, const char *full_input,
                      int enable_thinking)
{
    /* The rule whose pattern occurs first in the request wins (ties: the rule
       listed first); "*" matches at the end, after every other pattern. A
       request that holds several commands is answered on the first of them,
       as a confused small model may. */
    const char *input = latest_request(role, full_input);
    const sim_rule *hit = NULL;
    const char *hit_at = NULL;
    const char *input_end = input + strlen(input);
    for (size_t i = 0; i < m->nrules; i++) {
        const sim_rule *r = &m->rules[i];
        if (strcmp(r->role, "*") != 0 && strcmp(r->role, role) != 0)
            continue;
        const char *at = r->any ? input_end : find_ci(input, r->literal);
        if (at && (!hit || at < hit_at)) {
            hit = r;
            hit_at = at;
        }
    }
    char *captured =
        hit && hit->var ? capture_rest(hit_at + strlen(hit->literal)) : NULL;

    strbuf b;
    sb_init(&b);
    if (hit) {
        if (hit->var) {
            strbuf tmp;
            sb_init(&tmp);
            substitute(&tmp, hit->text, hit->var, captured);
            substitute(&b, sb_cstr(&tmp), "input", full_input);
            sb_free(&tmp);
        } else {
            substitute(&b, hit->text, "input", full_input);
        }
    } else if (m->default_reply) {
        substitute(&b, m->default_reply, "input", full_input);
    } else {
        sb_puts(&b, "You said: ");
        sb_puts(&b, full_input);
    }
    free(captured);
    char *reply = sb_take(&b);
    if (!enable_thinking) {
        char *stripped = strip_thinking(reply);
        free(reply);
        reply = stripped;
    }
    return reply;
}
