/*
 * layout_probe.c - print sizeof/offsetof of every struct of one ABI family
 * as a single JSON object, for comparison with the ctypes declarations.
 *
 *   cc -DRKLLM_SIM_ABI=12 -o probe layout_probe.c && ./probe
 *
 * Output: {"RKLLMParam": {"size": 208, "fields": {"model_path": 0, ...}}, ...}
 */
#include <stdio.h>

#include "rkllm_abi.h"

static int first_struct = 1;
static int first_field = 1;

static void begin(const char *name, size_t size)
{
    printf("%s\"%s\": {\"size\": %zu, \"fields\": {", first_struct ? "" : ", ",
           name, size);
    first_struct = 0;
    first_field = 1;
}

static void field(const char *name, size_t offset)
{
    printf("%s\"%s\": %zu", first_field ? "" : ", ", name, offset);
    first_field = 0;
}

static void end(void)
{
    printf("}}");
}

#define BEGIN(T) begin(#T, sizeof(T))
#define F(T, f) field(#f, offsetof(T, f))
#define END() end()

int main(void)
{
    printf("{");

    BEGIN(RKLLMExtendParam);
    F(RKLLMExtendParam, base_domain_id);
    F(RKLLMExtendParam, embed_flash);
    F(RKLLMExtendParam, enabled_cpus_num);
    F(RKLLMExtendParam, enabled_cpus_mask);
    F(RKLLMExtendParam, n_batch);
    F(RKLLMExtendParam, use_cross_attn);
    F(RKLLMExtendParam, reserved);
    END();

    BEGIN(RKLLMParam);
    F(RKLLMParam, model_path);
    F(RKLLMParam, max_context_len);
    F(RKLLMParam, max_new_tokens);
    F(RKLLMParam, top_k);
    F(RKLLMParam, n_keep);
    F(RKLLMParam, top_p);
    F(RKLLMParam, temperature);
    F(RKLLMParam, repeat_penalty);
    F(RKLLMParam, frequency_penalty);
    F(RKLLMParam, presence_penalty);
    F(RKLLMParam, mirostat);
    F(RKLLMParam, mirostat_tau);
    F(RKLLMParam, mirostat_eta);
    F(RKLLMParam, skip_special_token);
#if RKLLM_SIM_ABI >= 13
    F(RKLLMParam, ignore_eos_token);
#endif
    F(RKLLMParam, is_async);
#if RKLLM_SIM_ABI == 12
    F(RKLLMParam, img_start);
    F(RKLLMParam, img_end);
    F(RKLLMParam, img_content);
#endif
    F(RKLLMParam, extend_param);
    END();

    BEGIN(RKLLMLoraAdapter);
    F(RKLLMLoraAdapter, lora_adapter_path);
    F(RKLLMLoraAdapter, lora_adapter_name);
    F(RKLLMLoraAdapter, scale);
    END();

    BEGIN(RKLLMEmbedInput);
    F(RKLLMEmbedInput, embed);
    F(RKLLMEmbedInput, n_tokens);
    END();

    BEGIN(RKLLMTokenInput);
    F(RKLLMTokenInput, input_ids);
    F(RKLLMTokenInput, n_tokens);
    END();

#if RKLLM_SIM_ABI == 12
    BEGIN(RKLLMMultiModalInput);
    F(RKLLMMultiModalInput, prompt);
    F(RKLLMMultiModalInput, image_embed);
    F(RKLLMMultiModalInput, n_image_tokens);
    F(RKLLMMultiModalInput, n_image);
    F(RKLLMMultiModalInput, image_width);
    F(RKLLMMultiModalInput, image_height);
    END();
#else
    BEGIN(RKLLMImageInput);
    F(RKLLMImageInput, image_embed);
    F(RKLLMImageInput, n_image_tokens);
    F(RKLLMImageInput, n_image);
    F(RKLLMImageInput, image_start);
    F(RKLLMImageInput, image_end);
    F(RKLLMImageInput, image_content);
    F(RKLLMImageInput, image_width);
    F(RKLLMImageInput, image_height);
    END();

    BEGIN(RKLLMVideoInput);
    F(RKLLMVideoInput, video_embed);
    F(RKLLMVideoInput, n_frame_tokens);
    F(RKLLMVideoInput, n_frame_per_video);
    F(RKLLMVideoInput, n_video);
    F(RKLLMVideoInput, video_start);
    F(RKLLMVideoInput, video_end);
    F(RKLLMVideoInput, video_content);
    F(RKLLMVideoInput, frame_width);
    F(RKLLMVideoInput, frame_height);
    END();

    BEGIN(RKLLMMultiModalInput);
    F(RKLLMMultiModalInput, prompt);
    F(RKLLMMultiModalInput, image);
    F(RKLLMMultiModalInput, video);
    END();
#endif

    BEGIN(RKLLMInput);
    F(RKLLMInput, role);
    F(RKLLMInput, enable_thinking);
    F(RKLLMInput, input_type);
    F(RKLLMInput, prompt_input);
    F(RKLLMInput, embed_input);
    F(RKLLMInput, token_input);
    F(RKLLMInput, multimodal_input);
    END();

    BEGIN(RKLLMLoraParam);
    F(RKLLMLoraParam, lora_adapter_name);
    END();

    BEGIN(RKLLMPromptCacheParam);
    F(RKLLMPromptCacheParam, save_prompt_cache);
    F(RKLLMPromptCacheParam, prompt_cache_path);
    END();

#if RKLLM_SIM_ABI >= 13
    BEGIN(RKLLMSamplingParam);
    F(RKLLMSamplingParam, top_k);
    F(RKLLMSamplingParam, top_p);
    F(RKLLMSamplingParam, temperature);
    F(RKLLMSamplingParam, repeat_penalty);
    F(RKLLMSamplingParam, frequency_penalty);
    F(RKLLMSamplingParam, presence_penalty);
    F(RKLLMSamplingParam, mirostat);
    F(RKLLMSamplingParam, mirostat_tau);
    F(RKLLMSamplingParam, mirostat_eta);
    END();
#endif

    BEGIN(RKLLMInferParam);
    F(RKLLMInferParam, mode);
    F(RKLLMInferParam, lora_params);
    F(RKLLMInferParam, prompt_cache_params);
#if RKLLM_SIM_ABI >= 13
    F(RKLLMInferParam, sampling_params);
#endif
    F(RKLLMInferParam, keep_history);
#if RKLLM_SIM_ABI >= 13
    F(RKLLMInferParam, max_new_tokens);
#endif
    END();

    BEGIN(RKLLMCrossAttnParam);
    F(RKLLMCrossAttnParam, encoder_k_cache);
    F(RKLLMCrossAttnParam, encoder_v_cache);
    F(RKLLMCrossAttnParam, encoder_mask);
    F(RKLLMCrossAttnParam, encoder_pos);
    F(RKLLMCrossAttnParam, num_tokens);
    END();

    BEGIN(RKLLMResultLastHiddenLayer);
    F(RKLLMResultLastHiddenLayer, hidden_states);
    F(RKLLMResultLastHiddenLayer, embd_size);
    F(RKLLMResultLastHiddenLayer, num_tokens);
    END();

    BEGIN(RKLLMResultLogits);
    F(RKLLMResultLogits, logits);
    F(RKLLMResultLogits, vocab_size);
    F(RKLLMResultLogits, num_tokens);
    END();

    BEGIN(RKLLMPerfStat);
    F(RKLLMPerfStat, prefill_time_ms);
    F(RKLLMPerfStat, prefill_tokens);
    F(RKLLMPerfStat, generate_time_ms);
    F(RKLLMPerfStat, generate_tokens);
    F(RKLLMPerfStat, memory_usage_mb);
    END();

    BEGIN(RKLLMResult);
    F(RKLLMResult, text);
    F(RKLLMResult, token_id);
    F(RKLLMResult, last_hidden_layer);
    F(RKLLMResult, logits);
    F(RKLLMResult, perf);
    END();

#if RKLLM_SIM_ABI >= 13
    BEGIN(RKLLMCallback);
    F(RKLLMCallback, result_callback);
    F(RKLLMCallback, result_userdata);
    F(RKLLMCallback, tokenizer_callback);
    F(RKLLMCallback, tokenizer_userdata);
    F(RKLLMCallback, embed_callback);
    F(RKLLMCallback, embed_userdata);
    END();
#endif

    printf("}\n");
    return 0;
}
