"""Token generation for causal language models (the compute layer; no protobuf here).

* ``config``: a Hugging Face ``config.json`` -> ``LlamaConfig`` | ``GPT2Config``.
* ``llama``, ``gpt2`` (on ``modeling``): our PyTorch implementations, loaded by ``weights``
  from ``*.safetensors``.
* ``kv_cache``: the pool of key/value rows that lets sequences of different lengths decode
  in one forward pass and join or leave between steps.
* ``causal_lm``: ``CausalLM``: ``prefill`` one sequence, ``decode`` many.
* ``tokenizer``: ``tokenizer.json``, end-of-sequence ids, a streaming detokenizer.
* ``sampling``, ``stopping``, ``generate``: token choice, stop sequences, one request's
  output and the single-sequence reference loop.
"""
