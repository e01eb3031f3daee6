/*
 * rkllm_sim.c - the rockchip_llm RKLLM runtime simulator: the exported API,
 * handles, the run engine (template, prefix reuse, KV history, streaming,
 * abort, perf) and the test-only rkllm_sim_* debug exports.
 *
 * Semantics are specified in README.md next to this file.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "rkllm_abi.h"
#include "sim_internal.h"

#if RKLLM_SIM_ABI == 12
#define SIM_VERSION "1.2.3"
#else
#define SIM_VERSION "1.3.0"
#endif

#ifndef RKLLM_SIM_UNVERSIONED
/* Found by the binding's version scan; must stay in the binary. Real builds
   carry only the format string (a vendor build: -DRKLLM_SIM_UNVERSIONED). */
__attribute__((used)) static const char sim_version_banner[] =
    "rkllm-runtime version: " SIM_VERSION " (rockchip_llm simulator)";
#endif

#define SIM_MAGIC 0x52534d31u
#define DEFAULT_SYSTEM "You are a helpful assistant."
#define DEFAULT_TOOL_TAG "tool_response"
#define DEFAULT_CACHE_PATH "./prompt_cache.bin"
#define THINK_OFF "<think>\n\n</think>\n\n"
#define TURN_END "<|im_end|>\n"

/* ---- counters ----------------------------------------------------------- */

enum {
    C_INIT,
    C_DESTROY,
    C_RUN,
    C_CACHE_SAVE,
    C_CACHE_LOAD,
    C_PREFILL,
    C_CLEAR_KV,
    C_SET_TOOLS,
    C_SET_TEMPLATE,
    C_ABORT,
    C_CACHE_RELEASE,
    C_COUNT
};

static const char *const counter_names[C_COUNT] = {
    "init",          "destroy",         "run",
    "prompt_cache_save", "prompt_cache_load", "prefill_tokens",
    "clear_kv",      "set_function_tools", "set_chat_template",
    "abort",         "prompt_cache_release",
};

static long long counters[C_COUNT];

static void count(int which, long long delta)
{
    __atomic_fetch_add(&counters[which], delta, __ATOMIC_RELAXED);
    if (delta != 0)
        sim_trace("count", "%s %lld", counter_names[which], delta);
}

/* ---- handles ------------------------------------------------------------ */

typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} sim_sampling;

enum { SYS_DEFAULT, SYS_RAW, SYS_TOOLS };

typedef struct sim_handle {
    uint32_t magic;
    struct sim_handle *next; /* registry of live handles */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* abort requests and the end of runs */

    sim_model model;
    char *model_path;
    int max_context_len;
    int max_new_tokens;
    int n_keep;
    int n_batch;
    sim_sampling sampling;
#if RKLLM_SIM_ABI >= 13
    RKLLMCallback cb;
#else
    LLMResultCallback cb;
#endif

    /* chat template */
    int sys_mode;
    char *system_raw;  /* SYS_RAW: the whole system block */
    char *system_text; /* SYS_TOOLS: the system prompt text */
    char *tools_json;  /* SYS_TOOLS: may be NULL */
    char *tool_tag;
    char *user_prefix;  /* NULL: built-in */
    char *user_postfix; /* NULL: built-in */

    /* KV state */
    tokvec kv;
    size_t system_len;
    tokvec loaded_cache;

    /* run state */
    int running;
    int abort_flag;
    int destroying;
    pthread_t run_thread;
    int async_joinable;
    pthread_t async_thread;
    char *last_run_json;
} sim_handle;

static pthread_mutex_t g_registry_mu = PTHREAD_MUTEX_INITIALIZER;
static sim_handle *g_handles;
static long long g_live_handles;

static sim_handle *lookup(LLMHandle handle)
{
    sim_handle *found = NULL;
    if (!handle)
        return NULL;
    pthread_mutex_lock(&g_registry_mu);
    for (sim_handle *h = g_handles; h; h = h->next)
        if (h == handle && h->magic == SIM_MAGIC) {
            found = h;
            break;
        }
    pthread_mutex_unlock(&g_registry_mu);
    return found;
}

static void registry_add(sim_handle *h)
{
    pthread_mutex_lock(&g_registry_mu);
    h->next = g_handles;
    g_handles = h;
    g_live_handles++;
    pthread_mutex_unlock(&g_registry_mu);
    sim_trace("count", "live_handles +1");
}

static int registry_remove(sim_handle *h)
{
    int found = 0;
    pthread_mutex_lock(&g_registry_mu);
    for (sim_handle **pp = &g_handles; *pp; pp = &(*pp)->next)
        if (*pp == h) {
            *pp = h->next;
            found = 1;
            g_live_handles--;
            break;
        }
    pthread_mutex_unlock(&g_registry_mu);
    if (found)
        sim_trace("count", "live_handles -1");
    return found;
}

static void handle_free(sim_handle *h)
{
    sim_model_free(&h->model);
    free(h->model_path);
    free(h->system_raw);
    free(h->system_text);
    free(h->tools_json);
    free(h->tool_tag);
    free(h->user_prefix);
    free(h->user_postfix);
    tv_free(&h->kv);
    tv_free(&h->loaded_cache);
    free(h->last_run_json);
    pthread_cond_destroy(&h->cv);
    pthread_mutex_destroy(&h->mu);
    h->magic = 0;
    free(h);
}

