/*
 * rkllm_abi.h - C declarations of the RKLLM runtime ABI, written for the
 * rockchip_llm simulator from the facts in shared/docs/rkllm-runtime.md.
 *
 * Two ABI families, chosen at compile time with RKLLM_SIM_ABI:
 *   12  runtime 1.2.1 .. 1.2.3
 *   13  runtime 1.3.0
 *
 * Layouts follow LP64 (aarch64 / x86_64 Linux). Every size and key offset
 * that the doc lists in its section 12 is checked with _Static_assert below.
 */
#ifndef ROCKCHIP_LLM_RKLLM_ABI_H
#define ROCKCHIP_LLM_RKLLM_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef RKLLM_SIM_ABI
#error "define RKLLM_SIM_ABI as 12 (runtime 1.2.1-1.2.3) or 13 (runtime 1.3.0)"
#endif
#if RKLLM_SIM_ABI != 12 && RKLLM_SIM_ABI != 13
#error "RKLLM_SIM_ABI must be 12 or 13"
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define RKLLM_API __attribute__((visibility("default")))

/* CPU selection bits for RKLLMExtendParam.enabled_cpus_mask. */
#define CPU0 0x01u
#define CPU1 0x02u
#define CPU2 0x04u
#define CPU3 0x08u
#define CPU4 0x10u
#define CPU5 0x20u
#define CPU6 0x40u
#define CPU7 0x80u

typedef void *LLMHandle;

/* ---- enums (all int-sized) ------------------------------------------- */

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2,
} RKLLMInferMode;

/* ---- init parameters ------------------------------------------------- */

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if RKLLM_SIM_ABI >= 13
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_SIM_ABI == 12
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

/* ---- inputs ---------------------------------------------------------- */

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if RKLLM_SIM_ABI == 12
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    const char *image_start;
    const char *image_end;
    const char *image_content;
    size_t image_width;
    size_t image_height;
} RKLLMImageInput;

typedef struct {
    float *video_embed;
    size_t n_frame_tokens;
    size_t n_frame_per_video;
    size_t n_video;
    const char *video_start;
    const char *video_end;
    const char *video_content;
    size_t frame_width;
    size_t frame_height;
} RKLLMVideoInput;

typedef struct {
    char *prompt;
    RKLLMImageInput image;
    RKLLMVideoInput video;
} RKLLMMultiModalInput;
#endif

typedef struct {
    const char *role; /* "user" or "tool"; NULL is treated as "user" */
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

/* ---- per-run parameters ---------------------------------------------- */

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int32_t save_prompt_cache; /* 0 or 1 */
    const char *prompt_cache_path; /* NULL: ./prompt_cache.bin */
} RKLLMPromptCacheParam;

#if RKLLM_SIM_ABI >= 13
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
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_SIM_ABI >= 13
    RKLLMSamplingParam *sampling_params;
#endif
    int32_t keep_history;
#if RKLLM_SIM_ABI >= 13
    int32_t max_new_tokens; /* <= 0: use RKLLMParam.max_new_tokens */
#endif
} RKLLMInferParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int32_t num_tokens;
} RKLLMCrossAttnParam;

/* ---- results --------------------------------------------------------- */

typedef struct {
    const float *hidden_states;
    int32_t embd_size;
    int32_t num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int32_t vocab_size;
    int32_t num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int32_t prefill_tokens;
    float generate_time_ms;
    int32_t generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf; /* by value; filled on RKLLM_RUN_FINISH */
} RKLLMResult;

/* ---- callbacks ------------------------------------------------------- */

/* Return 0 to continue, 1 to pause (stop now, keep the KV), 2 as 0. */
typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata,
                                 LLMCallState state);

#if RKLLM_SIM_ABI >= 13
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text,
                                    int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens,
                                   uint64_t num_tokens, void *embed,
                                   uint64_t len);

typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* ---- exported functions ---------------------------------------------- */

RKLLM_API RKLLMParam rkllm_createDefaultParam(void);
#if RKLLM_SIM_ABI >= 13
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param,
                         RKLLMCallback *callback);
#else
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param,
                         LLMResultCallback callback);
#endif
RKLLM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
RKLLM_API int rkllm_load_prompt_cache(LLMHandle handle,
                                      const char *prompt_cache_path);
RKLLM_API int rkllm_release_prompt_cache(LLMHandle handle);
RKLLM_API int rkllm_destroy(LLMHandle handle);
RKLLM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input,
                        RKLLMInferParam *rkllm_infer_params, void *userdata);
RKLLM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input,
                              RKLLMInferParam *rkllm_infer_params,
                              void *userdata);
#ifndef RKLLM_SIM_OMIT_ABORT
RKLLM_API int rkllm_abort(LLMHandle handle);
#endif
RKLLM_API int rkllm_is_running(LLMHandle handle);
RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt,
                                   int *start_pos, int *end_pos);
RKLLM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
RKLLM_API int rkllm_set_chat_template(LLMHandle handle,
                                      const char *system_prompt,
                                      const char *prompt_prefix,
                                      const char *prompt_postfix);
RKLLM_API int rkllm_set_function_tools(LLMHandle handle,
                                       const char *system_prompt,
                                       const char *tools,
                                       const char *tool_response_str);
RKLLM_API int rkllm_set_cross_attn_params(LLMHandle handle,
                                          RKLLMCrossAttnParam *cross_attn_params);

/* ---- simulator-only debug exports (the real runtime has none) -------- */

