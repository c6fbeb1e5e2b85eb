# llama2.c's stories110M shape (context 1024) with the Llama 2 tokenizer (data/tok0). Training settings follow
# llama2.c train.py's defaults, with the batch cut to 32 sequences so that 32 x 1024 x 4 keeps its 131K tokens
# per iteration. Meant for GPUs: add --device=cuda --dtype=bfloat16 --compile=True (and torchrun for several;
# gradient_accumulation_steps is the total over all processes).
out_dir = "out110M"
vocab_source = "llama2"
vocab_size = 32000
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 12
multiple_of = 32
max_seq_len = 1024
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 5e-4
max_iters = 100000
warmup_iters = 1000
eval_interval = 2000
eval_iters = 100