/* ---- template ----------------------------------------------------------- */

#define TOOLS_INTRO                                                            \
    "# Tools\n\nYou may call one or more functions to assist with the user "   \
    "query.\n\nYou are provided with function signatures within "              \
    "<tools></tools> XML tags:\n"
#define TOOLS_OUTRO                                                            \
    "\n\nFor each function call, return a json object with function name and " \
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"         \
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"          \
    "</tool_call>"

static void build_system_block(const sim_handle *h, strbuf *out)
{
    switch (h->sys_mode) {
    case SYS_RAW:
        sb_puts(out, h->system_raw ? h->system_raw : "");
        break;
    case SYS_TOOLS:
        sb_puts(out, "<|im_start|>system\n");
        sb_puts(out, h->system_text ? h->system_text : DEFAULT_SYSTEM);
        if (h->tools_json) {
            /* The words Qwen3's own chat template puts around the tools. */
            sb_puts(out, "\n\n" TOOLS_INTRO "<tools>\n");
            sb_puts(out, h->tools_json);
            sb_puts(out, "\n</tools>" TOOLS_OUTRO);
        }
        sb_puts(out, TURN_END);
        break;
    default:
        sb_puts(out, "<|im_start|>system\n" DEFAULT_SYSTEM TURN_END);
    }
}

static const char *current_system(const sim_handle *h)
{
    switch (h->sys_mode) {
    case SYS_RAW:
        return h->system_raw ? h->system_raw : "";
    case SYS_TOOLS:
        return h->system_text ? h->system_text : DEFAULT_SYSTEM;
    default:
        return DEFAULT_SYSTEM;
    }
}

/* ---- runs --------------------------------------------------------------- */

typedef struct {
    sim_handle *h;
    int input_type;
    char *role;
    char *prompt; /* RKLLM_INPUT_PROMPT */
    tokvec tokens; /* RKLLM_INPUT_TOKEN */
    int enable_thinking;
    int keep_history;
    int save_cache;
    char *cache_path;
    int has_sampling;
    sim_sampling sampling;
    int max_new_tokens; /* per run (1.3), <= 0: none */
    void *userdata;
} run_job;

static void job_free(run_job *job)
{
    free(job->role);
    free(job->prompt);
    tv_free(&job->tokens);
    free(job->cache_path);
    memset(job, 0, sizeof(*job));
}

static int job_prepare(sim_handle *h, const RKLLMInput *input,
                       const RKLLMInferParam *infer, void *userdata,
                       run_job *job)
{
    memset(job, 0, sizeof(*job));
    tv_init(&job->tokens);
    job->h = h;
    if (!input || !infer) {
        fputs("E RKLLM: rkllm_run needs an input and infer params\n", stderr);
        return -1;
    }
    if (infer->mode != RKLLM_INFER_GENERATE) {
        fprintf(stderr,
                "E RKLLM: infer mode %d is not simulated (only RKLLM_INFER_GENERATE)\n",
                (int)infer->mode);
        return -1;
    }
    const char *role = input->role ? input->role : "user";
    if (strcmp(role, "user") != 0 && strcmp(role, "tool") != 0) {
        fprintf(stderr, "E RKLLM: unsupported role '%s' (user or tool)\n", role);
        return -1;
    }
    job->input_type = (int)input->input_type;
    if (input->input_type == RKLLM_INPUT_PROMPT) {
        if (!input->prompt_input) {
            fputs("E RKLLM: prompt_input is NULL\n", stderr);
            return -1;
        }
        job->prompt = sim_xstrdup(input->prompt_input);
    } else if (input->input_type == RKLLM_INPUT_TOKEN) {
        if (!input->token_input.input_ids || !input->token_input.n_tokens) {
            fputs("E RKLLM: token_input is empty\n", stderr);
            return -1;
        }
        tv_append(&job->tokens, input->token_input.input_ids,
                  input->token_input.n_tokens);
    } else {
        fprintf(stderr, "E RKLLM: input type %d is not simulated\n",
                (int)input->input_type);
        return -1;
    }
    job->role = sim_xstrdup(role);
    job->enable_thinking = input->enable_thinking ? 1 : 0;
    job->keep_history = infer->keep_history ? 1 : 0;
    if (infer->prompt_cache_params && infer->prompt_cache_params->save_prompt_cache) {
        job->save_cache = 1;
        const char *path = infer->prompt_cache_params->prompt_cache_path;
        job->cache_path = sim_xstrdup(path ? path : DEFAULT_CACHE_PATH);
    }
#if RKLLM_SIM_ABI >= 13
    if (infer->sampling_params) {
        const RKLLMSamplingParam *s = infer->sampling_params;
        job->has_sampling = 1;
        job->sampling.top_k = s->top_k;
        job->sampling.top_p = s->top_p;
        job->sampling.temperature = s->temperature;
        job->sampling.repeat_penalty = s->repeat_penalty;
        job->sampling.frequency_penalty = s->frequency_penalty;
        job->sampling.presence_penalty = s->presence_penalty;
        job->sampling.mirostat = s->mirostat;
        job->sampling.mirostat_tau = s->mirostat_tau;
        job->sampling.mirostat_eta = s->mirostat_eta;
    }
    job->max_new_tokens = infer->max_new_tokens;
#endif
    job->userdata = userdata;
    return 0;
}

