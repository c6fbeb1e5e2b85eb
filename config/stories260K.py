# llama2.c's stories260K: its shape, 512-token vocabulary, and the recipe of its doc/stories260K.md
# (about 10 minutes on an A100). On this 2-core CPU an iteration of 128 x 512 tokens takes seconds: try
# python train.py config/stories260K.py --batch_size=16 --max_iters=5000 --eval_interval=500 --eval_iters=10
# and on a GPU add --device=cuda --dtype=bfloat16 --compile=True.
out_dir = "out260K"
vocab_source = "custom"
vocab_size = 512
dim = 64
n_layers = 5
n_heads = 8
n_kv_heads = 4
multiple_of = 4
max_seq_len = 512
dropout = 0.05
batch_size = 128
gradient_accumulation_steps = 1
learning_rate = 1e-3
weight_decay = 0.01
beta2 = 0.99
max_iters = 100000
warmup_iters = 1000
eval_interval = 2000
eval_iters = 100
