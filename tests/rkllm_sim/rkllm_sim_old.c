/*
 * rkllm_sim_old.c - a stand-in for an old (1.1.x) runtime library.
 *
 * It only has to load and to look old: it embeds a 1.1.4 version string and
 * exports just the functions a 1.1.x runtime had (no chat template, KV cache
 * or function-tool API). Every call fails; nothing here is meant to run.
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define OLD_API __attribute__((visibility("default")))

__attribute__((used)) static const char sim_old_version_banner[] =
    "rkllm-runtime version: 1.1.4 (rockchip_llm simulator)";

/* The 1.1.x parameter layout (only so the by-value return has a real shape). */
typedef struct {
    int32_t base_domain_id;
    uint8_t reserved[112];
} OldExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
    OldExtendParam extend_param;
} OldParam;

typedef void (*OldCallback)(void *result, void *userdata, int state);

OLD_API OldParam rkllm_createDefaultParam(void);
OLD_API int rkllm_init(void **handle, OldParam *param, OldCallback callback);
OLD_API int rkllm_run(void *handle, void *input, void *infer_params, void *userdata);
OLD_API int rkllm_run_async(void *handle, void *input, void *infer_params,
                            void *userdata);
OLD_API int rkllm_destroy(void *handle);
OLD_API int rkllm_abort(void *handle);
OLD_API int rkllm_is_running(void *handle);
OLD_API int rkllm_load_prompt_cache(void *handle, const char *path);
OLD_API int rkllm_release_prompt_cache(void *handle);

OldParam rkllm_createDefaultParam(void)
{
    OldParam p;
    memset(&p, 0, sizeof(p));
    p.max_context_len = 512;
    p.max_new_tokens = 512;
    p.top_k = 40;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    return p;
}

int rkllm_init(void **handle, OldParam *param, OldCallback callback)
{
    (void)param;
    (void)callback;
    if (handle)
        *handle = NULL;
    return -1;
}

int rkllm_run(void *handle, void *input, void *infer_params, void *userdata)
{
    (void)handle;
    (void)input;
    (void)infer_params;
    (void)userdata;
    return -1;
}

int rkllm_run_async(void *handle, void *input, void *infer_params, void *userdata)
{
    return rkllm_run(handle, input, infer_params, userdata);
}

int rkllm_destroy(void *handle)
{
    (void)handle;
    return -1;
}

int rkllm_abort(void *handle)
{
    (void)handle;
    return -1;
}

int rkllm_is_running(void *handle)
{
    (void)handle;
    return -1;
}

int rkllm_load_prompt_cache(void *handle, const char *path)
{
    (void)handle;
    (void)path;
    return -1;
}

int rkllm_release_prompt_cache(void *handle)
{
    (void)handle;
    return -1;
}