static int emit(sim_handle *h, const run_job *job, RKLLMResult *r,
                LLMCallState state)
{
#if RKLLM_SIM_ABI >= 13
    if (!h->cb.result_callback)
        return 0;
    return h->cb.result_callback(
        r, job->userdata ? job->userdata : h->cb.result_userdata, state);
#else
    if (!h->cb)
        return 0;
    return h->cb(r, job->userdata, state);
#endif
}

static struct timespec deadline_ts(double ms)
{
    struct timespec ts;
    double sec = ms / 1000.0;
    ts.tv_sec = (time_t)sec;
    long ns = (long)((ms - (double)ts.tv_sec * 1000.0) * 1e6) + 1;
    if (ns >= 1000000000L) {
        ts.tv_sec += 1;
        ns -= 1000000000L;
    }
    if (ns < 0)
        ns = 0;
    ts.tv_nsec = ns;
    return ts;
}

/* Sleeps until deadline (monotonic ms) unless aborted; returns the abort flag. */
static int wait_until(sim_handle *h, double deadline)
{
    pthread_mutex_lock(&h->mu);
    while (!h->abort_flag && sim_now_ms() < deadline) {
        struct timespec ts = deadline_ts(deadline);
        pthread_cond_timedwait(&h->cv, &h->mu, &ts);
    }
    int aborted = h->abort_flag;
    pthread_mutex_unlock(&h->mu);
    return aborted;
}

/* Sleeps until deadline whatever the abort flag says. */
static void sleep_until(sim_handle *h, double deadline)
{
    pthread_mutex_lock(&h->mu);
    while (sim_now_ms() < deadline) {
        struct timespec ts = deadline_ts(deadline);
        pthread_cond_timedwait(&h->cv, &h->mu, &ts);
    }
    pthread_mutex_unlock(&h->mu);
}

typedef struct {
    const char *status;
    size_t seq_tokens;
    size_t reused;
    size_t prefilled;
    size_t generated;
    int aborted;
    int context_shifts;
    int limit;
    const char *cache_saved;
    const char *request_role; /* what the model read as the latest request */
    const char *request;
} run_report;

static void record_last_run(sim_handle *h, const run_job *job,
                            const char *newtext, const char *reply,
                            const run_report *rep)
{
    /* called with h->mu held */
    const sim_sampling *s = job->has_sampling ? &job->sampling : &h->sampling;
    strbuf b;
    sb_init(&b);
    sb_puts(&b, "{\"role\": ");
    sb_json_str(&b, job->role);
    sb_printf(&b, ", \"input_type\": \"%s\"",
              job->input_type == RKLLM_INPUT_TOKEN ? "token" : "prompt");
    sb_printf(&b, ", \"keep_history\": %d", job->keep_history);
    sb_printf(&b, ", \"enable_thinking\": %s", job->enable_thinking ? "true" : "false");
    sb_printf(&b, ", \"max_new_tokens\": %d", rep->limit);
    sb_puts(&b, ", \"prompt\": ");
    sb_json_str(&b, newtext);
    sb_printf(&b, ", \"seq_tokens\": %zu, \"reused_tokens\": %zu", rep->seq_tokens,
              rep->reused);
    sb_printf(&b, ", \"prefill_tokens\": %zu, \"generated_tokens\": %zu",
              rep->prefilled, rep->generated);
    sb_printf(&b, ", \"sampling_source\": \"%s\"", job->has_sampling ? "run" : "init");
    sb_printf(&b, ", \"temperature\": %.6g, \"top_k\": %d, \"top_p\": %.6g",
              (double)s->temperature, (int)s->top_k, (double)s->top_p);
    sb_printf(&b, ", \"repeat_penalty\": %.6g, \"frequency_penalty\": %.6g"
                  ", \"presence_penalty\": %.6g",
              (double)s->repeat_penalty, (double)s->frequency_penalty,
              (double)s->presence_penalty);
    sb_printf(&b, ", \"aborted\": %s, \"status\": \"%s\"",
              rep->aborted ? "true" : "false", rep->status);
    sb_puts(&b, ", \"system\": ");
    sb_json_str(&b, current_system(h));
    sb_puts(&b, ", \"tools\": ");
    sb_json_str(&b, h->sys_mode == SYS_TOOLS ? h->tools_json : NULL);
    sb_puts(&b, ", \"reply\": ");
    sb_json_str(&b, reply);
    sb_printf(&b, ", \"context_shifts\": %d, \"kv_tokens\": %zu", rep->context_shifts,
              h->kv.n);
    sb_puts(&b, ", \"prompt_cache_saved\": ");
    sb_json_str(&b, rep->cache_saved);
    sb_puts(&b, ", \"request_role\": ");
    sb_json_str(&b, rep->request_role);
    sb_puts(&b, ", \"request\": ");
    sb_json_str(&b, rep->request);
    sb_puts(&b, "}");
    free(h->last_run_json);
    h->last_run_json = sb_take(&b);
    sim_trace("run", "%p %s", (void *)h, h->last_run_json);
}

/* hang_at_token: a wedged driver. Ignores rkllm_abort; a signal still ends it. */
static void hang_forever(long at)
{
    fprintf(stderr, "W rkllm: simulated hang after %ld generated tokens\n", at);
    for (;;)
        pause();
}

static int log_level(void)
{
    const char *v = getenv("RKLLM_LOG_LEVEL");
    return v ? atoi(v) : 0;
}