RKLLM_API long long rkllm_sim_counter(const char *name);
RKLLM_API void rkllm_sim_reset_counters(void);
RKLLM_API int rkllm_sim_last_run(LLMHandle handle, char *buf, int len);
RKLLM_API int rkllm_sim_count_tokens(const char *text);

/* ---- layout checks (doc section 12) ----------------------------------- */

#define RKLLM_SIM_CHECK(cond) _Static_assert(cond, #cond)

RKLLM_SIM_CHECK(sizeof(void *) == 8);
RKLLM_SIM_CHECK(sizeof(LLMCallState) == 4);
RKLLM_SIM_CHECK(sizeof(RKLLMInputType) == 4);
RKLLM_SIM_CHECK(sizeof(RKLLMInferMode) == 4);
RKLLM_SIM_CHECK(sizeof(bool) == 1);

RKLLM_SIM_CHECK(sizeof(RKLLMExtendParam) == 120);
RKLLM_SIM_CHECK(offsetof(RKLLMExtendParam, embed_flash) == 4);
RKLLM_SIM_CHECK(offsetof(RKLLMExtendParam, enabled_cpus_num) == 5);
RKLLM_SIM_CHECK(offsetof(RKLLMExtendParam, enabled_cpus_mask) == 8);
RKLLM_SIM_CHECK(offsetof(RKLLMExtendParam, n_batch) == 12);
RKLLM_SIM_CHECK(offsetof(RKLLMExtendParam, use_cross_attn) == 13);
RKLLM_SIM_CHECK(offsetof(RKLLMExtendParam, reserved) == 14);

RKLLM_SIM_CHECK(offsetof(RKLLMParam, max_context_len) == 8);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, max_new_tokens) == 12);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, top_k) == 16);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, n_keep) == 20);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, top_p) == 24);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, presence_penalty) == 40);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, mirostat) == 44);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, mirostat_tau) == 48);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, mirostat_eta) == 52);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, skip_special_token) == 56);

RKLLM_SIM_CHECK(offsetof(RKLLMInput, role) == 0);
RKLLM_SIM_CHECK(offsetof(RKLLMInput, enable_thinking) == 8);
RKLLM_SIM_CHECK(offsetof(RKLLMInput, input_type) == 12);
RKLLM_SIM_CHECK(offsetof(RKLLMInput, prompt_input) == 16);
RKLLM_SIM_CHECK(offsetof(RKLLMInput, multimodal_input) == 16);

RKLLM_SIM_CHECK(sizeof(RKLLMPromptCacheParam) == 16);
RKLLM_SIM_CHECK(offsetof(RKLLMPromptCacheParam, prompt_cache_path) == 8);

RKLLM_SIM_CHECK(offsetof(RKLLMInferParam, lora_params) == 8);
RKLLM_SIM_CHECK(offsetof(RKLLMInferParam, prompt_cache_params) == 16);

RKLLM_SIM_CHECK(sizeof(RKLLMPerfStat) == 20);
RKLLM_SIM_CHECK(sizeof(RKLLMResult) == 72);
RKLLM_SIM_CHECK(offsetof(RKLLMResult, token_id) == 8);
RKLLM_SIM_CHECK(offsetof(RKLLMResult, last_hidden_layer) == 16);
RKLLM_SIM_CHECK(offsetof(RKLLMResult, logits) == 32);
RKLLM_SIM_CHECK(offsetof(RKLLMResult, perf) == 48);

RKLLM_SIM_CHECK(sizeof(RKLLMCrossAttnParam) == 40);

#if RKLLM_SIM_ABI == 12
RKLLM_SIM_CHECK(sizeof(RKLLMParam) == 208);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, is_async) == 57);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, img_start) == 64);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, img_end) == 72);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, img_content) == 80);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, extend_param) == 88);
RKLLM_SIM_CHECK(sizeof(RKLLMMultiModalInput) == 48);
RKLLM_SIM_CHECK(sizeof(RKLLMInput) == 64);
RKLLM_SIM_CHECK(sizeof(RKLLMInferParam) == 32);
RKLLM_SIM_CHECK(offsetof(RKLLMInferParam, keep_history) == 24);
#else
RKLLM_SIM_CHECK(sizeof(RKLLMParam) == 184);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, ignore_eos_token) == 57);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, is_async) == 58);
RKLLM_SIM_CHECK(offsetof(RKLLMParam, extend_param) == 60);
RKLLM_SIM_CHECK(sizeof(RKLLMImageInput) == 64);
RKLLM_SIM_CHECK(sizeof(RKLLMVideoInput) == 72);
RKLLM_SIM_CHECK(sizeof(RKLLMMultiModalInput) == 144);
RKLLM_SIM_CHECK(offsetof(RKLLMMultiModalInput, image) == 8);
RKLLM_SIM_CHECK(offsetof(RKLLMMultiModalInput, video) == 72);
RKLLM_SIM_CHECK(sizeof(RKLLMInput) == 160);
RKLLM_SIM_CHECK(sizeof(RKLLMSamplingParam) == 36);
RKLLM_SIM_CHECK(sizeof(RKLLMInferParam) == 40);
RKLLM_SIM_CHECK(offsetof(RKLLMInferParam, sampling_params) == 24);
RKLLM_SIM_CHECK(offsetof(RKLLMInferParam, keep_history) == 32);
RKLLM_SIM_CHECK(offsetof(RKLLMInferParam, max_new_tokens) == 36);
RKLLM_SIM_CHECK(sizeof(RKLLMCallback) == 48);
#endif

#ifdef __cplusplus
}
#endif

#endif /* ROCKCHIP_LLM_RKLLM_ABI_H */
