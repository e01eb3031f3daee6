/*
 * sim_cache.c - prompt cache files of the rockchip_llm RKLLM simulator.
 *
 * Format (text, deterministic):
 *   RKLLM-SIM-CACHE 1\n
 *   tokens <N>\n
 *   <N token ids, decimal, 16 per line, separated by single spaces>\n
 *   end\n
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim_internal.h"

#define CACHE_MAGIC "RKLLM-SIM-CACHE 1\n"
#define CACHE_MAX_BYTES (1024u * 1024u * 1024u)

int sim_cache_write(const char *path, const tokvec *tokens, long pad_per_token)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "E RKLLM: failed to save prompt cache to %s: %s\n", path,
                strerror(errno));
        return -1;
    }
    strbuf b;
    sb_init(&b);
    sb_puts(&b, CACHE_MAGIC);
    sb_printf(&b, "tokens %zu\n", tokens->n);
    for (size_t i = 0; i < tokens->n; i++)
        sb_printf(&b, "%d%s", (int)tokens->v[i],
                  (i % 16 == 15 || i + 1 == tokens->n) ? "\n" : " ");
    sb_puts(&b, "end\n");
    unsigned long long pad = (unsigned long long)pad_per_token * tokens->n;
    if (pad)
        sb_printf(&b, "pad %llu\n", pad);
    size_t written = fwrite(b.s, 1, b.n, f);
    int failed = written != b.n;
    /* padding stands for the size of a real KV dump */
    char dots[65536];
    memset(dots, '.', sizeof(dots));
    while (!failed && pad) {
        size_t n = pad < sizeof(dots) ? (size_t)pad : sizeof(dots);
        failed = fwrite(dots, 1, n, f) != n;
        pad -= n;
    }
    failed = failed || fflush(f) != 0 || ferror(f);
    int errsv = errno;
    if (fclose(f) != 0 && !failed) {
        failed = 1;
        errsv = errno;
    }
    sb_free(&b);
    if (failed) {
        fprintf(stderr, "E RKLLM: failed to save prompt cache to %s: %s\n", path,
                strerror(errsv));
        unlink(path);
        return -1;
    }
    return 0;
}

int sim_cache_read(const char *path, tokvec *out)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "E RKLLM: failed to open prompt cache %s: %s\n", path,
                strerror(errno));
        return -1;
    }
    strbuf data;
    sb_init(&data);
    char chunk[8192];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), f)) > 0 &&
           data.n <= CACHE_MAX_BYTES)
        sb_putn(&data, chunk, got);
    int read_error = ferror(f);
    fclose(f);
    if (read_error || data.n > CACHE_MAX_BYTES) {
        fprintf(stderr, "E RKLLM: failed to read prompt cache %s\n", path);
        sb_free(&data);
        return -1;
    }
    const char *s = sb_cstr(&data);
    size_t magic_len = strlen(CACHE_MAGIC);
    if (data.n < magic_len || memcmp(s, CACHE_MAGIC, magic_len) != 0 ||
        memchr(s, '\0', data.n) != NULL) {
        fprintf(stderr, "E RKLLM: invalid prompt cache file %s (bad magic)\n",
                path);
        sb_free(&data);
        return -1;
    }

    tokvec ids;
    tv_init(&ids);
    const char *p = s + magic_len;
    char *end;
    int ok = 0;
    if (strncmp(p, "tokens ", 7) == 0) {
        errno = 0;
        unsigned long long n = strtoull(p + 7, &end, 10);
        if (!errno && end != p + 7 && *end == '\n' && n <= CACHE_MAX_BYTES) {
            p = end + 1;
            ok = 1;
            for (unsigned long long i = 0; i < n && ok; i++) {
                while (*p == ' ' || *p == '\n')
                    p++;
                errno = 0;
                long v = strtol(p, &end, 10);
                if (errno || end == p || v <= 0 || v > 0x7fffffffL)
                    ok = 0;
                else
                    tv_push(&ids, (int32_t)v);
                p = end;
            }
            if (ok) {
                while (*p == ' ' || *p == '\n')
                    p++;
                ok = strncmp(p, "end", 3) == 0 &&
                     (p[3] == '\0' || (p[3] == '\n' && p[4] == '\0'));
                if (!ok && strncmp(p, "end\npad ", 8) == 0) {
                    /* padding: "pad <N>\n" and exactly N dots */
                    errno = 0;
                    unsigned long long pad = strtoull(p + 8, &end, 10);
                    size_t rest = data.n - (size_t)(end + 1 - s);
                    ok = !errno && end != p + 8 && *end == '\n' && rest == pad &&
                         strspn(end + 1, ".") == pad;
                }
            }
        }
    }
    sb_free(&data);
    if (!ok) {
        fprintf(stderr, "E RKLLM: prompt cache file %s is truncated or corrupt\n",
                path);
        tv_free(&ids);
        return -1;
    }
    tv_free(out);
    *out = ids;
    return 0;
}