/* Runs one job on the calling thread; h->running is already set. */
static int run_core(sim_handle *h, run_job *job)
{
    const sim_model *m = &h->model;
    tokvec seq, old_kv, ctx, turn_end;
    strbuf newtext, reply_out;
    run_report rep = {0};
    int rc = 0;
    tv_init(&seq);
    tv_init(&old_kv);
    tv_init(&ctx);
    tv_init(&turn_end);
    sb_init(&newtext);
    sb_init(&reply_out);
    count(C_RUN, 1);

    /* ---- build the sequence (template state is read under the lock) ---- */
    pthread_mutex_lock(&h->mu);
    tv_assign(&old_kv, &h->kv);
    size_t sys_len_seq;
    if (h->kv.n == 0) {
        if (job->input_type == RKLLM_INPUT_PROMPT)
            build_system_block(h, &newtext);
        sim_tokenize_ids(sb_cstr(&newtext), &seq);
        sys_len_seq = seq.n;
    } else {
        tv_assign(&seq, &h->kv);
        sys_len_seq = h->system_len;
    }
    if (job->input_type == RKLLM_INPUT_PROMPT) {
        strbuf turn;
        sb_init(&turn);
        int custom = 0;
        if (strcmp(job->role, "tool") == 0) {
            const char *tag = h->tool_tag ? h->tool_tag : DEFAULT_TOOL_TAG;
            sb_printf(&turn, "<|im_start|>user\n<%s>\n%s\n</%s>", tag, job->prompt,
                      tag);
            sb_puts(&turn, TURN_END "<|im_start|>assistant\n");
        } else {
            sb_puts(&turn, h->user_prefix ? h->user_prefix : "<|im_start|>user\n");
            sb_puts(&turn, job->prompt);
            sb_puts(&turn, h->user_postfix ? h->user_postfix
                                           : TURN_END "<|im_start|>assistant\n");
            custom = h->user_postfix != NULL;
        }
        if (!job->enable_thinking && !custom)
            sb_puts(&turn, THINK_OFF);
        sim_tokenize_ids(sb_cstr(&turn), &seq);
        sb_puts(&newtext, sb_cstr(&turn));
        sb_free(&turn);
    } else {
        tv_append(&seq, job->tokens.v, job->tokens.n);
    }
    size_t reuse = tv_lcp(&seq, &h->kv);
    size_t reuse_cache = m->ignore_cache_with_history && job->keep_history
                             ? 0
                             : tv_lcp(&seq, &h->loaded_cache);
    if (reuse_cache > reuse)
        reuse = reuse_cache;
    if (reuse >= seq.n) /* the last token is always computed */
        reuse = seq.n ? seq.n - 1 : 0;
    int limit = h->max_new_tokens > 0 ? h->max_new_tokens : 0;
    if (job->max_new_tokens > 0)
        limit = job->max_new_tokens;
    int max_ctx = h->max_context_len;
    int n_keep = h->n_keep;
    char *tool_tag = sim_xstrdup(h->tool_tag ? h->tool_tag : DEFAULT_TOOL_TAG);
    pthread_mutex_unlock(&h->mu);

    /* The model acts on the latest request of the conversation it reads (the
       whole context), not on the text of this run alone. */
    char *request_role = NULL, *request = NULL;
    if (job->input_type == RKLLM_INPUT_PROMPT) {
        strbuf context;
        sb_init(&context);
        sim_detokenize(&seq, &context);
        if (sim_read_request(sb_cstr(&context), tool_tag, &request_role, &request) != 0) {
            request_role = sim_xstrdup(job->role); /* not ChatML: the run's own text */
            request = sim_xstrdup(job->prompt);
        }
        sb_free(&context);
    } else {
        request_role = sim_xstrdup(job->role);
        request = sim_xstrdup("");
    }
    free(tool_tag);
    char *reply = sim_model_reply(m, request_role, request, job->enable_thinking);
    rep.request_role = request_role;
    rep.request = request;
    rep.seq_tokens = seq.n;
    rep.reused = reuse;
    rep.limit = limit;
    rep.status = "finished";
    RKLLMResult result;
    memset(&result, 0, sizeof(result));

    if (seq.n + 1 > (size_t)max_ctx) {
        fprintf(stderr,
                "E RKLLM: the input (%zu tokens) does not fit max_context_len %d\n",
                seq.n, max_ctx);
        rep.status = "context_overflow";
        rc = -1;
        goto fail;
    }

    /* ---- prefill ---- */
    size_t to_compute = seq.n - reuse;
    double t_prefill = sim_now_ms();
    if (m->prefill_ms_per_token > 0 && m->abort_after_prefill) {
        /* the strict case (R #400): an abort is noticed only after the prefill */
        sleep_until(h, t_prefill + (double)to_compute * m->prefill_ms_per_token);
        rep.prefilled = to_compute;
    } else if (m->prefill_ms_per_token > 0) {
        for (size_t i = 0; i < to_compute; i++) {
            if (wait_until(h, t_prefill + (double)(i + 1) * m->prefill_ms_per_token)) {
                rep.aborted = 1;
                break;
            }
            rep.prefilled = i + 1;
        }
    } else if (!m->abort_after_prefill && wait_until(h, 0)) {
        rep.aborted = 1;
    } else {
        rep.prefilled = to_compute;
    }
    double prefill_ms = sim_now_ms() - t_prefill;
    count(C_PREFILL, (long long)rep.prefilled);
    int prefill_done = !rep.aborted;

    if (prefill_done && job->save_cache && m->no_prompt_cache_save) {
        /* R #517: some models cannot save a prompt cache; the run goes on */
        fputs("W rkllm: Current model does not support saving prompt cache\n", stderr);
    } else if (prefill_done && job->save_cache) {
        if (sim_cache_write(job->cache_path, &seq, m->cache_bytes_per_token) != 0) {
            rep.status = "cache_write_error";
            rc = -1;
            goto fail;
        }
        count(C_CACHE_SAVE, 1);
        rep.cache_saved = job->cache_path;
    }

    /* ---- decode ---- */
    piecevec pieces = {0};
    sim_tokenize(reply, strlen(reply), &pieces);
    tv_assign(&ctx, &seq);
    double t_decode = sim_now_ms();
    int stop = rep.aborted;
    if (!stop && m->emit_null_result == 1 &&
        emit(h, job, NULL, RKLLM_RUN_NORMAL) == 1) {
        rep.status = "paused";
        stop = 1;
    }
    if (!stop && m->emit_null_text) {
        result.text = NULL;
        result.token_id = 0;
        if (emit(h, job, &result, RKLLM_RUN_NORMAL) == 1) {
            rep.status = "paused";
            stop = 1;
        }
    }
    for (size_t i = 0; i < pieces.n && !stop; i++) {
        if (limit > 0 && rep.generated >= (size_t)limit) {
            rep.status = "max_new_tokens";
            break;
        }
        if (m->error_at_token >= 0 && rep.generated == (size_t)m->error_at_token) {
            fprintf(stderr, "E RKLLM: simulated decode error at token %ld\n",
                    m->error_at_token);
            rep.status = "error";
            rc = -1;
            break;
        }
        if (m->abort_at_token >= 0 && rep.generated == (size_t)m->abort_at_token) {
            /* like a failed ggml assertion (rknn-llm #129): no callback, the
               process ends with SIGABRT */
            fprintf(stderr,
                    "E rkllm: sim_decode.c:%ld: GGML_ASSERT(n_past < n_ctx_slot) "
                    "failed\n",
                    m->abort_at_token);
            abort();
        }
        if (m->hang_at_token >= 0 && rep.generated == (size_t)m->hang_at_token)
            hang_forever(m->hang_at_token);
        if (ctx.n + 1 > (size_t)max_ctx) {
            size_t keep = sys_len_seq;
            if (n_keep > 0 && (size_t)n_keep > keep)
                keep = (size_t)n_keep;
            size_t discard = ctx.n > keep ? (ctx.n - keep) / 2 : 0;
            if (!m->context_shift || discard == 0) {
                rep.status = "context_full";
                break;
            }
            tv_erase(&ctx, keep, keep + discard);
            rep.context_shifts++;
        }
        double deadline = m->decode_ms_per_token > 0
                              ? t_decode + (double)i * m->decode_ms_per_token
                              : 0;
        if (wait_until(h, deadline)) {
            rep.aborted = 1;
            break;
        }
        const tok_piece *pc = &pieces.v[i];
        char text[160];
        size_t len = pc->len < sizeof(text) - 1 ? pc->len : sizeof(text) - 1;
        memcpy(text, reply + pc->off, len);
        text[len] = '\0';
        result.token_id = pc->id;
        int ret = 0;
        if (len >= 2 && (unsigned char)text[0] >= 0x80) {
            /* a multi-byte character: WAITING with its first bytes, then
               NORMAL with the whole character (what upstream's clients assume) */
            size_t first = len / 2;
            char head[8];
            memcpy(head, text, first);
            head[first] = '\0';
            result.text = head;
            ret = emit(h, job, &result, RKLLM_RUN_WAITING);
            if (ret != 1) {
                result.text = text;
                ret = emit(h, job, &result, RKLLM_RUN_NORMAL);
            }
        } else {
            result.text = text;
            ret = emit(h, job, &result, RKLLM_RUN_NORMAL);
        }
        result.text = NULL;
        tv_push(&ctx, pc->id);
        sb_putn(&reply_out, text, len);
        rep.generated++;
        if (ret == 1) {
            rep.status = "paused";
            stop = 1;
        }
    }
    pv_free(&pieces);
    double decode_ms = sim_now_ms() - t_decode;
    if (rc != 0)
        goto fail;
    if (rep.aborted)
        rep.status = "aborted";

    /* ---- commit the KV, then FINISH ---- */
    pthread_mutex_lock(&h->mu);
    if (job->keep_history) {
        if (prefill_done) {
            sim_tokenize_ids(TURN_END, &turn_end);
            tv_append(&ctx, turn_end.v, turn_end.n);
            tv_truncate(&ctx, (size_t)max_ctx);
            tv_assign(&h->kv, &ctx);
            h->system_len = sys_len_seq < ctx.n ? sys_len_seq : ctx.n;
        }
    } else {
        tv_clear(&h->kv);
        h->system_len = 0;
    }
    record_last_run(h, job, sb_cstr(&newtext), sb_cstr(&reply_out), &rep);
    pthread_mutex_unlock(&h->mu);

    memset(&result, 0, sizeof(result));
    result.token_id = -1;
    result.perf.prefill_time_ms = (float)prefill_ms;
    result.perf.prefill_tokens = (int32_t)rep.prefilled;
    result.perf.generate_time_ms = (float)decode_ms;
    result.perf.generate_tokens = (int32_t)rep.generated;
    result.perf.memory_usage_mb = (float)m->memory_usage_mb;
    if (log_level() >= 1)
        fprintf(stderr,
                "I rkllm: prefill %d tokens in %.2f ms, generate %d tokens in %.2f ms, "
                "memory %.2f MB\n",
                result.perf.prefill_tokens, (double)result.perf.prefill_time_ms,
                result.perf.generate_tokens, (double)result.perf.generate_time_ms,
                (double)result.perf.memory_usage_mb);
    emit(h, job, m->emit_null_result == 2 ? NULL : &result, RKLLM_RUN_FINISH);
    goto out;

fail:
    /* the KV stays as it was before the run */
    pthread_mutex_lock(&h->mu);
    tv_assign(&h->kv, &old_kv);
    record_last_run(h, job, sb_cstr(&newtext), sb_cstr(&reply_out), &rep);
    pthread_mutex_unlock(&h->mu);
    memset(&result, 0, sizeof(result));
    result.token_id = -1;
    emit(h, job, &result, RKLLM_RUN_ERROR);

out:
    free(reply);
    free(request_role);
    free(request);
    tv_free(&seq);
    tv_free(&old_kv);
    tv_free(&ctx);
    tv_free(&turn_end);
    sb_free(&newtext);
    sb_free(&reply_out);
    return rc;
}

