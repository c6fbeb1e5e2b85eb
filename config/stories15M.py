# llama2.c's stories15M shape with the Llama 2 tokenizer (data/tok0: python tinystories.py pretokenize
# --vocab_size=0 --tokenizer=path/to/llama2/tokenizer.model), and llama2.c train.py's default recipe:
# 128 x 256 tokens x 4 accumulation steps = 131K tokens per iteration. Meant for a GPU:
# add --device=cuda --dtype=bfloat16 --compile=True (and torchrun for several).
out_dir = "out15M"
vocab_source = "llama2"
vocab_size = 32000
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
multiple_of = 32
max_seq_len = 256
batch_size = 128
gradient_accumulation_steps = 4
learning_rate = 5e-4
max_iters = 100000
warmup_iters = 1000
eval_interval = 2000
eval_iters = 100
