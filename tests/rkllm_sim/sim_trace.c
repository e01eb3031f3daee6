/*
 * sim_trace.c - the trace file of the rockchip_llm RKLLM simulator.
 *
 * With RKLLM_SIM_TRACE naming a file, counter changes and finished runs are
 * appended to it, one line each, so a test can see what happened inside a
 * worker process (see README.md, "Trace file").
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "sim_internal.h"

void sim_trace(const char *kind, const char *fmt, ...)
{
    const char *path = getenv("RKLLM_SIM_TRACE");
    if (!path || !*path)
        return;
    int saved_errno = errno;
    va_list ap;
    va_start(ap, fmt);
    int body = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    int head = snprintf(NULL, 0, "%s %ld ", kind, (long)getpid());
    if (body >= 0 && head >= 0) {
        size_t len = (size_t)head + (size_t)body + 1; /* + the newline */
        char *line = sim_xmalloc(len + 1);
        snprintf(line, (size_t)head + 1, "%s %ld ", kind, (long)getpid());
        va_start(ap, fmt);
        vsnprintf(line + head, (size_t)body + 1, fmt, ap);
        va_end(ap);
        line[len - 1] = '\n';
        /* opened per line: the variable may change, and a forked child must
           not share a descriptor; O_APPEND makes the single write atomic */
        int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            ssize_t written = write(fd, line, len);
            (void)written; /* tracing must never change the run */
            close(fd);
        }
        free(line);
    }
    errno = saved_errno;
}