static int begin_run(sim_handle *h)
{
    pthread_mutex_lock(&h->mu);
    for (;;) {
        if (h->running || h->destroying) {
            pthread_mutex_unlock(&h->mu);
            return -1;
        }
        if (!h->async_joinable)
            break;
        /* reap the finished async thread of an earlier run */
        pthread_t t = h->async_thread;
        h->async_joinable = 0;
        pthread_mutex_unlock(&h->mu);
        pthread_join(t, NULL);
        pthread_mutex_lock(&h->mu);
    }
    h->running = 1;
    h->abort_flag = 0;
    h->run_thread = pthread_self();
    pthread_mutex_unlock(&h->mu);
    return 0;
}

static void end_run(sim_handle *h)
{
    pthread_mutex_lock(&h->mu);
    h->running = 0;
    h->abort_flag = 0;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

static void *async_main(void *arg)
{
    run_job *job = arg;
    sim_handle *h = job->h;
    run_core(h, job);
    job_free(job);
    free(job);
    end_run(h); /* h must not be touched after this */
    return NULL;
}

/* ---- exported API ------------------------------------------------------- */

RKLLMParam rkllm_createDefaultParam(void)
{
    RKLLMParam p;
    memset(&p, 0, sizeof(p));
    p.model_path = NULL;
    p.max_context_len = 512;
    p.max_new_tokens = 512;
    p.top_k = 40;
    p.n_keep = 0;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.is_async = false;
    p.extend_param.base_domain_id = 0;
    p.extend_param.embed_flash = 0;
#ifdef RKLLM_SIM_ODD_DEFAULTS
    p.extend_param.enabled_cpus_num = 8; /* defaults nobody documented */
#else
    p.extend_param.enabled_cpus_num = 4;
#endif
    p.extend_param.enabled_cpus_mask = 0;
    p.extend_param.n_batch = 1;
    p.extend_param.use_cross_attn = 0;
    return p;
}

#if RKLLM_SIM_ABI >= 13
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    if (!handle || !param) {
        fputs("E RKLLM: rkllm_init needs a handle pointer and params\n", stderr);
        return -1;
    }
    *handle = NULL;
    fprintf(stderr,
            "I rkllm: rkllm-runtime version: %s, rknpu driver version: simulated, "
            "platform: SIM\n",
            SIM_VERSION);
    if (!param->model_path) {
        fputs("E RKLLM: model_path is NULL\n", stderr);
        return -1;
    }
    sim_model model;
    if (sim_model_load(param->model_path, &model) != 0)
        return -1;
    fprintf(stderr,
            "I rkllm: rkllm-toolkit version: simulated, max_context_limit: %d, "
            "npu_core_num: 1, target_platform: SIM, model_dtype: SIM\n",
            model.max_context_limit);
    sim_sleep_ms(model.init_ms);
    if (model.crash_in_init) {
        /* runtime 1.3.0 segfaults here when NPU memory is exhausted (rknn-llm #522) */
        raise(SIGSEGV);
    }
    if (model.init_error) {
        fputs("E RKLLM: simulated init failure (init_error 1 in the model file)\n",
              stderr);
        sim_model_free(&model);
        return -1;
    }
    if (param->max_context_len > model.max_context_limit) {
        fprintf(stderr,
                "E RKLLM: max_context_len must be less than the model's "
                "max_context_limit (%d > %d)\n",
                param->max_context_len, model.max_context_limit);
        sim_model_free(&model);
        return -1;
    }

    sim_handle *h = sim_xmalloc(sizeof(*h));
    memset(h, 0, sizeof(*h));
    h->magic = SIM_MAGIC;
    pthread_mutex_init(&h->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->cv, &ca);
    pthread_condattr_destroy(&ca);
    h->model = model;
    h->model_path = sim_xstrdup(param->model_path);
    h->max_context_len =
        param->max_context_len > 0 ? param->max_context_len : model.max_context_limit;
    h->max_new_tokens = param->max_new_tokens;
    h->n_keep = param->n_keep;
    h->n_batch = param->extend_param.n_batch > 0 ? param->extend_param.n_batch : 1;
    h->sampling.top_k = param->top_k;
    h->sampling.top_p = param->top_p;
    h->sampling.temperature = param->temperature;
    h->sampling.repeat_penalty = param->repeat_penalty;
    h->sampling.frequency_penalty = param->frequency_penalty;
    h->sampling.presence_penalty = param->presence_penalty;
    h->sampling.mirostat = param->mirostat;
    h->sampling.mirostat_tau = param->mirostat_tau;
    h->sampling.mirostat_eta = param->mirostat_eta;
#if RKLLM_SIM_ABI >= 13
    if (callback)
        h->cb = *callback;
#else
    h->cb = callback;
#endif
    h->sys_mode = SYS_DEFAULT;
    tv_init(&h->kv);
    tv_init(&h->loaded_cache);
    registry_add(h);
    count(C_INIT, 1);
    *handle = h;
    return 0;
}

