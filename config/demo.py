# make demo's sizes: the whole pipeline on the built-in corpus in under 10 minutes on 2 CPU cores.
# python demo.py config/demo.py [--key=value ...]. The stage times below are of a quiet 2-core CPU; with a GPU,
# add train_args = "--device=cuda --dtype=bfloat16" and raise the iterations (and the corpus) as you like.
num_shards = 10  # 20,000 stories, 7.3M tokens; corpus, vocabulary and shards: about 15 s
stories_per_shard = 2000
vocab_size = 512
# the stories260K shape (train.py's defaults), 8,192 tokens per iteration
pretrain_args = ("--max_iters=300 --batch_size=16 --max_seq_len=512 --learning_rate=5e-3 --warmup_iters=30 "
                 "--eval_interval=100 --eval_iters=8 --log_interval=10")
sft_args = ("--max_iters=100 --batch_size=8 --learning_rate=1e-3 --warmup_iters=10 --eval_interval=50 --eval_iters=8 "
            "--log_interval=10")
# target 350: finished stories of about that length pay best. At 450 (the SFT model's unfinished stories run to
# 450-510 tokens) the +0.5 for finishing and the length term pulled apart, and the reward fell over 10 iterations
ppo_args = ("--max_iters=10 --rollouts=64 --batch_size=16 --max_new_tokens=400 --ppo_epochs=2 --learning_rate=1e-4 "
            "--eval_interval=10 --eval_iters=4 --reward=words+length --target_len=350")
speed_runs = 5