int rkllm_destroy(LLMHandle handle)
{
    sim_handle *h = lookup(handle);
    if (!h || !registry_remove(h))
        return -1;
    pthread_mutex_lock(&h->mu);
    if (h->running && pthread_equal(h->run_thread, pthread_self())) {
        pthread_mutex_unlock(&h->mu);
        registry_add(h);
        fputs("E RKLLM: rkllm_destroy called from inside a callback of the same "
              "handle\n",
              stderr);
        return -1;
    }
    h->destroying = 1;
    if (h->running) {
        h->abort_flag = 1;
        pthread_cond_broadcast(&h->cv);
        while (h->running)
            pthread_cond_wait(&h->cv, &h->mu);
    }
    int joinable = h->async_joinable;
    pthread_t t = h->async_thread;
    h->async_joinable = 0;
    pthread_mutex_unlock(&h->mu);
    if (joinable)
        pthread_join(t, NULL);
    handle_free(h);
    count(C_DESTROY, 1);
    return 0;
}

int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter)
{
    (void)lora_adapter;
    return lookup(handle) ? 0 : -1;
}

int rkllm_set_cross_attn_params(LLMHandle handle,
                                RKLLMCrossAttnParam *cross_attn_params)
{
    (void)cross_attn_params;
    return lookup(handle) ? 0 : -1;
}

int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    if (!prompt_cache_path) {
        fputs("E RKLLM: prompt cache path is NULL\n", stderr);
        return -1;
    }
    tokvec tokens;
    tv_init(&tokens);
    if (sim_cache_read(prompt_cache_path, &tokens) != 0)
        return -1;
    int rc = 0;
    pthread_mutex_lock(&h->mu);
    if (h->running) {
        fputs("E RKLLM: cannot load a prompt cache while running\n", stderr);
        rc = -1;
    } else if (tokens.n >= (size_t)h->max_context_len) {
        fprintf(stderr,
                "E RKLLM: prompt cache %s holds %zu tokens, more than "
                "max_context_len %d allows\n",
                prompt_cache_path, tokens.n, h->max_context_len);
        rc = -1;
    } else {
        tv_free(&h->loaded_cache);
        h->loaded_cache = tokens;
        tv_init(&tokens);
    }
    pthread_mutex_unlock(&h->mu);
    tv_free(&tokens);
    if (rc == 0)
        count(C_CACHE_LOAD, 1);
    return rc;
}

int rkllm_release_prompt_cache(LLMHandle handle)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    int rc = 0;
    pthread_mutex_lock(&h->mu);
    if (h->running)
        rc = -1;
    else
        tv_free(&h->loaded_cache);
    pthread_mutex_unlock(&h->mu);
    if (rc == 0)
        count(C_CACHE_RELEASE, 1);
    return rc;
}

int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input,
              RKLLMInferParam *rkllm_infer_params, void *userdata)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    run_job job;
    if (job_prepare(h, rkllm_input, rkllm_infer_params, userdata, &job) != 0) {
        job_free(&job);
        return -1;
    }
    if (begin_run(h) != 0) {
        fputs("E RKLLM: the handle is busy with another run\n", stderr);
        job_free(&job);
        return -1;
    }
    int rc = run_core(h, &job);
    job_free(&job);
    end_run(h);
    return rc;
}

int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input,
                    RKLLMInferParam *rkllm_infer_params, void *userdata)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    run_job *job = sim_xmalloc(sizeof(*job));
    if (job_prepare(h, rkllm_input, rkllm_infer_params, userdata, job) != 0) {
        job_free(job);
        free(job);
        return -1;
    }
    if (begin_run(h) != 0) {
        fputs("E RKLLM: the handle is busy with another run\n", stderr);
        job_free(job);
        free(job);
        return -1;
    }
    pthread_mutex_lock(&h->mu);
    pthread_t t;
    /* created under the lock so the thread cannot finish before it is recorded */
    int err = pthread_create(&t, NULL, async_main, job);
    if (err == 0) {
        h->async_thread = t;
        h->async_joinable = 1;
        h->run_thread = t;
    } else {
        h->running = 0;
        pthread_cond_broadcast(&h->cv);
    }
    pthread_mutex_unlock(&h->mu);
    if (err != 0) {
        fprintf(stderr, "E RKLLM: cannot start a thread: %s\n", strerror(err));
        job_free(job);
        free(job);
        return -1;
    }
    return 0;
}

#ifndef RKLLM_SIM_OMIT_ABORT
int rkllm_abort(LLMHandle handle)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    pthread_mutex_lock(&h->mu);
    if (h->running) {
        h->abort_flag = 1;
        pthread_cond_broadcast(&h->cv);
        /* strict model: the call returns only once the run has stopped */
        if (h->model.abort_after_prefill &&
            !pthread_equal(h->run_thread, pthread_self()))
            while (h->running && h->abort_flag)
                pthread_cond_wait(&h->cv, &h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    count(C_ABORT, 1);
    return 0;
}
#endif

int rkllm_is_running(LLMHandle handle)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    pthread_mutex_lock(&h->mu);
    int running = h->running;
    pthread_mutex_unlock(&h->mu);
#if RKLLM_SIM_ABI >= 13
    return running ? 1 : 0;
#else
    return running ? 0 : -1;
#endif
}

int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos,
                         int *end_pos)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    if ((start_pos == NULL) != (end_pos == NULL)) {
        fputs("E RKLLM: clear_kv_cache needs both start_pos and end_pos, or neither\n",
              stderr);
        return -1;
    }
    int rc = 0;
    pthread_mutex_lock(&h->mu);
    if (h->running) {
        rc = -1;
    } else if (start_pos) {
        int s = start_pos[0], e = end_pos[0];
        if (s < 0 || e < s) {
            rc = -1;
        } else {
            tv_erase(&h->kv, (size_t)s, (size_t)e);
            if ((size_t)s < h->system_len)
                h->system_len = (size_t)s;
        }
    } else if (keep_system_prompt) {
        tv_truncate(&h->kv, h->system_len);
    } else {
        tv_clear(&h->kv);
        h->system_len = 0;
    }
    if (h->kv.n == 0)
        h->system_len = 0;
    pthread_mutex_unlock(&h->mu);
    if (rc == 0)
        count(C_CLEAR_KV, 1);
    return rc;
}

int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes)
{
    sim_handle *h = lookup(handle);
    if (!h || !cache_sizes || h->model.kv_cache_size_error)
        return -1;
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n_batch; i++)
        cache_sizes[i] = (int)h->kv.n;
    pthread_mutex_unlock(&h->mu);
    return 0;
}

static void replace_str(char **slot, const char *value)
{
    free(*slot);
    *slot = sim_xstrdup(value);
}

int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt,
                            const char *prompt_prefix, const char *prompt_postfix)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    pthread_mutex_lock(&h->mu);
    if (h->running) {
        pthread_mutex_unlock(&h->mu);
        return -1;
    }
    if (system_prompt) {
        h->sys_mode = SYS_RAW;
        replace_str(&h->system_raw, system_prompt);
        replace_str(&h->tools_json, NULL);
    }
    if (prompt_prefix)
        replace_str(&h->user_prefix, prompt_prefix);
    if (prompt_postfix)
        replace_str(&h->user_postfix, prompt_postfix);
    tv_clear(&h->kv);
    h->system_len = 0;
    pthread_mutex_unlock(&h->mu);
    count(C_SET_TEMPLATE, 1);
    return 0;
}

int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt,
                             const char *tools, const char *tool_response_str)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    pthread_mutex_lock(&h->mu);
    if (h->running) {
        pthread_mutex_unlock(&h->mu);
        return -1;
    }
    h->sys_mode = SYS_TOOLS;
    replace_str(&h->system_text, system_prompt);
    replace_str(&h->tools_json, tools);
    replace_str(&h->tool_tag, tool_response_str);
    if (!h->model.tools_keep_kv) {
        tv_clear(&h->kv);
        h->system_len = 0;
    }
    pthread_mutex_unlock(&h->mu);
    count(C_SET_TOOLS, 1);
    return 0;
}

/* ---- debug exports (simulator only) -------------------------------------- */

long long rkllm_sim_counter(const char *name)
{
    if (!name)
        return -1;
    if (strcmp(name, "live_handles") == 0) {
        pthread_mutex_lock(&g_registry_mu);
        long long n = g_live_handles;
        pthread_mutex_unlock(&g_registry_mu);
        return n;
    }
    for (int i = 0; i < C_COUNT; i++)
        if (strcmp(name, counter_names[i]) == 0)
            return __atomic_load_n(&counters[i], __ATOMIC_RELAXED);
    return -1;
}

void rkllm_sim_reset_counters(void)
{
    for (int i = 0; i < C_COUNT; i++)
        __atomic_store_n(&counters[i], 0, __ATOMIC_RELAXED);
}

int rkllm_sim_last_run(LLMHandle handle, char *buf, int len)
{
    sim_handle *h = lookup(handle);
    if (!h)
        return -1;
    pthread_mutex_lock(&h->mu);
    const char *json = h->last_run_json ? h->last_run_json : "{}";
    size_t need = strlen(json);
    if (buf && len > 0) {
        size_t n = need < (size_t)len - 1 ? need : (size_t)len - 1;
        memcpy(buf, json, n);
        buf[n] = '\0';
    }
    pthread_mutex_unlock(&h->mu);
    return (int)need;
}

int rkllm_sim_count_tokens(const char *text)
{
    return text ? (int)sim_count_tokens(text) : -1;
}
